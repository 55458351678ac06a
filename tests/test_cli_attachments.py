"""Files named in a ``pollama run`` prompt (``cli.attachments``, Ollama's ``extractFileData``).

First the pieces: the path regex (Ollama's own test inputs), shell escapes and quotes, the
content sniffing, the size cap and the errors. Then the whole path through ``pollama run``
against the scripted server: on the command line, piped (in-process and as a real shell
pipeline) and in the REPL, where a vision model's request carries the file in ``images`` and a
text-only model's prompt is left alone.
"""

from __future__ import annotations

import base64
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pollama.cli import attachments
from pollama.cli.attachments import (
    extract_attachments,
    find_paths,
    normalize_path,
    read_attachment,
    sniff_content_type,
)
from pollama.cli.lineedit import ScriptedReader
from pollama.cli.main import cli
from pollama.cli.repl import Repl, Session
from pollama.client import Client
from pollama.errors import InvalidRequest
from stub_ollama import StubServer, model_info

VISION = ["completion", "vision"]
AUDIO = ["completion", "audio"]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(40)
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + bytes(20)
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 \x18\x00\x00\x00" + bytes(24)
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00" + bytes(40)
MP3_ID3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(30)
MP3_FRAME = b"\xff\xfb\x90\x64" + bytes(60)  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- the regex ---------------------------------------------------------------------------------


def test_unix_paths_as_ollama_finds_them() -> None:
    """Ollama's ``TestExtractNames`` input: escaped and unescaped spaces, quotes, case."""
    text = (' some preamble\n ./relative\\ path/one.png inbetween1 ./not a valid two.jpg '
            'inbetween2 ./1.svg\n/unescaped space /three.jpeg inbetween3 /valid\\ path/dir/'
            'four.png "./quoted with spaces/five.JPG\n/unescaped space /six.webp inbetween6 '
            '/valid\\ path/dir/seven.WEBP')
    found = find_paths(text, VISION)
    assert found == [
        "./relative\\ path/one.png", "./not a valid two.jpg", "/unescaped space /three.jpeg",
        "/valid\\ path/dir/four.png", "./quoted with spaces/five.JPG",
        "/unescaped space /six.webp", "/valid\\ path/dir/seven.WEBP",
    ]


def test_windows_paths_as_ollama_finds_them() -> None:
    text = (" c:/users/jdoe/one.png inbetween1 c:/program files/someplace/two.jpg inbetween2\n"
            ' d:\\path with\\spaces\\seven.JPEG inbetween7 "E:\\program files\\x\\ten.PNG\n'
            " .\\relative\\four.png and \\\\server\\share\\five.webp")
    assert find_paths(text, VISION) == [
        "c:/users/jdoe/one.png", "c:/program files/someplace/two.jpg",
        "d:\\path with\\spaces\\seven.JPEG", "E:\\program files\\x\\ten.PNG",
        ".\\relative\\four.png", "\\\\server\\share\\five.webp",
    ]


@pytest.mark.parametrize(
    ("text", "capabilities", "found"),
    [
        ("see ./a.gif and ./b.png.", VISION, ["./a.gif", "./b.png"]),
        ("./a.pngx ./b.png_ ./c.png, (./d.JpEg)", VISION, ["./a.pngx ./b.png_ ./c.png",
                                                           "./d.JpEg"]),
        ("./song.wav ./song.mp3 ./a.png", VISION, ["./song.wav ./song.mp3 ./a.png"]),
        ("./song.wav ./song.MP3 ./a.png", AUDIO, ["./song.wav", "./song.MP3"]),
        ("./a.png ./b.wav", ["vision", "audio"], ["./a.png", "./b.wav"]),
        ("./a.png", ["completion"], []),
        ("./a.png", ["completion", "tools", "thinking"], []),
        ("~/a.png and a\tb/c.png", VISION, ["~/a.png", "/c.png"]),
        ("no\npath/x\nhere.png", VISION, []),  # a match never spans a line break
    ],
)
def test_what_counts_as_a_path(text: str, capabilities: list[str], found: list[str]) -> None:
    """Image extensions for vision models, audio ones for audio models, none for the rest;
    ``\\b`` after the extension; never across a line break or tab."""
    assert find_paths(text, capabilities) == found


