"""The ``pollama`` command group.

Subcommands are imported when they run, not all at start-up (:class:`LazyGroup`): the
long-running ``pollama serve`` process must not carry the REPL's prompt_toolkit, rich and
the HTTP client (about 11 MiB resident), and every other command starts faster. ``--help``
still lists them all, importing each for its short help. A command's model argument gets
its name completion as it is loaded (``cli.completion``).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from pollama import __version__
from pollama.cli.completion import complete_model_arguments
from pollama.errors import PollamaError

# name -> "module:attribute"; order is the order `pollama --help` lists them in
COMMANDS: dict[str, str] = {
    "serve": "pollama.cli.serve:serve",
    "create": "pollama.cli.create:create",
    "show": "pollama.cli.models:show",
    "run": "pollama.cli.run:run",
    "stop": "pollama.cli.run:stop",
    "pull": "pollama.cli.registry:pull",
    "push": "pollama.cli.registry:push",
    "list": "pollama.cli.models:list_models",
    "ls": "pollama.cli.models:list_models",
    "ps": "pollama.cli.run:ps",
    "cp": "pollama.cli.models:cp",
    "rm": "pollama.cli.models:rm",
    "purge": "pollama.cli.models:purge",
    "pubkey": "pollama.cli.registry:pubkey",
    "keys": "pollama.cli.keys:keys",
    "service": "pollama.cli.service:service",
    "completion": "pollama.cli.completion:completion",
    "rpc": "pollama.cli.rpc:rpc",
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (click's documented pattern)."""

    def __init__(self, *args: object, lazy: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy) + [n for n in super().list_commands(ctx) if n not in self.lazy]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attr = target.split(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        complete_model_arguments(cmd_name, command)
        return command


def _server_version() -> dict[str, Any]:
    """The running server's ``/api/version`` (``version``: the Ollama API; a pollama server
    adds ``pollama_version``). Never starts a server, and gives up after 5 seconds."""
    import httpx

    from pollama.cli.common import settings
    from pollama.client import Client

    class _VersionClient(Client):
        def version_info(self) -> dict[str, Any]:
            body = self._request("GET", "/api/version").json()
            return body if isinstance(body, dict) else {}

    s = settings()
    try:
        with _VersionClient(s.host.url, timeout=5.0, api_key=s.api_key or None) as api:
            return api.version_info()
    except (httpx.HTTPError, ValueError) as exc:
        raise PollamaError(f"could not read the server's version ({type(exc).__name__})") from None


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """Ollama's ``versionHandler``: the server's version, then a warning with the client's
    when the two differ (or no server answered)."""
    if not value or ctx.resilient_parsing:
        return
    from pollama.client import ServerUnreachable

    info: dict[str, Any] = {}
    try:
        info = _server_version()
    except ServerUnreachable:
        click.echo("Warning: could not connect to a running pollama instance")
    except PollamaError as exc:
        click.echo(f"Warning: {exc}")
    server, api = info.get("pollama_version"), info.get("version")
    if server:
        click.echo(f"pollama version is {server} (Ollama API {api})")
    elif api:  # an Ollama server at OLLAMA_HOST
        click.echo(f"ollama version is {api}")
    if server != __version__:
        click.echo(f"Warning: client version is {__version__}")
    ctx.exit()


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "-v",
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show version information",
)
def cli() -> None:
    """Large language model runner."""


def main() -> None:
    cli(prog_name="pollama")


if __name__ == "__main__":
    main()
