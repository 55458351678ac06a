"""Load and faults at a small scale, with the functions of ``bench/load_bench.py`` (which
runs them at the issue's full scale): a burst against a small queue, a long sequence of
requests, and workers killed mid-stream; then the metrics and access log that describe it."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load_bench.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("load_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_bench"] = module
    spec.loader.exec_module(module)
    return module


lb = _load_bench()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lb.Server]:
    """A real server with the default model: 1 sequence at a time, a queue of 2 (small, so
    that the test stays short on 2 shared cores; the benchmark runs 200 clients against 32)."""
    home = tmp_path_factory.mktemp("load-home")
    server = lb.start_server(home, {"OLLAMA_MAX_QUEUE": "2", "OLLAMA_NUM_PARALLEL": "1"})
    try:
        lb.ensure_model(server)
        yield server
    finally:
        server.stop()


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_burst_against_a_small_queue(loaded: lb.Server) -> None:
    """Every request ends with a response or a 503 with Retry-After; none hangs; memory
    comes back to within 10 % of idle."""
    before = httpx.get(loaded.url + "/metrics").text
    result = lb.burst(loaded, 24, num_predict=2, timeout=120, warmup=1)
    assert result.hung == 0 and result.other == {}, result
    assert result.ok + result.busy == 24
    assert result.ok >= 3 and result.busy >= 24 - 3 - 3  # parallel + queue (+ early finishers)
    assert result.busy_without_retry_after == 0
    assert result.rss_growth <= 0.10, result
    after = httpx.get(loaded.url + "/metrics").text
    busy = (_sample(after, "pollama_http_requests_total", route="/api/generate", status="503")
            - _sample(before, "pollama_http_requests_total", route="/api/generate", status="503"))
    assert busy == result.busy
    assert _sample(after, "pollama_loaded_models") == 1
    assert _sample(after, "pollama_queue_depth") == 0


def test_sequential_requests_leak_nothing(loaded: lb.Server) -> None:
    result = lb.sequential(loaded, 150, num_predict=1, warmup=30, generate_every=15)
    assert result.failures == 0
    before, after = result.before, result.after
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["threads"] <= before["threads"] + 1, (before, after)
    assert after["rss_kb"] <= before["rss_kb"] * 1.05 + 2048, (before, after)


def test_killed_workers_give_error_lines_then_recover(loaded: lb.Server) -> None:
    result = lb.kill_during_streams(loaded, 2)
    assert result.error_lines == 2 and result.streams_without_error == 0, result
    assert result.recovered == 2, result
    assert all("runner" in d for d in result.details)
    assert loaded.process.poll() is None


def test_the_access_log_describes_it(loaded: lb.Server) -> None:
    lines = [json.loads(x) for x in (loaded.home / "access.log").read_text().splitlines()]
    generates = [x for x in lines if x["route"] == "/api/generate"]
    assert generates and all(len(x["request_id"]) == 32 for x in generates)
    assert {x["status"] for x in generates} >= {200, 503}
    assert len({x["request_id"] for x in lines}) == len(lines)


def test_inference_telemetry_is_wired(loaded: lb.Server) -> None:
    """TTFT, inter-token latency, token counts and load time reach /metrics and the log
    (the inference service and the scheduler report to the app's Metrics)."""
    text = httpx.get(loaded.url + "/metrics").text
    assert _sample(text, "pollama_time_to_first_token_seconds_count") > 0
    assert _sample(text, "pollama_generated_tokens_total") > 0
    assert _sample(text, "pollama_prompt_tokens_total") > 0
    assert _sample(text, "pollama_inter_token_latency_seconds_count") > 0
    assert _sample(text, "pollama_model_load_seconds_count") >= 1
    assert _sample(text, "pollama_generations_total", outcome="error") >= 2  # the kills
    lines = [json.loads(x) for x in (loaded.home / "access.log").read_text().splitlines()]
    done = [x for x in lines if x["route"] == "/api/generate" and x["status"] == 200
            and "generated_tokens" in x]
    assert done and all(x["model"] == lb.MODEL and x["ttft_ms"] > 0 for x in done)
