"""Files named in a ``pollama run`` prompt, attached the way Ollama's CLI attaches them
(``cmd/internal/filedata``: ``ExtractNames``, ``NormalizePath``, ``GetData``;
docs/ollama-behaviour.md#pollama-run).

For a model that can see (capability ``vision``) or hear (``audio``), a prompt such as
``what is in ./photo.png`` becomes the text ``what is in`` plus the file's bytes, base64, in
the request's ``images`` (Ollama sends audio in ``images`` too). How it works, and why:

* a path is found by Ollama's regex: an optional drive letter, then ``/``, ``./``, ``.\\``,
  ``\\`` or ``~/``, then anything but a line break or tab, lazily, up to the first known
  extension. Image extensions count only for ``vision`` models and audio ones only for
  ``audio`` models, so a text-only model's prompt is never touched;
* shell escapes (``my\\ photo.png``) are undone and surrounding double quotes dropped, as a
  terminal's drag and drop writes them; the path, quoted or not, is cut from the text;
* a path that does not exist is just text (the lazy regex also takes words such as
  ``and/or a .png file``);
* the content type comes from the magic bytes, as Go's ``http.DetectContentType`` decides it,
  never from the name: a file that is not an accepted type, a directory, an empty file or one
  over 100 MB is an error naming the file, and nothing is sent;
* at most 100 MB (and one byte, to notice more) is ever read, whatever ``stat`` said first,
  so a file that grows while it is read is still refused, not read without end.

Beyond Ollama: GIF images (the pollama server accepts them) and MP3 audio (an ``ID3`` tag or
an MPEG frame header) are accepted.
"""

from __future__ import annotations

import base64
import errno
import os
import re
import stat
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

from pollama.errors import InvalidRequest
from pollama.format import go_quote

__all__ = [
    "AUDIO_TYPES",
    "IMAGE_TYPES",
    "MAX_ATTACHMENT_BYTES",
    "Attachment",
    "extract_attachments",
    "find_paths",
    "normalize_path",
    "read_attachment",
    "sniff_content_type",
]

MAX_ATTACHMENT_BYTES = 100 * 1024 * 1024
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")
AUDIO_EXTENSIONS = ("wav", "mp3")
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
AUDIO_TYPES = frozenset({"audio/wave", "audio/mpeg"})

_SNIFF_BYTES = 512  # what http.DetectContentType looks at
_CHUNK = 1 << 20
# Go's ``\s`` is [\t\n\f\r ], so Ollama's ``[\S\\ ]`` is "anything but \t \n \f \r"
_BREAKS = re.compile(r"[\t\n\f\r]")
_UNESCAPE = re.compile(r"\\([ ()\[\]{}$&;'\\*?~])")  # Ollama's strings.NewReplacer list
# os.open errors that mean "there is no such file": the words were not a path after all
_NOT_A_PATH = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG})

# http.DetectContentType's exact signatures (net/http/sniff.go), in its order
_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "application/pdf"),
    (b"%!PS-Adobe-", "application/postscript"),
    (b"\xfe\xff", "text/plain; charset=utf-16be"),
    (b"\xff\xfe", "text/plain; charset=utf-16le"),
    (b"\xef\xbb\xbf", "text/plain; charset=utf-8"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
    (b"\x00\x00\x02\x00", "image/x-icon"),
    (b"BM", "image/bmp"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"ID3", "audio/mpeg"),
    (b"OggS\x00", "application/ogg"),
    (b"MThd\x00\x00\x00\x06", "audio/midi"),
    (b"\x1a\x45\xdf\xa3", "video/webm"),
    (b"Rar!\x1a\x07\x00", "application/x-rar-compressed"),
    (b"Rar!\x1a\x07\x01\x00", "application/x-rar-compressed"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b\x08", "application/x-gzip"),
    (b"\x00asm", "application/wasm"),
)
# RIFF-style containers: four bytes, a length, then the form type
_CONTAINERS: tuple[tuple[bytes, bytes, str], ...] = (
    (b"RIFF", b"WEBPVP", "image/webp"),
    (b"FORM", b"AIFF", "audio/aiff"),
    (b"RIFF", b"AVI ", "video/avi"),
    (b"RIFF", b"WAVE", "audio/wave"),
)
_BINARY = frozenset([*range(0x09), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20)])


@dataclass(frozen=True)
class Attachment:
    """One file taken from a prompt: where it was, ``image`` or ``audio``, and its bytes."""

    path: str
    kind: str
    data: bytes | bytearray

    def encoded(self) -> str:
        """The base64 text a request's ``images`` carries."""
        return base64.b64encode(self.data).decode("ascii")


def _extensions(capabilities: list[str]) -> tuple[str, ...]:
    return (IMAGE_EXTENSIONS if "vision" in capabilities else ()) + (
        AUDIO_EXTENSIONS if "audio" in capabilities else ()
    )


def _accepted(capabilities: list[str]) -> frozenset[str]:
    return (IMAGE_TYPES if "vision" in capabilities else frozenset()) | (
        AUDIO_TYPES if "audio" in capabilities else frozenset()
    )


