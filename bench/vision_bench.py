"""Images: pollama against llama.cpp's own ``llama-server --mmproj``, in one run.

Same model (SmolLM2-135M, the default), same projector, same threads, both servers up at
once and asked in turn (interleaved repeats, medians), through the same OpenAI-compatible
streaming chat client, each request with an image neither server has seen (random pixels,
a new seed per repeat), so every request encodes its image.

No vision GGUF can be downloaded here, so the projector is written by the tests' generator
(``tests/tiny_projector.py``) at :data:`BENCH_SHAPE`: LLaVA-1.5's layout and image-token
count (336 px, 576 tokens), 8 blocks 512 wide, random weights. Its encode costs what a small
real projector's does, which is what the measurements are about.

1. **Time to first token** of a request with one image, alone on the server.
2. **Other streams keep going**: a text stream is running when an image request arrives;
   the longest gap between two of its tokens while the image is encoded and its rows
   decoded, next to that stream's usual gap and the image request's own time to first token.

    bench/build_llama_server.sh                  # once
    .venv/bin/python bench/vision_bench.py       # ~3 min; prints and writes the tables
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import _procs
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "bench" / ".build"
LOGS = BUILD / "logs"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from tiny_projector import BENCH_SHAPE, write_vision_projector  # noqa: E402

MODEL_NAME = "seer-bench"
POLLAMA_LOG = LOGS / "vision-pollama.log"
QUESTION = "Describe this image."


def noise_png(seed: int, size: int = BENCH_SHAPE.image_size) -> str:
    """A random-pixel PNG (base64): an image no server has cached."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def _messages(image: str | None, text: str = QUESTION) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        url = f"data:image/png;base64,{image}"
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


async def stream_chat(client: httpx.AsyncClient, base: str, model: str,
                      messages: list[dict[str, Any]], max_tokens: int,
                      arrivals: list[float] | None = None) -> dict[str, Any]:
    """One streamed ``/v1/chat/completions``: the send time and each content chunk's
    arrival time (client clock), appended to ``arrivals`` as they come."""
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": 0}
    sent = time.perf_counter()
    arrivals = [] if arrivals is None else arrivals
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            # A token's text, or the end (a first token that ends the answer is one too).
            if (choice.get("delta") or {}).get("content") or choice.get("finish_reason"):
                arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals}


