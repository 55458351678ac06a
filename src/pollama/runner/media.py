"""Images and audio through llama.cpp's multimodal library (``mtmd``): a model's projector.

A request's prompt arrives as text with Ollama's ``[img-N]`` references (``N`` indexes the
request's media, images and audio alike) and the media's bytes. :meth:`Projector.tokenize`
splits the text at the references and hands text and media to ``mtmd_tokenize_from_parts``,
which adds what the model wants around each one (``<start_of_image>`` and the like) and
says how many embedding rows each takes. Media never referenced go first, in order (a raw
prompt without references still gets its images); a reference to media that does not exist
is the caller's error. The text is tokenized with special tokens parsed, as every prompt is.

In the prompt handed to the engine a medium's rows are one repeated *key*: a negative
number derived from the medium's content (SHA-256) and the chunk's place in it, never a
token id. So the engine's prefix cache compares media by content: the same image sent
again in a later turn matches the KV cache, a different image at the same place does not
(two different media share a key only on a 62-bit hash collision).

:meth:`Projector.encode` runs the vision (or audio) encoder on one chunk and copies its
output; the engine calls it on a thread of its own (``runner/engine.py``), so the other
sequences keep decoding meanwhile, and decodes the rows itself
(:meth:`~pollama.runner.llama.Context.decode_embeddings`).

With an M-RoPE text model (Qwen2-VL and later) an image's rows take fewer positions than
rows (``MediaSpan.n_pos``) and 2-D ones; :meth:`Projector.positions` gives them, for the
position the engine decodes the image at.

What must stay true: only ``runner/`` code calls this module, in the worker; every chunk and
bitmap llama.cpp gives us is freed exactly once; bytes that are neither an image Pillow
reads nor audio llama.cpp reads are an :class:`~pollama.errors.InvalidRequest` naming the
medium, never a crash.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pollama.errors import InternalError, InvalidRequest
from pollama.runner.bindings import load_mtmd
from pollama.runner.llama import Model

__all__ = [
    "MAX_REFERENCES",
    "MEDIA_REFERENCE",
    "MediaSpan",
    "Projector",
    "is_audio_file",
    "media_key",
]

MEDIA_REFERENCE = re.compile(r"\[img-(\d+)\]")
"""Ollama's reference to the request's N-th image (or audio clip) in a prompt."""

_TEXT, _IMAGE, _AUDIO = 0, 1, 2  # enum mtmd_input_chunk_type
MAX_REFERENCES = 4
"""How many ``[img-N]`` references one medium of a request may have."""


def is_audio_file(data: bytes) -> bool:
    """llama.cpp's own test (``audio_helpers::is_audio_file`` in ``mtmd-helper.cpp``), which
    the server's (``inference/audio.py``) mirrors: a RIFF file only when its form is WAVE (a
    WebP image is RIFF too), any MPEG audio frame sync (not only MPEG-1/2 Layer III without
    CRC), an ID3 tag, or FLAC."""
    return len(data) >= 12 and (
        (data[:4] == b"RIFF" and data[8:12] == b"WAVE")
        or data[:3] == b"ID3"
        or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
        or data[:4] == b"fLaC"
    )


def media_key(content_id: str, part: int) -> int:
    """The negative pseudo-token that stands for chunk ``part`` of a medium in a prompt."""
    digest = hashlib.blake2b(f"{content_id}:{part}".encode(), digest_size=8).digest()
    return -1 - (int.from_bytes(digest, "little") >> 2)


@dataclass
class MediaSpan:
    """One media chunk of a prompt: ``n_tokens`` embedding rows from ``start``, all of them
    ``key`` in the prompt's token list. ``chunk`` is an owned ``mtmd_input_chunk`` copy
    (freed by :meth:`Projector.release`); ``embeddings`` are filled by the encoder thread.

    ``n_pos`` is how far the KV position advances over the span: ``n_tokens``, except for
    an image in an M-RoPE model (``max(nx, ny)`` of its grid of merged patches), so the
    token after it sits at the span's first position + ``n_pos``."""

    start: int
    n_tokens: int
    key: int
    kind: str  # "image" | "audio"
    non_causal: bool
    chunk: Any = None
    embeddings: npt.NDArray[np.float32] | None = None
    error: str = ""
    queued: bool = False
    n_pos: int = -1  # -1: n_tokens

    def __post_init__(self) -> None:
        if self.n_pos < 0:
            self.n_pos = self.n_tokens

    @property
    def end(self) -> int:
        return self.start + self.n_tokens


@dataclass
class _Parts:
    """The ctypes objects of one ``mtmd_tokenize_from_parts`` call, kept alive by this."""

    texts: list[Any] = field(default_factory=list)
    bitmaps: list[Any] = field(default_factory=list)
    parts: list[Any] = field(default_factory=list)


