"""``pollama service install|uninstall``: ``pollama serve`` as a systemd service.

The unit is the one Ollama's installer writes (``scripts/install.sh``: ``User=``,
``Restart=always``, ``RestartSec=3``, ``Environment="PATH=..."``, ``After=
network-online.target``), with these differences, each for a reason:

* ``ExecStart`` is this very installation (the ``pollama`` script beside the running Python,
  else ``python -P -m pollama``), so the service runs the code that wrote it;
* a system unit runs as the invoking user (``SUDO_USER`` under sudo), whose home already
  holds the models and the venv, never as root unless ``--run-as root`` says so; a
  dedicated user is ``--run-as NAME``. ``--user`` writes a user unit, with no ``User=``;
* every ``OLLAMA_*``/``POLLAMA_*`` setting set in the environment becomes an
  ``Environment=`` line, quoted for systemd, so the service serves as ``pollama serve``
  would here. Secrets (``OLLAMA_API_KEY``, ``POLLAMA_API_KEY``) never go into the unit: any
  user can read a unit, and its ``Environment=`` through ``systemctl show``. They go into an
  ``EnvironmentFile`` beside it, mode 0600, which systemd reads before it drops privileges;
* hardening that does not get in the model's way (``NoNewPrivileges``, ``PrivateTmp``,
  ``ProtectSystem=full``...; no ``PrivateDevices``, which would hide the GPU, and no
  ``ProtectHome``, where the models usually are). A user manager may lack the namespaces
  most of it needs, so a user unit keeps only ``NoNewPrivileges``;
* the first line marks the file as pollama's: install overwrites only such a file, and
  uninstall removes only such a file.

Nothing here needs a running systemd: the commands to start the service are printed, or run
with ``--now``. Logs go to the journal: the server writes JSON lines to stderr.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from pollama import __version__
from pollama.cli.common import reports_errors
from pollama.config import Settings
from pollama.errors import PollamaError

UNIT_NAME = "pollama.service"
ENV_FILE_NAME = "pollama.env"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
MARK = "# Written by 'pollama service install'"
_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
_HARDENING = (
    "NoNewPrivileges=yes",
    "PrivateTmp=yes",
    "ProtectSystem=full",
    "ProtectControlGroups=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelTunables=yes",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "LockPersonality=yes",
)
# Plain words systemd reads as themselves in ExecStart= (no quotes, escapes or $).
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@+=:,./-")


class ServiceError(PollamaError):
    """The unit cannot be written or removed as asked; the message says what to do."""


@dataclass(frozen=True)
class UnitScope:
    """Where the unit goes and how systemctl is called: the system manager or the user's."""

    user: bool
    unit_dir: Path

    @property
    def systemctl(self) -> list[str]:
        return ["systemctl", "--user"] if self.user else ["systemctl"]

    @property
    def unit_path(self) -> Path:
        return self.unit_dir / UNIT_NAME

    @property
    def env_path(self) -> Path:
        return self.unit_dir / ENV_FILE_NAME


def user_unit_dir() -> Path:
    """``$XDG_CONFIG_HOME/systemd/user`` (default ``~/.config``), where a user's own units go."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def _scope(user: bool, unit_dir: Path | None) -> UnitScope:
    default = user_unit_dir() if user else SYSTEM_UNIT_DIR
    return UnitScope(user=user, unit_dir=unit_dir or default)


# -- quoting ----------------------------------------------------------------------------------


def _check_text(what: str, text: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ServiceError(f"{what} holds a control character, which a unit file cannot hold")


def exec_word(word: str) -> str:
    """One ``ExecStart=`` word: plain, or double-quoted with C escapes; ``%`` (specifiers) and
    ``$`` (variable expansion) doubled to stay literal."""
    _check_text(repr(word), word)
    word = word.replace("%", "%%").replace("$", "$$")
    if word and set(word) <= _PLAIN | {"%", "$"}:
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def environment_line(name: str, value: str) -> str:
    """``Environment="NAME=value"``: systemd expands no ``$`` there, but does expand ``%``
    specifiers and reads C escapes inside the quotes."""
    _check_text(name, value)
    quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'Environment="{name}={quoted}"'


def env_file_line(name: str, value: str) -> str:
    """``NAME="value"`` for an ``EnvironmentFile``, whose double quotes take ``\\`` escapes
    of ``"``, ``\\``, `````` ` `````` and ``$`` (and no specifiers)."""
    _check_text(name, value)
    for char in '\\"`$':
        value = value.replace(char, "\\" + char)
    return f'{name}="{value}"'


# -- what the unit holds ----------------------------------------------------------------------


