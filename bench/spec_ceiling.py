"""How fast n-gram drafting could make a task on this machine: the ceiling of any drafter.

Speculative decoding from the prompt gains as much as one decode of k rows costs less than k
decodes of one row, for the rows whose drafted token is kept. Both halves are measured here,
in-process, with the engine itself (it imports ``llama_cpp`` directly: a benchmark, not the
product), for one task of ``spec_bench.py``:

* the **step costs**: ``llama_decode`` of 1 to ``--draft-max`` + 1 rows at the end of the
  task's prompt (flash attention on, one sequence, every row with logits), the median of
  ``--repeats`` tries;
* the **answer**: the model's answer (greedy; for ``chat`` sampled with a seed), one row at
  a time, as its tokens.

It then replays the answer through the n-gram lookup pollama uses (``runner/ngram.py``
``NgramIndex``) and prices each step with the measured costs:

* **oracle**: the fewest decode seconds any choice of draft lengths gives, knowing the
  answer (a dynamic program over the answer's positions: the lookup's draft at a position
  depends only on the tokens before it): no drafting policy can do better with these
  drafts;
* **pollama's policy**: ``NgramIndex``, ``Acceptance`` and ``best_length``, as the worker
  runs them (one lookup per step, the index following its copy and learning its edits and
  their other spellings through the model's tokenizer), with the measured costs in place of
  its own running measurements;
* **always**: a full draft at every match (llama-server's ``--spec-type ngram-simple`` drafts
  up to 48 tokens: ``--draft-max 48`` replays that).

The speedups are against one row per token, the same answer: the ratio ``spec_bench.py``
measures end to end, minus everything that is not a decode. Prints a Markdown table. The
replays are ``tests/ngram_replay.py``'s; ``--record`` also writes the answer, the costs and
the tokenizer's answers as a trace, which ``tests/test_ngram_replay.py`` replays without the
model.

    .venv/bin/python bench/spec_ceiling.py --task rewrite
    .venv/bin/python bench/spec_ceiling.py --task edit --model qwen2.5-coder-1.5b…gguf
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np
from run_bench import chat_prompt, cpu_info
from spec_bench import TASKS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from ngram_replay import (  # noqa: E402
    Chances,
    RecordingSpelling,
    ReplayedSpelling,
    Trace,
    default_chain,
    lookups,
    oracle,
    replay,
    replay_policy,
)

DRAFT_MAX = 63  # draft_num_predict's default (--draft-max changes it)


def load(path: Path, threads: int) -> tuple[Any, lc.Llama]:
    """A context of the engine's own (for timing), and the high-level wrapper around it
    (for the chat template and the answer)."""
    llm = lc.Llama(str(path), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                   flash_attn=True, verbose=False)
    return llm._ctx.ctx, llm


def prompt_tokens(llm: lc.Llama, text: str) -> list[int]:
    prompt = chat_prompt(llm.metadata["tokenizer.chat_template"], text)
    return llm.tokenize(prompt.encode(), add_bos=False, special=True)


def answer_tokens(
    llm: lc.Llama, prompt: list[int], limit: int, sampling: dict[str, Any]
) -> list[int]:
    """The model's answer: greedy, or sampled as pollama samples by default (top_k 40,
    top_p 0.9, no repeat penalty) at the task's temperature and seed. With a seed, a
    sampled answer is nearly as fixed as a greedy one: the worker draws one random number
    a row, drafted or not, so drafts change it only by the small differences in logits a
    batch's shape makes, and the replay keeps a drafted token when it is the answer's."""
    temperature = sampling.get("temperature", 0.0)
    if temperature > 0:
        llm.set_seed(sampling.get("seed", 1))
        tokens = llm.generate(prompt, temp=temperature, top_k=40, top_p=0.9, min_p=0.0,
                              repeat_penalty=1.0)
    else:
        tokens = llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0)
    out: list[int] = []
    for token in tokens:
        if lc.llama_vocab_is_eog(llm._model.vocab, token) or len(out) >= limit:
            break
        out.append(token)
    return out


def chances(
    path: Path, prompt: list[int], answer: list[int], sampling: dict[str, Any], threads: int
) -> Chances:
    """At each position of a sampled answer, the probability pollama's default sampler chain
    (top_k 40, top_p 0.9, then the temperature) gives every token it keeps there: what a
    draft's token tested there teaches the worker (``SamplerChain.sample_weighing``; its
    test checks this arithmetic against the chain)."""
    scorer = lc.Llama(str(path), n_ctx=4096, n_threads=threads, logits_all=True, verbose=False)
    scorer.eval(prompt + answer)
    rows = np.asarray(scorer.scores[len(prompt) - 1 : len(prompt) + len(answer) - 1],
                      dtype=np.float64)
    nuclei = {
        str(position): {str(token): round(chance, 5)
                        for token, chance in default_chain(logits, sampling["temperature"]).items()}
        for position, logits in enumerate(rows)
    }
    scorer.close()
    return Chances(nuclei)


def step_costs(ctx: Any, prompt: list[int], repeats: int, max_rows: int) -> dict[int, float]:
    """Seconds of one ``llama_decode`` by rows (1..``max_rows``), after the prompt
    (evaluated first)."""
    mem = lc.llama_get_memory(ctx)
    lc.llama_memory_clear(mem, True)
    batch = lc.llama_batch_init(max(len(prompt), max_rows), 0, 1)

    def decode(tokens: list[int], pos0: int, logits_all: bool) -> float:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos0 + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = logits_all or i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        started = time.perf_counter()
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    try:
        decode(prompt, 0, False)
        costs: dict[int, list[float]] = {}
        for _ in range(repeats):  # rounds over every row count, so drift hits them alike
            for rows in range(1, max_rows + 1):
                costs.setdefault(rows, []).append(decode(prompt[:rows], len(prompt), True))
                lc.llama_memory_seq_rm(mem, 0, len(prompt), -1)
        return {rows: statistics.median(times) for rows, times in costs.items()}
    finally:
        lc.llama_batch_free(batch)


class LlmSpelling:
    """The model's tokenizer, for the other spellings of a learned edit (the worker gives its
    index the same)."""

    def __init__(self, llm: lc.Llama) -> None:
        self.llm = llm

    def text(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", "replace")

    def tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["rewrite", "edit", "chat"], default="rewrite")
    ap.add_argument("--model", type=Path,
                    help="GGUF (default: Qwen2.5-Coder-0.5B; for chat, pollama's default model)")
    ap.add_argument("--seed", type=int, help="the sampled answer's seed (chat; default: the "
                    "task's)")
    ap.add_argument("--prompt", help="the user's turn (default: the task's)")
    ap.add_argument("--answer-text", type=Path, help="replay this answer (say, a server's, "
                    "sampled with the task's settings), tokenized here, instead of the model's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--draft-max", type=int, default=DRAFT_MAX, help="the longest draft")
    ap.add_argument("--record", type=Path, help="also write the answer, the step costs and "
                    "the tokenizer's answers as a trace (tests/ngram_replay.py) to this file")
    args = ap.parse_args()
    if args.model is None and args.task == "chat":
        from pollama.default_model import default_gguf_path

        args.model = default_gguf_path()
    elif args.model is None:
        from models import qwen_coder_gguf

        args.model = qwen_coder_gguf()
    ctx, llm = load(args.model, args.threads)
    text, limit, sampling = TASKS[args.task]
    if args.seed is not None:
        sampling = {**sampling, "seed": args.seed}
    prompt = prompt_tokens(llm, args.prompt or text)
    if args.answer_text:
        answer = llm.tokenize(args.answer_text.read_bytes(), add_bos=False, special=False)
    else:
        answer = answer_tokens(llm, prompt, limit, sampling)
    costs = step_costs(ctx, prompt, args.repeats, args.draft_max + 1)
    spelling = RecordingSpelling(LlmSpelling(llm))
    weigh = None
    if sampling.get("temperature", 0) > 0:
        weigh = chances(args.model, prompt, answer, sampling, args.threads)
    drafts = lookups(prompt, answer, args.draft_max, spelling)
    base, _ = replay(drafts, costs, "none")
    print(f"{args.task} on {args.model.name}, {args.threads} threads: prompt {len(prompt)} "
          f"tokens, answer {len(answer)} tokens\n")
    print("rows | " + " | ".join(str(r) for r in costs))
    print("ms | " + " | ".join(f"{costs[r] * 1e3:.1f}" for r in costs) + "\n")
    print("| drafting | steps | decode s | speedup |\n|---|--:|--:|--:|")
    for policy, label in (("none", "none"), ("always", f"always {args.draft_max}"),
                          ("pollama", "pollama's policy"), ("oracle", "oracle (ceiling)")):
        if policy == "oracle":
            seconds, steps = oracle(drafts, costs)
        elif policy == "pollama":
            replayed = replay_policy(prompt, answer, costs, args.draft_max, spelling,
                                     weigh=weigh)
            seconds, steps = replayed.seconds, replayed.steps
        else:
            seconds, steps = replay(drafts, costs, policy)
        print(f"| {label} | {steps} | {seconds:.2f} | {base / seconds:.2f} |")
    if args.record:
        cpu = cpu_info()[0]
        about = (f"{args.task} on {args.model.name}, {args.threads} threads, {cpu}, "
                 f"{dt.date.today()}: bench/spec_ceiling.py --record")
        replayed_spelling = ReplayedSpelling(spelling.texts, spelling.tokens_of)
        if weigh is not None:
            about += f" (temperature {sampling['temperature']}, seed {sampling['seed']})"
        if args.prompt or args.answer_text:
            about += f", prompt {args.prompt or text!r}"
            about += f", answer from {args.answer_text.name}" if args.answer_text else ""
        Trace(about, prompt, answer, costs, args.draft_max, replayed_spelling,
              weigh).save(args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
