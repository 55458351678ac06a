"""The ``pollama`` command group."""

from __future__ import annotations

import click

from pollama import __version__
from pollama.cli.common import client
from pollama.cli.create import create
from pollama.cli.keys import keys
from pollama.cli.models import cp, list_models, purge, rm, show
from pollama.cli.registry import pubkey, pull, push
from pollama.cli.run import ps, run, stop
from pollama.cli.serve import serve
from pollama.errors import PollamaError


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    try:
        server_version = client(autostart=False).version()
        click.echo(f"pollama version is {__version__} (Ollama API {server_version})")
    except PollamaError:
        click.echo("Warning: could not connect to a running pollama instance")
        click.echo(f"Warning: client version is {__version__}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


cli.add_command(serve)
cli.add_command(create)
cli.add_command(run)
cli.add_command(stop)
cli.add_command(pull)
cli.add_command(push)
cli.add_command(show)
cli.add_command(list_models)
cli.add_command(list_models, name="ls")
cli.add_command(ps)
cli.add_command(cp)
cli.add_command(rm)
cli.add_command(purge)
cli.add_command(pubkey)
cli.add_command(keys)


def main() -> None:
    cli(prog_name="pollama")


if __name__ == "__main__":
    main()
