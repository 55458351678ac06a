"""``make run``: start a server if needed, register the default model, then chat with it.

Everything goes through the real CLI and HTTP API, exactly as a user would type it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from pollama.cli.autostart import ensure_server, server_log_path
from pollama.client import Client
from pollama.config import load_settings
from pollama.default_model import DEFAULT_MODEL, default_modelfile
from pollama.errors import PollamaError


def _pollama(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "pollama", *args])


def main() -> int:
    settings = load_settings()
    try:
        if ensure_server(settings):
            print(
                f"started pollama server at {settings.host.url} (log: {server_log_path(settings)})",
                file=sys.stderr,
            )
        api = Client(settings.host.url)
        names = {m.get("name") for m in api.list()}
    except PollamaError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if DEFAULT_MODEL not in names:
        with tempfile.TemporaryDirectory() as tmp:
            modelfile = Path(tmp) / "Modelfile"
            modelfile.write_text(default_modelfile(), encoding="utf-8")
            code = _pollama("create", DEFAULT_MODEL, "-f", str(modelfile))
            if code:
                return code
        code = _pollama("show", DEFAULT_MODEL)
        if code:
            return code
    # A chat on a terminal; with piped stdin, one answer to what it holds.
    return _pollama("run", DEFAULT_MODEL)


if __name__ == "__main__":
    sys.exit(main())
