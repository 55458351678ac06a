"""The container image's entry point and health check (``Dockerfile``).

``python -m pollama.cli.container [ARGS]`` is the image's ``ENTRYPOINT`` (under ``tini``, which
reaps the runner processes and forwards signals):

* no arguments, or options only (``--help``): ``pollama serve``;
* a ``pollama`` subcommand (``pull``, ``keys create``, ``list``...): that subcommand, so
  ``docker run --rm -v pollama:/home/pollama/.ollama pollama keys create`` works; pollama's
  names win over programs of the same name (``rm``, ``cp``, ``ps``);
* anything else (``sh``, ``python3``): that program, exec'd as is;
* ``healthcheck``: the image's ``HEALTHCHECK``, a GET of ``/healthz`` (exit 0 or 1).

Inside a container pollama listens on every interface (``OLLAMA_HOST=0.0.0.0:11434``), so
``serve`` needs a key: ``POLLAMA_API_KEY`` (stored nowhere) or a keys file in the volume.
Without either, and without ``POLLAMA_ALLOW_NO_AUTH``, it exits with :data:`EXIT_NO_KEY`
and a message that says, in ``docker run`` terms, what to do. ``pollama serve`` itself
would refuse too (``server/security.py`` ``bind_refusal``), but in terms of a host shell.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
import urllib.request
from collections.abc import Sequence

from pollama.config import Settings, load_settings
from pollama.keys import MIN_ENV_KEY_LENGTH, KeyStore

__all__ = ["EXIT_NO_KEY", "HEALTHCHECK", "main", "no_key_refusal"]

EXIT_NO_KEY = 78
"""``EX_CONFIG`` (sysexits.h): the container's configuration lacks a key."""
HEALTHCHECK = "healthcheck"
_HEALTH_TIMEOUT = 5.0
_VOLUME = "/home/pollama/.ollama"


def no_key_refusal(settings: Settings) -> str | None:
    """The message the container exits with when ``serve`` would have no key, else None.

    A keys file that exists but cannot be used counts as configured here: ``pollama
    serve`` then refuses with the file's own error, which says more.
    """
    if settings.server_api_key or settings.allow_no_auth:
        return None
    if _loopback(settings.host.bind_host):
        return None
    configured, _ = KeyStore(settings.api_keys_path).state()
    if configured:
        return None
    port = settings.host.port
    return (
        f"pollama: not starting: in a container pollama listens on every interface "
        f"(OLLAMA_HOST={settings.host.bind_host or '0.0.0.0'}:{port}), and no API key is set, "
        "so anyone who can reach the published port could run, pull and delete models.\n"
        "Give the server a key (at least "
        f"{MIN_ENV_KEY_LENGTH} characters; it is stored nowhere):\n"
        "    export POLLAMA_API_KEY=$(openssl rand -hex 32)\n"
        f"    docker run -d -p {port}:{port} -v pollama:{_VOLUME} -e POLLAMA_API_KEY "
        "--name pollama pollama\n"
        "  and give clients the same key as 'Authorization: Bearer <key>' (the pollama and "
        "ollama CLIs read OLLAMA_API_KEY);\n"
        "or create keys in the volume's keys file, then start the server as before:\n"
        f"    docker run --rm -v pollama:{_VOLUME} pollama keys create --name <who-uses-it>\n"
        "or, only on a network you trust, serve without keys: -e POLLAMA_ALLOW_NO_AUTH=1"
    )


def _loopback(host: str) -> bool:
    """``localhost`` or a loopback address. Not ``server.security.is_loopback_bind``: the CLI
    does not import the server; a name that resolves to loopback counts as not, so here it
    asks for a key where ``pollama serve`` might not (the safe side)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def healthcheck(settings: Settings) -> int:
    """``/healthz`` of the server these settings describe: 0 when it answers 200, else 1.

    It dials the address a client would (``0.0.0.0`` becomes ``127.0.0.1``) on the port of
    ``OLLAMA_HOST``, so a container run with another port stays healthy. Proxies are
    ignored: an ``HTTP_PROXY`` given to the container for pulls must not carry a loopback
    request away.
    """
    host = settings.host.connect_host
    netloc = f"[{host}]:{settings.host.port}" if ":" in host else f"{host}:{settings.host.port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{netloc}/healthz", timeout=_HEALTH_TIMEOUT) as response:
            status = int(response.status)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: http://{netloc}/healthz: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


def main(argv: Sequence[str] | None = None) -> None:
    """Route ``argv`` as the module docstring says; exits (or execs) when done."""
    from pollama.cli.main import COMMANDS, cli

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        args = ["serve", *args]
    if args[0] == HEALTHCHECK:
        sys.exit(healthcheck(load_settings()))
    if args[0] not in COMMANDS and shutil.which(args[0]):
        os.execvp(args[0], args)  # noqa: S606 - the command the container was given
    if args[0] == "serve" and not {"-h", "--help"} & set(args):
        refusal = no_key_refusal(load_settings())
        if refusal is not None:
            print(refusal, file=sys.stderr)
            sys.exit(EXIT_NO_KEY)
    cli.main(args=args, prog_name="pollama")


if __name__ == "__main__":
    main()
