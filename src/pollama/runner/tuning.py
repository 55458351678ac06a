"""Choosing the decode thread count from measured step times (used by ``runner/engine.py``).

ggml runs each graph on OpenMP threads that meet at a barrier after every node, hundreds of
times per token. On an idle machine all the cores the worker may use are fastest. When
something else keeps a core busy (another model's worker generating, a CPU-bound neighbour),
a barrier waits for a partner thread that is not running, and the decode collapses: measured
with SmolLM2-135M on 2 cores, about 100 tok/s alone, 1-10 tok/s beside one busy process,
while one thread still made ~45-70. No setting is right for both cases, so the tuner
measures: when decode steps get much slower than the best seen, it tries fewer threads for a
few steps and keeps them if they are faster (also once early and then every minute or so,
in case the neighbour was there from the start); from fewer threads it tries all of them
again now and then. Tries that fail come less and less often; on an idle machine they cost
about 0.3 % (four slower steps every minute). A try that nothing asked for (no slowdown seen)
runs only on steps that cost at most twice the cheapest shape: a long draft's decode on one
thread would cost more than all the one-row steps of the try.

Steps are weighed by their shape (the rows in the batch): drafts and streams joining or
leaving change it from one step to the next, so a probe compares each of its steps with the
current thread count's time for the same shape and judges the median ratio; a probe must
never be voided by a change of shape, or every step would start a new one and run on the
probe's thread count.

What must stay true: only decode steps are measured (prompt chunks vary too much), and
``set_threads`` is only called between decodes, from the loop thread. The thread count
never changes results, only speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pollama.runner.shapes import on_the_line

__all__ = ["ThreadTuner"]

_ALPHA = 0.25  # weight of a new step in the moving average
_SLOW = 1.5  # a moving average this much above the best seen triggers a probe
_BETTER = 0.85  # a probe must be this much faster to switch
_GIVE_UP = 2.0  # a probe step this much slower ends the probe at once (a collapse costs 100 ms)
_PROBE_STEPS = 4  # the first of them is not counted (the thread team changes)
_PROBE_STEPS_MAX = 12  # a probe that met too few shapes measured before gives up
_HOLD_S = 1.0  # after an interrupted probe, the wait before the next one
_FORGET = 1.002  # the best seen drifts up per step, so a longer context becomes the new normal
_RETRY_S, _RETRY_MAX_S = 1.0, 16.0  # from fewer threads, how often to try all of them
_EXPLORE_AFTER = 4  # measured steps before the first try of fewer threads (a busy start)
_EXPLORE_S, _EXPLORE_MAX_S = 5.0, 60.0  # then how often, when nothing looks slow
_EXPLORE_DEAR = 2.0  # such a try runs no step dearer than this many of the cheapest shape


class ThreadTuner:
    """Call :meth:`threads_for_step` before a decode-only step and :meth:`record` after it.

    ``n_max`` threads are the normal; the alternative is half of them (one on two cores).
    With ``n_max`` 1 the tuner does nothing.
    """

    def __init__(
        self,
        n_max: int,
        set_threads: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.n_max = n_max
        self.n_low = max(1, n_max // 2)
        self.current = n_max
        self._set = set_threads
        self._clock = clock
        self._ema: dict[tuple[int, int], float] = {}
        self._best: dict[tuple[int, int], float] = {}
        self._probe: int | None = None  # the thread count being tried
        self._probe_steps = 0  # decode steps since it began
        self._probe_ratios: list[float] = []  # their times over the current count's
        self._exploring = False  # the probe is a try nothing asked for (not a slowdown)
        self._hold_until = 0.0  # no probe before this (after one was interrupted)
        self._retry_s = _RETRY_S
        self._next_retry = 0.0
        self._explore_s = _EXPLORE_S
        self._next_explore = 0.0
        self._measured = 0

    @property
    def enabled(self) -> bool:
        return self.n_low < self.n_max

    def threads_for_step(self, rows: int) -> None:
        """Before a decode-only step of ``rows`` rows: start a probe if one is due; end an
        exploring probe rather than run a dear step on fewer threads."""
        if not self.enabled:
            return
        if self._probe is not None:
            if self._exploring and self._dear(rows):
                self._fail_probe()
            return
        if self._clock() < self._hold_until:
            return
        key = (self.current, rows)
        if self.current == self.n_max:
            ema, best = self._ema.get(key), self._best.get(key)
            if ema is None or best is None:
                return
            slow = ema >= _SLOW * best  # slower than before: something else runs
            due = self._measured >= _EXPLORE_AFTER and self._clock() >= self._next_explore
            if slow:
                self._start_probe(self.n_low)
            elif due and not self._dear(rows):  # it may have been running since we started
                self._start_probe(self.n_low, exploring=True)
        elif self._clock() >= self._next_retry:
            self._start_probe(self.n_max)

    def _dear(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows costs more than :data:`_EXPLORE_DEAR` times the
        cheapest shape measured (or is not measured at all): a long draft's decode on one
        thread costs as much as many one-row steps, for a probe that nothing said was
        needed."""
        known = self._known()
        reference = self._reference(rows, known)
        return reference is None or reference > _EXPLORE_DEAR * min(known.values())

    def record(self, rows: int, seconds: float) -> None:
        """After a decode-only step of ``rows`` sequences that took ``seconds``."""
        if not self.enabled:
            return
        if self._probe is not None:
            self._record_probe(rows, seconds)
            return
        self._measured += 1
        key = (self.current, rows)
        ema = self._ema.get(key)
        self._ema[key] = seconds if ema is None else ema + _ALPHA * (seconds - ema)
        best = self._best.get(key)
        self._best[key] = seconds if best is None else min(best * _FORGET, seconds)

    @property
    def running(self) -> int:
        """The thread count the next decode runs on: a probe's, else :attr:`current`."""
        return self._probe if self._probe is not None else self.current

    def interrupt(self) -> None:
        """A step that is not measured (prompt chunks) came between: drop a running probe,
        and wait a little before the next one, so that prompts arriving often cannot keep
        the decode on a probe's thread count."""
        if self._probe is not None:
            self._end_probe(switch=False)
            self._hold_until = self._clock() + _HOLD_S

    def _start_probe(self, n: int, *, exploring: bool = False) -> None:
        self._probe, self._probe_steps, self._probe_ratios = n, 0, []
        self._exploring = exploring
        self._set(n)

    def _record_probe(self, rows: int, seconds: float) -> None:
        """A probe step, weighed against the current thread count's time for the same
        number of rows: batches change shape from step to step (drafts, streams joining
        and leaving), so a probe compares ratios, never raw times."""
        self._probe_steps += 1
        reference = self._reference(rows)
        if reference is None:  # nothing measured to weigh this shape against
            if self._probe_steps >= _PROBE_STEPS_MAX:
                self._fail_probe()
            return
        ratio = seconds / reference
        if ratio > _GIVE_UP:
            self._fail_probe()  # clearly worse: do not wait for more steps
        elif self._probe_steps > 1:  # the first is not counted (the thread team changes)
            self._probe_ratios.append(ratio)
            if len(self._probe_ratios) >= _PROBE_STEPS - 1:
                self._finish_probe()

    def _known(self) -> dict[int, float]:
        """The current thread count's moving average by shape."""
        return {rows: ema for (n, rows), ema in self._ema.items() if n == self.current}

    def _reference(self, rows: int, known: dict[int, float] | None = None) -> float | None:
        """The current thread count's time for a step of ``rows`` rows (``known``: from
        :meth:`_known`): measured, else drawn on a line from the nearest shapes measured
        around it, else scaled down from the nearest larger one by rows. Drafts make many
        shapes, most of them rare, and a probe that only counted the shapes measured before
        ran on for a dozen steps of drafts (each one a long decode on one thread). A row
        mostly costs less the more rows a step holds, so both guesses mostly err low: a
        probe then looks slower than it is, and a guess is more likely to end a probe than
        to make it switch (llama.cpp's kernels make some shapes cheaper than their
        neighbours, so not always)."""
        known = self._known() if known is None else known
        if rows in known:
            return known[rows]
        counts = sorted(known)
        between = on_the_line(rows, counts, known)
        if between is not None:
            return between
        if not counts or rows > counts[-1]:
            return None
        return known[counts[0]] * rows / counts[0]  # below every shape measured

    def _finish_probe(self) -> None:
        assert self._probe is not None
        ratios = sorted(self._probe_ratios)
        ratio = ratios[len(ratios) // 2]
        if ratio >= _BETTER:
            self._fail_probe()
            return
        old, new = self.current, self._probe
        for (n, rows), ema in list(self._ema.items()):
            if n == old:  # what each shape should cost now, from this probe
                self._ema[(new, rows)] = self._best[(new, rows)] = ema * ratio
        self._end_probe(switch=True)
        self._retry_s, self._explore_s = _RETRY_S, _EXPLORE_S
        self._next_retry = self._clock() + self._retry_s
        self._next_explore = self._clock() + self._explore_s

    def _fail_probe(self) -> None:
        n = self._probe
        self._end_probe(switch=False)
        if n == self.n_max:  # all threads are still worse: try again later, then less often
            self._retry_s = min(_RETRY_MAX_S, self._retry_s * 2)
            self._next_retry = self._clock() + self._retry_s
        else:  # fewer threads do not help: this slower pace is the new normal
            for key, ema in self._ema.items():
                if key[0] == self.current:
                    self._best[key] = ema
            self._explore_s = min(_EXPLORE_MAX_S, self._explore_s * 2)
            self._next_explore = self._clock() + self._explore_s

    def _end_probe(self, *, switch: bool) -> None:
        assert self._probe is not None
        if switch:
            self.current = self._probe
        else:
            self._set(self.current)
        self._probe = None
        self._probe_ratios = []
