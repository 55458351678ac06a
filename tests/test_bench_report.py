"""bench/_report.py and bench/run_bench.py: a point's paired ratio is the median of the
per-repeat ratios (a shift of the machine's speed between repeats cancels out), and a
pollama server of the throughput benchmark starts with no prompt cache from an earlier one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import _report  # noqa: E402
import run_bench  # noqa: E402


def _point(engine: str, walls: list[float]) -> dict[str, Any]:
    ordered = sorted(walls)
    return {"engine": engine, "fa": "auto", "streams": 1, "per_stream_tok_s": 1.0,
            "aggregate_tok_s": 1.0, "wall_tok_s": ordered[len(ordered) // 2],
            "wall_samples": walls}


def test_the_paired_ratio_follows_each_repeat_not_the_medians() -> None:
    # pollama was 5 % ahead in repeats 1 and 3; in repeat 2 the machine slowed down
    # between the two measurements. The medians' ratio (105 / 200) shows that one slip; the
    # paired ratio does not.
    reference = _point("llama-server", [200.0, 200.0, 100.0])
    pollama = _point("pollama", [210.0, 105.0, 105.0])
    assert pollama["wall_tok_s"] / reference["wall_tok_s"] == 0.525
    assert _report._paired(pollama, reference) == 1.05


def test_no_paired_ratio_without_a_rate_per_repeat_in_both() -> None:
    reference = _point("llama-server", [100.0, 110.0])
    assert _report._paired(_point("pollama", [100.0]), reference) is None  # a failed repeat
    assert _report._paired(None, reference) is None
    assert _report._paired(_point("pollama", [1.0, 2.0]), _point("x", [0.0, 1.0])) is None


def test_the_report_shows_paired_ratios_beside_the_medians() -> None:
    meta = {"date": "2026-12-06", "cpu": "CPU", "cores": 2, "cpu_flags": "avx2",
            "mem_gib": 1.0, "model_name": "m.gguf", "model_bytes": 1, "threads": 2,
            "n_predict": 8, "streams": [1], "fa_modes": ["auto"], "quick": False,
            "repeat": 3, "max_foreign": 0.1, "llama_cpp_python": "0", "pollama": "0",
            "llama_server_version": "0", "pollama_commit": "x", "python": "3",
            "command": "python bench/run_bench.py"}
    rows = [_point("llama-server", [200.0, 200.0, 100.0]),
            _point("plain", [200.0, 200.0, 100.0]),
            _point("pollama", [210.0, 105.0, 105.0])]
    text = _report.render({"meta": meta, "throughput": rows, "memory": [], "followup": [],
                           "skipped": {}, "errors": []})
    row = next(line for line in text.splitlines() if line.startswith("| auto | 1 |"))
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert cells[-4:] == ["**0.53**", "1.05", "0.53", "1.05"]
    assert "over the 1 points: **0.53** (paired by repeat: 1.05)" in text


def test_a_fresh_pollama_server_starts_with_no_prompt_cache(tmp_path: Path) -> None:
    engine = run_bench.Pollama(tmp_path / "m.gguf", 2, tmp_path)
    cache = engine.prompt_cache
    assert cache == tmp_path / "home" / ".ollama" / "kvcache"  # pollama's own setting
    (cache / "abc").mkdir(parents=True)
    (cache / "abc" / "0.state").write_bytes(b"x")
    # the model file does not exist: the server never comes up, but the cache is gone
    with pytest.raises(run_bench.cl.Unavailable), engine.serve(1, "auto", fresh=True):
        pass
    assert not cache.exists()
