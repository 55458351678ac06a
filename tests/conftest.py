"""Shared fixtures: an isolated home and models folder, an in-process app and the official
clients over it, real servers.

Every test runs with ``HOME`` and ``OLLAMA_MODELS`` in its own temp folder and no
``OLLAMA_*`` variables from the caller's environment (httpx's ``clean_environ`` idea).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from fastapi.testclient import TestClient

from inprocess import anthropic_client, native_client, openai_client
from pollama.config import Settings, load_settings
from pollama.server.app import create_app
from registry_helpers import DockerRegistry, FaultProxy
from stub_ollama import StubServer


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("OLLAMA_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OLLAMA_MODELS", str(home / ".ollama" / "models"))
    return home


@pytest.fixture
def settings(isolated_env: Path) -> Settings:
    return load_settings()


@pytest.fixture
def models_dir(settings: Settings) -> Path:
    return settings.models


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    """The app in-process, lifespan included."""
    # A Host the server answers (TestClient's default "testserver" is refused: DNS rebinding).
    with TestClient(create_app(settings), base_url="http://127.0.0.1:11434") as client:
        yield client


# The official clients, their requests served in process by whichever ``api`` the test module
# provides (a module that serves the app over a fake runner overrides ``api``).


@pytest.fixture
def native(api: TestClient) -> ollama.Client:
    """The official ``ollama`` client."""
    return native_client(api)


@pytest.fixture
def oai(api: TestClient) -> openai.OpenAI:
    """The official ``openai`` client, on ``/v1``."""
    return openai_client(api)


@pytest.fixture
def claude(api: TestClient) -> anthropic.Anthropic:
    """The official ``anthropic`` client."""
    return anthropic_client(api)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_has_amx() -> bool:
    """This machine's CPU has Intel AMX (``amx_tile`` among its flags): the engine, built for
    it, then runs llama.cpp's AMX kernels (``scripts/gcc-amx-tilecfg.h``)."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@dataclass
class RunningServer:
    url: str
    host: str  # the OLLAMA_HOST value for clients
    env: dict[str, str]
    models: Path
    process: subprocess.Popen[bytes]
    log: Path

    def cli(
        self, *args: str, input: str | None = None, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``pollama ARGS`` as a subprocess pointed at this server."""
        result = subprocess.run(
            [sys.executable, "-m", "pollama", *args],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"pollama {args} failed:\n{result.stdout}\n{result.stderr}")
        return result


def start_server(home: Path, extra_env: dict[str, str] | None = None) -> RunningServer:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update(
        {
            "HOME": str(home),
            "OLLAMA_HOST": f"127.0.0.1:{port}",
            "OLLAMA_MODELS": str(home / ".ollama" / "models"),
            **(extra_env or {}),
        }
    )
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pollama", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(proc, url, log)
    return RunningServer(url, env["OLLAMA_HOST"], env, Path(env["OLLAMA_MODELS"]), proc, log)


def wait_until_serving(
    proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 30
) -> None:
    """Poll ``url`` until it answers; if the process exits first or the time runs out, kill
    it and fail with its log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"server did not start:\n{log.read_text()}") from None
            time.sleep(0.1)


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubServer]:
    """A scripted Ollama-like server that OLLAMA_HOST points at (``stub_ollama.py``)."""
    server = StubServer()
    monkeypatch.setenv("OLLAMA_HOST", server.host)
    yield server
    server.close()


@pytest.fixture(scope="module")
def http(srv: RunningServer) -> Iterator[httpx.Client]:
    """A client of the module's own ``srv`` server (a module that starts one defines
    ``srv``), with room for a model's first load."""
    with httpx.Client(base_url=srv.url, timeout=300) as client:
        yield client


def create_with_projector(server: RunningServer, name: str, projector: Path) -> None:
    """Create ``name`` as users make a vision (or audio) model: the default model's weights
    and a projector GGUF, two FROM lines."""
    from pollama.default_model import default_modelfile

    modelfile = projector.with_name(f"{name}.Modelfile")
    modelfile.write_text(default_modelfile() + f"\nFROM {projector}\n")
    server.cli("create", name, "-f", str(modelfile), check=True, timeout=300)


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture
def server(isolated_env: Path) -> Iterator[RunningServer]:
    """A real ``pollama serve`` process on a free loopback port."""
    running = start_server(isolated_env)
    yield running
    stop_server(running)


def tree_snapshot(root: Path) -> set[str]:
    """Every path under ``root`` (to prove that a failed request wrote nothing)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


MODEL = "smollm2:135m"
# A raw prompt (the default model's chat format) whose answer the model is sure of from its
# first token on (over the draft model's P_MIN), and in which no n-gram occurs twice (each
# letter is a token of its own): no draft from the prompt can come first, so the first draft
# weighed is a draft model's, before any cost of it is measured, and it is tried on every
# machine. A count's digits repeat: an n-gram draft came first and missed, and then the
# measured cost of its rows decided whether the draft model was ever asked (on a busy
# machine, once not in 48 tokens).
ALPHABET = (
    "<|im_start|>user\nWrite the alphabet in capital letters, separated by commas."
    "<|im_end|>\n<|im_start|>assistant\nA, B, C,"
)


def create_default_model(server: RunningServer, home: Path, name: str = MODEL,
                         timeout: float = 120) -> None:
    """Create the default model on ``server`` as a user does: its Modelfile, then
    ``pollama create``."""
    from pollama.default_model import default_modelfile

    modelfile = home / "default.Modelfile"
    modelfile.write_text(default_modelfile())
    server.cli("create", name, "-f", str(modelfile), check=True, timeout=timeout)


@contextmanager
def default_model_server(home: Path, extra_env: dict[str, str] | None = None
                         ) -> Iterator[RunningServer]:
    """A real server in ``home`` with the default model created, stopped at the end."""
    running = start_server(home, extra_env)
    try:
        create_default_model(running, home)
        yield running
    finally:
        stop_server(running)


@pytest.fixture(scope="session")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real server with the real default model, shared by the end-to-end modules.

    Four parallel sequences and a queue of ten, so concurrency and queue limits show.
    """
    home = tmp_path_factory.mktemp("model-home")
    with default_model_server(home, {"OLLAMA_NUM_PARALLEL": "4", "OLLAMA_MAX_QUEUE": "10"}
                              ) as running:
        yield running


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    """A real registry (Debian's docker-registry) for the module's pull and push tests."""
    running = DockerRegistry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


@pytest.fixture
def proxy(registry: DockerRegistry) -> Iterator[FaultProxy]:
    """A proxy in front of ``registry`` that injects the faults a test asks for."""
    running = FaultProxy(registry.url)
    yield running
    running.stop()
