"""``pollama run`` off a terminal (one-shot and piped), its flags, and server auto-start.

Most cases run the command in-process (click's runner: stdin and stdout are not terminals)
against the scripted server; two run it as a real subprocess, as a shell pipeline would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pollama.cli.autostart import ServerNotStarted, ensure_server
from pollama.cli.main import cli
from pollama.config import load_settings
from stub_ollama import StubServer

THINKING = "Thinking...\nLet me think about it.\n...done thinking.\n\nDone.\n\n"


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["run", *args], input=input)


def last(stub: StubServer, path: str = "/api/generate") -> dict[str, object]:
    return stub.bodies(path)[-1]


def test_one_shot(stub: StubServer) -> None:
    result = run("smollm2:135m", "Say", "hello")
    assert result.exit_code == 0, result.output
    assert result.stdout == "You said: Say hello.\n\n"
    assert result.stderr == ""
    assert last(stub) == {"model": "smollm2:135m", "prompt": "Say hello", "stream": True}


def test_piped_stdin_comes_before_the_arguments(stub: StubServer) -> None:
    assert run("smollm2:135m", input="What is 2+2?\n").stdout == "You said: What is 2+2?\n.\n\n"
    assert last(stub)["prompt"] == "What is 2+2?\n"
    run("smollm2:135m", "summarize", "this", input="file text\n")
    assert last(stub)["prompt"] == "file text\n summarize this"


def test_verbose_prints_the_statistics_on_stderr(stub: StubServer) -> None:
    result = run("smollm2:135m", "hi", "--verbose")
    assert result.stdout == "You said: hi.\n\n"
    assert result.stderr == (
        "total duration:       1.23456789s\nload duration:        12.345678ms\n"
        "prompt eval count:    12 token(s)\nprompt eval duration: 60ms\n"
        "prompt eval rate:     200.00 tokens/s\neval count:           30 token(s)\n"
        "eval duration:        500ms\neval rate:            60.00 tokens/s\n"
    )


def test_request_flags(stub: StubServer) -> None:
    assert run("smollm2:135m", "hi", "--format", "json", "--keepalive", "5m",
               "--insecure", "--nowordwrap").exit_code == 0
    body = last(stub)
    assert body["format"] == "json" and body["keep_alive"] == "5m"
    run("smollm2:135m", "hi", "--format", '{"type": "object"}')
    assert last(stub)["format"] == {"type": "object"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "{nope"], "invalid format: '{nope'; expected \"json\" or a JSON schema "
                                "object"),
        (["--keepalive", "3600"], 'time: missing unit in duration "3600"'),
        (["--think=maybe"], 'invalid value for --think: "maybe" (must be true, false, high, '
                            "medium, low, or max)"),
    ],
)
def test_bad_flags(stub: StubServer, args: list[str], message: str) -> None:
    result = run("smollm2:135m", "hi", *args)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {message}\n"
    assert stub.bodies("/api/generate") == []


def test_thinking_models_think_by_default(stub: StubServer) -> None:
    result = run("thinker", "think")
    assert result.stdout == THINKING
    assert "\x1b" not in result.stdout
    assert last(stub)["think"] is True
    assert run("thinker", "think", "--hidethinking").stdout == "Done.\n\n"
    run("thinker", "think", "--think=false")
    assert last(stub)["think"] is False
    run("thinker", "--think=low", "think")
    assert last(stub)["think"] == "low"


def test_bare_think_flag_keeps_the_prompt(stub: StubServer) -> None:
    result = run("thinker", "--think", "why", "not")
    assert result.exit_code == 0, result.output
    assert last(stub)["prompt"] == "why not" and last(stub)["think"] is True


def test_think_on_a_model_that_cannot(stub: StubServer) -> None:
    run("smollm2:135m", "hi")
    assert "think" not in last(stub)
    result = run("smollm2:135m", "--think", "hi")
    assert result.exit_code == 1
    assert result.stderr == 'Error: "smollm2:135m" does not support thinking\n'


def test_missing_model_is_pulled(stub: StubServer) -> None:
    result = run("pullme", "hi")
    assert result.exit_code == 0, result.output
    assert result.stdout == "You said: hi.\n\n"
    assert result.stderr.splitlines() == [
        "pulling manifest", "pulling cccccccccccc: 100% 2 KB", "verifying sha256 digest",
        "writing manifest", "success",
    ]
    assert stub.bodies("/api/pull") == [{"model": "pullme", "insecure": False}]


def test_model_not_found_says_how_to_get_it(stub: StubServer) -> None:
    result = run("nope-model", "hi", "--insecure")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "Error: model 'nope-model' not found (pull: pull model manifest: file does not exist); "
        "create it with 'pollama create nope-model -f Modelfile' or pull it from a registry "
        "with 'pollama pull nope-model'"
    )
    assert stub.bodies("/api/pull") == [{"model": "nope-model", "insecure": True}]


def test_embedding_models_print_the_vector(stub: StubServer) -> None:
    result = run("embedder", "some", "text", "--dimensions", "3", "--truncate=false")
    assert result.stdout == "[0.1,-0.25,3e-07]\n"
    assert last(stub, "/api/embed") == {"model": "embedder", "input": "some text",
                                        "truncate": False, "dimensions": 3}
    missing = run("embedder")
    assert missing.exit_code == 1
    assert missing.stderr == ('Error: embedding models require input text. Usage: pollama run '
                              'embedder "your text here"\n')


def test_server_errors_and_lost_connections(stub: StubServer) -> None:
    result = run("smollm2:135m", "error")
    assert result.exit_code == 1 and result.stdout == "Oops\n"
    assert result.stderr.endswith("Error: boom\n")
    result = run("smollm2:135m", "die")
    assert result.exit_code == 1 and result.stdout == "Half an \n"
    assert result.stderr == ("Error: the pollama server closed the connection before the "
                             "answer was complete (RemoteProtocolError)\n")


def test_run_help_lists_its_environment() -> None:
    result = CliRunner().invoke(cli, ["run", "--help"])
    for name in ("OLLAMA_EDITOR", "OLLAMA_HOST", "OLLAMA_NOHISTORY", "--hidethinking",
                 "--think", "--keepalive", "--format", "--nowordwrap", "--verbose"):
        assert name in result.output


def _subprocess(stub: StubServer, home: Path, *args: str, stdin: object = None,
                ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "OLLAMA_HOST": stub.host}
    return subprocess.run([sys.executable, "-m", "pollama", "run", *args], env=env,
                          stdin=stdin, capture_output=True, text=True, timeout=60)


def test_a_real_pipeline(stub: StubServer, isolated_env: Path, tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("Line one.\nLine two.\n")
    with open(text_file) as f:
        result = _subprocess(stub, isolated_env, "smollm2:135m", "summarize this", stdin=f)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "You said: Line one.\nLine two.\n summarize this.\n\n"
    assert result.stderr == "" and "\x1b" not in result.stdout
    result = _subprocess(stub, isolated_env, "thinker", "think", stdin=subprocess.DEVNULL)
    assert result.stdout == THINKING


def test_no_server_on_another_machine_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "http://pollama-nowhere.invalid:9")
    with pytest.raises(ServerNotStarted, match="it is not on this machine"):
        ensure_server(load_settings())
    result = run("smollm2:135m", "hi")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: could not connect to pollama server at http://pollama-nowhere.invalid:9; "
    )


def test_a_running_server_is_used_as_is(stub: StubServer) -> None:
    assert ensure_server(load_settings()) is False
    assert run("smollm2:135m", "hi").stderr == ""
