"""Replaying an answer through pollama's drafting policy, with step costs given.

The worker drafts from the prompt with ``runner/ngram.py``: ``NgramIndex`` finds the copy
and its draft, ``Acceptance`` weighs it against the step costs the worker measures
(``StepCosts``), and each step keeps the drafted tokens up to the first the model does not
draw. For one stream and a greedy answer that is a pure function of the prompt, the answer
and the costs, so an answer can be replayed without the model: ``bench/spec_ceiling.py``
prices it against the oracle, and ``test_ngram_replay.py`` pins what the policy keeps of a
recorded answer (``--record`` writes one). A sampled answer with a seed is nearly as fixed
(one random number a row, drafted or not); what the policy learns from it also takes the
sampler chain's chance of each token tested, which its trace records (:class:`Chances`).

What must stay true: :func:`replay_policy` runs one stream as ``Engine._add_drafts`` and
``Engine._verify`` do (one lookup per step, the index following the output and learning its
edits through the tokenizer, a copy not drafted told whether its first token was drawn, and
with what chance from a run of ``WEIGHED_RUN``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pollama.runner.ngram import (
    WEIGHED_ROWS,
    WEIGHED_RUN,
    Acceptance,
    NgramIndex,
    Spelling,
    StepCosts,
)

__all__ = [
    "Chances",
    "RecordingSpelling",
    "Replay",
    "ReplayedSpelling",
    "Trace",
    "Weigh",
    "agreeing",
    "default_chain",
    "lookups",
    "oracle",
    "replay",
    "replay_policy",
]


def agreeing(candidate: Sequence[int], answer: Sequence[int], done: int) -> int:
    """How many of a draft's first tokens the answer has from position ``done`` on."""
    kept = 0
    while (
        kept < len(candidate)
        and done + kept < len(answer)
        and (answer[done + kept] == candidate[kept])
    ):
        kept += 1
    return kept


Weigh = Callable[[int, int], float]
"""The chance a token had of being drawn at a position of the answer (``(position,
token)``): the sampler chain's probability of it there."""

Lookup = tuple[int, int, int]
"""At a position of the answer: the draft's length, its copy's run, how much of it holds."""


def lookups(
    prompt: list[int], answer: list[int], draft_max: int, spelling: Spelling | None = None
) -> list[Lookup]:
    """The lookup's draft at each position of ``answer`` (index 0, which the prompt's
    evaluation samples, has none): a draft depends only on the tokens before its position,
    so every policy meets the same ones."""
    index = NgramIndex(prompt + answer[:1], spelling=spelling)
    found: list[Lookup] = [(0, 0, 0)]
    for done in range(1, len(answer)):
        candidate, run = index.draft(draft_max)
        found.append((len(candidate), run, agreeing(candidate, answer, done)))
        index.extend(answer[done : done + 1])
    return found


def replay(drafts: list[Lookup], costs: dict[int, float], policy: str) -> tuple[float, int]:
    """Decode seconds and steps to produce the answer drafting a whole draft at every match
    (``always``) or none (``none``)."""
    done, seconds, steps = 1, 0.0, 0
    while done < len(drafts):
        length, _run, kept = drafts[done]
        k = length if policy == "always" else 0
        seconds += costs[1 + k]
        steps += 1
        done += min(kept, k) + 1
    return seconds, steps


def oracle(drafts: list[Lookup], costs: dict[int, float]) -> tuple[float, int]:
    """The fewest decode seconds (and its steps) to produce the answer with these drafts,
    choosing each step's draft length knowing what will be kept (a dynamic program from
    the end of the answer)."""
    end = len(drafts)
    best: list[tuple[float, int]] = [(0.0, 0)] * (end + 1)
    for done in range(end - 1, 0, -1):
        length, _run, kept = drafts[done]
        options = []
        for k in range(length + 1):
            seconds, steps = best[min(end, done + min(kept, k) + 1)]
            options.append((costs[1 + k] + seconds, steps + 1))
        best[done] = min(options)
    return best[1]


@dataclass(frozen=True)
class Replay:
    seconds: float  # decode seconds, priced with the costs given
    steps: int  # decodes after the prompt's
    kept: int  # drafted tokens kept