class Projector:
    """A loaded projector (``mtmd_context``) for one :class:`Model`."""

    def __init__(self, path: str, model: Model, n_threads: int, *, use_gpu: bool = False) -> None:
        mt = load_mtmd()
        self._mt = mt
        params = mt.mtmd_context_params_default()
        params.use_gpu = use_gpu  # the model's layers went to an accelerator (runner/worker.py)
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = True
        ptr = mt.mtmd_init_from_file(path.encode(), model.ptr, params)
        if not ptr:
            raise InternalError(f"llama.cpp could not load the projector {path}")
        self.ptr: Any = ptr
        self.path = path
        self.vision = bool(mt.mtmd_support_vision(ptr))
        self.audio = bool(mt.mtmd_support_audio(ptr))
        # The text model rotates by M-RoPE (Qwen2-VL and later): an image's rows take 2-D
        # positions and fewer of them than rows (see :meth:`positions`).
        self.mrope = bool(mt.mtmd_decode_use_mrope(ptr))
        self.n_embd = model.n_embd_inp
        self.image_tokens = self._probe_image_tokens() if self.vision else 0

    def _probe_image_tokens(self) -> int:
        """Rows one small image takes: exact for fixed-size projectors, a floor for those
        that grow with the image (the worker checks every real prompt anyway)."""
        pixels = (ctypes.c_uint8 * (64 * 64 * 3))()
        bitmap = self._mt.mtmd_bitmap_init(64, 64, pixels)
        try:
            tokens, spans = self._tokenize_parts([bitmap], add_special=False)
        finally:
            self._mt.mtmd_bitmap_free(bitmap)
        for span in spans:
            self.release(span)
        return sum(span.n_tokens for span in spans)

    def tokenize(
        self, prompt: str, media: Sequence[bytes], add_special: bool
    ) -> tuple[list[int], list[MediaSpan]]:
        """The prompt's tokens (media rows as their keys) and its media spans, in order."""
        bitmaps: list[Any] = []
        try:
            for index, data in enumerate(media):
                bitmaps.append(self._bitmap(data, index))
            order = self._layout(prompt, len(media))
            items = [bitmaps[item] if isinstance(item, int) else item for item in order]
            return self._tokenize_parts(items, add_special)
        finally:
            for bitmap in bitmaps:
                self._mt.mtmd_bitmap_free(bitmap)

    @staticmethod
    def _layout(prompt: str, n_media: int) -> list[str | int]:
        """Text pieces and media indexes in prompt order (unreferenced media first). A
        medium may be referenced :data:`MAX_REFERENCES` times: each reference is prepared
        (resized, or turned into a spectrogram) again, so this bounds the work a prompt can
        ask for to a multiple of what the server checked."""
        items: list[str | int] = []
        referenced: dict[int, int] = {}
        at = 0
        for match in MEDIA_REFERENCE.finditer(prompt):
            digits = match.group(1)
            index = int(digits) if len(digits) <= 9 else n_media
            if index >= n_media:
                raise InvalidRequest(
                    f"invalid image index: {digits} (the request has {n_media} image(s))"
                )
            referenced[index] = referenced.get(index, 0) + 1
            if referenced[index] > MAX_REFERENCES:
                raise InvalidRequest(
                    f"image {index} is referenced more than {MAX_REFERENCES} times "
                    f"([img-{index}]); send it again instead"
                )
            items += [prompt[at : match.start()], index]
            at = match.end()
        items.append(prompt[at:])
        first: list[str | int] = [i for i in range(n_media) if i not in referenced]
        return [item for item in first + items if item != ""]

    def _bitmap(self, data: bytes, index: int) -> Any:
        """An ``mtmd_bitmap`` of medium ``index``, its id the SHA-256 of its bytes."""
        mt = self._mt
        if is_audio_file(data):
            if not self.audio:
                raise InvalidRequest(f"media {index} is audio, and this model cannot hear audio")
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            bitmap = mt.mtmd_helper_bitmap_init_from_buf(self.ptr, buf, len(data), False)
            if not bitmap:
                raise InvalidRequest(f"media {index} is not audio llama.cpp can read")
        else:
            if not self.vision:
                raise InvalidRequest(f"media {index} is an image, and this model cannot see")
            width, height, rgb = _rgb(data, index)
            pixels = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
            bitmap = mt.mtmd_bitmap_init(width, height, pixels)
            if not bitmap:
                raise InternalError(f"llama.cpp could not take image {index}")
        mt.mtmd_bitmap_set_id(bitmap, hashlib.sha256(data).hexdigest().encode())
        return bitmap

    def _tokenize_parts(
        self, items: Sequence[Any], add_special: bool
    ) -> tuple[list[int], list[MediaSpan]]:
        mt = self._mt
        keep = _Parts()
        for item in items:
            part = mt.mtmd_input_part()
            if isinstance(item, str):
                raw = item.encode()
                text = mt.mtmd_input_text(raw, len(raw), add_special, True)
                keep.texts.append((raw, text))
                part.text = ctypes.pointer(text)
            else:
                part.bitmap = item
            keep.parts.append(part)
        array = (ctypes.POINTER(mt.mtmd_input_part) * len(keep.parts))(
            *(ctypes.pointer(p) for p in keep.parts)
        )
        chunks = mt.mtmd_input_chunks_init()
        try:
            rc = mt.mtmd_tokenize_from_parts(self.ptr, chunks, array, len(keep.parts), add_special)
            if rc != 0:
                raise InvalidRequest(
                    "the projector could not prepare the request's media (llama.cpp "
                    f"status {rc}): the image or audio is not one it can read"
                )
            return self._collect(chunks)
        finally:
            mt.mtmd_input_chunks_free(chunks)

    def _collect(self, chunks: Any) -> tuple[list[int], list[MediaSpan]]:
        mt = self._mt
        tokens: list[int] = []
        spans: list[MediaSpan] = []
        parts_of: dict[str, int] = {}
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            kind = mt.mtmd_input_chunk_get_type(chunk)
            if kind == _TEXT:
                n = ctypes.c_size_t(0)
                ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens.extend(ptr[: n.value] if n.value else ())
                continue
            content = (mt.mtmd_input_chunk_get_id(chunk) or b"").decode()
            part = parts_of[content] = parts_of.get(content, -1) + 1
            n_tokens = int(mt.mtmd_input_chunk_get_n_tokens(chunk))
            span = MediaSpan(
                start=len(tokens),
                n_tokens=n_tokens,
                key=media_key(content, part),
                kind="image" if kind == _IMAGE else "audio",
                non_causal=bool(mt.mtmd_decode_use_non_causal(self.ptr, chunk)),
                chunk=mt.mtmd_input_chunk_copy(chunk),
                n_pos=int(mt.mtmd_input_chunk_get_n_pos(chunk)),
            )
            spans.append(span)
            tokens.extend([span.key] * n_tokens)
        return tokens, spans

    def encode(self, span: MediaSpan) -> npt.NDArray[np.float32]:
        """The span's embedding rows (``n_tokens`` × the model's input width), copied.
        Only one thread may encode at a time (the engine's media thread)."""
        mt = self._mt
        if mt.mtmd_encode_chunk(self.ptr, span.chunk) != 0:
            raise InternalError(f"the projector failed to encode the {span.kind}")
        out = mt.mtmd_get_output_embd(self.ptr)
        if not out:
            raise InternalError(f"the projector produced no embeddings for the {span.kind}")
        rows = np.ctypeslib.as_array(out, shape=(span.n_tokens * self.n_embd,))
        return rows.reshape(span.n_tokens, self.n_embd).copy()

    def positions(self, span: MediaSpan, pos0: int) -> int | npt.NDArray[np.int32]:
        """The KV positions of the span's rows when its first row is at ``pos0``, as
        :meth:`~pollama.runner.llama.Context.decode_embeddings` takes them: ``pos0`` itself
        (rows at ``pos0``..) for an ordinary model; for an M-RoPE one, an array of shape
        (4, n_tokens), section-major as llama.cpp's ``mtmd_helper_decode_image_chunk``
        lays them out: an image's sections are (t, y, x, z) of
        ``mtmd_helper_image_get_decoder_pos`` (which depend on ``pos0``), an audio clip's
        rows take ``pos0 + i`` in every section (``set_position_mrope_1d``)."""
        if not self.mrope:
            return pos0
        n = span.n_tokens
        if span.kind == "audio":
            return np.tile(np.arange(pos0, pos0 + n, dtype=np.int32), (4, 1))
        mt = self._mt
        image = mt.mtmd_input_chunk_get_tokens_image(span.chunk)
        if not image:
            raise InternalError("the image chunk has no image tokens")
        out = (mt.mtmd_decoder_pos * n)()
        mt.mtmd_helper_image_get_decoder_pos(image, pos0, out)
        txyz = np.frombuffer(out, dtype=np.uint32).reshape(n, 4).astype(np.int32)
        return np.ascontiguousarray(txyz[:, [0, 2, 1, 3]].T)

    def release(self, span: MediaSpan) -> None:
        """Free the span's chunk and embeddings (idempotent)."""
        if span.chunk:
            self._mt.mtmd_input_chunk_free(span.chunk)
            span.chunk = None
        span.embeddings = None

    def close(self) -> None:
        if self.ptr:
            self._mt.mtmd_free(self.ptr)
            self.ptr = None


def _rgb(data: bytes, index: int) -> tuple[int, int, bytes]:
    """The first frame of an image as 8-bit RGB (the server checked its size and format;
    Pillow's own checks still apply: a file it cannot read is the caller's error)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequest(f"media {index} is not an image or audio file: {exc}") from None
    return rgb.width, rgb.height, rgb.tobytes()
