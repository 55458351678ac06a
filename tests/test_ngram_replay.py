"""The drafting policy on a real answer, replayed with fixed step costs (no model, no clock).

The trace (``golden/drafting/``) is Qwen2.5-Coder-0.5B's greedy answer to the rewrite task of
``bench/spec_bench.py`` (rename a variable in a function: it copies most of its prompt, drops
a line and rewrites another), with the decode costs of 1 to 64 rows measured beside it on
the 2-core EPYC and the tokenizer's answers to what the index asked; ``bench/spec_ceiling.py
--record`` writes it. The end-to-end test of the same kind
(``test_e2e_speculative.py``) runs on whatever the machine's costs are that minute, so it can
only ask for half of its answer from drafts; here the costs are fixed, and the policy's
quality is pinned against the oracle (the fewest decode seconds any choice of draft lengths
gives, knowing the answer) and against not drafting at all.

Costs are varied as the machine varies them: every row above the first dearer or cheaper by
a factor (``_scaled``); at the recorded costs a 3-row step costs 2.8 one-row steps and 64 rows
26 of them. A worker does not know its costs in advance: ``_requests`` replays several
requests on one worker that measures them as it drafts, as the engine does.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from ngram_replay import Trace, lookups, oracle, replay, replay_policy
from pollama.runner.ngram import StepCosts

GOLDEN = Path(__file__).parent / "golden" / "drafting"
TRACE = GOLDEN / "rewrite-qwen2.5-coder-0.5b.json"
CHATS = ["chat-smollm2-server-seed1.json", "chat-smollm2-seed1.json", "chat-smollm2-seed3.json"]
"""SmolLM2-135M's stories sampled at temperature 0.8 (``bench/spec_ceiling.py --task chat
--record``): two of its own (seeds 1 and 3 of the benchmark's prompt), and one a server
gave (the lighthouse story ``test_e2e_speculative.py`` also asks for), each with the
sampler chain's chances at every position. The server's repeats a passage of 14 tokens
at 0.2-1.0 a token and then leaves it."""


@pytest.fixture(scope="module")
def trace() -> Trace:
    return Trace.load(TRACE)


def _scaled(costs: dict[int, float], factor: float) -> dict[int, float]:
    """Every row above the first ``factor`` times what it added (1: the costs measured)."""
    one = costs[1]
    return {rows: one + factor * (seconds - one) for rows, seconds in costs.items()}


def _speedups(trace: Trace, factor: float) -> tuple[float, float, int]:
    """The policy's and the oracle's speedup over no drafting, and the tokens it kept."""
    costs = _scaled(trace.costs, factor)
    drafts = lookups(trace.prompt, trace.answer, trace.draft_max, trace.spelling)
    none, _ = replay(drafts, costs, "none")
    best, _ = oracle(drafts, costs)
    policy = replay_policy(trace.prompt, trace.answer, costs, trace.draft_max, trace.spelling)
    return none / policy.seconds, none / best, policy.kept


def test_the_trace_is_a_copy_with_edits(trace: Trace) -> None:
    assert len(trace.prompt) > 150 and len(trace.answer) > 100
    assert set(trace.costs) == set(range(1, trace.draft_max + 2))
    # drafting can pay: a full draft's step costs far less than its rows one by one
    assert trace.costs[64] < 64 * trace.costs[1] / 2


def test_at_the_measured_costs_most_of_a_rewrite_comes_from_drafts(trace: Trace) -> None:
    speedup, ceiling, kept = _speedups(trace, 1.0)
    # replayed: 88 of 110 tokens kept, 1.64 against the oracle's 1.87
    assert kept >= 3 * len(trace.answer) // 4
    assert speedup >= 1.5
    assert speedup >= 0.8 * ceiling


def test_cheaper_rows_are_used(trace: Trace) -> None:
    speedup, _ceiling, kept = _speedups(trace, 0.5)
    assert speedup >= 1.5  # replayed: 1.9, 91 kept
    assert kept >= 3 * len(trace.answer) // 4


def test_dearer_rows_draft_less_and_stay_near_the_ceiling(trace: Trace) -> None:
    speedup, ceiling, kept = _speedups(trace, 2.0)
    assert 1.0 <= speedup and speedup >= 0.9 * ceiling  # replayed: 1.06 of 1.10, 60 kept
    assert kept < 3 * len(trace.answer) // 4


@pytest.mark.parametrize("factor", [2.5, 3.0, 5.0])
def test_where_no_draft_pays_the_policy_is_never_slower(trace: Trace, factor: float) -> None:
    speedup, ceiling, kept = _speedups(trace, factor)
    assert ceiling == pytest.approx(1.0)  # even knowing the answer, no draft pays
    assert speedup >= 0.99
    assert kept == 0


def _requests(trace: Trace, slower: list[float]) -> list[float]:
    """One worker's requests of the trace's prompt, its step costs measured as it goes (no
    cost known in advance), each request ``slower`` times the recorded costs: each one's
    speedup over not drafting at the recorded costs."""
    none, _ = replay(lookups(trace.prompt, trace.answer, trace.draft_max, trace.spelling),
                     trace.costs, "none")
    worker = StepCosts()
    return [
        none / replay_policy(trace.prompt, trace.answer, trace.costs, trace.draft_max,
                             trace.spelling, worker=worker, slower=factor).seconds
        for factor in slower
    ]


def test_a_worker_drafts_again_after_a_busy_spell(trace: Trace) -> None:
    """The first request runs while another process makes every decode three times as slow,
    the next ones on an idle machine. Kept in seconds, the shapes measured during the spell
    stayed dear, no draft of them paid again and the next requests drafted nothing (1.00x);
    kept relative to the step that drafts nothing, they are priced at the idle speed."""
    idle = _requests(trace, [1.0] * 4)
    after_spell = _requests(trace, [3.0, 1.0, 1.0, 1.0])
    # replayed: idle 1.36, 1.20, 1.27, 1.27; after the spell 1.18, 1.37, 1.27
    assert min(idle) >= 1.15
    assert min(after_spell[1:]) >= 1.15
    assert sum(after_spell[1:]) >= 0.95 * sum(idle[1:])


def _chat_requests(trace: Trace, factor: float, weighed: bool, n: int = 4) -> list[float]:
    """A fresh worker's ``n`` requests of a sampled chat trace, rows ``factor`` times as
    dear as recorded: each one's speedup over not drafting. ``weighed``: each token tested
    teaches its chance (the engine); else whether it was kept."""
    costs = _scaled(trace.costs, factor)
    none, _ = replay(lookups(trace.prompt, trace.answer, trace.draft_max, trace.spelling),
                     costs, "none")
    worker, weigh = StepCosts(), trace.chances if weighed else None
    assert trace.chances is not None
    return [
        none / replay_policy(trace.prompt, trace.answer, costs, trace.draft_max,
                             trace.spelling, worker=worker, weigh=weigh).seconds
        for _ in range(n)
    ]


@pytest.mark.parametrize("factor", [1.0, 1.25, 1.5])
def test_a_sampled_chat_is_not_slowed_by_its_drafts(factor: float) -> None:
    """Whatever the rows cost (SmolLM2's on 2 EPYC cores measured a second row at 1.5-2.0
    steps), a story's drafts cost it at most a few percent: its first request on a fresh
    worker pays for learning the costs, the next ones little or nothing."""
    later = []
    for name in CHATS:
        first, *rest = _chat_requests(Trace.load(GOLDEN / name), factor, weighed=True)
        assert first >= 0.97, name
        assert min(rest) >= 0.98, name
        later += rest
    # replayed: 0.995-1.000 at each factor
    assert statistics.geometric_mean(later) >= 0.99


def test_weighing_the_tokens_tested_keeps_a_passage_sampled_from_paying_for_drafts() -> None:
    """The server's story repeats a passage of its own, drawn at 0.2-1.0 a token. Counted as
    kept, its tokens took the odds of the runs it met to code's (0.8-0.96), and seven of the
    nine drafts after it kept nothing; weighed by their chances, the odds stay a story's."""
    trace = Trace.load(GOLDEN / CHATS[0])
    kept = _chat_requests(trace, 1.25, weighed=False)
    weighed = _chat_requests(trace, 1.25, weighed=True)
    # replayed: kept 0.94, then 0.974; weighed 1.005, then 0.995
    assert max(kept[1:]) < 0.98
    assert min(weighed[1:]) >= 0.99
    assert sum(weighed) > sum(kept) + 0.05
