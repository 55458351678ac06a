"""``POLLAMA_API_KEY``: one more server key, given by the environment and stored nowhere.

It is what a container gets (``Dockerfile``): accepted like a keys-file key (constant-time
hash comparison, every scope, the fixed id ``env``), counted as "keys configured" so that a
network bind may start, refused at start when too short to be a key, and never written to a
log or a file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from conftest import free_port, stop_server
from pollama.cli.main import cli
from pollama.config import load_settings
from pollama.keys import ENV_KEY_ID, MIN_ENV_KEY_LENGTH, EnvKey, KeyStore
from pollama.server.app import create_app
from pollama.server.reload import ConfigReloader
from pollama.server.security import KEY_ID_STATE, AccessPolicy, auth_summary, bind_refusal
from security.conftest import launch

KEY = "env-key-" + "7f3a9c" * 6  # 44 characters, no shape of pollama's own keys
LOCAL = "http://127.0.0.1:11434"


@pytest.fixture(autouse=True)
def no_pollama_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's own POLLAMA_* settings (a key, an opt-out) must not leak into a test."""
    for name in list(os.environ):
        if name.startswith("POLLAMA_"):
            monkeypatch.delenv(name)


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(home), "OLLAMA_MODELS": str(home / ".ollama" / "models"), **extra}


@pytest.fixture
def client(isolated_env: Path) -> Iterator[TestClient]:
    """The app in process, bound (as settings say) to every interface, with the env key."""
    settings = load_settings(_env(isolated_env, OLLAMA_HOST="0.0.0.0:11434",
                                  POLLAMA_API_KEY=KEY))  # fmt: skip
    with TestClient(create_app(settings), base_url=LOCAL) as test_client:
        yield test_client


# -- the key itself ----------------------------------------------------------------------------


def test_env_key_matches_only_itself() -> None:
    key = EnvKey(KEY)
    assert key.problem is None
    record = key.authenticate(KEY)
    assert record is not None and record.id == ENV_KEY_ID == "env"
    assert record.name == "POLLAMA_API_KEY" and record.hint == ""
    for wrong in (None, "", KEY[:-1], KEY + "x", KEY.upper(), " " + KEY, "\udcff"):
        assert key.authenticate(wrong) is None, wrong
    assert KEY not in repr(key) and KEY not in repr(record)


@pytest.mark.parametrize("weak", ["x" * (MIN_ENV_KEY_LENGTH - 1), "secret", "a" * 20 + " b",
                                  "ключ" * 8, "tab\tseparated-key-text"])  # fmt: skip
def test_weak_env_key_matches_nothing(weak: str) -> None:
    key = EnvKey(weak)
    assert key.problem is not None and "POLLAMA_API_KEY" in key.problem
    assert weak not in key.problem
    assert key.authenticate(weak) is None  # fail closed, should a server be built anyway


def test_env_key_counts_as_configured_for_a_network_bind(isolated_env: Path) -> None:
    bound = _env(isolated_env, OLLAMA_HOST="0.0.0.0:11434")
    refusal = bind_refusal(load_settings(bound))
    assert refusal is not None and "POLLAMA_API_KEY=" in refusal  # the new way forward
    settings = load_settings({**bound, "POLLAMA_API_KEY": KEY})
    assert bind_refusal(settings) is None
    assert AccessPolicy.from_settings(settings).keys_required()
    on_loopback = load_settings(_env(isolated_env, POLLAMA_API_KEY=KEY))
    assert AccessPolicy.from_settings(on_loopback).keys_required()  # a key set is a key asked
    summary = auth_summary(settings)
    assert "environment" in summary and "POLLAMA_API_KEY" in summary and KEY not in summary


