"""A fake model worker speaking the protocol of ``pollama.runner.protocol``, for
``SubprocessRunner`` tests. No model, no llama.cpp: it starts in milliseconds.

Run as ``python fakeworker.py [--mode MODE] --fd N --spec JSON`` (``SubprocessRunner``
appends ``--fd`` and ``--spec`` to the command it is given).

Load modes (``--mode``): ``ok`` (send ``ready``), ``fatal`` (send ``fatal`` and exit 1, like a
corrupt model), ``die`` (print an error and exit 2 before answering), ``hang`` (never
answer), ``garbage`` (send a line that is not JSON), ``stubborn`` (ready, but ignores
``shutdown``, so ``close()`` must kill it).

A completion's prompt is a script of space-separated words:

* ``echo A B C`` streams ``A``, `` B``, `` C``, then done (``stop``); with ``logprobs`` in
  the request each chunk carries one entry (logprob ``-i``, its word, ``top_logprobs``
  alternatives ``alt0``…), and with stop strings in its options the done message names
  the first as ``stop_sequence``;
* ``badlogprobs`` streams a chunk whose logprobs lack ``logprob``;
* ``slow N`` streams ``tick`` every 20 ms N times, then done (``length``); a ``cancel`` stops
  it early (done with ``done_reason`` "" and ``cancelled <id>`` on stderr);
* ``crash K`` streams K chunks, prints ``error: fake worker crashed`` and exits 3;
* ``kill K`` streams K chunks, then SIGKILLs itself (no last words);
* ``abort`` aborts (SIGABRT);
* ``invalid MSG`` answers an ``error`` of kind ``invalid``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import sys
from typing import Any

MODES = ("ok", "fatal", "die", "hang", "garbage", "stubborn")


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Worker:
    def __init__(self, writer: asyncio.StreamWriter, spec: dict[str, Any], mode: str) -> None:
        self.writer = writer
        self.spec = spec
        self.mode = mode
        self.cancels: dict[int, asyncio.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, message: dict[str, Any]) -> None:
        self.writer.write(_encode(message))

    async def complete(self, rid: int, request: dict[str, Any]) -> None:
        words = str(request.get("prompt") or "").split()
        verb, args = (words[0], words[1:]) if words else ("echo", [])
        cancel = self.cancels.setdefault(rid, asyncio.Event())
        sent = 0
        reason = "stop"

        async def chunk(text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
            nonlocal sent
            message: dict[str, Any] = {"id": rid, "type": "chunk", "text": text}
            if logprobs is not None:
                message["logprobs"] = logprobs
            self.send(message)
            sent += 1
            await self.writer.drain()

        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        stop_sequence = ""
        if verb == "echo":
            stop_sequence = ((request.get("options") or {}).get("stop") or [""])[0]
            for i, word in enumerate(args):
                text = word if i == 0 else " " + word
                logprobs = None
                if request.get("logprobs"):
                    top = [entry(f"alt{j}", -float(j)) for j in range(request["top_logprobs"])]
                    logprobs = [{**entry(text, -float(i)), "top_logprobs": top}]
                await chunk(text, logprobs)
        elif verb == "badlogprobs":
            await chunk("x", [{"token": "x", "bytes": [120]}])
        elif verb == "slow":
            reason = "length"
            for _ in range(int(args[0]) if args else 1000):
                if cancel.is_set():
                    break
                await chunk("tick")
                try:
                    await asyncio.wait_for(cancel.wait(), 0.02)
                except TimeoutError:
                    pass
            if cancel.is_set():
                reason = ""
                print(f"cancelled {rid}", file=sys.stderr, flush=True)
        elif verb in ("crash", "kill"):
            for _ in range(int(args[0]) if args else 0):
                await chunk("x")
            await asyncio.sleep(0.05)
            if verb == "crash":
                print("error: fake worker crashed", file=sys.stderr, flush=True)
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        elif verb == "abort":
            os.abort()
        elif verb == "invalid":
            self.send({"id": rid, "type": "error", "kind": "invalid", "message": " ".join(args)})
            return
        self.send(
            {
                "id": rid,
                "type": "done",
                "done_reason": reason,
                "prompt_eval_count": len(words),
                "eval_count": sent,
                "stop_sequence": stop_sequence,
            }
        )
        self.cancels.pop(rid, None)

    def handle(self, message: dict[str, Any]) -> None:
        op, rid = message.get("op"), message.get("id")
        if op == "completion":
            task = asyncio.get_running_loop().create_task(self.complete(rid, message["request"]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif op == "cancel":
            self.cancels.setdefault(rid, asyncio.Event()).set()
        elif op == "tokenize":
            tokens = list(message["text"].encode())
            if message.get("add_special", True):
                tokens.insert(0, 256)
            self.send({"id": rid, "type": "result", "tokens": tokens})
        elif op == "detokenize":
            text = bytes(t for t in message["tokens"] if 0 <= t < 256).decode(errors="replace")
            self.send({"id": rid, "type": "result", "text": text})
        elif op == "shutdown":
            if self.mode == "stubborn":
                print("ignoring shutdown", file=sys.stderr, flush=True)
                return
            print("shutting down", file=sys.stderr, flush=True)
            os._exit(0)


async def main(fd: int, spec: dict[str, Any], mode: str) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ``abort`` must not leave a core file
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=64 << 20)
    print(f"fake worker {os.getpid()} loading {spec['model_path']}", file=sys.stderr, flush=True)
    if mode == "fatal":
        writer.write(_encode({"type": "fatal", "message": "error loading model: corrupt file"}))
        await writer.drain()
        os._exit(1)
    if mode == "die":
        print("error: cannot load model", file=sys.stderr, flush=True)
        os._exit(2)
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode == "garbage":
        writer.write(b"this is not json\n")
        await writer.drain()
        await asyncio.sleep(3600)
    info = {
        "pid": os.getpid(),
        "n_ctx": spec["num_ctx"],
        "n_ctx_train": 8192,
        "n_parallel": spec.get("num_parallel", 1),
        "n_vocab": 257,
        "memory_bytes": 12345,
        "load_duration_ns": 1000,
    }
    worker = Worker(writer, spec, mode)
    worker.send({"type": "ready", "info": info})
    while line := await reader.readline():
        worker.handle(json.loads(line))
    os._exit(0)  # the server went away


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.fd, json.loads(args.spec), args.mode))
