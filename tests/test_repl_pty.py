"""``pollama run`` driven like a person at a terminal: a real pseudo-terminal, keys typed.

The first tests talk to the scripted server (fast, every path); the last one talks to a
real ``pollama serve`` with the real SmolLM2 model. The child gets the pty as its
controlling terminal, so Ctrl+C typed during an answer is a real SIGINT.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import start_server, stop_server
from pollama.default_model import default_modelfile
from stub_ollama import LONG, StubServer
from test_repl_render import screen

pytestmark = pytest.mark.slow

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[=>78]")


class Terminal:
    """A command in a pseudo-terminal: ``expect`` what it shows, ``type`` keys into it."""

    def __init__(self, args: list[str], env: dict[str, str], cols: int = 80) -> None:
        self.master, slave = pty.openpty()
        self.resize(cols)

        def controlling_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     preexec_fn=controlling_terminal, close_fds=True)
        os.close(slave)
        self._raw = bytearray()
        self._lock = threading.Lock()
        self.mark = 0
        threading.Thread(target=self._pump, daemon=True).start()

    def resize(self, cols: int, rows: int = 24) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self._raw += data

    @property
    def raw(self) -> str:
        with self._lock:
            return self._raw.decode("utf-8", "replace")

    @property
    def text(self) -> str:
        """The output without escape sequences (prompt redraws show up repeated)."""
        return _ANSI.sub("", self.raw).replace("\r", "")

    def expect(self, needle: str, timeout: float = 15.0) -> str:
        """Wait for ``needle`` after the previous match; return what came in between."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text
            at = text.find(needle, self.mark)
            if at >= 0:
                seen, self.mark = text[self.mark:at], at + len(needle)
                return seen
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not shown; since the last match:\n"
                             f"{self.text[self.mark:]!r}")

    def type(self, keys: str) -> None:
        """Type at the prompt. Wait for the prompt first: keys typed between prompts meet
        the terminal's cooked mode (echoed, Enter turned into Ctrl+J)."""
        os.write(self.master, keys.encode())

    def ask(self, line: str, timeout: float = 15.0) -> str:
        """Type a line, return everything shown until the next prompt.

        The prompt redraws the line at every key; only the accepted line ends with a
        newline, and only a new prompt starts a line with ``>>> ``."""
        self.type(line + "\r")
        self.expect(line + "\n")
        return self.expect("\n>>> ", timeout)

    def answer_screen(self, start: int) -> list[str]:
        """The lines an answer occupied: what was drawn between the prompt giving the
        terminal back (bracketed paste off) and the next prompt (bracketed paste on)."""
        raw = self.raw[start:]
        for drawn in re.findall(r"\x1b\[\?2004l(.*?)\x1b\[\?2004h", raw, re.S):
            lines = [line for line in screen(drawn.replace("\r", "")) if line.strip()]
            if lines:  # a resize redraws the prompt with an empty pair first
                return lines
        return []

    def close(self) -> int:
        """Wait for the command to exit by itself."""
        try:
            return self.proc.wait(timeout=15)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