def replay_policy(
    prompt: list[int],
    answer: list[int],
    costs: dict[int, float],
    draft_max: int,
    spelling: Spelling | None = None,
    *,
    worker: StepCosts | None = None,
    slower: float = 1.0,
    weigh: Weigh | None = None,
) -> Replay:
    """The answer's decodes as the worker drafts them for one stream, ``costs`` (seconds of
    one decode by rows, 1 to ``draft_max + 1``) in place of its running measurements.
    The answer's first token comes from the prompt's evaluation.

    With ``worker``, the costs are not known in advance: each step's time (its cost, times
    ``slower`` while another process is busy) is recorded into the worker's own
    ``StepCosts`` as the engine records its decodes, and the next request given the same
    ``worker`` starts from what this one measured.

    With ``weigh`` (a sampled answer's :class:`Chances`), each token tested teaches
    the chance it had of being kept, as the engine's sampler chain tells it; without, it
    counts as kept or not (a greedy answer's chances)."""
    if worker is None:
        measured = StepCosts()
        for rows, seconds in costs.items():
            measured.record(rows, seconds)
    else:
        measured = worker
    index, acceptance = NgramIndex(prompt + answer[:1], spelling=spelling), Acceptance()
    done, seconds, steps, kept_all = 1, 0.0, 0, 0
    while done < len(answer):
        limit = min(draft_max, len(answer) - done)
        if measured.longest_that_may_pay(limit, 1, 1):
            candidate, run = index.draft(limit)
        else:  # no draft could pay: the engine looks nothing up (Engine._beyond_pay)
            candidate, run = [], 0
        agree = agreeing(candidate, answer, done)
        k = acceptance.length(run, len(candidate), 1, 1, measured) if candidate else 0
        kept = min(agree, k)
        tested = candidate[: kept + 1 if kept < k else k] if k else candidate[:1]
        weights = None  # as drawn: greedy, or a short copy not drafted (as the engine)
        if weigh is not None and (k or run >= WEIGHED_RUN):
            weights = [weigh(done + i, t) for i, t in enumerate(tested[:WEIGHED_ROWS])]
        if k:
            acceptance.record(run, k, kept, weights)
        elif candidate:  # the engine checks a copy not drafted against the token drawn
            acceptance.observe(run, agree > 0, None if weights is None else weights[0])
        step = costs[1 + k] * slower
        if worker is not None:
            worker.record(1 + k, step)
        seconds += step
        steps += 1
        kept_all += kept
        index.extend(answer[done : done + kept + 1])
        done += kept + 1
    return Replay(seconds, steps, kept_all)


def default_chain(logits: npt.NDArray[np.float64], temperature: float) -> dict[int, float]:
    """The tokens pollama's default sampler chain keeps from a row's ``logits`` (top_k 40,
    top_p 0.9, then the temperature) and the probability it gives each, worked out with
    numpy (``test_sampler_weighing.py`` checks it against the chain itself)."""
    top = np.argsort(-logits, kind="stable")[:40]
    p = np.exp(logits[top] - logits[top].max())
    p /= p.sum()
    nucleus = top[: int(np.searchsorted(np.cumsum(p), 0.9)) + 1]
    q = np.exp((logits[nucleus] - logits[nucleus].max()) / temperature)
    q /= q.sum()
    return {int(token): float(chance) for token, chance in zip(nucleus, q, strict=True)}


class Chances:
    """A sampled answer's chances (a :data:`Weigh`): at each position of the answer, the
    sampler chain's probability of every token it keeps there (its nucleus; any other
    token's is 0), as ``bench/spec_ceiling.py --record`` works them out from the model."""

    def __init__(self, nuclei: dict[str, dict[str, float]]) -> None:
        self.nuclei = nuclei  # position -> token -> probability, as JSON keys

    def __call__(self, position: int, token: int) -> float:
        nucleus = self.nuclei.get(str(position))
        if nucleus is None:
            raise KeyError(f"the trace has no chances at position {position}")
        return nucleus.get(str(token), 0.0)


class RecordingSpelling:
    """A tokenizer (``Spelling``) that remembers what it was asked, for a :class:`Trace`."""

    def __init__(self, spelling: Spelling) -> None:
        self.spelling = spelling
        self.texts: dict[str, str] = {}  # token ids (JSON) -> text
        self.tokens_of: dict[str, list[int]] = {}  # text -> token ids

    def text(self, tokens: Sequence[int]) -> str:
        text = self.spelling.text(tokens)
        self.texts[json.dumps(list(tokens))] = text
        return text

    def tokens(self, text: str) -> list[int]:
        tokens = self.spelling.tokens(text)
        self.tokens_of[text] = tokens
        return tokens


class ReplayedSpelling:
    """The answers a :class:`RecordingSpelling` gave; a question it was never asked is an
    error (the policy changed what it asks: record the trace again)."""

    def __init__(self, texts: dict[str, str], tokens_of: dict[str, list[int]]) -> None:
        self.texts, self.tokens_of = texts, tokens_of

    def text(self, tokens: Sequence[int]) -> str:
        key = json.dumps(list(tokens))
        if key not in self.texts:
            raise KeyError(f"the trace never spelled {key}: record it again (--record)")
        return self.texts[key]

    def tokens(self, text: str) -> list[int]:
        if text not in self.tokens_of:
            raise KeyError(f"the trace never tokenized {text!r}: record it again (--record)")
        return self.tokens_of[text]


@dataclass(frozen=True)
class Trace:
    """An answer, the step costs measured beside it and the tokenizer's answers; for a
    sampled answer, the chances the tokens tested had (None: greedy)."""

    about: str  # model, task, machine, date
    prompt: list[int]
    answer: list[int]
    costs: dict[int, float]
    draft_max: int
    spelling: ReplayedSpelling
    chances: Chances | None = None

    def save(self, path: Path) -> None:
        data: dict[str, Any] = {
            "about": self.about,
            "draft_max": self.draft_max,
            "costs": {str(rows): seconds for rows, seconds in self.costs.items()},
            "prompt": self.prompt,
            "answer": self.answer,
            "texts": self.spelling.texts,
            "tokens_of": self.spelling.tokens_of,
        }
        if self.chances is not None:
            data["chances"] = self.chances.nuclei
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    @staticmethod
    def load(path: Path) -> Trace:
        data = json.loads(path.read_text())
        return Trace(
            about=data["about"],
            prompt=data["prompt"],
            answer=data["answer"],
            costs={int(rows): seconds for rows, seconds in data["costs"].items()},
            draft_max=data["draft_max"],
            spelling=ReplayedSpelling(data["texts"], data["tokens_of"]),
            chances=Chances(data["chances"]) if "chances" in data else None,
        )
