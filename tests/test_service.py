"""``pollama service install|uninstall``: the unit's text, ``systemd-analyze verify`` on it
(system and user units), secrets kept out of it, and the files it refuses to touch.

No test needs a running systemd: units go to a temp folder (the hidden ``--unit-dir``), and
``--now`` runs a stand-in ``systemctl`` that records its arguments.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pollama.cli.main import cli
from pollama.cli.service import (
    MARK,
    env_file_line,
    environment_line,
    exec_word,
    service_environment,
)

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def service(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["service", *args], env=env)


def other_user() -> str:
    """An account that exists and is neither root nor ``nobody`` (systemd warns about both):
    the one running the tests, or the first system account."""
    me = pwd.getpwuid(os.getuid()).pw_name
    if me != "root":
        return me
    return next(u.pw_name for u in pwd.getpwall() if 0 < u.pw_uid < 65534)


def verify(unit: Path, tmp_path: Path, *, user: bool = False) -> None:
    """``systemd-analyze [--user] verify``: exit 0 and not a word about our unit. A user
    manager needs a runtime directory, which a test has none of; an empty one will do."""
    assert SYSTEMD_ANALYZE is not None
    env = dict(os.environ)
    command = [SYSTEMD_ANALYZE, "verify", str(unit)]
    if user:
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        command.insert(1, "--user")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "pollama" in line] == []


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@needs_systemd_analyze
def test_a_system_unit_runs_this_pollama_with_the_settings(tmp_path: Path) -> None:
    user = other_user()
    env = {"OLLAMA_HOST": "0.0.0.0:11500", "OLLAMA_KEEP_ALIVE": "10m",
           "OLLAMA_ORIGINS": 'http://a b,"q"%h$HOME\\x', "POLLAMA_MAX_UPLOADS": "7",
           "OLLAMA_NUM_PARALLEL": ""}  # empty means unset, as for the server
    result = service("install", "--run-as", user, "--unit-dir", str(tmp_path), env=env)
    assert result.exit_code == 0, result.output
    unit = tmp_path / "pollama.service"
    assert f"wrote {unit}" in result.output
    assert "systemctl daemon-reload && systemctl enable --now pollama" in result.output
    text = lines(unit)
    assert text[0].startswith(MARK)
    script = Path(sys.executable).parent / "pollama"
    assert f"ExecStart={script} serve" in text or \
        f"ExecStart={sys.executable} -P -m pollama serve" in text
    for line in (f"User={user}", "Restart=always", "RestartSec=3", "Type=exec",
                 "ExecReload=/bin/kill -HUP $MAINPID",
                 "After=network-online.target", "WantedBy=multi-user.target",
                 'Environment="OLLAMA_HOST=0.0.0.0:11500"',
                 'Environment="OLLAMA_KEEP_ALIVE=10m"',
                 'Environment="OLLAMA_ORIGINS=http://a b,\\"q\\"%%h$HOME\\\\x"',
                 'Environment="POLLAMA_MAX_UPLOADS=7"',
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectSystem=full"):
        assert line in text
    assert not any("OLLAMA_NUM_PARALLEL" in line or "EnvironmentFile" in line for line in text)
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    verify(unit, tmp_path)


@needs_systemd_analyze
def test_a_user_unit_goes_to_the_users_config(tmp_path: Path) -> None:
    config = tmp_path / "config"
    result = service("install", "--user", env={"XDG_CONFIG_HOME": str(config),
                                                "OLLAMA_HOST": "127.0.0.1:11501"})
    assert result.exit_code == 0, result.output
    unit = config / "systemd" / "user" / "pollama.service"
    text = lines(unit)
    assert not any(line.startswith(("User=", "After=", "Wants=")) for line in text)
    assert "WantedBy=default.target" in text and "NoNewPrivileges=yes" in text
    assert "PrivateTmp=yes" not in text  # needs namespaces a user manager may not have
    assert 'Environment="OLLAMA_HOST=127.0.0.1:11501"' in text
    assert "systemctl --user daemon-reload && systemctl --user enable --now pollama" \
        in result.output
    assert "journalctl --user -u pollama -f" in result.output
    verify(unit, tmp_path, user=True)


@needs_systemd_analyze
def test_secrets_go_to_a_private_environment_file(tmp_path: Path) -> None:
    units = tmp_path / "units"
    env = {"POLLAMA_API_KEY": 'server-$eKrEt"`\\', "OLLAMA_API_KEY": "client-SeKrEt",
           "OLLAMA_HOST": "0.0.0.0"}
    dry = service("install", "--dry-run", "--run-as", other_user(), "--unit-dir",
                  str(units), env=env)
    assert dry.exit_code == 0, dry.output
    assert "KrEt" not in dry.stdout
    assert "POLLAMA_API_KEY" in dry.stderr and "KrEt" not in dry.stderr
    assert not units.exists()  # a dry run writes nothing

    result = service("install", "--run-as", other_user(), "--unit-dir", str(units), env=env)
    assert result.exit_code == 0, result.output
    unit, env_file = units / "pollama.service", units / "pollama.env"
    assert "KrEt" not in unit.read_text() and "KrEt" not in result.output
    assert f"EnvironmentFile={env_file}" in lines(unit)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert lines(env_file)[1:] == ['OLLAMA_API_KEY="client-SeKrEt"',
                                   'POLLAMA_API_KEY="server-\\$eKrEt\\"\\`\\\\"']
    verify(unit, tmp_path)

    # installed again without them, the old file of secrets goes
    assert service("install", "--run-as", other_user(), "--unit-dir", str(units)
                   ).exit_code == 0
    assert not env_file.exists()
    assert not any("EnvironmentFile" in line for line in lines(unit))


def test_quoting_for_systemd() -> None:
    assert exec_word("/opt/pollama/bin/pollama") == "/opt/pollama/bin/pollama"
    assert exec_word("/My Apps/50%/$x/py") == '"/My Apps/50%%/$$x/py"'
    assert exec_word('/a"b\\c') == '"/a\\"b\\\\c"'
    assert environment_line("OLLAMA_ORIGINS", 'a "b" %i $X \\') == \
        'Environment="OLLAMA_ORIGINS=a \\"b\\" %%i $X \\\\"'
    assert env_file_line("K", 'a"$`\\%') == 'K="a\\"\\$\\`\\\\%"'
    result = service("install", "--dry-run", "--run-as", other_user(),
                     env={"OLLAMA_ORIGINS": "a\nb"})
    assert result.exit_code == 1
    assert "control character" in result.output


def test_only_settings_pollama_knows_are_carried() -> None:
    plain, secret = service_environment({
        "OLLAMA_HOST": "0.0.0.0", "OLLAMA_NOT_A_SETTING": "1", "POLLAMA_KEYS_FILE": "/k.json",
        "HOME": "/root", "POLLAMA_API_KEY": "k", "OLLAMA_DEBUG": "  ",
    })
    assert plain == {"OLLAMA_HOST": "0.0.0.0", "POLLAMA_KEYS_FILE": "/k.json"}
    assert secret == {"POLLAMA_API_KEY": "k"}


def test_the_service_user(tmp_path: Path) -> None:
    root = service("install", "--dry-run", "--unit-dir", str(tmp_path),
                   env={"SUDO_USER": "root"})
    assert root.exit_code == 1
    assert "refusing to run the service as root" in root.output and "--run-as" in root.output
    sudo = service("install", "--dry-run", env={"SUDO_USER": other_user()})
    assert sudo.exit_code == 0 and f"User={other_user()}\n" in sudo.output
    missing = service("install", "--dry-run", "--run-as", "no-such-user-here")
    assert missing.exit_code == 1 and "useradd" in missing.output
    both = service("install", "--user", "--run-as", other_user())
    assert both.exit_code == 2 and "--run-as is for system units" in both.output


def test_uninstall_removes_only_what_install_wrote(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    args = ("--unit-dir", str(units))
    unit, env_file = units / "pollama.service", units / "pollama.env"
    foreign = "[Service]\nExecStart=/usr/bin/ollama serve\n"
    unit.write_text(foreign)
    refused = service("install", "--run-as", other_user(), *args)
    assert refused.exit_code == 1 and "not written by pollama" in refused.output
    refused = service("uninstall", *args)
    assert refused.exit_code == 1 and "refusing to remove it" in refused.output
    assert unit.read_text() == foreign
    unit.unlink()

    installed = service("install", "--run-as", other_user(), *args,
                        env={"POLLAMA_API_KEY": "k"})
    assert installed.exit_code == 0 and env_file.exists()
    wants = units / "multi-user.target.wants"
    wants.mkdir()
    (wants / "pollama.service").symlink_to(unit)
    enabled = service("uninstall", *args)
    assert enabled.exit_code == 1 and "systemctl disable --now pollama" in enabled.output
    (wants / "pollama.service").unlink()

    removed = service("uninstall", *args)
    assert removed.exit_code == 0, removed.output
    assert f"removed {unit}" in removed.output and "systemctl daemon-reload" in removed.output
    assert sorted(p.name for p in units.iterdir()) == ["multi-user.target.wants"]
    again = service("uninstall", *args)
    assert again.exit_code == 0 and "nothing to remove" in again.output


def test_now_runs_systemctl(tmp_path: Path) -> None:
    bin_dir, log = tmp_path / "bin", tmp_path / "systemctl.log"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    units = tmp_path / "units"
    assert service("install", "--user", "--now", "--unit-dir", str(units), env=env
                   ).exit_code == 0
    assert service("uninstall", "--user", "--now", "--unit-dir", str(units), env=env
                   ).exit_code == 0
    assert log.read_text().splitlines() == [
        "--user daemon-reload", "--user enable --now pollama.service",
        "--user disable --now pollama.service", "--user daemon-reload",
    ]
    assert not (units / "pollama.service").exists()