OLLAMA_REGEX = re.compile(  # the newest Ollama regex, with GIF added, verbatim otherwise
    r"(?:[a-zA-Z]:)?(?:~/|\./|\.\\|/|\\)[\S\\ ]+?\.(?i:jpg|jpeg|png|webp|gif)\b", re.ASCII)


def test_the_line_cut_finds_what_the_plain_regex_finds() -> None:
    """``find_paths`` searches each line only up to its last extension (to stay linear);
    on random text it finds exactly what Ollama's regex over the whole text finds."""
    alphabet = [*"ab./\\ c:~\t\n'\"é", ".png", ".PNG", ".jpgx", ".jpeg", ".gif", "x.webp"]
    rng = random.Random(7)
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert find_paths(text, VISION) == OLLAMA_REGEX.findall(text), text


def test_a_long_line_full_of_slashes_is_fast() -> None:
    """The lazy regex alone is quadratic in a line's slashes: piping a 2 MB minified file to
    a vision model would hang. The cut keeps it linear."""
    text = "a/" * 500_000 + "see ./x.png " + "/b" * 500_000
    start = time.monotonic()
    assert find_paths(text, VISION) == [text[1 : text.index(".png") + 4]]
    assert time.monotonic() - start < 5


# -- normalizing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/home/user/my\\ photo.jpg", "/home/user/my photo.jpg"),
        ("/a\\(1\\)\\[2\\]\\{3\\}\\$\\&\\;\\'\\*\\?\\~.png", "/a(1)[2]{3}$&;'*?~.png"),
        ("/back\\\\slash.png", "/back\\slash.png"),
        ('"/home/user/photo.jpg"', "/home/user/photo.jpg"),
        ("/plain.jpg", "/plain.jpg"),
        ("c:\\Users\\x.png", "c:\\Users\\x.png"),  # not an escape: kept for Windows
    ],
)
def test_shell_escapes_and_quotes(raw: str, path: str) -> None:
    assert normalize_path(raw) == path


def test_home_directory(isolated_env: Path) -> None:
    assert normalize_path("~/pics/a.png") == str(isolated_env / "pics" / "a.png")


# -- content types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "content_type"),
    [
        (PNG, "image/png"), (JPEG, "image/jpeg"), (GIF, "image/gif"),
        (b"GIF87a" + bytes(8), "image/gif"), (WEBP, "image/webp"), (WAV, "audio/wave"),
        (MP3_ID3, "audio/mpeg"), (MP3_FRAME, "audio/mpeg"),
        (b"RIFF\x24\x00\x00\x00AVI LIST", "video/avi"), (b"BM" + bytes(20), "image/bmp"),
        (b"%PDF-1.7\n", "application/pdf"), (b"PK\x03\x04" + bytes(20), "application/zip"),
        (b"\xff\xfeh\x00i\x00", "text/plain; charset=utf-16le"),
        (b"just some words\n", "text/plain; charset=utf-8"),
        (b"\x00\x01\x02\x03binary", "application/octet-stream"),
        (b"\xff\xd9\x00\x00", "application/octet-stream"),  # 0xFF alone is no MPEG frame
        (b"RIFF\x24\x00\x00\x00WEBPXXXX", "application/octet-stream"),  # Go wants "WEBPVP"
    ],
)
def test_sniffing_matches_go(head: bytes, content_type: str) -> None:
    assert sniff_content_type(head) == content_type


def test_only_the_first_512_bytes_are_sniffed() -> None:
    assert sniff_content_type(b"a" * 512 + b"\x00") == "text/plain; charset=utf-8"


# -- extracting --------------------------------------------------------------------------------


def test_an_image_is_attached_and_cut_from_the_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = write(tmp_path / "photo.png", PNG)
    assert extract_attachments(f"what is in {png}?", VISION) == ("what is in ?", [b64(PNG)])
    assert capsys.readouterr().err == f"Added image '{png}'\n"


def test_relative_escaped_and_quoted_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "my photo.png", PNG)
    write(tmp_path / "b.jpg", JPEG)
    text, images = extract_attachments("compare ./my\\ photo.png with './b.jpg' now", VISION)
    assert (text, images) == ("compare  with  now", [b64(PNG), b64(JPEG)])
    assert capsys.readouterr().err == "Added image './my photo.png'\nAdded image './b.jpg'\n"
    absolute = tmp_path / "my photo.png"
    for quoted in (f"'{absolute}'", f'"{absolute}"'):  # drag and drop quotes a spaced path
        assert extract_attachments(f"look {quoted} here", VISION) == ("look  here", [b64(PNG)])


