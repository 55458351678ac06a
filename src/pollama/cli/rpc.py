"""``pollama rpc``: serve this machine's compute device to other pollama servers through
llama.cpp's RPC backend (README.md#rpc).

The server itself is llama.cpp's (``ggml_backend_rpc_start_server``), run by
``python -m pollama.runner.rpc serve`` in a subprocess: the CLI never loads llama.cpp
(only the runner does). Another pollama server uses it with
``OLLAMA_RPC_SERVERS=host:port``.

What must stay true: llama.cpp's RPC protocol has no authentication and no encryption, and
its server has had memory-safety bugs; so the server listens on loopback unless ``--host``
names another address *and* :data:`RISK_FLAG` is given, and the warning saying what an
attacker could do and how to tunnel instead is printed whenever it is not on loopback.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import click

from pollama.cli.common import fail

RISK_FLAG = "--i-understand-this-is-unauthenticated"
DEFAULT_PORT = 50052  # llama.cpp's rpc-server default

TUNNEL_HINT = (
    "To use it from another machine, keep it on loopback and carry the port over a tunnel:\n"
    "  ssh -N -L 50052:127.0.0.1:50052 user@this-host     (on the machine running pollama serve,\n"
    "  then OLLAMA_RPC_SERVERS=127.0.0.1:50052 there), or bind it to a WireGuard address\n"
    "  that only your peers can reach (README.md#rpc)."
)

WARNING = (
    "WARNING: llama.cpp's RPC protocol has no authentication and no encryption, and its\n"
    "server has had memory-safety bugs. Anyone who can reach {endpoint} can use this\n"
    "machine's {what} and memory, read and overwrite the model weights and prompts sent to\n"
    "it, and may be able to crash this process or run code in it. Listen only on a network\n"
    "where every host is yours.\n" + TUNNEL_HINT
)


def listen_address(host: str, accept_risk: bool) -> str:
    """The IPv4 address to listen on (llama.cpp's server takes only a dotted IPv4 address;
    ``localhost`` is ``127.0.0.1``), or ``click.UsageError`` saying why not: not an IPv4
    address, or not loopback without :data:`RISK_FLAG`."""
    address = "127.0.0.1" if host.strip().lower() == "localhost" else host.strip()
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError:
        raise click.UsageError(
            f"--host takes an IPv4 address (llama.cpp's RPC server listens on IPv4 only), "
            f"not {host!r}"
        ) from None
    if not parsed.is_loopback and not accept_risk:
        raise click.UsageError(
            f"refusing to listen on {address}: llama.cpp's RPC protocol is unauthenticated. "
            f"Add {RISK_FLAG} to accept that anyone who can reach {address} can use and "
            f"attack this server, or keep the default 127.0.0.1 and use an SSH tunnel "
            f"(ssh -L) or WireGuard (README.md#rpc)"
        )
    return address


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help=f"IPv4 address to listen on; one that is not loopback needs {RISK_FLAG}")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535),
              help="TCP port to listen on")
@click.option("--threads", default=0, type=click.IntRange(0, 4096),
              help="CPU threads for the computation (0: every CPU this process may use)")
@click.option(RISK_FLAG, "accept_risk", is_flag=True,
              help="Listen on a non-loopback address although the protocol has no "
              "authentication (see the warning it prints)")  # fmt: skip
def rpc(host: str, port: int, threads: int, accept_risk: bool) -> None:
    """Serve this machine's device to other pollama servers (llama.cpp RPC).

    Point another server at it with OLLAMA_RPC_SERVERS=host:port: its models' layers are
    split over its own device and this one. One pollama model uses it at a time."""
    address = listen_address(host, accept_risk)
    endpoint = f"{address}:{port}"
    if ipaddress.IPv4Address(address).is_loopback:
        click.echo(f"pollama rpc: listening on {endpoint} (this machine only).", err=True)
        click.echo(TUNNEL_HINT, err=True)
    else:
        click.echo(WARNING.format(endpoint=endpoint, what="CPU or GPU"), err=True)
    command = [sys.executable, "-m", "pollama.runner.rpc", "serve",
               "--host", address, "--port", str(port), "--threads", str(threads)]  # fmt: skip
    child = subprocess.Popen(command)  # noqa: S603 - our own interpreter and module
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.terminate()
        code = child.wait()
        click.echo("pollama rpc: stopped", err=True)
        return
    if code != 0:
        fail(f"the RPC server on {endpoint} stopped (exit status {code})")
