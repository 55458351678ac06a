"""A bounds-checked reader for GGUF model files: header, metadata and tensor table.

Every model file a user uploads or pulls passes through here before llama.cpp sees it, so this
reader is the one choke point for hostile files (docs/security.md#model-files: CVE-2024-39720
magic-only file, CVE-2024-12055/2025-0312/0315/0317/66959/66960 crafted metadata, CVE-2026-7482
tensors past the end of the file). What must stay true:

* Every problem is a ``GGUFError`` whose message starts with the file's display name (never a
  full server path when ``display_name`` is given) and says what is wrong. No other exception
  escapes, whatever the bytes.
* Nothing is allocated from a length in the file before that length has been checked against
  the configured caps *and* against the bytes actually left in the file, so a claimed 2^64
  string length costs nothing. Reads go through one cursor that never reads past the end.
* Loops are bounded by counts that were checked the same way, so no input can hang the reader.
* What the parsed header may cost in memory is bounded whatever the file's size: the header
  (metadata and tensor table) may span at most ``max_header`` bytes, and all metadata arrays
  together may hold at most ``max_elements`` elements (each costs a Python object pointer or
  more, so per-array caps alone would let a large file of many arrays amplify into many
  times its size in memory: CVE-2025-0315, unbounded allocation).
* Every tensor has a known ggml type, at most four dimensions, an element count and byte size
  that fit in int64, an offset aligned to ``general.alignment``, and a data range inside the
  file that overlaps no other tensor.

We do not use ``gguf.GGUFReader``: it memory-maps the file and trusts its lengths. The reader
reads the metadata in chunks with ``struct``; the tensor data itself is never read.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, overload

from pollama.errors import GGUFError

__all__ = [
    "PackedStrings",
    "DEFAULT_MAX_ARRAY",
    "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_MAX_HEADER",
    "DEFAULT_MAX_KV",
    "DEFAULT_MAX_STRING",
    "DEFAULT_MAX_TENSORS",
    "FILE_TYPES",
    "FIM_TOKEN_TEXTS",
    "FillInMiddleTokens",
    "GGML_TYPES",
    "GGUFInfo",
    "POOLING_RANK",
    "TensorInfo",
    "file_type_name",
    "read_gguf",
]

DEFAULT_MAX_TENSORS: Final = 1 << 17
"""Tensors per file. The biggest real models have a few thousand."""
DEFAULT_MAX_KV: Final = 1 << 16
"""Metadata keys per file. Real models have tens."""
DEFAULT_MAX_STRING: Final = 16 << 20
"""Bytes in one string value (Ollama's ``MaxStringLength``); chat templates are ~100 KB."""
DEFAULT_MAX_ARRAY: Final = 16 << 20
"""Elements in one metadata value, nested arrays counted together; vocabularies are ~256 K."""
DEFAULT_MAX_ELEMENTS: Final = 1 << 23
"""Elements in all metadata arrays together. The largest real tokenizers (262 K tokens with
scores, types and merges) hold about 1.3 M."""
DEFAULT_MAX_HEADER: Final = 256 << 20
"""Bytes from the start of the file to the end of the tensor table. Real headers are a few
MB (the vocabulary) to a few tens of MB."""

POOLING_RANK: Final = 4
"""``<arch>.pooling_type`` of a cross-encoder (llama.cpp's ``LLAMA_POOLING_TYPE_RANK``)."""

_MAGIC: Final = b"GGUF"
_MAX_DIMS: Final = 4  # GGML_MAX_DIMS
_MAX_TENSOR_NAME: Final = 63  # GGML_MAX_NAME is 64 including the terminating NUL
_MAX_KEY: Final = 1 << 16
_MAX_NESTING: Final = 8
_DEFAULT_ALIGNMENT: Final = 32
_INT64_MAX: Final = (1 << 63) - 1
_CHUNK: Final = 1 << 20
_PACK_MIN: Final = 1024  # string arrays this long are kept packed (PackedStrings)

# ggml_type id -> (name, block size in elements, bytes per block), as ggml's type_traits.
# Ids that ggml removed (4, 5, 31-33, 36-38) are absent, so a file using them is refused.
GGML_TYPES: Final[dict[int, tuple[str, int, int]]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# general.file_type (llama_ftype) -> the name Ollama prints (fs/ggml/type.go FileType.String).
# Ids Ollama prints as "unknown" (4-6 removed Q4 variants, 33-35 repacked Q4_0) are absent;
# 41 (Q2_0) is newer than Ollama's table but llama.cpp 0.3.36 writes it.
FILE_TYPES: Final[dict[int, str]] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}  # fmt: skip


def file_type_name(file_type: int) -> str:
    """The name Ollama prints for a ``general.file_type`` value; ``"unknown"`` if it has none."""
    return FILE_TYPES.get(file_type, "unknown")


# GGUF value types: id -> (struct format, size). 7 is bool, 8 string, 9 array.
_SCALARS: Final[dict[int, tuple[str, int]]] = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}  # fmt: skip
_BOOL, _STRING, _ARRAY = 7, 8, 9
_INT_TYPES: Final = frozenset({0, 1, 2, 3, 4, 5, 10, 11})


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    ``shape`` is in ggml order (``ne[0]`` first, the fastest-varying dimension), as Ollama
    shows it. ``offset`` is the absolute byte position of the tensor's data in the file (the
    data section start plus the offset stored in the table); ``nbytes`` its data size.
    """

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


class PackedStrings(Sequence[str]):
    """A long string array (a vocabulary, its merges) as one byte blob plus end offsets.

    A list of 100 K ``str`` objects costs ~7 MiB; this costs the bytes of the strings and
    8 bytes each, and parsed headers are cached for as long as the server runs
    (``store.gguf_cache``). Items decode on access, with invalid UTF-8 replaced exactly as
    the reader does for any other string. It compares equal to any sequence of the same
    strings, so callers may treat it as the list it stands for.
    """

    __slots__ = ("_blob", "_ends")

    def __init__(self, blob: bytes, ends: array) -> None:  # type: ignore[type-arg]
        self._blob = blob
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self._ends)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("PackedStrings index out of range")
        start = self._ends[index - 1] if index else 0
        return self._blob[start : self._ends[index]].decode("utf-8", errors="replace")

    def __iter__(self) -> Iterator[str]:
        start = 0
        blob = self._blob
        for end in self._ends:
            yield blob[start:end].decode("utf-8", errors="replace")
            start = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedStrings):
            return self._blob == other._blob and self._ends == other._ends
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PackedStrings({len(self)} strings, {len(self._blob)} bytes)"


FIM_TOKEN_TEXTS: Final = (
    ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
     "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
     "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
     "▁<MID>", "<|code_middle|>", "<|middle|>"),
)
"""The spellings llama.cpp (``llama-vocab.cpp``) recognises as the prefix, suffix and middle
tokens of a vocabulary whose header does not name them (Qwen, Granite, DeepSeek, CodeLlama…)."""


@dataclass(frozen=True)
class FillInMiddleTokens:
    """The texts of a vocabulary's fill-in-the-middle tokens; written into a prompt they
    tokenize back to those special tokens."""

    prefix: str
    suffix: str
    middle: str


def _fim_texts_in(tokens: Sequence[str]) -> list[str | None]:
    """The first token of ``tokens`` spelled as each role's :data:`FIM_TOKEN_TEXTS`."""
    roles = {text: role for role, texts in enumerate(FIM_TOKEN_TEXTS) for text in texts}
    found: list[str | None] = [None, None, None]
    for text in tokens:
        role = roles.get(text)
        if role is not None and found[role] is None:
            found[role] = text
    return found


