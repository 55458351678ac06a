"""Helpers for the security regression tests: apps with chosen settings, keys, servers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import RunningServer, free_port, wait_until_serving
from pollama.config import load_settings
from pollama.keys import KeyStore
from pollama.server.app import create_app

LOCAL = "http://127.0.0.1:11434"
ZERO_DIGEST = "sha256:" + "0" * 64


def concrete(template: str) -> str:
    """A request path for a route template: digests get a valid digest, other params ``x``."""
    def fill(m: re.Match[str]) -> str:
        return ZERO_DIGEST if m.group(1) == "digest" else "x"

    return re.sub(r"\{(\w+)(?::[^}]*)?\}", fill, template)


@pytest.fixture
def make_client(isolated_env: Path) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**env)``: the app in-process with these extra environment variables."""
    clients: list[TestClient] = []

    def make(base_url: str = LOCAL, **env: str) -> TestClient:
        environ = {"HOME": str(isolated_env),
                   "OLLAMA_MODELS": str(isolated_env / ".ollama" / "models"), **env}
        client = TestClient(create_app(load_settings(environ)), base_url=base_url)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def keys(isolated_env: Path) -> KeyStore:
    """The key store the app of ``make_client``/``api`` reads."""
    return KeyStore(isolated_env / ".ollama" / "api_keys.json")


def launch(
    home: Path, bind: str, extra_env: dict[str, str] | None = None, *, wait: bool = True
) -> RunningServer:
    """``pollama serve`` bound to host ``bind`` on a free port (reached on 127.0.0.1)."""
    port = free_port()
    host = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "POLLAMA_"))}
    env.update({"HOME": str(home), "OLLAMA_HOST": host,
                "OLLAMA_MODELS": str(home / ".ollama" / "models"), **(extra_env or {})})
    log = home / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pollama", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    server = RunningServer(url, host, env, Path(env["OLLAMA_MODELS"]), proc, log)
    if wait:
        wait_until_serving(proc, url + "/healthz", log)
    return server
