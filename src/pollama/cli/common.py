"""What every client command shares: settings, the API client, error reporting."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pollama.config import Settings, load_settings
from pollama.errors import PollamaError

if TYPE_CHECKING:  # httpx is imported by the commands that talk to a server, not by serve
    from pollama.client import Client

F = TypeVar("F", bound=Callable[..., Any])


def settings() -> Settings:
    ctx = click.get_current_context()
    root = ctx.find_root()
    if root.obj is None:
        root.obj = load_settings()
    assert isinstance(root.obj, Settings)
    return root.obj


def client(*, autostart: bool = True) -> Client:
    """The API client for this command; first, once per command, start a background server
    when none answers (``cli.autostart``). ``autostart=False`` only reports, as ``-v`` does."""
    from pollama.cli.autostart import ensure_server, server_log_path
    from pollama.client import Client

    s = settings()
    root = click.get_current_context().find_root()
    if autostart and not root.meta.get("pollama.server_checked"):
        if ensure_server(s):
            click.echo(
                f"started pollama server in the background at {s.host.url} "
                f"(log: {server_log_path(s)})",
                err=True,
            )
        root.meta["pollama.server_checked"] = True
    return Client(s.host.url, api_key=s.api_key or None)


def fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def reports_errors(func: F) -> F:
    """Print domain errors as Ollama's CLI does (``Error: <message>``, exit 1)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PollamaError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
