"""Render the benchmark's results (a JSON-able dict) as the markdown the README shows."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "—"
    return f"{a / b:.2f}"


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _get(row: dict[str, Any] | None, key: str) -> float | None:
    return None if row is None else row.get(key)


def _paired(row: dict[str, Any] | None, ref: dict[str, Any] | None) -> float | None:
    """The median over repeats of ``row``'s wall rate over ``ref``'s in the same repeat
    (measured minutes apart, so a shift of the shared machine's speed between repeats
    cancels out); None without one wall rate per repeat in both."""
    a, b = _get(row, "wall_samples"), _get(ref, "wall_samples")
    if not a or not b or len(a) != len(b) or not all(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [
        f"# pollama benchmark — {meta['date']} — {meta['cpu']}",
        "",
        f"- **Machine**: {meta['cpu']}, {meta['cores']} cores usable ({meta['cpu_flags']}), "
        f"{meta['mem_gib']:.0f} GiB RAM",
        f"- **Model**: `{meta['model_name']}` ({meta['model_bytes'] / MiB:.1f} MiB); "
        f"{meta['threads']} threads everywhere; {meta['n_predict']} tokens per request; "
        "greedy (temperature 0)",
        f"- **Versions**: llama-cpp-python {meta['llama_cpp_python']}; llama-server "
        f"{meta['llama_server_version']} (built from that sdist's vendored llama.cpp, "
        f"`GGML_NATIVE=ON`); pollama {meta['pollama']} ({meta['pollama_commit']}); "
        f"Python {meta['python']}",
        f"- **Run**: `{meta['command']}`" + (" (**quick mode**)" if meta["quick"] else ""),
        "",
    ]
    for engine, reason in results.get("skipped", {}).items():
        one_line = " ".join(str(reason).split())
        out += [f"> **{engine} skipped**: {one_line}", ""]
    for err in results.get("errors", []):
        out += [f"> **{err['engine']} {err['point']} failed** (twice): {err['error']}", ""]

    loads = [r.get("foreign_load", 0.0) for r in results["throughput"] + results["followup"]]
    if loads:
        out += [f"Other processes used at most {max(loads):.0%} of the CPUs during any kept "
                f"measurement (a measurement is retried above {meta['max_foreign']:.0%}; the "
                "machines are shared).", ""]
    spreads = sorted(max(r["wall_samples"]) / min(r["wall_samples"]) - 1
                     for r in results["throughput"] if len(r.get("wall_samples", [])) > 1)
    if spreads:
        out += [f"Every point is the median of {meta.get('repeat', 1)} interleaved repeats; the "
                f"repeats of one point differ by {spreads[len(spreads) // 2]:.0%} (median; "
                f"worst {spreads[-1]:.0%}) between best and worst wall rate.", ""]
    out += _throughput(results)
    out += _followup(results)
    out += _memory(results)
    out += [
        "### How measured",
        "",
        "- *per stream*: the engine's own decode rate per request (llama-server "
        "`timings.predicted_per_second`; pollama `eval_count / eval_duration`; plain loop "
        "tokens / decode time), averaged over the N concurrent requests. *aggregate*: the sum "
        "of those rates. *wall*: all generated tokens / wall time from the first request sent "
        "to the last one done, as the client sees it (includes queueing, prefill and HTTP).",
        "- Every engine evaluates the same prompt tokens: a story request rendered with the "
        "model's chat template and sent as it is (pollama `raw`, llama-server `/completion`, "
        "the plain loop's tokenizer, special tokens parsed); the prompt tokens of each "
        "measurement are in the raw results. The prompts of one repeat differ from those of "
        "every other after the chat template's system turn, and pollama's prompt cache on "
        "disk (kept across restarts) is emptied before each measured server starts, so no "
        "engine finds any of a prompt cached.",
        "- FA *auto* is each engine's default, llama.cpp's auto (on wherever the backend has "
        "the kernel, the CPU included; pollama with `OLLAMA_FLASH_ATTENTION` unset); *on* and "
        "*off* force it for all three.",
        "- llama-server: `-t T -tb T -np N -c 4096·N --flash-attn auto|on|off`, `/completion` "
        "streaming with `ignore_eos`; pollama: `OLLAMA_NUM_PARALLEL=N`, "
        "`OLLAMA_CONTEXT_LENGTH=4096`, `OLLAMA_FLASH_ATTENTION` unset, `1` or `0`, "
        "`/api/generate` streaming "
        "with `raw: true` and `options: {num_predict, temperature: 0, seed: 1, num_thread: T}` "
        "(its other defaults on: drafting from the prompt; it could stop at EOS, rates are "
        "per generated token); plain loop: `bench/plain_loop.py` (one context with "
        "`n_seq_max=N`, batched prefill, one `llama_decode` per step, greedy `llama_sampler` "
        "chain per stream). Every measurement starts a fresh server (or loop process); the "
        "engines are interleaved and their order rotated between repeats, so the machine's "
        "drift over minutes hits all of them alike; the table shows the median repeat. "
        "*paired*: the median over repeats of pollama's wall rate over the other's in the "
        "same repeat, which a shift of the machine's speed between repeats does not move.",
        "- Follow-up TTFT: a chat with a multi-turn history; request 1 = history, request 2 = "
        "history + the reply + one new user message. *warm*: request 2 right after request 1 "
        "on the same server (`NUM_PARALLEL=1` / `-np 1`), the median over three chained "
        "follow-up turns; *cold*: request 2 alone on a fresh server (model loaded by an "
        "unrelated warm-up request). TTFT is client-side.",
        "- Memory: VmRSS summed over the server process and all its descendants (pollama's "
        "worker processes), after the N-stream runs with the model loaded. Budget = model file "
        "+ F16 KV cache for 4096·N tokens + 150 MiB.",
        "",
    ]
    return "\n".join(out)


def _throughput(results: dict[str, Any]) -> list[str]:
    rows = results["throughput"]
    out = [
        "## Decode throughput (tok/s)",
        "",
        "| FA | streams | llama-server per stream | llama-server aggregate | llama-server wall "
        "| plain loop per stream | plain loop aggregate "
        "| pollama per stream | pollama aggregate | pollama wall "
        "| pollama / llama-server (aggregate) | **pollama / llama-server (wall)** "
        "| pollama / llama-server (wall, paired) | pollama / plain (wall) "
        "| pollama / plain (wall, paired) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for fa in results["meta"]["fa_modes"]:
        for n in results["meta"]["streams"]:
            ls = _find(rows, engine="llama-server", fa=fa, streams=n)
            pl = _find(rows, engine="plain", fa=fa, streams=n)
            po = _find(rows, engine="pollama", fa=fa, streams=n)
            out.append(
                f"| {fa} | {n} "
                f"| {_f(_get(ls, 'per_stream_tok_s'))} | {_f(_get(ls, 'aggregate_tok_s'))} "
                f"| {_f(_get(ls, 'wall_tok_s'))} "
                f"| {_f(_get(pl, 'per_stream_tok_s'))} | {_f(_get(pl, 'aggregate_tok_s'))} "
                f"| {_f(_get(po, 'per_stream_tok_s'))} | {_f(_get(po, 'aggregate_tok_s'))} "
                f"| {_f(_get(po, 'wall_tok_s'))} "
                f"| {_ratio(_get(po, 'aggregate_tok_s'), _get(ls, 'aggregate_tok_s'))} "
                f"| **{_ratio(_get(po, 'wall_tok_s'), _get(ls, 'wall_tok_s'))}** "
                f"| {_f(_paired(po, ls), 2)} "
                f"| {_ratio(_get(po, 'wall_tok_s'), _get(pl, 'wall_tok_s'))} "
                f"| {_f(_paired(po, pl), 2)} |"
            )
    out.append("")
    for label, reference in (("pollama / llama-server", "llama-server"),
                             ("pollama / plain loop", "plain")):
        ratios, paired = [], []
        for r in rows:
            if r["engine"] != "pollama":
                continue
            ref = _find(rows, engine=reference, fa=r["fa"], streams=r["streams"])
            if ref and ref.get("wall_tok_s"):
                ratios.append(r["wall_tok_s"] / ref["wall_tok_s"])
            pair = _paired(r, ref)
            if pair is not None:
                paired.append(pair)
        if ratios:
            line = (f"Geometric mean of {label} (client-side wall rate) over the "
                    f"{len(ratios)} points: **{_geomean(ratios):.2f}**")
            if len(paired) == len(ratios):
                line += f" (paired by repeat: {_geomean(paired):.2f})"
            out.append(line + "  ")
    return [*out, ""]


def _geomean(values: list[float]) -> float:
    return math.prod(values) ** (1 / len(values))


def _followup(results: dict[str, Any]) -> list[str]:
    rows = results.get("followup", [])
    if not rows:
        return []
    out = [
        "## Follow-up chat turn: time to first token (s)",
        "",
        "| engine | FA | history tokens | TTFT cold | TTFT warm (follow-up) | warm / cold "
        "| prompt tokens reported cold → warm ¹ |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        out.append(
            f"| {row['engine']} | {row['fa']} | {row['history_tokens']} "
            f"| {_f(row['ttft_cold'], 3)} | {_f(row['ttft_warm'], 3)} "
            f"| {_ratio(row['ttft_warm'], row['ttft_cold'])} "
            f"| {row['prompt_cold']} → {row['prompt_warm']} |"
        )
    out += ["", "¹ llama-server's `prompt_n` counts only the tokens it evaluated; pollama's "
            "`prompt_eval_count` includes the cached prefix, as Ollama's does (Ollama reports "
            "llama-server's `cache_n + prompt_n`), so the TTFT shows the cache hit."]
    ls = {r["fa"]: r for r in rows if r["engine"] == "llama-server"}
    po = {r["fa"]: r for r in rows if r["engine"] == "pollama"}
    for fa in sorted(set(ls) & set(po)):
        out.append("")
        out.append(
            f"FA {fa}: pollama / llama-server follow-up TTFT = "
            f"**{_ratio(po[fa]['ttft_warm'], ls[fa]['ttft_warm'])}**, "
            f"cold = {_ratio(po[fa]['ttft_cold'], ls[fa]['ttft_cold'])}"
        )
    return [*out, ""]


def _memory(results: dict[str, Any]) -> list[str]:
    rows = results.get("memory", [])
    if not rows:
        return []
    out = [
        "## Resident memory with the model loaded (MiB)",
        "",
        "| FA | parallel | budget (file + KV + 150) | llama-server RSS | pollama RSS "
        "| pollama RSS by process | pollama PSS | pollama RSS within budget "
        "| pollama / llama-server |",
        "|---|--:|--:|--:|--:|---|--:|---|--:|",
    ]
    for fa in results["meta"]["fa_modes"]:
        for n in results["meta"]["streams"]:
            ls = _find(rows, engine="llama-server", fa=fa, streams=n)
            po = _find(rows, engine="pollama", fa=fa, streams=n)
            if ls is None and po is None:
                continue
            budget = (ls or po or {}).get("budget", 0)
            ok = "—" if po is None else ("yes" if po["rss"] <= budget else "**no**")
            po_rss = "—" if po is None else f"{po['rss'] / MiB:.0f}"
            split = "—" if po is None else " + ".join(
                f"{role} {rss / MiB:.0f}" for role, rss in sorted(po.get("split", {}).items()))
            out.append(
                f"| {fa} | {n} | {budget / MiB:.0f} "
                f"| {_f(_get(ls, 'rss') and ls['rss'] / MiB, 0)} | {po_rss} | {split} "
                f"| {_f(_get(po, 'pss') and po['pss'] / MiB, 0)} | {ok} "
                f"| {_ratio(_get(po, 'rss'), _get(ls, 'rss'))} |"
            )
    return [*out, ""]


def publish(text: str, out: Path) -> int:
    """Write a benchmark's markdown to ``out`` (its folder made), print it and where it went;
    the exit status of a run that got this far (0)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0
