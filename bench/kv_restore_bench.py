"""The prompt cache across unloads: a long conversation's next turn, time to first token.

One pollama server, one sequence (``OLLAMA_NUM_PARALLEL=1``), the follow-up chat of
``run_bench.py`` (about 850 tokens of history, then "Thanks. Summarise all of that..."; and
the same chat with twice the turns, ``--turns``),
streamed through ``/api/chat``, TTFT on the client's clock. Three ways the next turn can
find the server:

* **cold**: the model was unloaded and nothing is cached (the cached sequences deleted), so
  the turn loads the model and evaluates the whole history: what every turn after an unload
  cost before the prompt cache;
* **restored**: the first turn ran, the model was unloaded (``keep_alive: 0``, which saves
  the slot), and the next turn loads the model, reads the slot back and evaluates only the
  new tokens;
* **warm**: the first turn ran and the model is still loaded.

Before the repeats, each conversation's next turn is answered once, as the server of a
conversation had answered turns before, so that its workers have measured what a short
prompt chunk costs against a tile (``runner/prefill.py``). What they measured is kept
beside the cached sequences (the ``.costs`` file) and read by every later load; deleting the
sequences for **cold** leaves it, as it is the machine's, not the conversation's.

Each repeat runs the three in a rotated order, waiting for a quiet machine before each
measurement (``_procs.wait_quiet``) and measuring again when other processes used the CPUs
during it; the table shows medians of the repeats and what others used. Writes
``bench/results/<date>-kv-restore.md``.

    .venv/bin/python bench/kv_restore_bench.py              # ~3 minutes on a quiet machine
    .venv/bin/python bench/kv_restore_bench.py --repeats 1 --out /tmp/kv.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _procs
from _clients import HTTP
from _report import publish
from run_bench import FA_MODES, FOLLOW_UPS, ROOT, Pollama, chat_history, git_commit
from structured_bench import cpu_model

MODES = ("cold", "restored", "warm")


@dataclass
class Turn:
    text: str
    ttft: float  # seconds from sending to the first piece of text
    final: dict[str, Any]


class Session:
    """The server, the conversation and the cache directory of one run."""

    def __init__(self, engine: Pollama, base: str, args: argparse.Namespace, turns: int
                 ) -> None:
        self.engine, self.base, self.args = engine, base, args
        self.cache = engine.prompt_cache
        self.history = chat_history(turns)
        self.next_turn: list[dict[str, str]] = []
        self.history_tokens = 0

    def chat(self, messages: list[dict[str, str]], n_predict: int) -> Turn:
        """One streamed turn: its text, TTFT and final chunk."""
        # Only the first token is measured: no speculative drafting (it starts after it).
        options = {**self.engine.options(n_predict), "draft_num_predict": 0}
        body = {"model": self.engine.model_name, "messages": messages, "stream": True,
                "options": options}
        text: list[str] = []
        t_sent = time.perf_counter()
        t_first = 0.0
        with HTTP.stream("POST", f"{self.base}/api/chat", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line:
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                piece = (chunk.get("message") or {}).get("content")
                if piece:
                    t_first = t_first or time.perf_counter()
                    text.append(piece)
                if chunk.get("done"):
                    return Turn("".join(text), (t_first or time.perf_counter()) - t_sent, chunk)
        raise RuntimeError("the stream ended without a done chunk")

    def unload(self) -> None:
        """Answered once the worker has saved its slots and exited."""
        body = {"model": self.engine.model_name, "keep_alive": 0}
        HTTP.post(f"{self.base}/api/generate", json=body, timeout=120).raise_for_status()

    def forget(self) -> None:
        """Unload, and drop every cached sequence. What the workers measured (the
        ``.costs`` file, ``runner/prefill.py``) stays, as on a server that has served
        conversations before: it is knowledge of the machine, not of this conversation."""
        self.unload()
        for path in self.cache.glob("*.kv"):
            path.unlink()

    def first_turn(self) -> None:
        first = self.chat(self.history, 32)
        self.history_tokens = int(first.final.get("prompt_eval_count") or 0)
        if not self.next_turn:
            self.next_turn = [*self.history, {"role": "assistant", "content": first.text},
                              {"role": "user", "content": FOLLOW_UPS[0]}]

    def prepare(self, mode: str) -> None:
        """Leave the server as ``mode`` says (see the module docstring)."""
        self.forget()
        if mode == "cold":
            return
        self.first_turn()
        if mode == "restored":
            self.unload()

    def measure(self, mode: str) -> dict[str, Any]:
        """One next turn as ``mode`` says; measured again (up to ``--tries`` times) while
        other processes used more than ``--max-foreign`` of the CPUs during it."""
        got, foreign = _procs.quiet_measure(lambda: self.chat(self.next_turn, 8), self.args,
                                            prepare=lambda: self.prepare(mode))
        final = got.final
        return {"mode": mode, "ttft": got.ttft, "history": self.history_tokens,
                "prompt_tokens": int(final.get("prompt_eval_count") or 0),
                "cached": int(final.get("prompt_cached_count") or 0),
                "load": (final.get("load_duration") or 0) / 1e9,
                "prompt_eval": (final.get("prompt_eval_duration") or 0) / 1e9,
                "foreign": foreign}


def run(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    engine = Pollama(args.model, args.threads, home)
    rows: list[dict[str, Any]] = []
    with engine.serve(parallel=1, fa=args.fa) as (_srv, base):
        sessions = [Session(engine, base, args, turns) for turns in args.turns]
        for session in sessions:
            session.prepare("warm")  # fixes the conversation's next turn
            session.chat(session.next_turn, 8)  # a next turn measured: what a server knows
        for rnd in range(args.repeats):
            order = MODES[rnd % len(MODES):] + MODES[: rnd % len(MODES)]
            for session, mode in ((s, m) for s in sessions for m in order):
                row = session.measure(mode)
                row["repeat"] = rnd
                rows.append(row)
                print(f"  repeat {rnd} {row['history']:5d} {mode:8s} TTFT {row['ttft']:.3f}s "
                      f"(load {row['load']:.3f}s, prompt eval {row['prompt_eval']:.3f}s, "
                      f"{row['cached']}/{row['prompt_tokens']} cached, "
                      f"others {row['foreign']:.0%})", flush=True)
    return rows


def _median(rows: list[dict[str, Any]], mode: str, key: str) -> float:
    return float(statistics.median(r[key] for r in rows if r["mode"] == mode))


def _table(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for history in sorted({r["history"] for r in rows}):
        mine = [r for r in rows if r["history"] == history]
        cold = _median(mine, "cold", "ttft")
        for mode in MODES:
            ttft = _median(mine, mode, "ttft")
            out.append(
                f"| {history} | {mode} | {ttft:.3f} | {_median(mine, mode, 'load'):.3f} | "
                f"{_median(mine, mode, 'prompt_eval'):.3f} | "
                f"{int(_median(mine, mode, 'prompt_tokens'))} | "
                f"{int(_median(mine, mode, 'cached'))} | {ttft / cold:.2f} |"
            )
    return out


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    out = [
        f"# Prompt cache across unloads: next-turn TTFT ({meta['date']})",
        "",
        f"{meta['cpu']}, {meta['threads']} threads, flash attention {meta['fa']}, "
        f"{meta['model']}, one sequence; commit {meta['commit']}. `{meta['command']}`",
        "",
        "The follow-up chat of `bench/run_bench.py` (its first follow-up question; 6 user "
        "turns of history, and the same chat twice as long), streamed through `/api/chat`, "
        "time to first token on the client's clock; medians of "
        f"{meta['repeats']} interleaved repeats. **cold**: unloaded, nothing cached (load + "
        "the whole history); **restored**: the first turn ran, then `keep_alive: 0` (which "
        "saves the slot), then the next turn (load + read back + the new tokens); **warm**: "
        "the first turn ran and the model stayed loaded. Before the repeats each "
        "conversation's next turn was answered once, as a server that has served "
        "conversations has, so that the workers measured what a short prompt chunk costs "
        "against a 64-row tile (`runner/prefill.py`); that measurement is kept beside the "
        "cached sequences and outlives **cold**'s deleting them.",
        "",
        "| history tokens | next turn | TTFT (s) | of which load (s) | prompt eval (s) | "
        "prompt tokens | cached | TTFT / cold |",
        "|--:|---|--:|--:|--:|--:|--:|--:|",
        *_table(rows),
        "",
        "Every measurement:",
        "",
        "| repeat | history tokens | next turn | TTFT (s) | load (s) | prompt eval (s) | "
        "cached | others' CPU |",
        "|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        out.append(f"| {r['repeat']} | {r['history']} | {r['mode']} | {r['ttft']:.3f} | "
                   f"{r['load']:.3f} | {r['prompt_eval']:.3f} | {r['cached']} | "
                   f"{r['foreign']:.0%} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF (default: pollama's default model)")
    ap.add_argument("--turns", type=int, nargs="+", default=[6, 12],
                    help="user turns of history (6: run_bench.py's follow-up chat)")
    ap.add_argument("--fa", choices=FA_MODES, default="auto")
    _procs.add_quiet_options(ap, repeats=5, patience=120.0, llama_server=False)
    args = ap.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(ROOT / "src"))
        from pollama.default_model import default_gguf_path

        args.model = default_gguf_path()
    date = dt.date.today().isoformat()
    meta = {"date": date, "cpu": cpu_model(), "threads": args.threads, "fa": args.fa,
            "model": Path(args.model).name, "repeats": args.repeats, "commit": git_commit(),
            "command": shlex.join(["python", *sys.argv])}
    with tempfile.TemporaryDirectory(prefix="pollama-kv-restore-") as home:
        rows = run(args, Path(home))
    text = render(meta, rows)
    return publish(text, args.out or ROOT / "bench" / "results" / f"{date}-kv-restore.md")


if __name__ == "__main__":
    raise SystemExit(main())
