"""``pollama serve``: run the HTTP server in the foreground."""

from __future__ import annotations

import logging

import click
import uvicorn

from pollama.cli.common import reports_errors, settings
from pollama.config import SERVE_ENV_VARS, env_help
from pollama.server.app import create_app


@click.command(epilog="\b" + env_help(SERVE_ENV_VARS))
@reports_errors
def serve() -> None:
    """Start pollama."""
    s = settings()
    logging.basicConfig(
        level=logging.DEBUG if s.debug else logging.INFO,
        format="time=%(asctime)s level=%(levelname)s source=%(name)s msg=%(message)s",
    )
    app = create_app(s)
    click.echo(
        f"pollama listening on {s.host.bind_host}:{s.host.port} (models: {s.models})", err=True
    )
    uvicorn.run(
        app,
        host=s.host.bind_host,
        port=s.host.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
