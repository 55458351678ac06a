"""Start ``pollama serve`` in the background when no server answers.

The server outlives the command that started it (a new session, output to a log file under
the pollama home), so later commands find it, as they find Ollama's service.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pollama.client import Client, ServerUnreachable
from pollama.config import Settings
from pollama.errors import InternalError


def server_log_path(settings: Settings) -> Path:
    return settings.home / "logs" / "server.log"


def server_pid_path(settings: Settings) -> Path:
    return settings.home / "logs" / "server.pid"


def ensure_server(settings: Settings, *, timeout_s: float = 60.0) -> bool:
    """Make sure a server answers; return True when this call started it."""
    api = Client(settings.host.url)
    try:
        api.heartbeat()
        return False
    except ServerUnreachable:
        pass
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
        if proc.poll() is not None:
            raise InternalError(f"pollama serve exited with code {proc.returncode}; see {log_path}")
        try:
            api.heartbeat()
            return True
        except ServerUnreachable:
            time.sleep(0.2)
    raise InternalError(f"pollama serve did not answer within {timeout_s:.0f}s; see {log_path}")
