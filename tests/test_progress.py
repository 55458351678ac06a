"""Progress output: Ollama's bar and spinner layout, the redraw protocol, plain lines off a TTY."""

from __future__ import annotations

import io

import pytest

from pollama.cli.progress import Bar, Progress, ProgressDisplay, Spinner, format_eta


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45, "45s"), (90, "1m30s"), (3599, "59m59s"), (7500, "2h5m"), (400_000, "99h+")],
)
def test_eta_has_two_units_at_most(seconds: int, text: str) -> None:
    assert format_eta(seconds) == text


def test_running_bar_layout_matches_ollama() -> None:
    clock = FakeClock()
    bar = Bar("pulling 0123456789ab:", 1_000_000_000, clock=clock)
    bar.set(250_000_000)
    clock.now += 2
    bar.set(500_000_000)
    line = bar.render(80)
    # pre "<msg>  50%", bar of 18 cells half full, "cur/total", rate over the buckets, ETA
    assert line == (
        "pulling 0123456789ab:  50% ▕" + "█" * 9 + " " * 9 + "▏ "
        + "500 MB/  1 GB" + "  125 MB/s" + "      4s"
    )
    assert len(line) == 79


def test_finished_bar_shows_only_the_total() -> None:
    clock = FakeClock()
    bar = Bar("copying", 2000, clock=clock)
    clock.now += 1
    bar.set(5000)  # clamped to the total
    assert bar.done and bar.current == 2000
    line = bar.render(60)
    assert line.startswith("copying 100% ▕█")
    assert line.endswith("▏ " + "  2 KB" + " " * 7 + " " * 18)
    assert len(line) == 59


def test_bar_width_follows_the_terminal() -> None:
    bar = Bar("x", 100, 50, clock=FakeClock())
    assert len(bar.render(120)) - len(bar.render(80)) == 40


def test_spinner_animates_then_keeps_its_text() -> None:
    clock = FakeClock()
    spinner = Spinner("gathering model components", clock=clock)
    assert spinner.render(80) == "gathering model components ⠋ "
    clock.now += 0.35
    assert spinner.render(80) == "gathering model components ⠸ "
    spinner.stop()
    assert spinner.render(80) == "gathering model components "
    assert Spinner("", clock=clock).render(80) == "⠋ "


def test_progress_redraws_in_place_and_stops() -> None:
    out = io.StringIO()
    progress = Progress(out, start=False)
    progress.add(Spinner("one"))
    progress.add(Bar("two", 10, 5))
    progress.render()
    first = out.getvalue()
    assert "\x1b[A" not in first and "one ⠋ \x1b[K\ntwo  50%" in first
    progress.render()
    assert out.getvalue()[len(first):].startswith("\x1b[?2026h\x1b[?25l\x1b[A\x1b[1G")
    assert progress.stop()
    assert out.getvalue().endswith("\x1b[?25h\x1b[?2026l\n")
    assert "one \x1b[K" in out.getvalue()  # the stopped spinner keeps its text
    assert not progress.stop()


def test_progress_stop_and_clear_erases_every_line() -> None:
    out = io.StringIO()
    progress = Progress(out, start=False)
    progress.add(Spinner("a"))
    progress.add(Spinner("b"))
    progress.render()
    mark = len(out.getvalue())
    progress.stop_and_clear()
    assert out.getvalue()[mark:] == "\x1b[?25l\x1b[2K\x1b[1G\x1b[A\x1b[2K\x1b[1G\x1b[?25h"


def test_display_on_a_terminal_draws_spinners_and_bars() -> None:
    out = io.StringIO()
    with ProgressDisplay(out, tty=True) as display:
        display.status("gathering model components")
        display.handle({"status": "copying file sha256:abc", "digest": "sha256:" + "a" * 64,
                        "total": 1000, "completed": 1000})
        display.handle({"status": "writing manifest"})
        display.handle({"status": "success"})
    text = out.getvalue()
    for part in ("gathering model components", "copying file sha256:abc 100% ▕",
                 "writing manifest", "success"):
        assert part in text
    assert text.endswith("\n")


def test_display_off_a_terminal_prints_plain_lines_once() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out)
    assert not display.tty
    display.status("gathering model components")
    display.status("gathering model components")
    display.bar("k", "copying file sha256:abc", 10, 2000)
    display.bar("k", "copying file sha256:abc", 2000, 2000)
    display.bar("k", "copying file sha256:abc", 2000, 2000)
    display.handle({"status": "quantizing F32 model to Q8_0", "digest": "0" * 19,
                    "total": 5_000_000, "completed": 5_000_000})
    display.handle({"status": "success"})
    display.close()
    assert out.getvalue() == (
        "gathering model components\n"
        "copying file sha256:abc 100% 2 KB\n"
        "quantizing F32 model to Q8_0 100% 5 MB\n"
        "success\n"
    )
    assert "\x1b" not in out.getvalue()


def test_pull_progress_skips_the_first_layer_update_and_names_bars_by_digest() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out)
    digest = "sha256:" + "0123456789abcdef" * 4
    display.handle_pull({"status": "pulling manifest"})
    display.handle_pull({"status": "pulling x", "digest": digest, "total": 3000, "completed": 0})
    display.handle_pull({"status": "pulling x", "digest": digest, "total": 3000,
                         "completed": 3000})
    display.handle_pull({"status": "success"})
    assert out.getvalue() == "pulling manifest\npulling 0123456789ab: 100% 3 KB\nsuccess\n"
