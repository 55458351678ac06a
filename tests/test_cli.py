"""CLI behaviour that needs no server."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from pollama.cli.main import cli
from pollama.config import SERVE_ENV_VARS


def test_serve_help_lists_every_setting() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    assert "Environment Variables:" in result.output
    for name in SERVE_ENV_VARS:
        assert f"      {name}" in result.output


def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "pollama", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for command in ("serve", "create", "show", "list", "ls", "cp", "rm", "purge"):
        assert command in result.stdout


def test_show_flags_are_exclusive() -> None:
    result = CliRunner().invoke(cli, ["show", "m", "--license", "--template"])
    assert result.exit_code != 0
    assert "only one of '--license', '--modelfile', '--parameters', '--system', or " \
        "'--template' can be specified" in result.output


def test_create_rejects_bad_name_before_contacting_server() -> None:
    result = CliRunner().invoke(cli, ["create", "no good"])
    assert result.exit_code == 1
    assert "invalid model name" in result.output