def test_gif_webp_and_content_over_name(tmp_path: Path) -> None:
    """GIF and WebP are images; what the bytes are decides, not the name."""
    gif, webp = write(tmp_path / "a.gif", GIF), write(tmp_path / "b.webp", WEBP)
    jpeg_named_png = write(tmp_path / "c.png", JPEG)
    text, images = extract_attachments(f"{gif} {webp} {jpeg_named_png}", VISION)
    assert (text, images) == ("", [b64(GIF), b64(WEBP), b64(JPEG)])


def test_audio_needs_the_audio_capability(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wav, mp3 = write(tmp_path / "a.wav", WAV), write(tmp_path / "b.mp3", MP3_FRAME)
    text, images = extract_attachments(f"transcribe {wav} and {mp3}", AUDIO)
    assert (text, images) == ("transcribe  and", [b64(WAV), b64(MP3_FRAME)])
    assert capsys.readouterr().err == f"Added audio '{wav}'\nAdded audio '{mp3}'\n"
    # a vision-only model: the .wav is not a path to it, and WAV bytes are not an image
    assert extract_attachments(f"hear {wav}", VISION) == (f"hear {wav}", [])
    wav_named_png = write(tmp_path / "c.png", WAV)
    with pytest.raises(InvalidRequest, match="invalid file type: audio/wave"):
        extract_attachments(f"see {wav_named_png}", VISION)


def test_paths_that_are_not_files_stay_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    text = (f"what about {tmp_path}/missing.png, {tmp_path}/nodir/x.png, "
            f"{tmp_path}/notes.txt/x.png, /{'n' * 300}.png and /a\x00b.png ?")
    assert extract_attachments("  " + text + "\n", VISION) == (text, [])
    assert capsys.readouterr().err == ""


def test_a_model_that_cannot_see_gets_the_text_unchanged(tmp_path: Path) -> None:
    png = write(tmp_path / "photo.png", PNG)
    for capabilities in (["completion"], [], ["completion", "tools"]):
        assert extract_attachments(f" what is in {png}\n", capabilities) == (
            f" what is in {png}\n", [])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"this is not a picture\n", "invalid file type: text/plain; charset=utf-8"),
        (b"\x00\x01garbage", "invalid file type: application/octet-stream"),
        (b"%PDF-1.4 ...", "invalid file type: application/pdf"),
        (b"", "file is empty"),
    ],
)
def test_a_file_of_the_wrong_type_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes, reason: str
) -> None:
    bad = write(tmp_path / "fake.png", data)
    png = write(tmp_path / "good.png", PNG)
    with pytest.raises(InvalidRequest) as info:
        extract_attachments(f"{png} and {bad}", VISION)
    assert str(info.value) == f'couldn\'t process file "{bad}": {reason}'
    assert capsys.readouterr().err == ""  # nothing is reported as added when one fails


def test_directories_and_fifos_are_errors_not_hangs(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InvalidRequest, match=r'"[^"]*dir\.png": is a directory'):
        extract_attachments(f"{tmp_path}/dir.png", VISION)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer
        with pytest.raises(InvalidRequest, match="pipe.png\": not a regular file"):
            extract_attachments(f"{tmp_path}/pipe.png", VISION)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    png = write(tmp_path / "secret.png", PNG)
    png.chmod(0)
    with pytest.raises(InvalidRequest, match="Permission denied"):
        extract_attachments(str(png), VISION)


# -- the size cap ------------------------------------------------------------------------------


def test_a_file_over_100_mb_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # sparse: costs no disk
        f.write(PNG)
        f.truncate(attachments.MAX_ATTACHMENT_BYTES + 1)
    with pytest.raises(InvalidRequest, match="file size exceeds maximum limit \\(100MB\\)"):
        extract_attachments(f"{big}", VISION)


def test_a_file_at_the_cap_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachments, "MAX_ATTACHMENT_BYTES", 1000)
    exact = write(tmp_path / "exact.png", PNG + bytes(1000 - len(PNG)))
    assert extract_attachments(str(exact), VISION)[1] == [b64(exact.read_bytes())]
    over = write(tmp_path / "over.png", PNG + bytes(1001 - len(PNG)))
    with pytest.raises(InvalidRequest, match="exceeds maximum limit"):
        extract_attachments(str(over), VISION)


