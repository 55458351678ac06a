"""The pure parts of speculative decoding (``runner/ngram.py``): the n-gram lookup, the
expected yield of a draft, the measured cost of rows and what each request learns."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest

from pollama.runner.ngram import (
    MODEL_KEY,
    SUBS_MAX,
    Acceptance,
    NgramIndex,
    StepCosts,
    best_length,
    cheapest_probe,
    expected_tokens,
    word_variants,
)


def test_the_draft_is_what_followed_the_latest_occurrence_of_the_tail() -> None:
    index = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3])
    # "2 3" occurred twice before the tail: the latest was followed by 7 8 6 2 3
    assert index.draft(3) == ([7, 8, 6], 2)
    assert index.draft(10) == ([7, 8, 6, 2, 3], 2)  # up to the end of the history
    assert index.draft(0) == ([], 0)


def test_the_longest_matching_key_wins_over_a_later_short_one() -> None:
    # "1 2 3 4" is followed by 50; a later "3 4" by 60. The tail "1 2 3 4" matches both.
    history = [1, 2, 3, 4, 50, 51, 9, 3, 4, 60, 61, 1, 2, 3, 4]
    assert NgramIndex(history).draft(2) == ([50, 51], 4)
    # With only the two-token key the latest occurrence is taken.
    assert NgramIndex(history, sizes=(2,)).draft(2) == ([60, 61], 2)


def test_the_tail_itself_is_never_a_match_and_extend_follows_the_output() -> None:
    index = NgramIndex([5, 6, 7])
    assert index.draft(4) == ([], 0)  # "6 7" occurs only at the end
    index.extend([5, 6])
    assert index.draft(4) == ([7, 5, 6], 2)
    # a repeating pattern drafts its own continuation, overlapping the tail
    loop = NgramIndex([1, 2, 1, 2, 1, 2])
    assert loop.draft(5) == ([1, 2], 4)


def test_a_single_token_never_drafts() -> None:
    index = NgramIndex([4, 8, 4])
    assert index.draft(3) == ([], 0)


def test_expected_tokens() -> None:
    assert expected_tokens([]) == 1.0
    assert expected_tokens([0.5] * 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([1.0] * 8) == 9.0
    assert expected_tokens([0.5, 1.0, 0.0, 1.0]) == pytest.approx(1 + 0.5 + 0.5)


def _costs(a: float, b: float, rows: range = range(1, 40)) -> StepCosts:
    """Decode times ``a + b * rows``, measured for every row count in ``rows``."""
    costs = StepCosts()
    for n in rows:
        costs.record(n, a + b * n)
    return costs


def test_measured_times_and_hopeful_guesses() -> None:
    costs = StepCosts()
    assert costs.time(5) / costs.time(1) == pytest.approx(2.0)  # the prior: a quarter a row
    costs.record(1, 0.04)
    costs.record(4, 0.06)
    costs.record(5, 0.09)  # rows go four at a time: five cost more than eight might
    assert (costs.time(1), costs.time(4), costs.time(5)) == (0.04, 0.06, 0.09)
    # never measured: the nearest count under it, and a quarter of one row's time a row
    assert costs.time(9) == pytest.approx(0.09 + 4 * 0.01)
    for _ in range(20):
        costs.record(1, 0.02)
    assert costs.time(1) == pytest.approx(0.02, rel=0.05)  # a moving average
    drafted_first = StepCosts()  # the first step measured already held a draft
    drafted_first.record(9, 0.06)
    assert drafted_first.time(1) == pytest.approx(0.02)  # the prior's line through it
    assert 0 < drafted_first.time(1) < drafted_first.time(2) < 0.06


def test_a_shape_between_two_measured_ones_is_guessed_on_the_line_through_them() -> None:
    costs = StepCosts()
    for rows, seconds in ((1, 0.036), (3, 0.1), (43, 0.67)):
        costs.record(rows, seconds)
    # the line from 3 rows to 43, not 3 rows and a quarter of a row per row: a 42-row draft
    # must not look 20 % cheaper than the 43 rows measured beside it
    assert costs.time(23) == pytest.approx(0.1 + (0.67 - 0.1) * 20 / 40)
    assert costs.time(2) == pytest.approx(0.068)
    assert costs.time(64) == pytest.approx(0.67 + 21 * 0.25 * 0.036)  # above: hopeful


def test_the_line_between_measured_shapes_stops_at_both_ends() -> None:
    from pollama.runner.shapes import on_the_line

    times = {2: 0.06, 4: 0.1, 16: 0.3}
    counts = sorted(times)
    assert on_the_line(3, counts, times) == pytest.approx(0.08)
    assert on_the_line(10, counts, times) == pytest.approx(0.2)
    assert on_the_line(16, counts, times) == pytest.approx(0.3)  # a measured count: its time
    assert [on_the_line(r, counts, times) for r in (1, 2, 17)] == [None, None, None]
    assert on_the_line(5, [], {}) is None


def test_one_slow_first_sample_of_a_rare_shape_is_outweighed_by_the_next() -> None:
    costs = StepCosts()
    costs.record(64, 1.1)  # another process was busy during the first long draft
    costs.record(64, 0.8)
    assert costs.time(64) == pytest.approx(0.95)  # the plain mean: not 1.1 - 0.2 * 0.3
    costs.record(64, 0.8)
    assert costs.time(64) == pytest.approx(0.9)
    for _ in range(40):
        costs.record(64, 0.8)
    assert costs.time(64) == pytest.approx(0.8, rel=0.01)
    for _ in range(3):  # later, a moving average: the cost follows the machine
        costs.record(64, 1.6)
    assert 1.1 < costs.time(64) < 1.3


def test_a_shape_measured_while_the_machine_was_slow_is_priced_at_todays_speed() -> None:
    costs = StepCosts()  # one stream: the reference is one row
    for _ in range(5):  # a busy neighbour: one row 0.1 s, and a draft of 7 measured then
        costs.record(1, 0.1)
    costs.record(8, 0.3)
    assert costs.time(8) == pytest.approx(0.3)
    for _ in range(40):  # the neighbour left: one row 0.025 s again, 8 rows never re-measured
        costs.record(1, 0.025)
    assert costs.time(1) == pytest.approx(0.025, rel=0.01)
    # 8 rows cost three one-row steps when measured, and so now: 0.075 s, not 0.3 (which
    # is twelve of today's steps, and no draft of 7 would ever pay again)
    assert costs.time(8) == pytest.approx(0.075, rel=0.01)
    assert costs.time(4) == pytest.approx(0.025 + (0.075 - 0.025) * 3 / 7, rel=0.01)
    assert best_length([0.95] * 7, 1, 1, costs) == 7
    for _ in range(40):
        costs.record(8, 0.1)  # until the shape is measured again: its own ratio
    assert costs.time(8) == pytest.approx(0.1, rel=0.01)


def test_shapes_turn_relative_only_once_the_reference_has_settled() -> None:
    """Four streams whose first decode-only step measured held drafts (8 rows, 20 ms), then
    one fast step without (6 ms), then the usual 13.5 ms. Divided by that one fast sample,
    8 rows would cost 3.3 steps of 4 for good, where they cost 1.7."""
    costs = StepCosts(reference=4)
    costs.record(8, 0.020)
    costs.record(4, 0.006)
    assert costs.time(8) == pytest.approx(0.020)  # seconds, until the reference settles
    for _ in range(4):
        costs.record(4, 0.0135)
    assert costs.time(4) == pytest.approx(0.012)  # the plain mean of its five samples
    assert costs.time(8) == pytest.approx(0.020)
    for _ in range(40):
        costs.record(4, 0.006)  # the machine got twice as fast: 8 rows follow it
    assert costs.time(8) / costs.time(4) == pytest.approx(0.020 / 0.012)
    assert costs.time(8) == pytest.approx(0.010, rel=0.01)


def _best_length_by_every_length(rates: Sequence[float], streams: int, rows: int,
                                 costs: StepCosts, per_token: float = 0.0) -> int:
    """best_length as it was first written: every length weighed, each time asked anew."""
    base, weight = costs.time(rows), max(1, streams)
    best_k, best = 0, math.log(1.03)
    tokens, term = 1.0, 1.0
    for k, rate in enumerate(rates, 1):
        term *= rate
        tokens += term
        slower = (costs.time(rows + k) + k * per_token) / base
        value = math.log(tokens) - weight * math.log(slower)
        if value > best:
            best_k, best = k, value
    return best_k


def test_the_weights_kept_between_steps_and_the_early_stop_change_no_length() -> None:
    """best_length keeps each step's slowdowns until a shape's guess changes and stops
    where no longer draft can do better; Acceptance.length skips the odds where no draft
    of the limit can pay. Neither may change a length, over many costs, odds, streams and
    rows, with steps of the reference (which keep the slowdowns) and of shapes (which do
    not) between the questions."""
    rng = random.Random(7)
    for _ in range(300):
        streams = rng.choice([1, 1, 2, 4, 8, 16])
        costs = StepCosts(reference=streams)
        row_cost = rng.choice([0.02, 0.1, 0.3, 0.6, 1.0])
        shapes = rng.sample(range(streams + 1, streams + 65), rng.randrange(0, 8))
        for rows in [streams] * rng.randrange(0, 8) + shapes:
            extra = rows - streams
            costs.record(rows, 0.01 * (1 + row_cost * extra) * rng.uniform(0.8, 1.25))
        acceptance = Acceptance()
        for _ in range(10):
            rows = streams + rng.choice([0, 0, 0, 3, 10])
            rates = [rng.choice([0.3, 0.7, 0.9, 0.98, 1.0]) for _ in range(rng.randrange(0, 64))]
            expected = _best_length_by_every_length(rates, streams, rows, costs)
            assert best_length(rates, streams, rows, costs) == expected
            per_token = rng.choice([0.001, 0.004])  # a draft model's seconds a token
            expected = _best_length_by_every_length(rates, streams, rows, costs, per_token)
            assert best_length(rates, streams, rows, costs, per_token) == expected
            key, limit = rng.choice([2, 7, 30]), rng.choice([0, 1, 5, 63])
            expected = _best_length_by_every_length(acceptance.rates(key, limit), streams, rows,
                                                    costs)
            assert acceptance.length(key, limit, streams, rows, costs) == expected
            if rng.random() < 0.5:
                costs.record(streams, 0.01 * rng.uniform(0.5, 2.0))  # the machine's speed
            else:
                costs.record(rng.randrange(streams + 1, streams + 65), 0.01 * rng.uniform(1, 9))


def test_a_draft_pays_only_when_it_is_likely_and_rows_are_cheap() -> None:
    cheap = _costs(0.02, 0.002)  # a row is a tenth of a step
    dear = _costs(0.0, 0.01)  # a row costs as much as a step: batching gains nothing
    assert best_length([0.98] * 16, 1, 1, cheap) == 16
    assert best_length([0.1] * 16, 1, 1, cheap) == 0
    assert best_length([0.98] * 16, 1, 1, dear) == 0
    # with four streams decoding, the same draft slows them all: it must pay more
    middling = _costs(0.02, 0.006)
    alone = best_length([0.7] * 16, 1, 1, middling)
    shared = best_length([0.7] * 16, 4, 4, middling)
    assert alone > shared


def test_a_draft_must_pay_every_stream_it_slows() -> None:
    """Measured with SmolLM2 on 2 CPU cores: 1 row 11 ms, 16 rows 100 ms, 24 rows 135 ms.
    A near-certain draft of 8 beside 15 other streams makes the most tokens per second of
    the step (23.3 in 135 ms against 16 in 100), but costs each of the 15 others a third
    more time a token for its own 7: it is not drafted. Alone it pays; where rows are
    nearly free (a GPU), it pays beside them too."""
    measured = StepCosts()
    for rows, seconds in ((1, 0.011), (16, 0.100), (24, 0.135)):
        measured.record(rows, seconds)
    sure = [0.98] * 8
    assert (16 + expected_tokens(sure) - 1) / 0.135 > 1.03 * 16 / 0.100  # the sum's verdict
    assert best_length(sure, 16, 16, measured) == 0
    assert best_length(sure, 1, 1, measured) > 0
    assert best_length(sure, 4, 4, _costs(0.0055, 0.0054)) == 0
    gpu = _costs(0.010, 0.00005)
    assert best_length(sure, 16, 16, gpu) == 8
    # a second draft in the same step weighs what the batch holds by then
    assert best_length(sure, 2, 10, gpu) == 8


def test_a_draft_models_cost_per_token_counts_against_its_draft() -> None:
    cheap = _costs(0.02, 0.002)
    assert best_length([0.9] * 8, 1, 1, cheap, per_token=0.002) > 0  # a draft a tenth the size
    assert best_length([0.9] * 8, 1, 1, cheap, per_token=0.02) == 0  # as big as the model
    # a draft model dearer than the step a kept token saves (its catch-up after the tokens
    # n-gram drafts brought included) is not even probed: a probe would cost more than it
    # could gain whatever it taught
    acceptance = Acceptance()
    assert not any(acceptance.length(MODEL_KEY, 8, 1, 1, cheap, per_token=0.05)
                   for _ in range(100))
    # once it costs less again, the probe that waited goes at once
    assert acceptance.length(MODEL_KEY, 8, 1, 1, cheap, per_token=0.012) == 1


def test_acceptance_follows_the_recent_odds_by_the_run_of_the_copy() -> None:
    acceptance = Acceptance()
    (odds_3,), (odds_8,), (odds_64,) = (acceptance.rates(run, 1) for run in (3, 8, 64))
    assert odds_64 > odds_8 > odds_3  # the priors: a copy that agreed long goes on agreeing
    # a draft's later tokens sit further into the copy: their odds are those of longer runs
    assert acceptance.rates(8, 60)[-1] == odds_64
    for _ in range(5):
        acceptance.record(8, 2, 2)
    assert acceptance.rates(8, 1)[0] > 0.95
    for _ in range(5):
        acceptance.record(8, 2, 0)
    # a run tested follows its tokens (ten kept of fifteen) more than its prior
    assert acceptance.rates(8, 1)[0] == pytest.approx(10 / 15, abs=0.05)
    model = acceptance.rates(MODEL_KEY, 3)
    assert len(set(model)) == 1 and model[0] == pytest.approx(2 / 3)  # the draft model's
    assert expected_tokens(acceptance.rates(MODEL_KEY, 2)) == pytest.approx(1 + 2 / 3 + 4 / 9)


def test_copies_not_drafted_teach_their_odds_and_are_never_probed() -> None:
    dear = _costs(0.0, 0.01)  # a row costs a step: no draft pays
    acceptance = Acceptance()
    assert not any(acceptance.length(4, 8, 1, 1, dear) for _ in range(300))
    (prior,) = acceptance.rates(4, 1)
    for _ in range(20):
        acceptance.observe(4, False)  # the token drawn was not the copy's
    (missed,) = acceptance.rates(4, 1)
    assert missed < prior / 2
    for _ in range(60):
        acceptance.observe(4, True)
    assert acceptance.rates(4, 1)[0] > missed + 0.3
    # what the observations taught is what drafting then weighs
    cheap = _costs(0.02, 0.002)
    assert acceptance.length(4, 8, 1, 1, cheap) > 1
    assert Acceptance().length(4, 8, 1, 1, cheap) >= 1


def test_tokens_tested_teach_their_chances_not_only_whether_they_were_kept() -> None:
    """A sampled answer that keeps a copy's tokens it drew at 0.6 each: counted as kept,
    the run's odds go to code's (and its long runs' with them, through the fit); weighed,
    they stay near 0.6 and no long draft pays. Weights of 1 and 0 are the counts."""
    counted, weighed, ones = Acceptance(), Acceptance(), Acceptance()
    for _ in range(6):
        counted.record(8, 3, 3)
        weighed.record(8, 3, 3, [0.6, 0.6, 0.6])
        ones.record(8, 3, 3, [1.0, 1.0, 1.0, 0.0])  # the row after a draft kept whole
        counted.observe(5, True)
        weighed.observe(5, True, 0.6)
        ones.observe(5, True, 1.0)
    assert ones.rates(8, 40) == counted.rates(8, 40) and ones._fit == counted._fit
    assert counted.rates(8, 1)[0] > 0.95
    assert weighed.rates(8, 1)[0] == pytest.approx(0.6, abs=0.1)
    assert weighed.rates(5, 1)[0] < counted.rates(5, 1)[0] - 0.2
    assert weighed.rates(40, 1)[0] < counted.rates(40, 1)[0] - 0.1  # untested: the fit
    cheap = _costs(0.02, 0.004)
    assert counted.length(8, 32, 1, 1, cheap) > 8
    assert weighed.length(8, 32, 1, 1, cheap) <= 2
    # weights for the first tokens tested only (the engine weighs WEIGHED_ROWS of a draft):
    # the rest count as drawn
    short, whole = Acceptance(), Acceptance()
    short.record(8, 12, 10, [0.5, 0.7])
    whole.record(8, 12, 10, [0.5, 0.7] + [1.0] * 8 + [0.0])
    assert short.rates(8, 20) == whole.rates(8, 20) and short._fit == whole._fit
    # a miss weighed by its chance: a refused token that had 0.3 counts 0.3 kept
    missed = Acceptance()
    for _ in range(6):
        missed.record(8, 3, 0, [0.3])
    assert missed.rates(8, 1)[0] == pytest.approx(0.3, abs=0.1)


def test_copies_that_break_early_make_every_copy_less_trusted() -> None:
    """A story meets a phrase of its own again, drafts a long copy of it and keeps two
    tokens: the odds of runs it never drafted (their priors come from code) fall too, so
    its next long copy is not drafted at 16 rows; a faithful copy keeps them whole."""
    costs = _costs(0.01, 0.002)  # a second row costs a sixth of a step more
    story, faithful = Acceptance(), Acceptance()
    (prior_32,) = story.rates(32, 1)
    assert story.length(32, 16, 1, 1, costs) == 16
    for _ in range(2):
        story.record(6, 13, 2)
    assert story.rates(32, 1)[0] < prior_32 * 0.6
    assert story.length(32, 16, 1, 1, costs) < 4
    for _ in range(2):
        faithful.record(6, 13, 13)
    assert faithful.rates(32, 1)[0] >= prior_32
    assert faithful.length(32, 16, 1, 1, costs) == 16
    # its copies hold again: the trust comes back
    for _ in range(30):
        story.observe(8, True)
    assert story.rates(32, 1)[0] > prior_32 * 0.9


def test_a_long_copy_that_holds_brings_the_trust_back_after_an_early_miss() -> None:
    """A copy with a correction near its start ("Thursdy" written "Thursday"): a 17-token
    draft misses at its first token, and every copy is trusted less. The copy then holds for
    long: its kept tokens, observed or drafted, bring the trust back, so the rest of it is
    drafted; its breaks never count against it (an edit breaks a long copy once)."""
    costs = _costs(0.005, 0.005)  # a second row costs half a step more, as on 2 CPU cores
    for hold in ("observed", "drafted"):
        acceptance = Acceptance()
        (prior_48,) = acceptance.rates(48, 1)
        acceptance.record(6, 17, 0)
        assert acceptance.rates(48, 1)[0] < prior_48 * 0.2
        assert acceptance.length(48, 16, 1, 1, costs) == 0
        if hold == "observed":
            for run in range(16, 32):
                acceptance.observe(run, True)
        else:
            acceptance.record(16, 8, 8)
            acceptance.record(25, 8, 8)
        assert acceptance.rates(48, 1)[0] > prior_48 * 0.7, hold
        assert acceptance.length(48, 16, 1, 1, costs) >= 1
    broken = Acceptance()  # a long copy's break (an edit of code) teaches the fit nothing
    broken.record(20, 8, 3)
    assert broken.rates(48, 1)[0] >= Acceptance().rates(48, 1)[0]


def test_a_draft_model_is_probed_with_back_off_while_it_does_not_pay() -> None:
    costs = _costs(0.02, 0.006)  # a kept token would pay; its guesses are never kept
    acceptance = Acceptance()
    probes = []
    for step in range(300):
        k = acceptance.length(MODEL_KEY, 8, 1, 1, costs)
        if k:
            probes.append((step, k))
            acceptance.record(MODEL_KEY, k, 0)
    # drafts while its prior odds last, then probes of one token with gaps of 4, 8, 16, ...
    assert [step for step, _ in probes[4:9]] == [5, 9, 17, 33, 65]
    assert all(k == 1 for _, k in probes[4:]) and len(probes) <= 11
    # a probe that brings the rate back resets the gap
    good = _costs(0.02, 0.002)
    for _ in range(6):
        acceptance.record(MODEL_KEY, 4, 4)
    assert acceptance.length(MODEL_KEY, 8, 1, 1, good) > 1


def test_a_probe_takes_the_rows_that_cost_least() -> None:
    costs = _costs(0.0, 0.01, range(1, 10))  # each row costs as much as a step
    assert cheapest_probe(8, 1, costs) == 1
    kernels = StepCosts()  # as llama.cpp's CPU kernels do: four rows cost what two do
    for rows, seconds in ((1, 0.025), (2, 0.055), (3, 0.08), (4, 0.056), (5, 0.11)):
        kernels.record(rows, seconds)
    assert cheapest_probe(3, 1, kernels) == 3  # 4 rows: within 2 % of 2 rows
    assert cheapest_probe(8, 1, kernels) == 3  # 6 rows and more are guessed dearer
    assert cheapest_probe(2, 1, kernels) == 1


def test_a_step_timed_at_zero_never_divides_by_zero() -> None:
    from pollama.runner.ngram import StepCosts, best_length

    costs = StepCosts()
    costs.record(1, 0.0)  # ignored: not a measurement
    assert costs.time(0) > 0  # no measurement yet: the prior, even for an empty batch
    costs.record(6, 0.012)
    for rows in (0, 1, 3, 6, 9):
        assert costs.time(rows) > 0, rows
    assert 0 <= best_length([0.9] * 8, 1, 0, costs) <= 8


# A document of distinct tokens, with one word (OLD) at three places, and a rename of it.
OLD, NEW = 900, (901, 902)
DOC = [1, 2, 3, 4, 5, 6, OLD, 7, 8, 9, 10, 11, 12, 13, OLD, 14, 15, 16, 17, 18, OLD, 19, 20, 21]


def _renamed(tokens: list[int]) -> list[int]:
    out: list[int] = []
    for token in tokens:
        out += NEW if token == OLD else (token,)
    return out


def _generate(index: NgramIndex, tokens: list[int]) -> None:
    """The output comes a token at a time, looked up before each (as the engine drafts)."""
    for token in tokens:
        index.draft(8)
        index.extend([token])


def test_a_rename_is_learned_at_its_first_place_and_drafted_at_the_next() -> None:
    index = NgramIndex([100, *DOC, 101])
    first = DOC.index(OLD)
    index.extend(DOC[:first])  # the copy agreed for six tokens, then the output renames
    assert index.draft(3) == ([OLD, 7, 8], 6)
    index.extend([*NEW, 7, 8, 9])  # ...and agrees with the copy again for three tokens
    draft, run = index.draft(16)
    assert index.learned == {(OLD,): NEW}
    # the next occurrence is drafted as renamed, and the copy goes on after it
    assert draft[:9] == [10, 11, 12, 13, *NEW, 14, 15, 16]
    # the edit is explained, so the copy's run goes on through it: 6 before, 2 new, 3 after
    assert run == 11
    # following the copy past the new name, whose tokens never occur in the prompt
    second = DOC.index(OLD, first + 1)
    index.extend(_renamed(DOC[first + 4 : second + 1]))
    draft, run = index.draft(4)
    assert draft == [14, 15, 16, 17] and run > 8


def test_a_substitution_the_output_does_not_make_is_forgotten() -> None:
    index = NgramIndex([100, *DOC, 101])
    first = DOC.index(OLD)
    second = DOC.index(OLD, first + 1)
    _generate(index, _renamed(DOC[:second]))
    assert index.learned == {(OLD,): NEW}
    assert index.draft(2)[0] == [*NEW]
    index.extend([OLD])  # here the output kept the old word
    assert index.learned == {}
    assert index.draft(3)[0] == [14, 15, 16]  # and the copy is found again


def test_a_short_match_that_breaks_teaches_nothing() -> None:
    # two tokens agreed, not a copy: what comes after is no substitution
    index = NgramIndex([100, 1, 2, 3, 4, 5, 6, 7, 101])
    index.extend([1, 2])
    assert index.draft(3) == ([3, 4, 5], 2)
    index.extend([60, 4, 5, 6, 7])
    index.draft(3)
    assert index.learned == {}


def test_substitutions_are_bounded() -> None:
    # more words than are remembered, each renamed at its only place, with six tokens of
    # copy around each
    words = SUBS_MAX + 8
    doc: list[int] = []
    for word in range(words):
        doc += [10000 + 10 * word + i for i in range(6)] + [5000 + word]
    index = NgramIndex([100, *doc, 101])
    _generate(index, [token + 1000 if 5000 <= token < 6000 else token for token in doc])
    assert len(index.learned) == SUBS_MAX
    assert (5000,) not in index.learned  # the oldest went first
    assert (5000 + words - 2,) in index.learned


def test_other_spellings_of_a_word_are_learned_with_it() -> None:
    assert word_variants(" total", " grand_total")[:2] == [
        ("total", "grand_total"), (".total", ".grand_total")]
    assert word_variants(" a b", " c") == []  # not one word
    assert word_variants(" total", " total") == []

    class Vocabulary:
        """" total" 900, " grand" 901, "_total" 902, "total" 903, "grand" 904."""

        pieces = {900: " total", 901: " grand", 902: "_total", 903: "total", 904: "grand"}

        def text(self, tokens: Sequence[int]) -> str:
            return "".join(self.pieces.get(t, "?") for t in tokens)

        def tokens(self, text: str) -> list[int]:
            spelled = {"total": [903], "grand_total": [904, 902]}
            return spelled.get(text, [])

    # the word after a space, then as a dict key ("total" is another token there)
    doc = [1, 2, 3, 4, 5, 6, 900, 7, 8, 9, 10, 11, 12, 13, 903, 14, 15, 16, 17]
    index = NgramIndex([100, *doc, 101], spelling=Vocabulary())
    _generate(index, [1, 2, 3, 4, 5, 6, 901, 902, 7, 8, 9])
    index.draft(8)
    assert index.learned == {(900,): (901, 902), (903,): (904, 902)}
    assert index.draft(8)[0] == [10, 11, 12, 13, 904, 902, 14, 15]
    # where the output keeps the word's other spelling, the guess is forgotten and the
    # copy goes on with the original
    kept = NgramIndex([100, *doc, 101], spelling=Vocabulary())
    _generate(kept, [1, 2, 3, 4, 5, 6, 901, 902, 7, 8, 9, 10, 11, 12, 13])
    assert kept.draft(3)[0] == [904, 902, 14]
    kept.extend([903, 14])
    assert (903,) not in kept.learned and (900,) in kept.learned
    assert kept.draft(3) == ([15, 16, 17], kept.draft(3)[1])
    # the copy did not break: its run goes on from before the rename (a lookup after a break
    # would find a run of 9, back to the renamed place)
    assert kept.draft(3)[1] == 17
    without = NgramIndex([100, *doc, 101])  # no tokenizer: the one spelling only
    _generate(without, [1, 2, 3, 4, 5, 6, 901, 902, 7, 8, 9])
    assert without.draft(8)[0] == [10, 11, 12, 13, 903, 14, 15, 16]