def terminal_env(home: Path, host: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update(HOME=str(home), OLLAMA_HOST=host, TERM="xterm-256color",
               PROMPT_TOOLKIT_NO_CPR="1", **extra)
    return env


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    yield server
    server.close()


def pollama_run(env: dict[str, str], *args: str, cols: int = 80) -> Terminal:
    return Terminal([sys.executable, "-m", "pollama", "run", *args], env, cols)


def test_a_chat_session(stub: StubServer, isolated_env: Path) -> None:
    env = terminal_env(isolated_env, stub.host)
    term = pollama_run(env, "smollm2:135m")
    try:
        term.expect("Send a message (/? for help)")
        assert "You said: hello there." in term.ask("hello there")
        assert "Set parameter 'temperature' to '0'" in term.ask("/set parameter temperature 0")
        shown = term.ask("/show parameters")
        assert "User defined parameters:\n  temperature                    0\n" in shown
        assert "Set system message." in term.ask("/set system You are terse.")
        term.type('"""first line\r')
        term.expect("\n... ")
        term.expect("Press Enter to send")
        term.type('second line"""\r')
        term.expect("You said: first line\nsecond line.\n\n>>> ")
        # Ctrl+C during an answer stops it and gives the prompt back
        term.type("slow\r")
        term.expect("w3 ")
        stopped = time.monotonic()
        term.type("\x03")
        term.expect("\n>>> ", timeout=5)
        assert time.monotonic() - stopped < 3
        assert "w399" not in term.text
        term.type("\x03")
        term.expect("Use Ctrl + d or /bye to exit.\n>>> ")
        assert "You said: after." in term.ask("after")
        term.type("/bye\r")
        assert term.close() == 0
    finally:
        term.kill()
    chat = stub.bodies("/api/chat")[-1]
    assert chat["options"] == {"temperature": 0}
    roles = [m["role"] for m in chat["messages"]]
    assert roles == ["user", "assistant", "system", "user", "assistant", "user", "assistant",
                     "user"]
    assert chat["messages"][-3]["content"] == "slow"  # the interrupted answer is kept
    assert chat["messages"][-2]["content"].startswith("w0 w1 w2 w3 ")
    assert stub.cancelled == 1
    history = (isolated_env / ".ollama" / "history").read_text()
    assert history.startswith("hello there\n/set parameter temperature 0\n")
    assert history.endswith("after\n/bye\n")
    # the next session recalls the history with the up arrow
    term = pollama_run(env, "smollm2:135m")
    try:
        term.expect("Send a message")
        term.type("\x1b[A")
        term.expect("/bye")
        term.type("\r")
        assert term.close() == 0
    finally:
        term.kill()


def test_thinking_wrap_and_resize(stub: StubServer, isolated_env: Path) -> None:
    term = pollama_run(terminal_env(isolated_env, stub.host), "thinker", cols=40)
    try:
        term.expect("Send a message")
        shown = term.ask("think")
        assert "Thinking...\nLet me think about it.\n...done thinking.\n\nDone." in shown
        assert "\x1b[38;5;245m\x1b[1mThinking...\r\n" in term.raw  # grey and bold
        start = len(term.raw)
        term.ask("long")
        narrow = term.answer_screen(start)
        assert all(len(line.rstrip()) <= 35 for line in narrow)
        assert " ".join(line.strip() for line in narrow) == LONG
        term.resize(70)
        start = len(term.raw)
        term.ask("long")
        wide = term.answer_screen(start)
        assert all(len(line.rstrip()) <= 65 for line in wide)
        assert max(len(line) for line in wide) > 40 and len(wide) < len(narrow)
        assert " ".join(line.strip() for line in wide) == LONG
        term.type("\x04")  # Ctrl+D on an empty line
        assert term.close() == 0
    finally:
        term.kill()


def test_model_messages_and_a_server_that_dies_mid_answer(
    stub: StubServer, isolated_env: Path
) -> None:
    env = terminal_env(isolated_env, stub.host, OLLAMA_NOHISTORY="1")
    term = pollama_run(env, "greeter", "--nowordwrap")
    try:
        # a model's MESSAGE history is shown first, as if it had just been typed
        assert ">>> Who are you?\nA greeter.\n\n>>> " in term.expect("Send a message")
        shown = term.ask("die")
        assert [line.rstrip() for line in shown.strip().splitlines()] == [
            "Half an",
            "error: the pollama server closed the connection before the answer was complete "
            "(RemoteProtocolError)",
        ]
        assert "You said: still here." in term.ask("still here")
        assert "Couldn't find model 'missing'" in term.ask("/load missing")
        assert "You said: same model." in term.ask("same model")
        term.type("/bye\r")
        assert term.close() == 0
    finally:
        term.kill()
    assert not (isolated_env / ".ollama" / "history").exists()
    chat = stub.bodies("/api/chat")[-1]
    assert chat["model"] == "greeter" and chat["messages"][0]["content"] == "still here"


MODEL = "smollm2:135m"


def test_the_real_model(isolated_env: Path) -> None:
    server = start_server(isolated_env)
    term: Terminal | None = None
    try:
        modelfile = isolated_env / "Modelfile"
        modelfile.write_text(default_modelfile())
        server.cli("create", MODEL, "-f", str(modelfile), check=True)
        term = pollama_run(terminal_env(isolated_env, server.host), MODEL, "--verbose")
        term.expect("Send a message (/? for help)", timeout=60)
        assert "Set parameter 'temperature' to '0'" in term.ask("/set parameter temperature 0")
        assert "Set parameter 'num_predict' to '24'" in term.ask("/set parameter num_predict 24")
        answer = term.ask("What is the capital of France?", timeout=60)
        assert len(answer.strip()) > 5 and "eval rate:" in answer
        shown = term.ask("/show parameters")
        assert "temperature                    0" in shown and "num_predict" in shown
        assert "Set system message." in term.ask("/set system You answer in one word.")
        term.type('"""Name a colour.\r')
        term.expect("\n... ")
        term.type('Just one."""\r')
        term.expect("eval rate:", timeout=60)
        term.expect("\n>>> ")
        assert "Set parameter 'num_predict' to '2000'" in term.ask(
            "/set parameter num_predict 2000")
        term.type("Write a very long story about a dragon and a knight.\r")
        term.expect("dragon")
        before = len(term.text)
        deadline = time.monotonic() + 30
        while len(term.text) - before < 60 and time.monotonic() < deadline:
            time.sleep(0.05)  # let it stream a while
        term.type("\x03")
        stopped = time.monotonic()
        term.expect("\n>>> ", timeout=10)
        assert time.monotonic() - stopped < 5
        assert "Set 'quiet' mode." in term.ask("/set quiet")
        term.type("/bye\r")
        assert term.close() == 0
        history = (isolated_env / ".ollama" / "history").read_text().splitlines()
        assert history[0] == "/set parameter temperature 0" and history[-1] == "/bye"
    finally:
        if term is not None:
            term.kill()
        stop_server(server)