class _CountingFile:
    """Wraps the opened file and counts the bytes read from it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.read_bytes = 0

    def read(self, n: int) -> bytes:
        data: bytes = self.raw.read(n)
        self.read_bytes += len(data)
        return data

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()


def test_a_file_that_grows_while_read_is_still_capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stat`` said small, the file turned out big: at most the cap and one byte are read,
    and the file is refused."""
    cap = 4096
    monkeypatch.setattr(attachments, "MAX_ATTACHMENT_BYTES", cap)
    grown = write(tmp_path / "grown.png", PNG + bytes(50 * cap))
    real_fstat, real_fdopen = os.fstat, os.fdopen
    opened: list[_CountingFile] = []

    def small_fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid,
                               st.st_gid, 10, st.st_atime, st.st_mtime, st.st_ctime))

    def counting_fdopen(fd: int, *args: Any, **kwargs: Any) -> _CountingFile:
        opened.append(_CountingFile(real_fdopen(fd, *args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(attachments.os, "fstat", small_fstat)
    monkeypatch.setattr(attachments.os, "fdopen", counting_fdopen)
    with pytest.raises(InvalidRequest, match="exceeds maximum limit"):
        read_attachment(str(grown), attachments.IMAGE_TYPES)
    assert opened[0].read_bytes == cap + 1


# -- through `pollama run` ---------------------------------------------------------------------


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubServer]:
    server = StubServer()
    server.models["llava:latest"] = model_info("llava", VISION)
    server.models["hearer:latest"] = model_info("hearer", AUDIO)
    monkeypatch.setenv("OLLAMA_HOST", server.host)
    yield server
    server.close()


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["run", *args], input=input)


def generated(stub: StubServer) -> dict[str, Any]:
    return stub.bodies("/api/generate")[-1]


def test_run_attaches_an_image_on_the_command_line(stub: StubServer, tmp_path: Path) -> None:
    png = write(tmp_path / "photo.png", PNG)
    result = run("llava", f"what is in {png}")
    assert result.exit_code == 0, result.output
    assert result.stderr == f"Added image '{png}'\n"
    assert result.stdout == "You said: what is in.\n\n"
    assert generated(stub) == {"model": "llava", "prompt": "what is in", "images": [b64(PNG)],
                               "stream": True}


def test_run_relative_and_escaped_paths(
    stub: StubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "photo.png", PNG)
    write(tmp_path / "my photo.gif", GIF)
    result = run("llava", "what is in ./photo.png")
    assert result.stderr == "Added image './photo.png'\n"
    assert generated(stub)["prompt"] == "what is in" and generated(stub)["images"] == [b64(PNG)]
    result = run("llava", "describe", "./my\\ photo.gif", "briefly")
    assert result.stderr == "Added image './my photo.gif'\n"
    assert generated(stub)["prompt"] == "describe  briefly"
    assert generated(stub)["images"] == [b64(GIF)]


def test_run_attaches_from_piped_stdin(stub: StubServer, tmp_path: Path) -> None:
    png = write(tmp_path / "a.png", PNG)
    result = run("llava", input=f"describe {png}\n")
    assert result.exit_code == 0, result.output
    assert result.stderr == f"Added image '{png}'\n"
    assert generated(stub)["prompt"] == "describe" and generated(stub)["images"] == [b64(PNG)]
    run("llava", "in", "detail", input=f"describe {png}\n")
    assert generated(stub)["prompt"] == "describe \n in detail"


def test_run_audio_for_an_audio_model(stub: StubServer, tmp_path: Path) -> None:
    wav = write(tmp_path / "clip.wav", WAV)
    result = run("hearer", f"transcribe {wav}")
    assert result.stderr == f"Added audio '{wav}'\n"
    assert generated(stub)["prompt"] == "transcribe"
    assert generated(stub)["images"] == [b64(WAV)]


def test_run_leaves_other_prompts_alone(stub: StubServer, tmp_path: Path) -> None:
    """A text-only model gets the path as text; a missing file is text for any model."""
    png = write(tmp_path / "photo.png", PNG)
    result = run("smollm2:135m", f"what is in {png}")
    assert result.stderr == ""
    assert generated(stub) == {"model": "smollm2:135m", "prompt": f"what is in {png}",
                               "stream": True}
    result = run("llava", f"what is in {tmp_path}/nothere.png")
    assert result.exit_code == 0 and result.stderr == ""
    assert generated(stub)["prompt"] == f"what is in {tmp_path}/nothere.png"
    assert "images" not in generated(stub)


def test_run_reports_a_file_it_cannot_attach(stub: StubServer, tmp_path: Path) -> None:
    fake = write(tmp_path / "fake.png", b"plain text\n")
    result = run("llava", f"what is in {fake}")
    assert result.exit_code == 1
    assert result.stderr == (f'Error: couldn\'t process file "{fake}": invalid file type: '
                             "text/plain; charset=utf-8\n")
    assert stub.bodies("/api/generate") == []


def test_a_real_shell_pipeline(stub: StubServer, isolated_env: Path, tmp_path: Path) -> None:
    """``echo "describe ./a.png" | pollama run llava`` in a shell, in the image's folder."""
    write(tmp_path / "a.png", PNG)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(isolated_env),
           "OLLAMA_HOST": stub.host}
    command = f'echo "describe ./a.png" | "{sys.executable}" -m pollama run llava'
    result = subprocess.run(["sh", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "Added image './a.png'\n"
    assert result.stdout == "You said: describe.\n\n"
    assert generated(stub)["images"] == [b64(PNG)]


# -- in the REPL -------------------------------------------------------------------------------


def repl_run(stub: StubServer, model: str, lines: list[str]) -> Repl:
    api = Client(stub.url)
    session = Session(model=model, word_wrap=False)
    session.apply_show(api.show(model))
    repl = Repl(api, session, ScriptedReader(lines))
    try:
        repl.run()
    finally:
        api.close()
    return repl


def test_repl_attaches_images_and_keeps_them_in_the_history(
    stub: StubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = write(tmp_path / "photo.png", PNG)
    gif = write(tmp_path / "anim.gif", GIF)
    repl = repl_run(stub, "llava", [f"what is in {png}", "and the colours?", f"{gif} and this"])
    out, err = capsys.readouterr()
    assert err == f"Added image '{png}'\nAdded image '{gif}'\n"
    assert "Unknown command" not in out  # a line starting with a path is a message
    assert "You said: what is in.\n\n" in out and "You said: and this.\n\n" in out
    first = {"role": "user", "content": "what is in", "images": [b64(PNG)]}
    chats = stub.bodies("/api/chat")
    assert chats[0]["messages"] == [first]
    assert chats[1]["messages"][0] == first  # the image stays with its message
    assert chats[1]["messages"][-1] == {"role": "user", "content": "and the colours?"}
    assert chats[2]["messages"][-1] == {"role": "user", "content": "and this",
                                        "images": [b64(GIF)]}
    assert repl.session.messages[0] == first


def test_repl_slash_lines_and_errors(
    stub: StubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``/`` line that names no file is still a command; a missing file is text; a file
    that cannot be attached is an error line, and the session goes on."""
    fake = write(tmp_path / "fake.png", b"text\n")
    repl = repl_run(stub, "llava", ["/nope", f"{tmp_path}/missing.png hi", f"see {fake}", "ok"])
    out, err = capsys.readouterr()
    assert out.startswith("Unknown command '/nope'. Type /? for help\n")
    assert (f'error: couldn\'t process file "{fake}": invalid file type: text/plain; '
            "charset=utf-8\n") in out
    assert err == ""
    sent = [b["messages"][-1]["content"] for b in stub.bodies("/api/chat")]
    assert sent == [f"{tmp_path}/missing.png hi", "ok"]
    assert [m["content"] for m in repl.session.messages if m["role"] == "user"] == sent


def test_repl_for_a_text_model_sends_the_line_as_it_is(
    stub: StubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = write(tmp_path / "photo.png", PNG)
    repl_run(stub, "smollm2:135m", [f"what is in {png}", f"{png} hi"])
    out, err = capsys.readouterr()
    assert err == ""
    assert f"Unknown command '{png}'. Type /? for help\n" in out
    assert stub.bodies("/api/chat")[-1]["messages"] == [
        {"role": "user", "content": f"what is in {png}"}]
