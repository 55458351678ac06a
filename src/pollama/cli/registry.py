"""``pollama pull``, ``pollama push`` and ``pollama pubkey``.

Pull and push are thin clients of ``/api/pull`` and ``/api/push``: the server does the
transfer (so downloads survive in its store and are shared), the CLI draws the progress on
stderr as Ollama's does (bars per layer with size, rate and ETA on a terminal, one plain line
per step otherwise). Ctrl+C only stops following: the server keeps what it downloaded, and
the next ``pollama pull`` resumes from there.

``pubkey`` prints this user's ed25519 public key (``~/.ollama/id_ed25519.pub``), creating the
pair first if needed, to register with a registry (ollama.com, Hugging Face) for private
models. It is the key a server running as this user signs registry requests with.
"""

from __future__ import annotations

import click

from pollama.cli.common import client, reports_errors, settings
from pollama.cli.progress import ProgressDisplay
from pollama.config import CLIENT_ENV_VARS, env_help
from pollama.names import ModelName

_ENV = env_help(CLIENT_ENV_VARS)


@click.command(epilog=_ENV)
@click.argument("model")
@click.option("--insecure", is_flag=True, help="Use an insecure registry")
@reports_errors
def pull(model: str, insecure: bool) -> None:
    """Pull a model from a registry."""
    api = client()
    with ProgressDisplay() as display:
        for item in api.pull(model, insecure=insecure):
            display.handle_pull(item)


@click.command(epilog=_ENV)
@click.argument("model")
@click.option("--insecure", is_flag=True, help="Use an insecure registry")
@reports_errors
def push(model: str, insecure: bool) -> None:
    """Push a model to a registry."""
    name = ModelName.parse(model)
    api = client()
    with ProgressDisplay() as display:
        for item in api.push(model, insecure=insecure):
            display.handle(item, default_verb="pushing")
    destination = str(name)
    if name.host.endswith((".ollama.ai", ".ollama.com")):
        destination = "https://ollama.com/" + name.display_shortest().removesuffix(":latest")
    click.echo("\nYou can find your model at:\n")
    click.echo(f"\t{destination}")


@click.command()
@reports_errors
def pubkey() -> None:
    """Print your public key, to register with a registry for private models."""
    from pollama.registry.auth import IdentityKey  # cryptography: only this command needs it

    key = IdentityKey(settings().home)
    if key.ensure():
        click.echo(f"Couldn't find '{key.path}'. Generated a new private key.", err=True)
    click.echo(key.public_key())
