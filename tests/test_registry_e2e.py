"""End to end: real ``pollama serve`` processes, the real CLI, a real registry.

* create → push → rm → pull gives the same digests, and the model runs;
* a pull that the client abandons stops; one whose server is killed mid-download continues
  from the bytes on disk;
* one pollama pulls a model from another pollama's ``/v2/`` (the LAN case);
* the CLI's progress, on a terminal (a pty) and not.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import RunningServer, start_server, stop_server
from ggufgen import write_tiny_model
from pollama.client import Client
from pollama.keys import KeyStore, Scope
from pollama.names import ModelName
from pollama.registry import RegistryService
from pollama.store import Store
from registry_helpers import DockerRegistry, Fault, FaultProxy
from test_registry import FAST, LOOPBACK_REGISTRIES, make_model, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server that also serves its models to other machines, and pushes to the test's
    registry on loopback (listed, as a user lists a registry of their own)."""
    running = start_server(tmp_path_factory.mktemp("origin"),
                           {"POLLAMA_SERVE_REGISTRY": "1", "POLLAMA_REGISTRY_HOSTS": "127.0.0.1"})
    yield running
    stop_server(running)


def create_model(server: RunningServer, name: str, gguf: Path) -> str:
    """Create ``name`` from a GGUF through the API (as ``pollama create`` does)."""
    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    with Client(server.url) as api:
        api.push_blob(digest, gguf)
        items = list(api.create({"model": name, "files": {gguf.name: digest}}))
    assert items[-1] == {"status": "success"}
    return digest


def tags(server: RunningServer) -> dict[str, str]:
    with Client(server.url) as api:
        return {m["name"]: m["digest"] for m in api.list()}


