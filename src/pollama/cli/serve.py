"""``pollama serve``: run the HTTP server in the foreground."""

from __future__ import annotations

import logging
import os

import click
import uvicorn

from pollama.cli.common import fail, reports_errors, settings
from pollama.config import SERVE_ENV_VARS, env_help
from pollama.config.report import config_rows, format_config
from pollama.server.app import create_app, take_inventory
from pollama.server.limits import guarded_h11_protocol
from pollama.server.security import auth_summary, bind_refusal


@click.command(epilog="\b" + env_help(SERVE_ENV_VARS))
@click.option(
    "--print-config",
    is_flag=True,
    help="Print each setting's value and where it came from (environment, file, default), "
    "and the per-model presets; then exit",
)
@reports_errors
def serve(print_config: bool) -> None:
    """Start pollama."""
    if print_config:
        rows, effective = config_rows(os.environ)
        click.echo(format_config(rows, effective), nl=False)
        return
    s = settings()
    logging.addLevelName(5, "TRACE")
    logging.basicConfig(
        level=s.python_log_level,  # OLLAMA_DEBUG: 1 = DEBUG, 2 = TRACE, as Ollama
        format="time=%(asctime)s level=%(levelname)s source=%(name)s msg=%(message)s",
    )
    refusal = bind_refusal(s)
    if refusal is not None:
        fail(refusal)
    # POLLAMA_API_KEY stays in memory only (the settings, a reload's copy of the starting
    # environment); the runner processes, which parse untrusted model files, must not
    # inherit it.
    environ = dict(os.environ)
    os.environ.pop("POLLAMA_API_KEY", None)
    # SIGHUP and a changed pollama.toml reload keys, limits and presets (server/reload.py).
    app = create_app(s, inventory=take_inventory(rpc_servers=s.rpc_servers), reload_environ=environ)
    click.echo(auth_summary(s), err=True)
    click.echo(
        f"pollama listening on {s.host.bind_host}:{s.host.port} (models: {s.models})", err=True
    )
    uvicorn.run(
        app,
        host=s.host.bind_host,
        port=s.host.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
        # Slow clients (server/limits.py): a deadline for headers, a cap on connections per
        # client address, idle kept-alive connections closed after 5s, 16 KiB of headers at
        # most, a connection cap (503).
        http=guarded_h11_protocol(s.header_timeout, s.max_connections_per_client),
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,
        limit_concurrency=s.max_connections or None,
        server_header=False,
        access_log=False,  # pollama writes its own (server/access_log.py)
    )
