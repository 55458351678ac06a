"""The ``pollama`` command group.

Subcommands are imported when they run, not all at start-up (:class:`LazyGroup`): the
long-running ``pollama serve`` process must not carry the REPL's prompt_toolkit, rich and
the HTTP client (about 11 MiB resident), and every other command starts faster. ``--help``
still lists them all, importing each for its short help.
"""

from __future__ import annotations

import importlib

import click

from pollama import __version__
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
        return command


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from pollama.cli.common import client

    try:
        server_version = client(autostart=False).version()
        click.echo(f"pollama version is {__version__} (Ollama API {server_version})")
    except PollamaError:
        click.echo("Warning: could not connect to a running pollama instance")
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
