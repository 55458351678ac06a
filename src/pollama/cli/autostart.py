"""Start ``pollama serve`` in the background when no server answers
(docs/architecture.md#the-cli-is-an-http-client).

Every client command calls :func:`ensure_server` before its first request (through
``cli.common.client``). The rules:

* something answers at ``OLLAMA_HOST``: nothing to do;
* nothing listens there and the address is this machine: start ``pollama serve`` as its
  own session (it outlives the command, as Ollama's service does), log to
  ``~/.ollama/logs/server.log``, wait until it answers;
* the address is another machine: we cannot start it, say so;
* something listens but does not answer as a server, or the started server exits or stays
  silent: say so, with the last line of the log.

Two commands starting at once both spawn a server; one wins the port, the other exits, and
both commands find the winner answering, so the race is harmless.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pollama.client import Client, ServerUnreachable
from pollama.config import Settings
from pollama.errors import PollamaError


class ServerNotStarted(PollamaError):
    """No server answers and none could be started here."""


def server_log_path(settings: Settings) -> Path:
    return settings.home / "logs" / "server.log"


def server_pid_path(settings: Settings) -> Path:
    return settings.home / "logs" / "server.pid"


def _answers(api: Client) -> bool:
    """True when a server answers; False when nothing listens; raise when something
    listens but is not a working server."""
    try:
        api.heartbeat()
        return True
    except ServerUnreachable:
        return False
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        raise ServerNotStarted(
            f"something at {api.base_url} accepts connections but does not answer as a "
            f"pollama server ({type(exc).__name__}); check OLLAMA_HOST"
        ) from None


def _last_log_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def ensure_server(settings: Settings, *, timeout_s: float = 60.0) -> bool:
    """Make sure a server answers at ``settings.host``; return True when this call started it.

    Raises :class:`ServerNotStarted` (a :class:`PollamaError`, so commands print
    ``Error: ...`` and exit 1) when no server answers and none could be started.
    """
    url = settings.host.url
    api = Client(url, timeout=5.0)
    try:
        if _answers(api):
            return False
        if not settings.host.is_local:
            raise ServerNotStarted(
                f"could not connect to pollama server at {url}; it is not on this machine, so "
                "start it there with 'pollama serve' or fix OLLAMA_HOST"
            )
        log_path = server_log_path(settings)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pollama", "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        server_pid_path(settings).write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if _answers(api):
                return True
            if proc.poll() is not None:
                if _answers(api):  # another command's server won the port
                    return False
                detail = _last_log_line(log_path)
                raise ServerNotStarted(
                    f"could not start pollama server at {url}: 'pollama serve' exited with "
                    f"code {proc.returncode}" + (f" ({detail})" if detail else "")
                    + f"; see {log_path}"
                )
            time.sleep(0.1)
        raise ServerNotStarted(
            f"could not start pollama server at {url}: no answer within {timeout_s:.0f}s; "
            f"see {log_path}"
        )
    finally:
        api.close()


__all__ = ["ServerNotStarted", "ensure_server", "server_log_path", "server_pid_path"]
