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

from pathlib import Path

import pytest

from ngram_replay import Trace, lookups, oracle, replay, replay_policy
from pollama.runner.ngram import StepCosts

TRACE = Path(__file__).parent / "golden" / "drafting" / "rewrite-qwen2.5-coder-0.5b.json"


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
