"""``pollama keys``: create, list and revoke the server's API keys.

These commands edit the keys file directly (``POLLAMA_KEYS_FILE``, by default
``~/.ollama/api_keys.json``) instead of calling the API: whoever can write that file already
controls the server, and a first key cannot be made over an API that needs one. A running
server sees each change on its next request. A new key is printed once, on stdout alone,
so ``KEY=$(pollama keys create)`` works; it cannot be shown again.
"""

from __future__ import annotations

import json

import click

from pollama.cli.common import reports_errors, settings
from pollama.cli.tables import table
from pollama.keys import KEY_PREFIX, KeyStore, Scope


def _store() -> KeyStore:
    return KeyStore(settings().api_keys_path)


@click.group()
def keys() -> None:
    """Manage the API keys that pollama serve requires."""


@keys.command("create")
@click.option("--name", default="", help="A name to recognise the key by (logged, never the key)")
@click.option(
    "--scope",
    type=click.Choice([s.value for s in Scope]),
    default=Scope.ALL.value,
    show_default=True,
    help="inference: run models, list and show; manage: create, delete, copy, pull, push; "
    "all: both",
)
@reports_errors
def create_key(name: str, scope: str) -> None:
    """Create a key and print it (shown this once only)."""
    store = _store()
    secret, record = store.create(name, scope)
    click.echo(secret)
    click.echo(
        f'\nCreated key "{record.name}" (id {record.id}, scope {record.scope.value}) in '
        f"{store.path}.\nIt is shown only now: store it somewhere safe. Clients send it as "
        "'Authorization: Bearer <key>'; for the pollama and ollama CLIs:\n"
        f"    export OLLAMA_API_KEY={secret}\n"
        "A running server accepts it at once.",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table")
@reports_errors
def list_keys(as_json: bool) -> None:
    """List keys (names, scopes and hints; the keys themselves are not stored)."""
    records = _store().keys()
    if as_json:
        click.echo(json.dumps([k.public() for k in records], indent=2))
        return
    rows = [["ID", "NAME", "SCOPE", "KEY", "CREATED"]]
    rows += [[k.id, k.name, k.scope.value, f"{KEY_PREFIX}...{k.hint}", k.created_at]
             for k in records]  # fmt: skip
    click.echo(table(rows))


@keys.command("revoke")
@click.argument("key", metavar="ID|NAME")
@reports_errors
def revoke_key(key: str) -> None:
    """Revoke a key; a running server refuses it from its next request."""
    record = _store().revoke(key)
    click.echo(f'Revoked key "{record.name}" (id {record.id}).', err=True)