@lru_cache(maxsize=8)
def _patterns(extensions: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Ollama's path regex for these extensions, and the bare extension ending it. ASCII,
    as Go's ``\\b`` is."""
    ext = r"\.(?i:" + "|".join(extensions) + r")\b"
    path = r"(?:[a-zA-Z]:)?(?:~/|\./|\.\\|/|\\)[^\t\n\f\r]+?" + ext
    return re.compile(path, re.ASCII), re.compile(ext, re.ASCII)


def find_paths(text: str, capabilities: list[str]) -> list[str]:
    """The candidate paths in ``text``, as written, in order (Ollama's ``ExtractNames``).

    A match never spans a line break or a tab, and ends at an extension; so each line is
    searched only up to its last extension. Without that cut, the lazy scan would run from
    every ``/`` to the end of its line, quadratic on a long piped line full of slashes."""
    extensions = _extensions(capabilities)
    if not extensions:
        return []
    path, ext = _patterns(extensions)
    found: list[str] = []
    for line in _BREAKS.split(text):
        end = 0
        for match in ext.finditer(line):
            end = match.end()
        if end:
            found += path.findall(line, 0, end)
    return found


def normalize_path(raw: str) -> str:
    """The file a matched path names (Ollama's ``NormalizePath``): outer double quotes
    dropped, shell escapes undone, ``~/`` at the start made the home directory."""
    path = _UNESCAPE.sub(r"\1", raw.strip('"'))
    return os.path.expanduser(path) if path.startswith("~/") else path


def sniff_content_type(head: bytes) -> str:
    """The MIME type Go's ``http.DetectContentType`` gives these first bytes, for the types
    that matter here (and the text/binary fallback); plus MPEG audio frames, which Go does
    not sniff but an MP3 without an ``ID3`` tag starts with."""
    head = head[:_SNIFF_BYTES]
    for prefix, content_type in _PREFIXES:
        if head.startswith(prefix):
            return content_type
    for outer, form, content_type in _CONTAINERS:
        if head[:4] == outer and head[8 : 8 + len(form)] == form:
            return content_type
    if _is_mpeg_frame(head):
        return "audio/mpeg"
    if any(byte in _BINARY for byte in head):
        return "application/octet-stream"
    return "text/plain; charset=utf-8"


def _is_mpeg_frame(head: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, then a version, layer, bitrate and sample
    rate that are not the reserved values."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer = (head[1] >> 3) & 3, (head[1] >> 1) & 3
    bitrate, rate = head[2] >> 4, (head[2] >> 2) & 3
    return version != 1 and layer != 0 and bitrate != 0xF and rate != 3


def _failed(path: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"couldn't process file {go_quote(path)}: {reason}")


def _read_until(f: BinaryIO, data: bytearray, limit: int) -> None:
    """Read onto ``data`` until it holds ``limit`` bytes or the file ends, however the file
    changes meanwhile (one buffer, so a 100 MB file is not copied on the way)."""
    while len(data) < limit:
        chunk = f.read(min(limit - len(data), _CHUNK))
        if not chunk:
            break
        data += chunk


def _open(path: str) -> int | None:
    """A read-only descriptor for ``path``; None when there is no such file. Non-blocking,
    so that a FIFO named like an image cannot hang the open."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                       | getattr(os, "O_BINARY", 0))
    except ValueError:  # a NUL in the text: not a path
        return None
    except OSError as exc:
        if exc.errno in _NOT_A_PATH:
            return None
        raise _failed(path, exc.strerror or str(exc)) from None


def _check_regular(path: str, fd: int) -> None:
    """Only a regular file of at most the cap, by what ``fstat`` says now (checked again
    while reading, as the file may grow)."""
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise _failed(path, "is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise _failed(path, "not a regular file")
    if info.st_size > MAX_ATTACHMENT_BYTES:
        raise _failed(path, "file size exceeds maximum limit (100MB)")


def read_attachment(path: str, accepted: frozenset[str]) -> Attachment | None:
    """The file at ``path`` if it is one of the ``accepted`` content types; None when there
    is no such file (the words stay text). Anything else wrong raises, naming the file."""
    fd = _open(path)
    if fd is None:
        return None
    try:
        _check_regular(path, fd)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=0) as f:
        data = bytearray()
        try:
            _read_until(f, data, _SNIFF_BYTES)
            if not data:
                raise _failed(path, "file is empty")
            content_type = sniff_content_type(bytes(data))
            if content_type not in accepted:
                raise _failed(path, f"invalid file type: {content_type}")
            _read_until(f, data, MAX_ATTACHMENT_BYTES + 1)  # one more byte shows it grew
        except OSError as exc:
            raise _failed(path, exc.strerror or str(exc)) from None
    if len(data) > MAX_ATTACHMENT_BYTES:
        raise _failed(path, "file size exceeds maximum limit (100MB)")
    kind = "audio" if content_type.startswith("audio/") else "image"
    return Attachment(path, kind, data)


def _cut(text: str, raw: str, path: str) -> str:
    """The text without the path: quoted forms first, so no stray quotes stay behind."""
    for written in (f"'{path}'", f"'{raw}'", f'"{path}"', f'"{raw}"', raw):
        text = text.replace(written, "")
    return text


def extract_attachments(text: str, capabilities: list[str]) -> tuple[str, list[str]]:
    """Ollama's ``extractFileData``: the prompt without the attached paths (trimmed) and the
    files' base64, for a ``vision``/``audio`` model; any other model's text comes back as it
    is. Each attached file is reported on stderr as Ollama does, once all were read."""
    if not _extensions(capabilities):
        return text, []
    accepted = _accepted(capabilities)
    files: list[Attachment] = []
    for raw in find_paths(text, capabilities):
        path = normalize_path(raw)
        attachment = read_attachment(path, accepted)
        if attachment is None:
            continue
        text = _cut(text, raw, path)
        files.append(attachment)
    for attachment in files:
        print(f"Added {attachment.kind} '{attachment.path}'", file=sys.stderr, flush=True)
    return text.strip(), [attachment.encoded() for attachment in files]