@dataclass(frozen=True)
class GGUFInfo:
    """The parsed header of a well-formed GGUF file (tensor data is not read).

    ``kv`` keeps the file's key order; arrays are lists (nested arrays nested lists), except
    that long string arrays are :class:`PackedStrings` (read them as sequences). The
    properties never raise: a missing key, or one of the wrong type, reads as ``None``.
    Instances are cached and shared (``store.gguf_cache``): treat ``kv`` and ``tensors`` as
    read-only.
    """

    version: int
    kv: dict[str, Any]
    tensors: list[TensorInfo]
    file_size: int
    alignment: int = _DEFAULT_ALIGNMENT
    data_offset: int = 0
    """Where the tensor data section starts (end of the header, padded to ``alignment``)."""
    parameter_count: int = 0
    """Sum of every tensor's element count, as Ollama computes ``general.parameter_count``."""

    def _str(self, key: str) -> str | None:
        value = self.kv.get(key)
        return value if isinstance(value, str) else None

    def _int(self, key: str) -> int | None:
        value = self.kv.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def _arch_int(self, suffix: str) -> int | None:
        arch = self.architecture
        return self._int(f"{arch}.{suffix}") if arch else None

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` (``llama``, ``qwen2``, ``clip``…)."""
        return self._str("general.architecture")

    @property
    def general_type(self) -> str | None:
        """``general.type``: ``model``, ``adapter``, ``projector``/``mmproj``…"""
        return self._str("general.type")

    @property
    def context_length(self) -> int | None:
        return self._arch_int("context_length")

    @property
    def embedding_length(self) -> int | None:
        return self._arch_int("embedding_length")

    @property
    def block_count(self) -> int | None:
        return self._arch_int("block_count")

    @property
    def ranks(self) -> bool:
        """A cross-encoder: its pooling type is rank (it scores pairs, no embeddings)."""
        return self.pooling_type == POOLING_RANK

    @property
    def pooling_type(self) -> int | None:
        """``<arch>.pooling_type``; its presence makes a model an embedding model."""
        return self._arch_int("pooling_type")

    @property
    def has_vision(self) -> bool:
        arch = self.architecture
        return arch is not None and f"{arch}.vision.block_count" in self.kv

    @property
    def file_type_id(self) -> int | None:
        return self._int("general.file_type")

    @property
    def file_type(self) -> str:
        """``general.file_type`` as Ollama prints it (``Q4_K_M``); ``"unknown"`` if absent."""
        file_type = self.file_type_id
        return "unknown" if file_type is None else file_type_name(file_type)

    @property
    def chat_template(self) -> str | None:
        return self._str("tokenizer.chat_template")

    @property
    def vocab_size(self) -> int | None:
        tokens = self.kv.get("tokenizer.ggml.tokens")
        return len(tokens) if isinstance(tokens, list | PackedStrings) else None

    @functools.cached_property
    def fim_tokens(self) -> FillInMiddleTokens | None:
        """The fill-in-the-middle tokens' texts, found as llama.cpp's vocabulary loader finds
        them (``tokenizer.ggml.fim_{pre,suf,mid}_token_id``, else the deprecated
        ``prefix``/``suffix``/``middle_token_id``, else a token spelled as one of
        :data:`FIM_TOKEN_TEXTS`); None unless all three are there."""
        tokens = self.kv.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list | PackedStrings):
            return None
        found: list[str | None] = []
        for role, old_name in (("pre", "prefix"), ("suf", "suffix"), ("mid", "middle")):
            token_id = self._int(f"tokenizer.ggml.fim_{role}_token_id")
            if token_id is None:
                token_id = self._int(f"tokenizer.ggml.{old_name}_token_id")
            text = (
                tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
            )
            found.append(text if isinstance(text, str) else None)
        if None in found:
            for index, text in enumerate(_fim_texts_in(tokens)):
                found[index] = found[index] or text
        prefix, suffix, middle = found
        if prefix and suffix and middle:
            return FillInMiddleTokens(prefix, suffix, middle)
        return None

    def model_info(self, verbose: bool = False) -> dict[str, Any]:
        """``model_info`` of ``/api/show`` (docs/ollama-behaviour.md#show): :meth:`shown_kv`
        minus ``general.name`` and ``tokenizer.chat_template``, as Ollama removes them."""
        return self.shown_kv(verbose, omit=("general.name", "tokenizer.chat_template"))

    def shown_kv(self, verbose: bool = False, *, omit: Sequence[str] = ()) -> dict[str, Any]:
        """The metadata as ``/api/show`` shows a GGUF (``model_info``, and all of it as
        ``projector_info``), less the keys in ``omit``.

        ``general.parameter_count`` is set to the computed count as Ollama does. Unless
        ``verbose``, arrays longer than 5 elements are replaced by ``[]`` (the vocabulary
        would otherwise be megabytes of JSON).
        """
        info: dict[str, Any] = {}
        for key, value in self.kv.items():
            if key in omit:
                continue
            if isinstance(value, PackedStrings):
                value = list(value) if verbose else []
            elif not verbose and isinstance(value, list) and len(value) > 5:
                value = []
            info[key] = value
        info["general.parameter_count"] = self.parameter_count
        return info


@dataclass(frozen=True)
class _Caps:
    tensors: int
    kv: int
    string: int
    array: int
    elements: int = DEFAULT_MAX_ELEMENTS
    header: int = DEFAULT_MAX_HEADER


def read_gguf(
    path: str | os.PathLike[str],
    *,
    display_name: str | None = None,
    max_tensors: int = DEFAULT_MAX_TENSORS,
    max_kv: int = DEFAULT_MAX_KV,
    max_string: int = DEFAULT_MAX_STRING,
    max_array: int = DEFAULT_MAX_ARRAY,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_header: int = DEFAULT_MAX_HEADER,
) -> GGUFInfo:
    """Read and validate a GGUF file's header, metadata and tensor table.

    ``display_name`` is the name errors use (a model name or upload file name); without it,
    the file's basename. Only regular files are opened (a FIFO or ``/dev/zero`` is refused
    before any read), so the call neither blocks nor reads unbounded input.
    """
    name = display_name if display_name is not None else os.path.basename(os.fspath(path))
    caps = _Caps(max_tensors, max_kv, max_string, max_array, max_elements, max_header)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise GGUFError(f"{name}: cannot open file: {getattr(e, 'strerror', None) or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError(f"{name}: not a regular file")
        with os.fdopen(fd, "rb", buffering=0) as fp:
            fd = -1
            return _Parser(fp, st.st_size, name, caps).parse()
    except OSError as e:
        raise GGUFError(f"{name}: cannot read file: {e.strerror or e}") from None
    except (MemoryError, RecursionError):
        raise GGUFError(f"{name}: metadata too large to read") from None
    finally:
        if fd >= 0:
            os.close(fd)


class _Cursor:
    """Sequential little-endian reads over a file of known size, buffered in chunks.

    ``need(n)`` is the only way bytes become readable: it refuses ``n`` larger than what is
    left of the file before touching the buffer, and never reads more than ``max(n, 1 MiB)``.
    """

    def __init__(self, fp: BinaryIO, size: int, name: str, limit: int | None = None) -> None:
        self.fp = fp
        self.size = size
        self.limit = size if limit is None else limit  # the header must end before it
        self.name = name
        self.pos = 0
        self.buf = b""
        self.base = 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.name}: {what}")

    def need(self, n: int, what: str) -> int:
        """Make ``n`` bytes at ``pos`` readable; return their index into ``buf``."""
        if n > self.size - self.pos:
            raise self.fail(
                f"truncated file: {what} at byte {self.pos} needs {n} bytes but the file "
                f"ends at byte {self.size}"
            )
        if n > self.limit - self.pos:
            raise self.fail(
                f"header too large: {what} at byte {self.pos} ends past the limit of "
                f"{self.limit} bytes for metadata and tensor table"
            )
        start = self.pos - self.base
        if start + n > len(self.buf):
            self.fp.seek(self.pos)
            want = min(max(n, _CHUNK), min(self.size, self.limit) - self.pos)
            data = self.fp.read(want)
            if data is None or len(data) < n:
                raise self.fail(f"file changed while reading {what} at byte {self.pos}")
            self.buf, self.base, start = data, self.pos, 0
        return start

    def unpack(self, fmt: str, size: int, what: str) -> Any:
        start = self.need(size, what)
        self.pos += size
        return struct.unpack_from("<" + fmt, self.buf, start)[0]

    def u32(self, what: str) -> int:
        return int(self.unpack("I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.unpack("Q", 8, what))

    def string(self, limit: int, what: str) -> str:
        length = self.u64(f"length of {what}")
        if length > limit:
            raise self.fail(f"{what} is {length} bytes long, more than the limit of {limit}")
        start = self.need(length, what)
        self.pos += length
        return self.buf[start : start + length].decode("utf-8", errors="replace")


class _Parser:
    """One pass over the header; holds the cursor and the caps so helpers stay short."""

    def __init__(self, fp: BinaryIO, size: int, name: str, caps: _Caps) -> None:
        self.cur = _Cursor(fp, size, name, caps.header)
        self.caps = caps
        self.fail = self.cur.fail
        self.elements_left = caps.elements

    def parse(self) -> GGUFInfo:
        version, n_tensors, n_kv = self._header()
        kv = self._metadata(n_kv)
        alignment = self._alignment(kv)
        raw = [self._tensor_info(i) for i in range(n_tensors)]
        end_of_header = self.cur.pos
        data_offset = -(-end_of_header // alignment) * alignment
        tensors = self._place_tensors(raw, data_offset, alignment)
        return GGUFInfo(
            version=version,
            kv=kv,
            tensors=tensors,
            file_size=self.cur.size,
            alignment=alignment,
            data_offset=data_offset,
            parameter_count=sum(t.n_elements for t in tensors),
        )

    def _header(self) -> tuple[int, int, int]:
        cur = self.cur
        if cur.size == 0:
            raise self.fail("empty file, not a GGUF model")
        if cur.size < 4:
            raise self.fail(f"file too short ({cur.size} bytes) to be a GGUF model")
        start = cur.need(4, "magic")
        magic = cur.buf[start : start + 4]
        cur.pos = 4
        if magic != _MAGIC:
            if magic in (b"lmgg", b"fmgg", b"tjgg", b"algg"):
                raise self.fail("legacy GGML/GGJT model files are not supported; convert to GGUF")
            raise self.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = cur.u32("version")
        if version == 1:
            raise self.fail("GGUF version 1 is obsolete and not supported; reconvert the model")
        if version not in (2, 3):
            if int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
                raise self.fail("big-endian GGUF files are not supported")
            raise self.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("key/value count")
        if n_tensors > self.caps.tensors:
            raise self.fail(f"too many tensors: {n_tensors} (limit {self.caps.tensors})")
        if n_kv > self.caps.kv:
            raise self.fail(f"too many metadata keys: {n_kv} (limit {self.caps.kv})")
        # Each key/value takes at least 13 bytes and each tensor entry 24: a count the rest of
        # the file cannot hold is refused now, with a clearer message than a truncation later.
        if n_kv * 13 + n_tensors * 24 > cur.size - cur.pos:
            raise self.fail(
                f"header claims {n_kv} keys and {n_tensors} tensors, more than a "
                f"{cur.size}-byte file can hold"
            )
        return version, n_tensors, n_kv

    def _metadata(self, n_kv: int) -> dict[str, Any]:
        kv: dict[str, Any] = {}
        for index in range(n_kv):
            key = self.cur.string(min(_MAX_KEY, self.caps.string), f"key #{index}")
            if key in kv:
                raise self.fail(f"duplicate metadata key {key!r}")
            vtype = self.cur.u32(f"type of {key!r}")
            budget = [self.caps.array]
            kv[key] = self._value(vtype, key, 0, budget)
        return kv

    def _value(self, vtype: int, key: str, depth: int, budget: list[int]) -> Any:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            return self.cur.unpack(*scalar, f"value of {key!r}")
        if vtype == _STRING:
            return self.cur.string(self.caps.string, f"value of {key!r}")
        if vtype == _ARRAY:
            return self._array(key, depth, budget)
        raise self.fail(f"metadata key {key!r} has unknown value type {vtype}")

    def _array(self, key: str, depth: int, budget: list[int]) -> list[Any]:
        cur = self.cur
        if depth >= _MAX_NESTING:
            raise self.fail(f"metadata key {key!r} nests arrays deeper than {_MAX_NESTING}")
        sub = cur.u32(f"element type of {key!r}")
        count = cur.u64(f"length of {key!r}")
        if count > budget[0]:
            if depth:
                raise self.fail(
                    f"metadata key {key!r} has nested arrays of more than {self.caps.array} "
                    f"elements in all"
                )
            raise self.fail(
                f"metadata key {key!r} has an array of {count} elements, more than the "
                f"limit of {self.caps.array}"
            )
        if count > self.elements_left:
            raise self.fail(
                f"metadata arrays hold more than {self.caps.elements} elements in all "
                f"(at {key!r})"
            )
        budget[0] -= count
        self.elements_left -= count
        scalar = _SCALARS.get(sub)
        if scalar is not None:
            return self._scalar_array(scalar, count, key)
        if sub == _STRING:
            return self._string_array(count, key)
        if sub == _ARRAY:
            if count * 12 > cur.size - cur.pos:
                raise self.fail(f"truncated file: array {key!r} of {count} arrays")
            return [self._array(key, depth + 1, budget) for _ in range(count)]
        raise self.fail(f"metadata key {key!r} is an array of unknown type {sub}")

    def _scalar_array(self, scalar: tuple[str, int], count: int, key: str) -> list[Any]:
        fmt, size = scalar
        cur = self.cur
        if count * size > cur.size - cur.pos:
            raise self.fail(
                f"truncated file: array {key!r} of {count} elements at byte {cur.pos} "
                f"runs past the end of the file"
            )
        out: list[Any] = []
        per_chunk = _CHUNK // size
        left = count
        while left:
            n = min(left, per_chunk)
            start = cur.need(n * size, f"array {key!r}")
            out.extend(struct.unpack_from(f"<{n}{fmt}", cur.buf, start))
            cur.pos += n * size
            left -= n
        return out

    def _string_array(self, count: int, key: str) -> list[str] | PackedStrings:
        """Strings are length-prefixed, so they are walked one by one; this is the hot loop
        for vocabularies (~100 K strings), kept free of per-item method calls. Arrays of
        ``_PACK_MIN`` strings or more come back as :class:`PackedStrings`."""
        cur = self.cur
        if count * 8 > cur.size - cur.pos:
            raise self.fail(f"truncated file: array {key!r} of {count} strings")
        limit = self.caps.string
        unpack_len = struct.Struct("<Q").unpack_from
        packed = count >= _PACK_MIN
        out: list[str] = []
        append = out.append
        blob = bytearray()
        ends = array("Q")
        mark = ends.append
        buf, base, pos = cur.buf, cur.base, cur.pos
        for _ in range(count):
            i = pos - base
            if i + 8 > len(buf):
                cur.pos = pos
                i = cur.need(8, f"string length in {key!r}")
                buf, base = cur.buf, cur.base
            (length,) = unpack_len(buf, i)
            if length > limit:
                raise self.fail(
                    f"a string in {key!r} is {length} bytes long, more than the limit of {limit}"
                )
            i += 8
            if i + length > len(buf):
                cur.pos = pos + 8
                i = cur.need(length, f"string in {key!r}")
                buf, base = cur.buf, cur.base
            if packed:
                blob += buf[i : i + length]
                mark(len(blob))
            else:
                append(buf[i : i + length].decode("utf-8", errors="replace"))
            pos = base + i + length
        cur.pos = pos
        return PackedStrings(bytes(blob), ends) if packed else out

    def _alignment(self, kv: dict[str, Any]) -> int:
        if "general.alignment" not in kv:
            return _DEFAULT_ALIGNMENT
        value = kv["general.alignment"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"general.alignment must be an integer, not {type(value).__name__}")
        if value <= 0 or value & (value - 1) or value >= 1 << 32:
            raise self.fail(
                f"general.alignment must be a nonzero power of two below 2^32, not {value}"
            )
        return value

    def _tensor_info(self, index: int) -> tuple[str, tuple[int, ...], int, int]:
        cur = self.cur
        name = cur.string(self.caps.string, f"name of tensor #{index}")
        if len(name.encode()) > _MAX_TENSOR_NAME:
            raise self.fail(f"tensor #{index} name is longer than {_MAX_TENSOR_NAME} bytes")
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        shape = tuple(cur.u64(f"shape of tensor {name!r}") for _ in range(n_dims))
        type_id = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"offset of tensor {name!r}")
        return name, shape, type_id, offset

    def _place_tensors(
        self, raw: list[tuple[str, tuple[int, ...], int, int]], data_offset: int, alignment: int
    ) -> list[TensorInfo]:
        size = self.cur.size
        seen: set[str] = set()
        tensors: list[TensorInfo] = []
        for name, shape, type_id, offset in raw:
            if name in seen:
                raise self.fail(f"duplicate tensor name {name!r}")
            seen.add(name)
            ggml_type = GGML_TYPES.get(type_id)
            if ggml_type is None:
                raise self.fail(f"tensor {name!r} has unknown ggml type {type_id}")
            type_name, block, type_size = ggml_type
            elements = 1
            for dim in shape:
                elements *= dim
                if elements > _INT64_MAX or dim > _INT64_MAX:
                    raise self.fail(f"tensor {name!r} shape {list(shape)} is too large")
            row = shape[0] if shape else 1
            if row % block:
                raise self.fail(
                    f"tensor {name!r} of type {type_name} has a row of {row} elements, "
                    f"not a multiple of the block size {block}"
                )
            nbytes = elements // block * type_size
            if offset % alignment:
                raise self.fail(
                    f"tensor {name!r} offset {offset} is not a multiple of the alignment "
                    f"{alignment}"
                )
            start = data_offset + offset
            if nbytes > _INT64_MAX or start + nbytes > size:
                raise self.fail(
                    f"tensor {name!r} data (bytes {start}..{start + nbytes}) lies outside the "
                    f"file ({size} bytes)"
                )
            tensors.append(TensorInfo(name, type_name, shape, start, nbytes))
        self._check_overlaps(tensors)
        return tensors

    def _check_overlaps(self, tensors: list[TensorInfo]) -> None:
        placed = sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset)
        for before, after in zip(placed, placed[1:], strict=False):
            if after.offset < before.offset + before.nbytes:
                raise self.fail(f"tensors {before.name!r} and {after.name!r} overlap")