def test_short_env_key_refuses_to_start(isolated_env: Path) -> None:
    short = "s3cr3t-but-short"[: MIN_ENV_KEY_LENGTH - 1]
    for host in ("127.0.0.1:11434", "0.0.0.0:11434"):  # a weak key is refused on any bind
        refusal = bind_refusal(load_settings(_env(isolated_env, OLLAMA_HOST=host,
                                                  POLLAMA_API_KEY=short)))  # fmt: skip
        assert refusal is not None and "too short" in refusal and short not in refusal
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update(_env(isolated_env, OLLAMA_HOST=f"0.0.0.0:{free_port()}", POLLAMA_API_KEY=short))
    done = subprocess.run([sys.executable, "-m", "pollama", "serve"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "POLLAMA_API_KEY is too short" in done.stderr and "openssl rand" in done.stderr
    assert short not in done.stderr + done.stdout


# -- the server with it ------------------------------------------------------------------------


def test_env_key_is_accepted_and_a_wrong_one_is_401(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/tags").status_code == 401
    wrong = client.get("/api/tags", headers={"Authorization": "Bearer " + KEY[:-1] + "0"})
    assert wrong.status_code == 401 and wrong.json()["error"].startswith("invalid API key")
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        assert client.get("/api/tags", headers=headers).status_code == 200, headers
    # Every scope: a management route gets past the key check (404: no such model).
    copy = client.post("/api/copy", json={"source": "a", "destination": "b"},
                       headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert copy.status_code == 404


def test_requests_with_the_env_key_carry_its_fixed_id(client: TestClient) -> None:
    @client.app.get("/api/whoami")  # type: ignore[misc]
    async def whoami(request: Request) -> dict[str, str]:
        return {"id": str(getattr(request.state, KEY_ID_STATE, ""))}

    response = client.get("/api/whoami", headers={"Authorization": f"Bearer {KEY}"})
    assert response.json() == {"id": "env"}


def test_env_key_and_keys_file_work_together(isolated_env: Path) -> None:
    store = KeyStore(isolated_env / ".ollama" / "api_keys.json")
    secret, record = store.create("laptop", "inference")
    settings = load_settings(_env(isolated_env, OLLAMA_HOST="0.0.0.0:11434",
                                  POLLAMA_API_KEY=KEY))  # fmt: skip
    policy = AccessPolicy.from_settings(settings)
    assert policy.authenticate(secret) == record
    from_env = policy.authenticate(KEY)
    assert from_env is not None and from_env.id == "env"
    assert policy.authenticate("nope") is None and policy.authenticate(None) is None
    summary = auth_summary(settings)
    assert "POLLAMA_API_KEY" in summary and "1 in" in summary
    # A keys file that cannot be trusted locks every key out, the environment's too.
    store.path.chmod(0o666)
    assert policy.authenticate(KEY) is None and policy.authenticate(secret) is None
    assert bind_refusal(settings) is not None


def test_serve_does_not_pass_the_key_to_its_children(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runner processes parse untrusted model files: they must not inherit the key."""
    seen: dict[str, str | None] = {}
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:11434")
    monkeypatch.setenv("POLLAMA_API_KEY", KEY)
    monkeypatch.setattr("pollama.cli.serve.take_inventory", lambda *_a, **_k: None)
    monkeypatch.setattr("pollama.cli.serve.create_app", lambda *_a, **k: seen.update(
        reload=k["reload_environ"].get("POLLAMA_API_KEY")))  # fmt: skip
    monkeypatch.setattr("pollama.cli.serve.uvicorn.run", lambda *_a, **_k: seen.update(
        key=os.environ.get("POLLAMA_API_KEY")))  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args=["serve"], prog_name="pollama")
    assert exit_info.value.code in (0, None)
    # Gone from the environment children inherit; kept for a SIGHUP reload (in memory).
    assert seen == {"key": None, "reload": KEY}


def test_env_key_survives_a_reload(client: TestClient, isolated_env: Path) -> None:
    environ = _env(isolated_env, OLLAMA_HOST="0.0.0.0:11434", POLLAMA_API_KEY=KEY)
    assert ConfigReloader(client.app, environ).reload()  # type: ignore[arg-type]
    assert client.get("/api/tags", headers={"x-api-key": KEY}).status_code == 200
    assert client.get("/api/tags").status_code == 401


@pytest.mark.slow
def test_the_key_reaches_no_log_and_no_file(isolated_env: Path) -> None:
    """A real server at its most verbose: the key is in no line it writes and no file."""
    server = launch(isolated_env, "0.0.0.0", {"POLLAMA_API_KEY": KEY, "OLLAMA_DEBUG": "2"})
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/api/tags").status_code == 401
            bad = http.get("/api/tags", headers={"Authorization": f"Bearer {KEY}x"})
            assert bad.status_code == 401
            good = http.get("/api/tags", headers={"Authorization": f"Bearer {KEY}"})
            assert good.status_code == 200
            assert http.post("/api/show", json={"model": "nope"},
                             headers={"x-api-key": KEY}).status_code == 404  # fmt: skip
        server.env["OLLAMA_API_KEY"] = KEY  # what the CLI sends (the container's habit)
        assert "NAME" in server.cli("list", check=True).stdout
    finally:
        stop_server(server)
    log = server.log.read_text()
    assert '"key":"POLLAMA_API_KEY"' in log.replace(" ", "")  # the access log names it
    assert KEY not in log
    for path in isolated_env.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_the_cli_client_sends_the_containers_key_when_no_client_key_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside the container, `docker exec pollama pollama list` finds POLLAMA_API_KEY;
    OLLAMA_API_KEY (what Ollama's clients read) wins when both are set."""
    from pollama.client import Client

    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    monkeypatch.setenv("POLLAMA_API_KEY", "k" * 20)
    with Client("http://127.0.0.1:9") as api:
        assert api._http.headers["Authorization"] == "Bearer " + "k" * 20
    monkeypatch.setenv("OLLAMA_API_KEY", "o" * 20)
    with Client("http://127.0.0.1:9") as api:
        assert api._http.headers["Authorization"] == "Bearer " + "o" * 20
