"""pollama against llama-server and the plain loop, warm, in many short paired rounds.

``run_bench.py`` starts a fresh server for every measurement, as a user's first request
meets one; on this 2-core machine its repeats of one point differ by 30 %, more than what
separates the engines. This script keeps one server of each engine up per stream count
(the model loaded, ``--streams`` slots) and alternates short measurements between them
(pollama, llama-server, and the plain loop in this process: the model loaded once, a fresh
context per measurement as ``plain_loop.py`` makes), in a rotated order, ``--gap`` seconds
apart so that no engine's spinning threads overlap the next. Each round gives every engine
the same prompts (``run_bench.story_prompts``, new ones each round, so no engine reuses a
prefix of the round before), and a round's ratios pair measurements taken seconds apart.

Reported per stream count: each engine's median client-side wall rate (tokens received per
second from the first request sent to the last token), the engine-reported decode rate, and
the medians and quartiles of the paired ratios. Prints Markdown; ``--out`` writes it.

    .venv/bin/python bench/warm_pairs.py                    # 1, 4, 8, 16 streams, 16 rounds
    .venv/bin/python bench/warm_pairs.py --streams 1 --rounds 24
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import plain_loop
import run_bench as rb

ENGINES = ("pollama", "llama-server", "plain")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=rb.parse_args([]).model)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds of rest before each run")
    ap.add_argument("--out", type=Path)
    return ap.parse_args(argv)


def _served(stack: ExitStack, engines: list[rb.Engine], n: int
            ) -> dict[str, tuple[rb.Engine, str]]:
    """Each server engine with ``n`` slots, warmed up, until ``stack`` closes."""
    servers: dict[str, tuple[rb.Engine, str]] = {}
    for engine in engines:
        _srv, base = stack.enter_context(engine.serve(n, "auto", fresh=True))
        asyncio.run(engine.warm_up(base))
        servers[engine.name] = (engine, base)
    return servers


def _measure(name: str, servers: dict[str, tuple[rb.Engine, str]], plain: plain_loop.Engine,
             prompts: list[str], args: argparse.Namespace) -> tuple[float, float]:
    """One engine's (client-side wall rate, engine-reported decode rate summed over the
    streams) on ``prompts``, as ``run_bench.py`` measures them."""
    if name == "plain":
        r = plain.run(len(prompts), flash_attn="auto", threads=args.threads,
                      n_predict=args.n_predict, prompts=prompts)
        return r.wall_tok_s, r.aggregate_tok_s
    engine, base = servers[name]
    summary, _others = rb._run_streams(engine, base, prompts, args.n_predict)
    return summary.wall_tok_s, summary.aggregate_tok_s


def _rounds(args: argparse.Namespace, n: int, engines: list[rb.Engine],
            plain: plain_loop.Engine) -> Iterator[dict[str, tuple[float, float]]]:
    with ExitStack() as stack:
        servers = _served(stack, engines, n)
        for r in range(args.rounds):
            prompts = rb.story_prompts(args.model, r, n)
            order = ENGINES[r % 3:] + ENGINES[:r % 3]
            row = {}
            for name in order:
                time.sleep(args.gap)
                row[name] = _measure(name, servers, plain, prompts, args)
            print(f"  N={n} #{r + 1}: " + ", ".join(
                f"{k} {v[0]:.1f}" for k, v in row.items()), flush=True)
            yield row


def _quartiles(values: list[float]) -> str:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"**{median:.3f}** ({q1:.2f}-{q3:.2f})"


def table_row(n: int, rows: list[dict[str, tuple[float, float]]]) -> str:
    med = {e: [statistics.median(r[e][i] for r in rows) for i in (0, 1)] for e in ENGINES}
    ratios = [_quartiles([r["pollama"][i] / r[other][i] for r in rows])
              for other in ("llama-server", "plain") for i in (0, 1)]
    rates = " | ".join(f"{med[e][0]:.1f} / {med[e][1]:.1f}" for e in ENGINES)
    return f"| {n} | {rates} | " + " | ".join(ratios) + " |"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not rb.llama_server_bin().exists():
        print("llama-server is not built: run bench/build_llama_server.sh", file=sys.stderr)
        return 2
    cpu, _slug, _simd = rb.cpu_info()
    plain = plain_loop.Engine(args.model)
    lines = [
        f"{dt.date.today()}, {cpu}, {args.threads} threads, {args.model.name}, commit "
        f"{rb.git_commit()}: warm servers, {args.rounds} rounds of {args.n_predict} tokens a "
        f"stream, engines in rotated order {args.gap:g} s apart (`bench/warm_pairs.py`).", "",
        "| streams | pollama wall / decode tok/s | llama-server | plain loop | "
        "pollama / llama-server, wall | decode | pollama / plain, wall | decode |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    with tempfile.TemporaryDirectory(prefix="pollama-warm-") as tmp:
        engines: list[rb.Engine] = [rb.Pollama(args.model, args.threads, Path(tmp)),
                                    rb.LlamaServer(args.model, args.threads)]
        for n in args.streams:
            lines.append(table_row(n, list(_rounds(args, n, engines, plain))))
    lines += ["", "Rates are medians of the rounds; ratios are medians of each round's "
              "ratio (paired), quartiles in brackets."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
