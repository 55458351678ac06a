"""Metrics (/metrics), health (/healthz, /readyz), the JSON access log and request ids."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pollama.config import load_settings
from pollama.inference.types import InferenceEvent
from pollama.inference.types import Metrics as EventMetrics
from pollama.keys import KeyStore
from pollama.server.access_log import current_record
from pollama.server.app import create_app
from pollama.server.metrics import MAX_MODEL_LABELS, PrometheusMetrics
from pollama.telemetry import NULL_TELEMETRY, observe_events

ISSUE_METRICS = [
    "pollama_http_requests", "pollama_http_request_duration_seconds",
    "pollama_time_to_first_token_seconds", "pollama_inter_token_latency_seconds",
    "pollama_prompt_tokens", "pollama_generated_tokens", "pollama_prompt_cached_tokens",
    "pollama_queue_depth", "pollama_loaded_models", "pollama_model_load_seconds",
    "pollama_model_evictions", "pollama_prompt_cache_hit_ratio", "pollama_pull_bytes",
    "process_resident_memory_bytes", "process_open_fds",
]  # fmt: skip


@pytest.fixture
def logged(isolated_env: Path) -> Iterator[tuple[TestClient, Path]]:
    """The app with its access log in a file; yields (client, log path)."""
    log = isolated_env / "access.log"
    settings = load_settings({"HOME": str(isolated_env), "POLLAMA_ACCESS_LOG": str(log),
                              "OLLAMA_MODELS": str(isolated_env / ".ollama" / "models")})
    with TestClient(create_app(settings), base_url="http://127.0.0.1:11434") as client:
        yield client, log


def _lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_exposition(api: TestClient) -> None:
    api.get("/api/tags")
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name for f in text_string_to_metric_families(response.text)}
    for name in ISSUE_METRICS:
        assert name in families, name
    assert _value(response.text, "pollama_http_requests_total", route="/api/tags",
                  method="GET", status="200") == 1  # fmt: skip
    assert _value(response.text, "pollama_loaded_models") == 0
    assert _value(response.text, "pollama_queue_depth") == 0


def test_labels_stay_low_cardinality(api: TestClient) -> None:
    for i in range(5):
        data = f"blob {i}".encode()
        api.post(f"/api/blobs/sha256:{hashlib.sha256(data).hexdigest()}", content=data)
        api.get(f"/no/such/path/{i}")
    text = api.get("/metrics").text
    routes = {dict(labels).get("route") for (name, labels) in _samples(text)
              if name == "pollama_http_requests_total"}  # fmt: skip
    assert "/api/blobs/{digest}" in routes and "unmatched" in routes
    assert not any(r and "sha256" in r for r in routes)
    assert _value(text, "pollama_http_requests_total", route="/api/blobs/{digest}",
                  method="POST", status="201") == 5  # fmt: skip


def test_refusals_are_counted(api: TestClient) -> None:
    api.get("/api/tags", headers={"Host": "evil.example"})
    api.get("/api/tags", headers={"Origin": "https://evil.example"})
    text = api.get("/metrics").text
    assert _value(text, "pollama_http_refused_total", reason="host") == 1
    assert _value(text, "pollama_http_refused_total", reason="origin") == 1


def test_metrics_need_a_key_when_keys_exist(api: TestClient, settings: Any) -> None:
    secret, _ = KeyStore(settings.api_keys_path).create("prometheus", "inference")
    assert api.get("/metrics").status_code == 401
    assert api.get("/metrics", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}


def test_readiness(settings: Any) -> None:
    app = create_app(settings)
    client = TestClient(app, base_url="http://127.0.0.1:11434")
    not_started = client.get("/readyz")  # no lifespan has run: not ready
    assert not_started.status_code == 503 and not_started.headers["retry-after"] == "1"
    assert client.get("/healthz").status_code == 200
    with client:
        assert client.get("/readyz").status_code == 200
        aside = settings.models.with_name("moved")
        settings.models.rename(aside)  # the disk went away
        try:
            broken = client.get("/readyz")
        finally:
            aside.rename(settings.models)
        assert broken.status_code == 503 and "models directory" in broken.json()["reason"]
    assert client.app.state.metrics.stopping


def test_access_log_line_per_request(logged: tuple[TestClient, Path], settings: Any) -> None:
    client, log = logged
    secret, _ = KeyStore(settings.api_keys_path).create("ci-bot", "inference")
    auth = {"Authorization": f"Bearer {secret}"}
    ok = client.get("/api/tags", headers={**auth, "X-Request-Id": "trace-42.a:b"})
    assert ok.headers["x-request-id"] == "trace-42.a:b"
    weird = client.get("/api/tags", headers={**auth, "X-Request-Id": "bad id\twith junk"})
    assert weird.headers["x-request-id"] != "bad id\twith junk"
    assert len(weird.headers["x-request-id"]) == 32
    client.get("/api/tags")  # no key: 401
    client.post("/api/copy", json={"source": "a", "destination": "b"}, headers=auth)  # scope
    lines = _lines(log)
    assert len(lines) == 4
    first, second, third, fourth = lines
    assert first["request_id"] == "trace-42.a:b" and first["key"] == "ci-bot"
    assert first["status"] == 200 and first["route"] == "/api/tags"
    assert first["method"] == "GET" and first["path"] == "/api/tags"
    assert first["duration_ms"] >= 0 and first["time"].endswith("Z")
    assert second["request_id"] == weird.headers["x-request-id"]
    assert third["status"] == 401 and third["refused"] == "key" and third["key"] is None
    assert fourth["status"] == 403 and fourth["refused"] == "scope"
    assert secret not in log.read_text()


def test_error_responses_carry_the_request_id(api: TestClient) -> None:
    response = api.post("/api/show", json={"model": "missing"})
    assert response.status_code == 404 and len(response.headers["x-request-id"]) == 32


# -- the inference telemetry -------------------------------------------------------------------


async def _events(texts: list[str], *, fail: bool = False) -> AsyncIterator[InferenceEvent]:
    for text in texts:
        await asyncio.sleep(0.001)
        yield InferenceEvent(text=text)
    if fail:
        raise RuntimeError("worker died")
    yield InferenceEvent(done=True, done_reason="stop", metrics=EventMetrics(
        prompt_eval_count=10, prompt_cached=4, eval_count=len(texts)))


async def _drain(events: AsyncIterator[InferenceEvent]) -> list[InferenceEvent]:
    return [e async for e in events]


def test_generation_metrics() -> None:
    m = PrometheusMetrics()
    events = asyncio.run(_drain(observe_events(m, "tiny:latest", _events(["a", "b", "c"]))))
    assert len(events) == 4
    text = m.exposition().decode()
    assert _value(text, "pollama_time_to_first_token_seconds_count", model="tiny:latest") == 1
    assert _value(text, "pollama_inter_token_latency_seconds_count", model="tiny:latest") == 2
    assert _value(text, "pollama_prompt_tokens_total", model="tiny:latest") == 10
    assert _value(text, "pollama_prompt_cached_tokens_total", model="tiny:latest") == 4
    assert _value(text, "pollama_generated_tokens_total", model="tiny:latest") == 3
    assert _value(text, "pollama_generations_total", model="tiny:latest", outcome="stop") == 1
    assert _value(text, "pollama_prompt_cache_hit_ratio") == pytest.approx(0.4)

    with pytest.raises(RuntimeError):
        asyncio.run(_drain(observe_events(m, "tiny:latest", _events(["a"], fail=True))))

    async def cancel_early() -> None:
        stream = observe_events(m, "tiny:latest", _events(["a", "b"]))
        await anext(stream)
        await stream.aclose()  # the client went away

    asyncio.run(cancel_early())
    text = m.exposition().decode()
    assert _value(text, "pollama_generations_total", model="tiny:latest", outcome="error") == 1
    assert _value(text, "pollama_generations_total", model="tiny:latest",
                  outcome="cancelled") == 1  # fmt: skip


def test_queue_depth_counts_requests_waiting_for_a_slot() -> None:
    """``pollama_queue_depth`` stayed 0 whatever waited: the scheduler's ``pending`` is a
    property, and the gauge was only wired when ``callable(pending)``."""
    from fake_runner import FakeRunnerFactory
    from test_scheduler import Hold, scheduler, settle

    async def body() -> None:
        sched = scheduler(FakeRunnerFactory(), num_parallel=1, max_queue=5)
        m = PrometheusMetrics()
        m.watch_scheduler(sched)
        running = Hold(sched, "a")
        await running.entered.wait()
        waiting = [Hold(sched, "a") for _ in range(3)]
        await settle()
        text = m.exposition().decode()
        assert _value(text, "pollama_queue_depth") == 3
        assert _value(text, "pollama_loaded_models") == 1
        for hold in (running, *waiting):
            await hold.done()
        assert _value(m.exposition().decode(), "pollama_queue_depth") == 0
        await sched.shutdown()

    asyncio.run(asyncio.wait_for(body(), 20))


def test_scheduler_reports_and_label_cap() -> None:
    m = PrometheusMetrics()
    m.model_loaded("a:latest", 1.5)
    m.model_unloaded("a:latest", "evicted")
    m.model_unloaded("a:latest", "expired")
    m.model_unloaded("a:latest", "something new")
    m.pull_bytes(1000)
    for i in range(MAX_MODEL_LABELS + 10):
        m.model_loaded(f"m{i}", 0.1)
    text = m.exposition().decode()
    assert _value(text, "pollama_model_load_seconds_count", model="a:latest") == 1
    assert _value(text, "pollama_model_evictions_total") == 1
    assert _value(text, "pollama_model_unloads_total", reason="expired") == 1
    assert _value(text, "pollama_model_unloads_total", reason="other") == 1
    assert _value(text, "pollama_pull_bytes_total") == 1000
    models = {dict(labels).get("model") for (name, labels) in _samples(text)
              if name == "pollama_model_load_seconds_count"}  # fmt: skip
    assert len(models) == MAX_MODEL_LABELS + 1 and "other" in models


def test_generation_fills_the_access_log_record(logged: tuple[TestClient, Path]) -> None:
    """What the telemetry learns lands in the request's log line (through the context)."""
    client, log = logged
    metrics: PrometheusMetrics = client.app.state.metrics

    @client.app.post("/api/fake-generate")  # type: ignore[misc]
    async def fake() -> dict[str, Any]:
        record = current_record()
        assert record is not None
        await _drain(observe_events(metrics, "tiny:latest", _events(["x", "y"]), prompt="secret"))
        return {"ok": True}

    assert client.post("/api/fake-generate").status_code == 200
    line = _lines(log)[-1]
    assert line["model"] == "tiny:latest" and line["prompt_tokens"] == 10
    assert line["generated_tokens"] == 2 and line["cached_tokens"] == 4
    assert line["ttft_ms"] > 0 and line["done_reason"] == "stop"
    assert "prompt" not in line and "output" not in line  # POLLAMA_LOG_PROMPTS is off


