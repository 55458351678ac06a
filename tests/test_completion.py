"""``pollama completion bash|zsh|fish`` and model-name completion.

The scripts are click's (bash's passes the line too, since bash splits model names at
``:``); the answers are driven through click's completion protocol (``_POLLAMA_COMPLETE``)
as a real shell calls it, in a subprocess, and through a real bash sourcing the script.
Names come from the server when one answers (the scripted one of ``stub_ollama``), else
from the local store (written here through the store's API).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import free_port
from pollama.cli.completion import MODEL_ARGUMENTS, ModelNameType
from pollama.cli.main import cli
from pollama.names import ModelName
from pollama.store.manifests import CONFIG_MEDIA_TYPE, Layer, Manifest, ManifestStore
from stub_ollama import StubServer

SCRIPT = Path(sys.executable).parent / "pollama"


@pytest.fixture
def stored(models_dir: Path) -> list[str]:
    """Three models in the local store; no server runs."""
    store = ManifestStore(models_dir)
    manifest = Manifest(Layer(CONFIG_MEDIA_TYPE, "sha256:" + "0" * 64, 2), ())
    names = ["smollm2:135m", "smollm2:360m", "qwen/coder:0.5b"]
    for name in names:
        store.write(ModelName.parse(name), manifest)
    return names


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")


def complete(shell: str, **env: str) -> list[str]:
    """What ``pollama`` answers a shell's completion call (``_POLLAMA_COMPLETE``)."""
    result = subprocess.run(
        [sys.executable, "-m", "pollama"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "_POLLAMA_COMPLETE": f"{shell}_complete", **env},
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def bash(words: str, cword: int) -> list[str]:
    return complete("bash", COMP_WORDS=words, COMP_CWORD=str(cword))


def test_model_arguments_complete_names_from_the_local_store(
        stored: list[str], no_server: None) -> None:
    assert bash("pollama run sm", 2) == ["plain,smollm2:135m", "plain,smollm2:360m"]
    assert bash("pollama show q", 2) == ["plain,qwen/coder:0.5b"]
    assert bash("pollama rm smollm2:135m smollm2:3", 3) == ["plain,smollm2:360m"]
    assert bash("pollama cp smollm2:135m ", 3) == []  # the new name is the user's
    assert bash("pollama stop sm", 2) == []  # nothing runs without a server
    assert complete("zsh", COMP_WORDS="pollama push qwen", COMP_CWORD="2") == \
        ["plain", "qwen/coder:0.5b", "_"]
    assert complete("fish", COMP_WORDS="pollama run smollm2:1", COMP_CWORD="smollm2:1") == \
        ["plain,smollm2:135m"]


def test_names_come_from_the_server_that_answers(stored: list[str], stub: StubServer) -> None:
    """A running server's models win over the local folder: it is where ``run`` looks."""
    result = CliRunner().invoke(cli, ["run", "th"], prog_name="pollama",
                                env={"_POLLAMA_COMPLETE": "bash_complete",
                                     "COMP_WORDS": "pollama run th", "COMP_CWORD": "2"})
    assert result.output == "plain,thinker:latest\n"
    assert bash("pollama run sm", 2) == ["plain,smollm2:135m"]


def test_no_local_names_for_a_server_on_another_machine(
        stored: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "192.0.2.1:11434")  # TEST-NET-1: nothing answers
    assert bash("pollama run sm", 2) == []


def test_bash_keeps_the_colon_of_a_model_name(stored: list[str], no_server: None) -> None:
    """Bash has split ``smollm2:3`` into ``smollm2``, ``:``, ``3``: the words come from the
    line, and the answer is what follows the colon, which is all bash replaces."""
    line = "pollama run smollm2:3"
    answer = complete("bash", COMP_WORDS="pollama\nrun\nsmollm2\n:\n3", COMP_CWORD="4",
                      COMP_LINE=line, COMP_POINT=str(len(line)), COMP_WORDBREAKS="\"'><=;|&(:")
    assert answer == ["plain,360m"]


@pytest.mark.skipif(shutil.which("bash") is None or not SCRIPT.is_file(),
                    reason="needs bash and the pollama script")
def test_the_bash_script_in_a_real_bash(stored: list[str], no_server: None,
                                        tmp_path: Path) -> None:
    script = tmp_path / "pollama.bash"
    script.write_text(CliRunner().invoke(cli, ["completion", "bash"]).output)
    program = (
        f"source {script}\n"
        "complete -p pollama\n"
        "COMP_WORDS=(pollama run smollm2 : 1); COMP_CWORD=4\n"
        'COMP_LINE="pollama run smollm2:1"; COMP_POINT=${#COMP_LINE}\n'
        "_pollama_completion pollama\n"
        'printf "reply:%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{SCRIPT.parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "complete -o nosort -F _pollama_completion pollama", "reply:135m"]


def test_zsh_and_fish_scripts() -> None:
    zsh = CliRunner().invoke(cli, ["completion", "zsh"])
    assert zsh.exit_code == 0
    assert zsh.output.startswith("#compdef pollama\n")
    assert "compdef _pollama_completion pollama" in zsh.output
    assert "_POLLAMA_COMPLETE=zsh_complete" in zsh.output
    fish = CliRunner().invoke(cli, ["completion", "fish"])
    assert fish.exit_code == 0
    assert "complete --no-files --command pollama" in fish.output
    assert "_POLLAMA_COMPLETE=fish_complete" in fish.output


def test_an_unknown_shell_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["completion", "tcsh"])
    assert result.exit_code == 2
    assert "'tcsh' is not one of 'bash', 'zsh', 'fish'" in result.output


def test_every_model_argument_completes() -> None:
    ctx = click.Context(cli)
    for name, (argument, source) in MODEL_ARGUMENTS.items():
        command = cli.get_command(ctx, name)
        assert command is not None
        types = {p.name: p.type for p in command.params}
        assert isinstance(types[argument], ModelNameType), name
        assert types[argument].source == source
