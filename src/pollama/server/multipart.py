"""``multipart/form-data`` bodies, read within a bound: the server's one form reader.

Only ``/v1/audio/transcriptions`` takes a form (one file and a few text fields, as the
``openai`` SDK sends them). Starlette parses forms only through ``python-multipart``, which
pollama does not otherwise need, and reads a file part to disk with its own limits; a form
this small is better read whole, within a cap the route gives (the audio byte cap plus a
margin for the other fields), and split with plain bytes operations, each one pass over the
body. Part headers are parsed by the standard library's ``email`` package (RFC 2231
parameters included).

What must stay true: :func:`read_bounded` never holds more than ``limit`` bytes of body (a
declared ``Content-Length`` over it is refused before a byte is read); a body that does not
follow the multipart grammar is an :class:`~pollama.errors.InvalidRequest` (400), never a
guess; the number of parts and the size of each part's headers are capped, so a body of
many empty parts costs no more than its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value

from fastapi import Request

from pollama.errors import InvalidRequest

__all__ = ["FormPart", "parse_form", "read_bounded"]

MAX_PARTS = 64
"""Parts a form may have (the transcription form has six fields)."""
MAX_PART_HEADERS = 16 << 10
"""Bytes of headers one part may have."""


@dataclass(frozen=True)
class FormPart:
    """One field of a form: its ``data`` as sent; ``filename`` is None for a text field."""

    name: str
    filename: str | None
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


async def read_bounded(request: Request, limit: int, too_large: str) -> bytes:
    """The whole body, or :class:`InvalidRequest` with ``too_large`` (which should name the
    limit and its setting) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(too_large)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise InvalidRequest(too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_form(body: bytes, content_type: str) -> dict[str, FormPart]:
    """The parts of a ``multipart/form-data`` body by field name (the first of a repeated
    name wins, as Go's ``FormValue``). A body that breaks the grammar is refused."""
    delimiter = b"\r\n--" + _boundary(content_type)
    pieces = (b"\r\n" + body).split(delimiter)
    if len(pieces) < 3:
        raise _malformed("it has no parts between its boundaries")
    if not pieces[-1].startswith(b"--"):
        raise _malformed("it does not end with the closing boundary")
    if len(pieces) - 2 > MAX_PARTS:
        raise _malformed(f"it has more than {MAX_PARTS} parts")
    form: dict[str, FormPart] = {}
    for piece in pieces[1:-1]:  # pieces[0] is the preamble; the last the closing "--"
        part = _part(piece)
        form.setdefault(part.name, part)
    return form


def _boundary(content_type: str) -> bytes:
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        raise InvalidRequest(
            f"this endpoint takes a multipart/form-data body, not {content_type or 'none'!r}"
        )
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise _malformed("its Content-Type has no valid boundary")
    return boundary.encode("latin-1", errors="replace")


def _part(piece: bytes) -> FormPart:
    """One part: the rest of the delimiter line (transport padding), headers, data."""
    line_end = piece.find(b"\r\n")
    if line_end < 0 or piece[:line_end].strip(b" \t"):
        raise _malformed("a boundary line has text after it")
    head, blank, data = piece[line_end + 2 :].partition(b"\r\n\r\n")
    if not blank or len(head) > MAX_PART_HEADERS:
        raise _malformed("a part has no end to its headers")
    headers = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
    if headers.get_content_disposition() != "form-data":
        raise _malformed('a part is not "Content-Disposition: form-data"')
    name = headers.get_param("name", header="content-disposition")
    if name is None:
        raise _malformed("a part has no field name")
    return FormPart(str(collapse_rfc2231_value(name)), headers.get_filename(), data)


def _malformed(why: str) -> InvalidRequest:
    return InvalidRequest(f"failed to parse multipart form: {why}")