def test_prompts_are_logged_only_when_asked(isolated_env: Path) -> None:
    log = isolated_env / "access.log"
    settings = load_settings({"HOME": str(isolated_env), "POLLAMA_ACCESS_LOG": str(log),
                              "POLLAMA_LOG_PROMPTS": "1"})  # fmt: skip
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        metrics: PrometheusMetrics = client.app.state.metrics

        @client.app.post("/api/fake-generate")  # type: ignore[misc]
        async def fake() -> dict[str, Any]:
            events = observe_events(metrics, "tiny", _events(["x", "y"]), prompt="hello")
            await _drain(events)
            return {}

        client.post("/api/fake-generate")
    line = _lines(log)[-1]
    assert line["prompt"] == "hello" and line["output"] == "xy"


def test_null_telemetry_accepts_everything() -> None:
    gen = NULL_TELEMETRY.generation("m", prompt="p")
    gen.output("x")
    gen.finished(prompt_tokens=1, cached_tokens=0, generated_tokens=1, reason="stop")
    gen.failed(None)
    NULL_TELEMETRY.model_loaded("m", 1.0)
    NULL_TELEMETRY.model_unloaded("m", "expired")
    NULL_TELEMETRY.pull_bytes(1)


def test_access_log_targets(isolated_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pollama.server.access_log import AccessLog

    off = AccessLog("off")
    assert not off.enabled
    off.write({"a": 1})
    err = AccessLog("-")
    err.write({"a": 1})
    assert json.loads(capsys.readouterr().err) == {"a": 1}
    path = isolated_env / "logs" / "access.jsonl"
    to_file = AccessLog(str(path))
    to_file.write({"b": 2})
    to_file.close()
    assert json.loads(path.read_text()) == {"b": 2}
    assert path.stat().st_mode & 0o077 == 0