def setting_variables() -> list[tuple[str, bool]]:
    """Every ``OLLAMA_*``/``POLLAMA_*`` variable :class:`Settings` reads, and whether it is a
    secret (a field kept out of ``repr``, or a name such as ``*_API_KEY``)."""
    out: list[tuple[str, bool]] = []
    for field in Settings.model_fields.values():
        extra = field.json_schema_extra
        name = extra.get("env") if isinstance(extra, dict) else None
        if isinstance(name, str) and name.startswith(("OLLAMA_", "POLLAMA_")):
            out.append((name, field.repr is False or name.endswith(_SECRET_SUFFIXES)))
    return out


def service_environment(environ: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(plain, secret): the settings set (non-empty) in ``environ``, for the service."""
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    for name, is_secret in setting_variables():
        value = environ.get(name, "")
        if value.strip():
            (secret if is_secret else plain)[name] = value
    return plain, secret


def exec_start() -> str:
    """``pollama serve`` of this installation: its console script beside the running Python
    (a venv's, pipx's), else this Python with ``-m pollama``; ``-P`` keeps the service's
    working directory off ``sys.path``."""
    python = Path(os.path.abspath(sys.executable))
    script = python.parent / "pollama"
    if script.is_file() and os.access(script, os.X_OK):
        return f"{exec_word(str(script))} serve"
    return f"{exec_word(str(python))} -P -m pollama serve"


def service_user(run_as: str | None) -> str:
    """The account a system unit runs as: ``run_as``, else the invoking user (the one behind
    ``sudo``). Root only when asked for by name."""
    name = run_as or os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(
            f"there is no user {name!r}; create it first, e.g. 'useradd --system "
            f"--create-home --home-dir /var/lib/{name} --shell /usr/sbin/nologin {name}'"
        ) from None
    if name == "root" and run_as is None:
        raise ServiceError(
            "refusing to run the service as root; name its user with --run-as USER (a "
            "dedicated one: 'useradd --system --create-home --home-dir /var/lib/pollama "
            "--shell /usr/sbin/nologin pollama', then install pollama where it can read "
            "it), or pass --run-as root to mean it"
        )
    return name


def render_unit(scope: UnitScope, plain: dict[str, str], *, user: str | None,
                env_file: bool) -> str:
    """The unit's text (``user`` None for a user unit, which has no ``User=``)."""
    lines = [
        f"{MARK} (pollama {__version__}); 'pollama service uninstall' removes it.",
        "# Logs: journalctl " + ("--user " if scope.user else "") + "-u pollama (JSON lines)",
        "[Unit]",
        "Description=pollama, a local LLM server speaking Ollama's API",
    ]
    if not scope.user:  # the user manager has no network-online.target
        lines += ["After=network-online.target", "Wants=network-online.target"]
    lines += ["", "[Service]", "Type=exec", f"ExecStart={exec_start()}",
              # systemctl reload: SIGHUP reloads keys, limits and presets (server/reload.py)
              "ExecReload=/bin/kill -HUP $MAINPID"]  # fmt: skip
    if user is not None:
        lines.append(f"User={user}")
    lines += ["Restart=always", "RestartSec=3"]
    if os.environ.get("PATH"):
        lines.append(environment_line("PATH", os.environ["PATH"]))
    lines += [environment_line(name, value) for name, value in plain.items()]
    if env_file:  # one path, not split on spaces; specifiers expanded
        _check_text("the unit directory", str(scope.env_path))
        lines.append("EnvironmentFile=" + str(scope.env_path).replace("%", "%%"))
    lines.append("SyslogIdentifier=pollama")
    lines += list(_HARDENING[:1] if scope.user else _HARDENING)
    wanted_by = "default.target" if scope.user else "multi-user.target"
    lines += ["", "[Install]", f"WantedBy={wanted_by}", ""]
    return "\n".join(lines)


def render_env_file(secret: dict[str, str]) -> str:
    header = f"{MARK}: the service's secrets, readable by root (or its user) only.\n"
    return header + "".join(env_file_line(n, v) + "\n" for n, v in secret.items())


# -- files and systemctl ----------------------------------------------------------------------


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a file pollama wrote (its first line is :data:`MARK`)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(MARK)
    except FileNotFoundError:
        return False


def write_private(path: Path, text: str, mode: int) -> None:
    """Write ``path`` atomically with ``mode`` from the start (a secret is never readable by
    others, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _refuse_foreign(path: Path) -> None:
    if path.exists() and not is_ours(path):
        raise ServiceError(
            f"{path} exists and was not written by pollama; remove it yourself first"
        )


def _write(path: Path, text: str, mode: int) -> None:
    _refuse_foreign(path)
    try:
        write_private(path, text, mode)
    except PermissionError:
        raise ServiceError(
            f"cannot write {path}: a system unit needs root, e.g. "
            "'sudo -E \"$(command -v pollama)\" service install' (-E keeps your OLLAMA_* "
            "settings), or install a user unit with --user"
        ) from None


def _systemctl(scope: UnitScope, *args: str) -> None:
    command = [*scope.systemctl, *args]
    click.echo("$ " + " ".join(command), err=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise ServiceError(f"'{' '.join(command)}' failed")


def _need_systemctl() -> None:
    if shutil.which("systemctl") is None:
        raise ServiceError("--now needs systemctl, which is not on PATH")


# -- commands ---------------------------------------------------------------------------------

_USER_HELP = "A unit of your own user manager (~/.config/systemd/user), not the system's"
_DIR_HELP = "Write the unit here instead (tests, packaging)"


@click.group()
def service() -> None:
    """Run pollama serve as a systemd service."""


@service.command()
@click.option("--user", "user_mode", is_flag=True, help=_USER_HELP)
@click.option("--run-as", metavar="USER",
              help="The account a system unit runs as (default: you, or whoever ran sudo)")
@click.option("--dry-run", is_flag=True, help="Print the unit instead of writing it")
@click.option("--now", is_flag=True, help="Then enable and start it with systemctl")
@click.option("--unit-dir", type=click.Path(path_type=Path), hidden=True, help=_DIR_HELP)
@reports_errors
def install(user_mode: bool, run_as: str | None, dry_run: bool, now: bool,
            unit_dir: Path | None) -> None:
    """Write a systemd unit that runs pollama serve with the OLLAMA_* and POLLAMA_*
    settings of this environment."""
    if user_mode and run_as:
        raise click.UsageError("--run-as is for system units; a user unit runs as you")
    scope = _scope(user_mode, unit_dir)
    plain, secret = service_environment(dict(os.environ))
    user = None if user_mode else service_user(run_as)
    unit = render_unit(scope, plain, user=user, env_file=bool(secret))
    if dry_run:
        click.echo(unit, nl=False)
        if secret:
            click.echo(f"# and {scope.env_path} (mode 0600): {', '.join(secret)}", err=True)
        return
    if now:
        _need_systemctl()
    _refuse_foreign(scope.unit_path)  # before anything is written
    if secret:  # first, so that the unit never names a file that is not there
        _write(scope.env_path, render_env_file(secret), 0o600)
        click.echo(f"wrote {scope.env_path} (mode 0600: {', '.join(secret)})")
    _write(scope.unit_path, unit, 0o644)
    click.echo(f"wrote {scope.unit_path}")
    if not secret and is_ours(scope.env_path):
        scope.env_path.unlink()
    _after_install(scope, now)


def _after_install(scope: UnitScope, now: bool) -> None:
    systemctl = " ".join(scope.systemctl)
    if now:
        _systemctl(scope, "daemon-reload")
        _systemctl(scope, "enable", "--now", UNIT_NAME)
    else:
        click.echo("start it now and at every boot with:")
        click.echo(f"  {systemctl} daemon-reload && {systemctl} enable --now pollama")
    journal = "journalctl --user" if scope.user else "journalctl"
    click.echo(f"logs: {journal} -u pollama -f")
    if scope.user:
        click.echo("to keep it running while you are logged out: loginctl enable-linger")


@service.command()
@click.option("--user", "user_mode", is_flag=True, help=_USER_HELP)
@click.option("--now", is_flag=True, help="First stop and disable it with systemctl")
@click.option("--unit-dir", type=click.Path(path_type=Path), hidden=True, help=_DIR_HELP)
@reports_errors
def uninstall(user_mode: bool, now: bool, unit_dir: Path | None) -> None:
    """Remove the unit pollama service install wrote (never another file)."""
    scope = _scope(user_mode, unit_dir)
    path = scope.unit_path
    if not path.exists():
        click.echo(f"{path} is not there; nothing to remove")
        return
    if not is_ours(path):
        raise ServiceError(f"{path} was not written by pollama; refusing to remove it")
    systemctl = " ".join(scope.systemctl)
    enabled = sorted(scope.unit_dir.glob(f"*.wants/{UNIT_NAME}"))
    if now:
        _need_systemctl()
        _systemctl(scope, "disable", "--now", UNIT_NAME)
    elif enabled:
        raise ServiceError(
            f"pollama is enabled ({enabled[0]}): stop and disable it first with "
            f"'{systemctl} disable --now pollama', or pass --now"
        )
    try:
        path.unlink()
        if is_ours(scope.env_path):
            scope.env_path.unlink()
    except PermissionError:
        raise ServiceError(f"cannot remove {path}: run this as root") from None
    click.echo(f"removed {path}")
    if now:
        _systemctl(scope, "daemon-reload")
    else:
        click.echo(f"then run: {systemctl} daemon-reload")