@contextmanager
def _llama_server(gguf: Path, mmproj: Path, threads: int) -> Iterator[str]:
    port = _procs.free_port()
    cmd = [str(BUILD / "llama-server"), "-m", str(gguf), "--mmproj", str(mmproj),
           "-t", str(threads), "-tb", str(threads), "-np", "2", "-c", "8192",
           "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    log = LOGS / f"vision-llama-{port}.log"
    with _procs.Server("llama-server", cmd, os.environ, log, ROOT) as srv:
        base = f"http://127.0.0.1:{port}"
        srv.wait_ready(f"{base}/health", timeout=180)
        yield base


ENCODED = re.compile(r"image encoded \((\d+) rows\) in (\d+) ms")


def encode_times(log: Path) -> list[float]:
    """The encode times (s) pollama's worker logged, in order."""
    return [int(m.group(2)) / 1000 for m in ENCODED.finditer(log.read_text(errors="replace"))]


@contextmanager
def _pollama(gguf: Path, mmproj: Path, home: Path) -> Iterator[str]:
    """``pollama serve`` (its threads: every CPU, as by default) with the model created
    from the two files, as a user does it."""
    port = _procs.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update(HOME=str(home), OLLAMA_MODELS=str(home / "models"), OLLAMA_NUM_PARALLEL="2",
               OLLAMA_HOST=f"127.0.0.1:{port}", OLLAMA_CONTEXT_LENGTH="4096",
               OLLAMA_KEEP_ALIVE="30m", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "pollama", "serve"]
    with _procs.Server("pollama", cmd, env, POLLAMA_LOG, ROOT) as srv:
        base = f"http://127.0.0.1:{port}"
        srv.wait_ready(f"{base}/api/version", timeout=60)
        modelfile = home / "Modelfile"
        modelfile.write_text(f"FROM {gguf}\nFROM {mmproj}\n")
        subprocess.run([sys.executable, "-m", "pollama", "create", MODEL_NAME, "-f",
                        str(modelfile)], env=env, cwd=ROOT, check=True, capture_output=True,
                       timeout=300)
        yield base


@contextmanager
def servers(engines: list[str], gguf: Path, mmproj: Path, threads: int,
            home: Path) -> Iterator[dict[str, str]]:
    """The servers, up together (an idle one costs the other nothing), two slots each."""
    with ExitStack() as stack:
        bases = {}
        if "llama-server" in engines:
            bases["llama-server"] = stack.enter_context(_llama_server(gguf, mmproj, threads))
        if "pollama" in engines:
            bases["pollama"] = stack.enter_context(_pollama(gguf, mmproj, home))
        yield bases


async def time_to_first_token(bases: dict[str, str], repeats: int) -> dict[str, list[float]]:
    """TTFT of a one-image request alone on each server, engines interleaved per repeat."""
    times: dict[str, list[float]] = {name: [] for name in bases}
    async with httpx.AsyncClient(timeout=300) as client:
        for base in bases.values():  # warm: weights paged in, first encode done
            await stream_chat(client, base, MODEL_NAME, _messages(noise_png(10_000)), 2)
        for repeat in range(repeats):
            image = noise_png(repeat)
            order = list(bases.items()) if repeat % 2 == 0 else list(bases.items())[::-1]
            for name, base in order:
                _procs.wait_quiet(patience=120)
                run = await stream_chat(client, base, MODEL_NAME, _messages(image), 4)
                times[name].append(run["arrivals"][0] - run["sent"])
    return times


async def gap_while_encoding(base: str, seed: int) -> dict[str, float]:
    """A text stream runs; an image request arrives after its 16th token. Returns the
    stream's longest gap while the image request waits for its first token, its median
    gap before, and the image request's time to first token."""
    async with httpx.AsyncClient(timeout=300) as client:
        seen: list[float] = []
        text = asyncio.create_task(stream_chat(
            client, base, MODEL_NAME, _messages(None, "Write a long story about a dragon."), 160,
            seen))
        while len(seen) < 16:  # the 16th token of the text stream, seen from the client
            await asyncio.sleep(0.002)
            if text.done():
                raise RuntimeError("the text stream ended before the image request")
        image = await stream_chat(client, base, MODEL_NAME, _messages(noise_png(seed)), 4)
        stream = await text
    window = (image["sent"], image["arrivals"][0])
    gaps_in = [b - a for a, b in zip(stream["arrivals"], stream["arrivals"][1:], strict=False)
               if b > window[0] and a < window[1]]
    before = [b - a for a, b in zip(stream["arrivals"], stream["arrivals"][1:], strict=False)
              if b <= window[0]]
    return {"max_gap": max(gaps_in, default=0.0),
            "usual_gap": statistics.median(before) if before else 0.0,
            "image_ttft": window[1] - window[0]}


async def gaps(bases: dict[str, str], repeats: int) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {name: [] for name in bases}
    for repeat in range(repeats):
        order = list(bases.items()) if repeat % 2 == 0 else list(bases.items())[::-1]
        for name, base in order:
            _procs.wait_quiet(patience=120)
            row = await gap_while_encoding(base, 1000 + repeat)
            if name == "pollama":  # its worker logs each encode; llama-server does not
                await asyncio.sleep(0.2)  # the log line is relayed by the server
                row["encode"] = encode_times(POLLAMA_LOG)[-1]
            out[name].append(row)
    return out


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def render(ttft: dict[str, list[float]], gap: dict[str, list[dict[str, float]]],
           threads: int, repeats: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    ref, ours = statistics.median(ttft["llama-server"]), statistics.median(ttft["pollama"])
    lines = [
        f"Images, {dt.date.today().isoformat()}, {cpu}, {threads} threads; SmolLM2-135M Q4_1 "
        f"with a {BENCH_SHAPE.tokens}-token LLaVA-layout projector (random weights, "
        f"{BENCH_SHAPE.layers} blocks x {BENCH_SHAPE.width}); medians of {repeats} "
        "interleaved repeats, client clock.",
        "",
        "| time to first token, one new image | llama-server --mmproj | pollama | ratio |",
        "|---|---:|---:|---:|",
        f"| seconds | {ref:.3f} | {ours:.3f} | {ours / ref:.2f}x |",
        "",
        "| a text stream while another request's image is encoded | llama-server --mmproj "
        "| pollama |",
        "|---|---:|---:|",
    ]
    for label, key in (("the image's encode, meanwhile (s)", "encode"),
                       ("image request's time to first token (s)", "image_ttft"),
                       ("longest gap between two tokens of the stream (s)", "max_gap"),
                       ("the stream's usual gap before (s)", "usual_gap")):
        theirs = "not logged" if key == "encode" else f"{_median(gap['llama-server'], key):.3f}"
        lines.append(f"| {label} | {theirs} | {_median(gap['pollama'], key):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", default=["llama-server", "pollama"],
                        choices=["llama-server", "pollama"])
    args = parser.parse_args()
    from pollama.default_model import default_gguf_path

    if "llama-server" in args.only and not (BUILD / "llama-server").exists():
        sys.exit("llama-server is not built: run bench/build_llama_server.sh first")
    mmproj = BUILD / "bench-mmproj.gguf"
    if not mmproj.exists():
        write_vision_projector(mmproj, shape=BENCH_SHAPE)
    with tempfile.TemporaryDirectory(prefix="vision-bench-") as tmp, \
            servers(args.only, default_gguf_path(), mmproj, args.threads, Path(tmp)) as bases:
        ttft = asyncio.run(time_to_first_token(bases, args.repeats))
        gap = asyncio.run(gaps(bases, args.repeats))
    if len(bases) < 2:
        print(json.dumps({"ttft": ttft, "gaps": gap}, indent=1))
        return
    table = render(ttft, gap, args.threads, args.repeats)
    print(table)
    out = ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-vision.md"
    out.write_text(table + "\n<details><summary>raw</summary>\n\n```json\n"
                   + json.dumps({"ttft": ttft, "gaps": gap}, indent=1) + "\n```\n</details>\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
