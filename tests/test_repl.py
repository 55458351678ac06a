"""The REPL's commands and chat turns, line by line, against a scripted server.

Each test feeds typed lines to :class:`Repl` and compares what Ollama would print
(``cmd/interactive.go``), byte for byte where Ollama's text is fixed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pollama.cli.lineedit import EditRequested, Interrupted, OllamaHistory, ScriptedReader
from pollama.cli.repl import (
    USAGE,
    USAGE_PARAMETERS,
    USAGE_SET,
    USAGE_SHORTCUTS,
    USAGE_SHOW,
    Repl,
    Session,
    go_print_value,
)
from pollama.client import Client
from stub_ollama import StubServer

_clients: list[Client] = []


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    yield server
    while _clients:
        _clients.pop().close()
    server.close()


def make_repl(stub: StubServer, lines: list[Any], model: str = "smollm2:135m",
              api: Client | None = None, **kwargs: Any) -> Repl:
    api = api or Client(stub.url)
    _clients.append(api)
    session = Session(model=model, word_wrap=False)
    session.apply_show(api.show(model))
    return Repl(api, session, ScriptedReader(lines), **kwargs)


def run(stub: StubServer, capsys: pytest.CaptureFixture[str], lines: list[Any],
        **kwargs: Any) -> tuple[Repl, str, str]:
    repl = make_repl(stub, lines, **kwargs)
    repl.run()
    out, err = capsys.readouterr()
    return repl, out, err


def test_help_texts(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, err = run(stub, capsys, ["/?", "/help set", "/? show", "/? shortcuts", "/? nope"])
    assert out == "\n"  # the newline printed at EOF
    assert err == USAGE + "\n" + USAGE_SET + USAGE_SHOW + USAGE_SHORTCUTS
    assert USAGE.startswith("Available Commands:\n  /set            Set session variables\n")
    assert 'Use """ to begin a multi-line message.\n' in USAGE


