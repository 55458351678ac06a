"""pollama.toml in a real server: reloads on SIGHUP and on a changed file, presets applied
to real loads of the real model, a bad file keeping the old configuration, pinned models."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from conftest import (
    MODEL,
    RunningServer,
    create_default_model,
    start_server,
    stop_server,
)
from ggufgen import write_tiny_model
from pollama.server.reload import POLL_SECONDS

pytestmark = pytest.mark.slow

GREEDY = {"num_predict": 2, "temperature": 0}


def write_config(home: Path, text: str) -> Path:
    path = home / ".ollama" / "pollama.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)  # as editors save: the watcher must see a new inode too
    return path


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def reloads_logged(server: RunningServer) -> int:
    return server.log.read_text().count("configuration reloaded")


def hup(server: RunningServer) -> None:
    """SIGHUP, then wait for the log line that says the reload ran."""
    before = reloads_logged(server)
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads_logged(server) > before, "the reload's log line")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-home")


@pytest.fixture(scope="module")
def srv(home: Path) -> Iterator[RunningServer]:
    write_config(home, "OLLAMA_MAX_QUEUE = 64\n")
    running = start_server(home)
    create_default_model(running, home)
    yield running
    stop_server(running)


def ps(server: RunningServer) -> list[dict]:
    models: list[dict] = httpx.get(f"{server.url}/api/ps", timeout=30).json()["models"]
    return models


def generate(server: RunningServer, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Hi", "stream": False, "options": GREEDY, **extra}
    return httpx.post(f"{server.url}/api/generate", json=body, timeout=300)


def test_sighup_applies_limits_and_a_bad_file_keeps_them(srv: RunningServer, home: Path) -> None:
    body = {"model": MODEL, "padding": "x" * 4000}
    assert httpx.post(f"{srv.url}/api/show", json=body, timeout=30).status_code == 200
    write_config(home, "POLLAMA_MAX_BODY_SIZE = 2048\n")
    hup(srv)
    refused = httpx.post(f"{srv.url}/api/show", json=body, timeout=30)
    assert refused.status_code == 413 and "2048" in refused.json()["error"]

    path = write_config(home, "POLLAMA_MAX_BODY_SIZE = 999999\nOLLAMA_MAX_QUEUE = = 1\n")
    srv.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in srv.log.read_text(), "the error line")
    line = next(x for x in srv.log.read_text().splitlines() if "not reloaded" in x)
    assert str(path) in line and "line 2" in line
    assert httpx.post(f"{srv.url}/api/show", json=body, timeout=30).status_code == 413

    write_config(home, "OLLAMA_MAX_QUEUE = 64\n")
    hup(srv)
    assert httpx.post(f"{srv.url}/api/show", json=body, timeout=30).status_code == 200


def test_a_changed_file_reloads_keys_without_a_signal(srv: RunningServer, home: Path) -> None:
    keys_file = home / "team-keys.json"
    env = {**srv.env, "POLLAMA_KEYS_FILE": str(keys_file)}
    command = [sys.executable, "-m", "pollama", "keys", "create", "--name", "ops"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True)
    key = out.stdout.strip()
    assert httpx.get(f"{srv.url}/api/tags", timeout=30).status_code == 200

    before = reloads_logged(srv)
    write_config(home, f'POLLAMA_KEYS_FILE = "{keys_file}"\n')
    wait_for(lambda: reloads_logged(srv) > before, "the watcher's reload", POLL_SECONDS * 5)
    assert httpx.get(f"{srv.url}/api/tags", timeout=30).status_code == 401
    authorized = httpx.get(f"{srv.url}/api/tags", headers={"Authorization": f"Bearer {key}"})
    assert authorized.status_code == 200

    before = reloads_logged(srv)
    write_config(home, "OLLAMA_MAX_QUEUE = 64\n")
    wait_for(lambda: reloads_logged(srv) > before, "the watcher's reload", POLL_SECONDS * 5)
    assert httpx.get(f"{srv.url}/api/tags", timeout=30).status_code == 200


def test_presets_set_the_next_load_and_requests_still_win(
    srv: RunningServer, home: Path
) -> None:
    write_config(home, f'[models."{MODEL}"]\nnum_ctx = 1024\nkeep_alive = "7m"\n')
    hup(srv)
    assert generate(srv).status_code == 200
    (row,) = ps(srv)
    assert row["context_length"] == 1024
    expires = datetime.fromisoformat(row["expires_at"])
    assert 6 * 60 < (expires - datetime.now(expires.tzinfo)).total_seconds() <= 7 * 60 + 5

    assert generate(srv, options={**GREEDY, "num_ctx": 512}).status_code == 200
    assert ps(srv)[0]["context_length"] == 512  # the request's option wins over the preset

    # the name is matched as a request's is: the full form names the same model
    write_config(home, '[models."registry.ollama.ai/library/smollm2:135m"]\nnum_ctx = 2048\n')
    hup(srv)
    assert generate(srv).status_code == 200
    assert ps(srv)[0]["context_length"] == 2048
    write_config(home, "OLLAMA_MAX_QUEUE = 64\n")
    hup(srv)


def test_restart_only_settings_are_logged_not_applied(srv: RunningServer, home: Path) -> None:
    write_config(home, 'POLLAMA_MAX_CONNECTIONS = 3\nOLLAMA_HOST = "127.0.0.1:1"\n')
    hup(srv)
    log = srv.log.read_text()
    assert "max_connections changed; it takes effect at the next restart" in log
    assert "host changed" not in log  # the environment's OLLAMA_HOST wins over the file
    assert httpx.get(srv.url, timeout=10).text == "Ollama is running"
    write_config(home, "OLLAMA_MAX_QUEUE = 64\n")
    hup(srv)


def test_a_pinned_model_loads_at_start_and_is_never_evicted(tmp_path: Path) -> None:
    first = start_server(tmp_path)
    try:
        create_default_model(first, tmp_path)
        tiny = write_tiny_model(tmp_path / "tiny.gguf")
        (tmp_path / "tiny.Modelfile").write_text(f"FROM {tiny}\n")
        first.cli("create", "tiny", "-f", str(tmp_path / "tiny.Modelfile"), check=True)
    finally:
        stop_server(first)
    write_config(tmp_path, f'[models."{MODEL}"]\nkeep_alive = "pinned"\n\n'
                           '[models."no-such-model"]\nnum_ctx = 4096\n')  # fmt: skip
    server = start_server(tmp_path, {"OLLAMA_MAX_LOADED_MODELS": "1"})
    try:
        wait_for(lambda: len(ps(server)) == 1, "the pinned model to load", 120)
        (row,) = ps(server)
        assert row["name"] == MODEL
        assert datetime.fromisoformat(row["expires_at"]).year > 2100  # forever
        log = server.log.read_text()
        assert 'preset models."no-such-model" names no installed model' in log

        assert generate(server, keep_alive=0).status_code == 200  # cannot unpin it
        assert [m["name"] for m in ps(server)] == [MODEL]

        refused = httpx.post(f"{server.url}/api/generate", timeout=120,
                             json={"model": "tiny", "prompt": "x", "stream": False})  # fmt: skip
        assert refused.status_code == 500  # InsufficientMemory, as Ollama answers it
        assert "pinned" in refused.json()["error"]
        assert [m["name"] for m in ps(server)] == [MODEL]

        stopped = server.cli("stop", MODEL)  # an explicit stop still unloads it
        assert stopped.returncode == 0, stopped.stderr
        wait_for(lambda: ps(server) == [], "the stop")
    finally:
        stop_server(server)