def test_create_push_rm_pull_gives_the_same_model_and_it_runs(
    origin: RunningServer, registry: DockerRegistry, tmp_path: Path
) -> None:
    name = f"{registry.netloc}/library/tiny:latest"
    create_model(origin, name, write_tiny_model(tmp_path / "tiny.gguf"))
    before = tags(origin)[name]
    blobs = sorted(p.name for p in (origin.models / "blobs").iterdir())

    pushed = origin.cli("push", "--insecure", name, check=True)
    assert "You can find your model at:" in pushed.stdout
    assert f"\t{name}" in pushed.stdout
    assert pushed.stderr.splitlines()[0] == "retrieving manifest"
    assert pushed.stderr.splitlines()[-2:] == ["pushing manifest", "success"]

    with Client(origin.url) as api:
        api.delete(name)
    assert name not in tags(origin)
    assert list((origin.models / "blobs").iterdir()) == []

    pulled = origin.cli("pull", "--insecure", name, check=True)
    lines = pulled.stderr.splitlines()
    assert lines[0] == "pulling manifest"
    assert lines[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    bars = [line for line in lines[1:-3]]
    assert bars and all(
        re.fullmatch(r"pulling [0-9a-f]{12}: 100% \d+(\.\d+)? [KMGT]?B", b) for b in bars
    ), bars
    assert "\x1b" not in pulled.stderr  # plain lines when not on a terminal
    assert tags(origin)[name] == before
    assert sorted(p.name for p in (origin.models / "blobs").iterdir()) == blobs

    with Client(origin.url) as api:
        out = list(api.generate({"model": name, "prompt": "hello", "options": {"num_predict": 3}}))
    assert out[-1]["done"] is True and out[-1]["eval_count"] > 0


def test_a_pull_continues_after_ctrl_c_and_after_the_server_is_killed(
    registry: DockerRegistry, tmp_path: Path, isolated_env: Path
) -> None:
    scratch = Store(tmp_path / "scratch")
    scratch.ensure()
    name = ModelName.parse(f"{registry.netloc}/library/killed:latest")
    manifest = make_model(scratch, name, tmp_path, seed=9, n_embd=256)
    run(RegistryService(scratch, user_home=tmp_path, allowed_hosts=LOOPBACK_REGISTRIES,
                        options=FAST).push(name, insecure=True))
    size = max(layer.size for layer in manifest.layers)
    proxy = FaultProxy(registry.url)
    throttle = proxy.add(Fault(path="/blobs/", action="throttle", rate=size / 6, times=None))
    via_proxy = f"{proxy.netloc}/library/killed:latest"
    listed = {"POLLAMA_REGISTRY_HOSTS": proxy.netloc}
    server = start_server(isolated_env, listed)
    try:
        # A client that goes away (Ctrl+C) stops the download: nobody else follows it.
        with httpx.stream(
            "POST",
            f"{server.url}/api/pull",
            timeout=30,
            json={"model": via_proxy, "insecure": True},
        ) as response:
            for line in response.iter_lines():
                if json.loads(line).get("completed", 0) > size // 8:
                    break
        time.sleep(0.3)
        before = proxy.blob_bytes()
        time.sleep(1.0)
        assert proxy.blob_bytes() - before < size // 8  # it would be ~size/6 had it gone on

        # Then the server is killed in the middle of the next attempt.
        started = None
        with httpx.stream(
            "POST",
            f"{server.url}/api/pull",
            timeout=30,
            json={"model": via_proxy, "insecure": True},
        ) as response:
            for line in response.iter_lines():
                item = json.loads(line)
                if item.get("total") == size and item.get("completed"):
                    started = started or time.monotonic()
                    if time.monotonic() - started > 2.6:  # past a progress checkpoint
                        server.process.kill()
                        break
        server.process.wait()
        blobs = server.models / "blobs"
        states = [json.loads(p.read_text()) for p in blobs.glob("*-partial-*")]
        saved = sum(s["Completed"] for s in states)
        assert 0 < saved < size
        assert not [n for n in tags_or_none(server) if "killed" in n]
        first = proxy.blob_bytes()

        throttle.times = 0
        server = start_server(isolated_env, listed)
        assert "killed" not in " ".join(tags(server))  # never a half-pulled model
        with Client(server.url) as api:
            assert list(api.pull(via_proxy, insecure=True))[-1] == {"status": "success"}
        assert (
            tags(server)[via_proxy]
            == hashlib.sha256((scratch.manifests.path(name)).read_bytes()).hexdigest()
        )
        again = proxy.blob_bytes() - first
        assert again < size - saved + size // 4  # only what was missing (plus small blobs)
        assert proxy.blob_bytes() < 2 * size
        assert list(blobs.glob("*-partial*")) == []
    finally:
        stop_server(server)
        proxy.stop()


def tags_or_none(server: RunningServer) -> list[str]:
    """Names listed in the store (the server is dead: read the manifests folder)."""
    root = server.models / "manifests"
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run a command with a terminal (120x40) as stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(args, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout=10), b"".join(chunks).decode("utf-8", errors="replace")


@pytest.fixture
def puller(origin: RunningServer, isolated_env: Path) -> Iterator[RunningServer]:
    """A server that lists the origin's address among its registries (the LAN case)."""
    port = origin.url.rsplit(":", 1)[1]
    running = start_server(isolated_env, {"POLLAMA_REGISTRY_HOSTS": f"127.0.0.1:{port}"})
    yield running
    stop_server(running)


def test_pull_from_another_pollama_with_progress_on_a_terminal(
    origin: RunningServer, puller: RunningServer, tmp_path: Path
) -> None:
    server = puller
    digest = create_model(origin, "lan-model:135m", write_tiny_model(tmp_path / "lan.gguf", seed=4))
    port = origin.url.rsplit(":", 1)[1]
    name = f"127.0.0.1:{port}/library/lan-model:135m"
    code, output = run_in_pty(
        [sys.executable, "-m", "pollama", "pull", "--insecure", name], server.env
    )
    assert code == 0, output
    assert "pulling manifest" in output and "success" in output
    assert f"pulling {digest[7:19]}:" in output
    assert "100%" in output and "▕" in output and "\x1b[" in output
    assert tags(server)[name] == tags(origin)["lan-model:135m"]
    assert (server.models / "blobs" / digest.replace(":", "-")).is_file()
    # An origin that requires API keys takes one from the puller's Docker config.json.
    keys = KeyStore(Path(origin.env["HOME"]) / ".ollama" / "api_keys.json")
    secret, key = keys.create("lan", Scope.INFERENCE)
    try:
        refused = server.cli("pull", "--insecure", name)
        assert refused.returncode == 1
        assert "requires an API key" in refused.stderr and "registrytoken" in refused.stderr
        docker = Path(server.env["HOME"]) / ".docker"
        docker.mkdir()
        (docker / "config.json").write_text(
            json.dumps({"auths": {f"127.0.0.1:{port}": {"registrytoken": secret}}})
        )
        with Client(server.url) as api:
            assert list(api.pull(name, insecure=True))[-1] == {"status": "success"}
    finally:
        keys.revoke(key.id)
    # A host the server's settings do not list is refused, --insecure or not.
    refused = server.cli("pull", "--insecure", f"127.0.0.2:{port}/library/lan-model:135m")
    assert refused.returncode == 1
    assert "is not allowed" in refused.stderr and "POLLAMA_REGISTRY_HOSTS" in refused.stderr