def test_set_parameter(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    repl, out, err = run(stub, capsys, [
        "/set parameter temperature 0.7", "/set parameter stop <end> </s>",
        "/set parameter num_ctx abc", "/set parameter bogus 1", "/set parameter seed",
        "/set parameter seed 42",
    ])
    lines = out.splitlines()
    assert lines[0] == "Set parameter 'temperature' to '0.7'"
    assert lines[1] == "Set parameter 'stop' to '<end>, </s>'"
    assert lines[2] == "Couldn't set parameter: \"invalid int value [abc]\""
    assert lines[3].startswith("Couldn't set parameter: \"unknown parameter 'bogus'; valid "
                               "parameters are: num_ctx, ")
    assert "temperature" in lines[3]
    assert lines[4] == "Set parameter 'seed' to '42'"
    assert err == USAGE_PARAMETERS
    assert repl.session.options == {"temperature": 0.7, "stop": ["<end>", "</s>"], "seed": 42}


def test_set_modes(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    repl, out, err = run(stub, capsys, [
        "/set wordwrap", "/set nowordwrap", "/set verbose", "/set quiet", "/set format json",
        "/set format xml", "/set noformat", "/set think", "/set think high", "/set nothink",
        "/set nohistory", "/set", "/set bogus",
    ])
    assert out.splitlines() == [
        "Set 'wordwrap' mode.", "Set 'nowordwrap' mode.", "Set 'verbose' mode.",
        "Set 'quiet' mode.", "Set format to 'json' mode.",
        "Invalid or missing format. For 'json' mode use '/set format json'",
        "Disabled format.", "Set 'think' mode.", "Set 'think' mode to 'high'.",
        "Set 'nothink' mode.", "Unknown command '/set bogus'. Type /? for help", "",
    ]
    warning = 'warning: model "smollm2:135m" does not support thinking output\n'
    assert err == warning * 3 + USAGE_SET
    s = repl.session
    assert (s.word_wrap, s.verbose, s.format, s.think) == (False, False, "", False)
    assert repl.reader.history_enabled is False


def test_set_system_one_line_and_multi_line(
    stub: StubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    repl, out, _ = run(stub, capsys, [
        "/set system You are terse.", "/set system   Be   brief.",
        '/set system """You are', "a pirate.", 'Arr."""', '/set system """One line."""',
    ])
    assert out.count("Set system message.\n") == 4
    assert repl.reader.alt is False
    assert repl.session.system == "One line."
    # the multi-line form appends, the one-line forms replace a trailing system message
    assert [m["content"] for m in repl.session.messages] == ["Be brief.", "One line."]
    repl, _, _ = run(stub, capsys, ['/set system """You are', "a pirate.", 'Arr."""'])
    assert repl.session.system == "You are\na pirate.\nArr."


def test_show_commands(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, err = run(stub, capsys, [
        "/show license", "/show system", "/show template", "/show parameters", "/show bogus",
        "/set parameter temperature 0", "/set system Be kind.", "/show parameters",
        "/show system", "/show modelfile", "/show info", "/show",
    ])
    assert out == (
        "No license was specified for this model.\n"
        "No system message was specified for this model.\n"
        "{{ .Prompt }}\n"
        "Model defined parameters:\n"
        '  stop                           "<|im_end|>"\n'
        "\n"
        "Unknown command '/show bogus'. Type /? for help\n"
        "Set parameter 'temperature' to '0'\n"
        "Set system message.\n"
        "Model defined parameters:\n"
        '  stop                           "<|im_end|>"\n'
        "\n"
        "User defined parameters:\n"
        "  temperature                    0\n"
        "\n"
        "Be kind.\n\n"
        '# Modelfile generated by "ollama show"\nFROM smollm2:135m\nSYSTEM "Be kind."\n\n'
        "\n"
    )
    assert err.startswith("  Model\n    architecture      llama")
    assert err.endswith(USAGE_SHOW)
    show = stub.bodies("/api/show")[-2]
    assert show["system"] == "Be kind." and show["options"] == {"temperature": 0}


def test_go_print_value() -> None:
    assert [go_print_value(v) for v in (0.0, 0.7, 42, True, ["a", "b"], 1e-05)] == [
        "0", "0.7", "42", "true", "[a b]", "1e-05"]


def test_chat_turns_keep_the_history(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    repl, out, err = run(stub, capsys, [
        "hello", "   ", "/set parameter seed 1", "/set format json", "/set verbose", "again",
    ])
    assert out.startswith("You said: hello.\n\nSet parameter 'seed' to '1'\n")
    assert "You said: again.\n\n" in out
    assert err.startswith("total duration:       1.23456789s\n")
    assert [m["role"] for m in repl.session.messages] == ["user", "assistant"] * 2
    last = stub.bodies("/api/chat")[-1]
    assert last["options"] == {"seed": 1} and last["format"] == "json"
    assert last["messages"][1] == {"role": "assistant", "content": "You said: hello."}
    assert "think" not in last and "keep_alive" not in last


def test_multi_line_messages(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    repl, out, _ = run(stub, capsys, ['"""first line', "second line", 'end"""',
                                      '"""all in one"""', "pasted\nlines"])
    sent = [b["messages"][-1]["content"] for b in stub.bodies("/api/chat")]
    assert sent == ["first line\nsecond line\nend", "all in one", "pasted\nlines"]
    assert "You said: first line\nsecond line\nend." in out


def test_clear_keeps_the_system_message(
    stub: StubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    repl, out, _ = run(stub, capsys, ["/set system Be kind.", "hi", "/clear"])
    assert out.endswith("Cleared session context\n\n")
    assert repl.session.messages == [{"role": "system", "content": "Be kind."}]


def test_load(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    repl, out, _ = run(stub, capsys, ["hi", "/load", "/load missing", "/load thinker"])
    assert out.endswith(
        "Usage:\n  /load <modelname>\n"
        "Loading model 'missing'\nCouldn't find model 'missing'\n"
        "Loading model 'thinker'\n\n"
    )
    s = repl.session
    assert s.model == "thinker" and s.messages == [] and s.think is True
    load = stub.bodies("/api/generate")[-1]
    assert load == {"model": "thinker", "think": True, "stream": True}


def test_load_failure_keeps_the_session(
    stub: StubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    repl, _, _ = run(stub, capsys, ["hi", "/load missing"])
    assert repl.session.model == "smollm2:135m" and len(repl.session.messages) == 2


def test_save(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(stub, capsys, [
        "/save", "/save Bad!Name", "/set system Be kind.", "/set parameter temperature 0.5",
        "hi", "/save mine",
    ])
    assert out.startswith("Usage:\n  /save <modelname>\nerror: The model name 'Bad!Name' is "
                          "invalid\n")
    assert out.endswith("Created new model 'mine'\n\n")
    create = stub.bodies("/api/create")[-1]
    assert create["model"] == "mine" and create["from"] == "smollm2:135m"
    assert create["system"] == "Be kind." and create["parameters"] == {"temperature": 0.5}
    assert [m["role"] for m in create["messages"]] == ["system", "user", "assistant"]
    assert stub.find("mine") == "mine:latest"


def test_unknown_commands_and_exit(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(stub, capsys, ["/nope", "/bye", "never read"])
    assert out == "Unknown command '/nope'. Type /? for help\n"
    _, out, _ = run(stub, capsys, ["/exit", "never read"])
    assert out == ""
    assert stub.bodies("/api/chat") == []


def test_ctrl_c_at_the_prompt_clears_the_input(
    stub: StubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    repl, out, _ = run(stub, capsys, ['"""started', Interrupted(), "hi"])
    assert out.startswith("Use Ctrl + d or /bye to exit.\nYou said: hi.")
    assert repl.session.messages[0]["content"] == "hi"


def test_ctrl_g_fills_the_prompt_from_the_editor(
    stub: StubServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    repl = make_repl(stub, [EditRequested("draft")],
                     editor="""sh -c 'printf "%s edited\\n" "$(cat "$0")" > "$0"'""")
    repl.run()
    assert repl.reader.prefill == "draft edited"
    repl = make_repl(stub, [EditRequested("")], editor="no-such-editor-here")
    repl.run()
    assert 'editor "no-such-editor-here" not found' in capsys.readouterr().err


def test_thinking_model(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    repl, out, _ = run(stub, capsys, ["think"], model="thinker")
    assert "Thinking...\n" in out and "Let me think about it.\n" in out
    assert "...done thinking.\n\n\x1b[0mDone.\n\n" in out
    assert repl.session.messages[-1] == {"role": "assistant", "content": "Done.",
                                         "thinking": "Let me think about it.\n"}
    assert stub.bodies("/api/chat")[-1]["think"] is True


def test_hidden_thinking(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    repl = make_repl(stub, ["think"], model="thinker")
    repl.session.hide_thinking = True
    repl.run()
    assert capsys.readouterr().out == "Done.\n\n\n"


def test_server_errors_keep_the_session(
    stub: StubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    stub.reject_format = True
    repl, out, _ = run(stub, capsys, [
        "/set think", "hi", "/set nothink", "/set format json", "hi", "/set noformat",
        "error", "die", "hi",
    ])
    lines = out.splitlines()
    assert 'error: "smollm2:135m" does not support thinking' in lines
    assert "error: format is not supported yet" in lines
    assert "Oops" in lines and "error: boom" in lines
    assert ("error: the pollama server closed the connection before the answer was complete "
            "(RemoteProtocolError)") in lines
    assert out.endswith("You said: hi.\n\n\n")
    assert [m["content"] for m in repl.session.messages] == ["hi", "You said: hi."]


def test_server_gone(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[int] = []
    repl = make_repl(stub, ["hi"], restart_server=lambda: bool(calls.append(1)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repl.api = Client(f"http://127.0.0.1:{port}")  # nothing listens there any more
    _clients.append(repl.api)
    repl.run()
    out = capsys.readouterr().out
    assert out.startswith("error: could not connect to pollama server")
    assert calls == [1] and repl.session.messages == []


class InterruptingClient(Client):
    """Ctrl+C after ``after`` chunks of every chat answer."""

    after = 3

    def chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        inner = super().chat(body)
        try:
            for i, item in enumerate(inner):
                if i == self.after:
                    raise KeyboardInterrupt
                yield item
        finally:
            inner.close()


def test_ctrl_c_during_an_answer_keeps_what_was_shown(
    stub: StubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    repl = make_repl(stub, ["slow", "next"], api=InterruptingClient(stub.url))
    repl.run()
    out = capsys.readouterr().out
    assert out.startswith("w0 w1 w2 \n\n")
    assert repl.session.messages[:2] == [{"role": "user", "content": "slow"},
                                         {"role": "assistant", "content": "w0 w1 w2 "}]
    InterruptingClient.after = 0
    repl = make_repl(stub, ["slow"], api=InterruptingClient(stub.url))
    repl.run()
    assert repl.session.messages == []


def test_history_file_format(tmp_path: Path) -> None:
    path = tmp_path / ".ollama" / "history"
    history = OllamaHistory(path)
    for i in range(105):
        history.store_string(f"line {i}")
    history.store_string("two\nlines")
    text = path.read_text()
    assert text.startswith("line 6\n") and text.endswith("line 104\ntwo\nlines\n")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = OllamaHistory(path)
    assert list(again.load_history_strings())[:2] == ["lines", "two"]
    again.enabled = False
    again.store_string("secret")
    assert "secret" not in path.read_text()
    assert list(again.load_history_strings())[0] == "secret"  # still recalled in the session
