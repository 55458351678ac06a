"""Tiny GGUF files for tests: real loadable models, arbitrary metadata, and hostile files.

* ``write_tiny_model`` writes a real llama-architecture model with random weights and a small
  SentencePiece-style vocabulary (byte fallback, so any text tokenizes). llama.cpp loads and
  evaluates it, and ``llama_model_quantize`` can re-quantize it (use ``n_embd=256`` for real
  K-quant blocks; smaller rows make llama.cpp fall back to other types per tensor).
* ``write_gguf`` writes any metadata and tensors through ``gguf.GGUFWriter``.
* ``build_gguf`` assembles GGUF bytes by hand with no validation at all, and
  ``corrupt_variants`` uses it to produce one malformed file per kind of defect the reader
  must refuse (docs/security.md#model-files).

Import it from tests as ``from ggufgen import ...`` (``tests/`` is on pytest's pythonpath).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, TokenType
from gguf.quants import quantize

__all__ = [
    "RawKV",
    "RawTensor",
    "build_gguf",
    "corrupt_variants",
    "tiny_vocab",
    "valid_raw_gguf",
    "write_gguf",
    "write_projector_header",
    "write_tiny_model",
]

_FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7}

# Words that get whole tokens so that ordinary English prompts are not all byte tokens.
_WORDS = (
    "the and is a of to in it you that he was for on are with as I his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "hello world yes no why sky blue red green cat dog tell me story answer question model"
).split()


def tiny_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece vocabulary of exactly ``n_vocab`` tokens: tokens, scores, types.

    Ids 0-2 are ``<unk> <s> </s>``, then ``<|im_start|> <|im_end|>`` (ChatML control tokens,
    for chat-template tests), the 256 byte-fallback tokens, then ``▁``, single characters,
    ``▁`` + letter, ``▁`` + word and two-letter pieces until the size is reached (400 tokens
    reach the first few words). Scores fall with the id, so earlier pieces merge first.
    """
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [
        TokenType.UNKNOWN,
        TokenType.CONTROL,
        TokenType.CONTROL,
        TokenType.CONTROL,
        TokenType.CONTROL,
    ]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    if n_vocab < len(tokens) + 1:
        raise ValueError(f"n_vocab must be at least {len(tokens) + 1}")
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pieces = ["▁"] + [chr(c) for c in range(33, 127)] + ["▁" + c for c in letters]
    pieces += ["▁" + w for w in _WORDS] + [a + b for a in letters for b in letters]
    seen = set(tokens)
    for piece in pieces:
        if len(tokens) == n_vocab:
            break
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(TokenType.NORMAL)
    if len(tokens) < n_vocab:
        raise ValueError(f"n_vocab is at most {len(tokens)}")
    scores = [0.0] * len(tokens)
    for i in range(261, len(tokens)):
        scores[i] = -float(i)
    return tokens, scores, [int(t) for t in types]


def write_tiny_model(
    path: str | Path,
    *,
    arch: str = "llama",
    file_type: str = "F32",
    chat_template: str | None = None,
    context_length: int = 256,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    n_vocab: int = 400,
    extra_kv: Mapping[str, Any] | None = None,
    pooling_type: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a loadable llama-architecture model with random weights; return its path.

    ``file_type`` is ``F32``, ``F16`` or ``Q8_0`` (matrices in that type, norms in F32, as
    converters do). The output head is tied to the token embedding. ``arch`` names the key
    prefix; only ``llama`` is loadable by llama.cpp with these tensors. Defaults give ~1 MB
    in F32; ``n_embd=256`` (so ``n_ff=512``) gives ~4 MB and exercises real K-quant blocks.
    """
    if file_type not in _FILE_TYPES:
        raise ValueError(f"file_type must be one of {sorted(_FILE_TYPES)}")
    n_head_kv = n_head_kv or n_head
    n_ff = n_ff or 2 * n_embd
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)
    tokens, scores, types = tiny_vocab(n_vocab)

    kv: dict[str, Any] = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": "tiny test model",
        "general.file_type": (_FILE_TYPES[file_type], GGUFValueType.UINT32),
        f"{arch}.context_length": (context_length, GGUFValueType.UINT32),
        f"{arch}.embedding_length": (n_embd, GGUFValueType.UINT32),
        f"{arch}.block_count": (n_layer, GGUFValueType.UINT32),
        f"{arch}.feed_forward_length": (n_ff, GGUFValueType.UINT32),
        f"{arch}.attention.head_count": (n_head, GGUFValueType.UINT32),
        f"{arch}.attention.head_count_kv": (n_head_kv, GGUFValueType.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, GGUFValueType.FLOAT32),
        f"{arch}.rope.dimension_count": (head_dim, GGUFValueType.UINT32),
        f"{arch}.rope.freq_base": (10000.0, GGUFValueType.FLOAT32),
        f"{arch}.vocab_size": (n_vocab, GGUFValueType.UINT32),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": (scores, GGUFValueType.FLOAT32),
        "tokenizer.ggml.token_type": (types, GGUFValueType.INT32),
        "tokenizer.ggml.bos_token_id": (1, GGUFValueType.UINT32),
        "tokenizer.ggml.eos_token_id": (2, GGUFValueType.UINT32),
        "tokenizer.ggml.unknown_token_id": (0, GGUFValueType.UINT32),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "general.quantization_version": (2, GGUFValueType.UINT32),
    }
    if pooling_type is not None:
        kv[f"{arch}.pooling_type"] = (pooling_type, GGUFValueType.UINT32)
    if chat_template is not None:
        kv["tokenizer.chat_template"] = chat_template
    kv.update(extra_kv or {})

    def matrix(rows: int, cols: int) -> Any:
        weights = rng.normal(0.0, 0.02, size=(rows, cols)).astype(np.float32)
        if file_type == "F16":
            return weights.astype(np.float16)
        if file_type == "Q8_0":
            return (quantize(weights, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        return weights

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    tensors: dict[str, Any] = {"token_embd.weight": matrix(n_vocab, n_embd)}
    for i in range(n_layer):
        blk = f"blk.{i}"
        tensors[f"{blk}.attn_norm.weight"] = norm()
        tensors[f"{blk}.attn_q.weight"] = matrix(n_embd, n_embd)
        tensors[f"{blk}.attn_k.weight"] = matrix(n_head_kv * head_dim, n_embd)
        tensors[f"{blk}.attn_v.weight"] = matrix(n_head_kv * head_dim, n_embd)
        tensors[f"{blk}.attn_output.weight"] = matrix(n_embd, n_embd)
        tensors[f"{blk}.ffn_norm.weight"] = norm()
        tensors[f"{blk}.ffn_gate.weight"] = matrix(n_ff, n_embd)
        tensors[f"{blk}.ffn_down.weight"] = matrix(n_embd, n_ff)
        tensors[f"{blk}.ffn_up.weight"] = matrix(n_ff, n_embd)
    tensors["output_norm.weight"] = norm()
    return write_gguf(path, kv, tensors)


def write_projector_header(
    path: str | Path,
    *,
    width: int,
    vision: bool | None = True,
    audio: bool = False,
    projector_type: str = "mlp",
    hidden: int = 16,
    extra_kv: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tiny multimodal projector ("mmproj") GGUF whose output is ``width`` wide; return
    its path. Only its header is meant to be read (llama.cpp cannot run it).

    It is shaped as llama.cpp's converters write one: ``general.architecture`` "clip",
    ``general.type`` "mmproj", ``clip.projector_type`` (default "mlp"), the encoder flags
    (``vision=None`` leaves ``clip.has_vision_encoder`` out, as older projectors do), the
    vision keys Ollama's ``show`` prints, and the LLaVA projection tensors: ``mm.0.weight``
    and ``mm.2.weight``, whose ggml shape is ``[hidden, width]`` (``ne[1]`` is the width
    ``clip_n_mmproj_embd`` reads). With ``audio``, ``mm.a.mlp.2.weight`` gives the audio
    side the same width.
    """
    kv: dict[str, Any] = {
        "general.architecture": "clip",
        "general.type": "mmproj",
        "general.name": "tiny projector",
        "clip.projector_type": projector_type,
        "clip.has_audio_encoder": audio,
        "clip.vision.block_count": 1,
        "clip.vision.embedding_length": hidden,
        "clip.vision.projection_dim": 768,
        "clip.vision.image_size": 32,
        "clip.vision.patch_size": 16,
        "clip.vision.image_mean": [0.5, 0.5, 0.5],
    }
    if vision is not None:
        kv["clip.has_vision_encoder"] = vision
    kv.update(extra_kv or {})
    tensors = {
        "v.patch_embd.weight": np.zeros((hidden, 3, 16, 16), dtype=np.float32),
        "mm.0.weight": np.zeros((hidden, hidden), dtype=np.float32),
        "mm.2.weight": np.zeros((width, hidden), dtype=np.float32),
    }
    if audio:
        tensors["mm.a.mlp.2.weight"] = np.zeros((width, hidden), dtype=np.float32)
    return write_gguf(path, kv, tensors)


def write_gguf(
    path: str | Path,
    kv: Mapping[str, Any],
    tensors: Mapping[str, Any] | None = None,
    *,
    alignment: int | None = None,
) -> Path:
    """Write a GGUF file with ``gguf.GGUFWriter``; return its path.

    ``kv`` values are written with an inferred type (``bool``, ``int`` as UINT32 when it fits
    and INT64 otherwise, ``float`` as FLOAT32, ``str``, lists as arrays) or, given as a
    ``(value, GGUFValueType)`` pair, with that type (for arrays, the element type).
    ``general.architecture`` is written only if ``kv`` has it; ``alignment`` also writes
    ``general.alignment`` unless ``kv`` has it. ``tensors`` maps names to numpy
    arrays (F32/F16/F64/I8-I64 by dtype, numpy shape order) or to ``(uint8 array,
    GGMLQuantizationType)`` pairs of already-quantized bytes.
    """
    path = Path(path)
    arch = kv.get("general.architecture", "")
    writer = GGUFWriter(path, arch if isinstance(arch, str) else "")
    writer.kv_data[0].clear()  # drop the automatic general.architecture; kv decides
    if alignment is not None:
        writer.data_alignment = alignment
        if "general.alignment" not in kv:
            writer.add_uint32("general.alignment", alignment)
    for key, value in kv.items():
        _add_kv(writer, key, value)
    for name, tensor in (tensors or {}).items():
        if isinstance(tensor, tuple):
            data, qtype = tensor
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_kv(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, tuple):
        value, vtype = value
        if isinstance(value, list):
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=vtype)
        else:
            writer.add_key_value(key, value, vtype)
    elif isinstance(value, bool):
        writer.add_key_value(key, value, GGUFValueType.BOOL)
    elif isinstance(value, int):
        vtype = GGUFValueType.UINT32 if 0 <= value < 1 << 32 else GGUFValueType.INT64
        writer.add_key_value(key, value, vtype)
    elif isinstance(value, float):
        writer.add_key_value(key, value, GGUFValueType.FLOAT32)
    elif isinstance(value, str):
        writer.add_key_value(key, value, GGUFValueType.STRING)
    elif isinstance(value, list):
        writer.add_key_value(key, value, GGUFValueType.ARRAY)
    else:
        raise TypeError(f"cannot write {key!r} of type {type(value).__name__}")


# --- raw byte-level building, for malformed files -------------------------------------------

RawKV = tuple[str, int, Any]
"""``(key, GGUF value type id, value)``; an array value is ``(element type id, [items])``."""
RawTensor = tuple[str, Sequence[int], int, int]
"""``(name, ggml-order dims, ggml type id, offset within the data section)``."""

_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
        12: "d"}  # fmt: skip


def _pack_string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(vtype: int, value: Any) -> bytes:
    if vtype in _FMT:
        return struct.pack("<" + _FMT[vtype], value)
    if vtype == 8:
        return _pack_string(value)
    if vtype == 9:
        sub, items = value
        out = struct.pack("<IQ", sub, len(items))
        return out + b"".join(_pack_value(sub, item) for item in items)
    raise ValueError(f"no packing for value type {vtype}")


def build_gguf(
    kv: Sequence[RawKV] = (),
    tensors: Sequence[RawTensor] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
    magic: bytes = b"GGUF",
) -> bytes:
    """GGUF bytes assembled exactly as told, with no checks (counts may lie).

    The data section starts at the header end padded to ``alignment`` (pass the alignment the
    file's ``general.alignment`` claims, or a different one to misplace it), then ``data``.
    """
    out = bytearray(magic)
    out += struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kv) if n_kv is None else n_kv,
    )
    for key, vtype, value in kv:
        out += _pack_string(key) + struct.pack("<I", vtype) + _pack_value(vtype, value)
    for name, dims, ggml_type, offset in tensors:
        out += _pack_string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    if alignment > 0 and (tensors or data):
        out += b"\0" * (-len(out) % alignment)
    return bytes(out + data)


_VALID_KV: list[RawKV] = [
    ("general.architecture", 8, "llama"),
    ("general.name", 8, "raw"),
    ("llama.context_length", 4, 128),
    ("llama.block_count", 4, 1),
    ("tokenizer.ggml.tokens", 9, (8, ["a", "b", "c"])),
    ("tokenizer.ggml.scores", 9, (6, [0.0, -1.0, -2.0])),
    ("misc.nested", 9, (9, [(4, [1, 2]), (4, [3])])),
    ("misc.flags", 9, (7, [True, False])),
    ("misc.i64", 11, -5),
    ("misc.f64", 12, 0.5),
]


def valid_raw_gguf() -> bytes:
    """A small well-formed GGUF (every value type, two F32 tensors, one Q4_0)."""
    tensors = [("a.weight", [8], 0, 0), ("b.weight", [4, 2], 0, 32), ("q.weight", [32], 2, 64)]
    return build_gguf(_VALID_KV, tensors, bytes(range(64)) + bytes(18))


def corrupt_variants() -> dict[str, bytes]:
    """One malformed file per defect, keyed by a short description.

    ``read_gguf`` must refuse each with a ``GGUFError`` that names the file. Truncations of
    ``valid_raw_gguf()`` at every offset are left to the tests themselves.
    """
    good = valid_raw_gguf()
    arch = [("general.architecture", 8, "llama")]
    one_f32 = [("t", [8], 0, 0)]
    data = bytes(32)
    huge = (1 << 64) - 1
    return {
        "empty": b"",
        "short": b"GG",
        "magic only": b"GGUF",
        "magic and version only": b"GGUF" + struct.pack("<I", 3),
        "bad magic": b"GGUX" + good[4:],
        "text file": b"this is not a model, just some text\n" * 4,
        "legacy ggjt": b"tjgg" + good[4:],
        "version 1": build_gguf(arch, version=1),
        "version 4": build_gguf(arch, version=4),
        "big endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + good[24:],
        "huge tensor count": build_gguf(arch, n_tensors=huge),
        "huge kv count": build_gguf(arch, n_kv=huge),
        "kv count beyond file": build_gguf(arch, n_kv=1000),
        "huge key length": b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, huge) + b"x" * 16,
        "huge string value": _one_key(struct.pack("<IQ", 8, huge) + b"x" * 16),
        "huge array length": _one_key(struct.pack("<IIQ", 9, 4, 1 << 62) + bytes(16)),
        "huge string array": _one_key(struct.pack("<IIQ", 9, 8, 1 << 40) + bytes(16)),
        "array beyond file": _one_key(struct.pack("<IIQ", 9, 10, 1 << 20) + bytes(64)),
        "unknown value type": _one_key(struct.pack("<I", 13) + bytes(8)),
        "unknown array type": _one_key(struct.pack("<IIQ", 9, 42, 1) + bytes(8)),
        "deeply nested arrays": build_gguf([("k", 9, _nested(12))]),
        "duplicate key": build_gguf(arch + arch),
        "too many dims": build_gguf(arch, [("t", [1, 1, 1, 1, 8], 0, 0)], data),
        "unknown ggml type": build_gguf(arch, [("t", [8], 1000, 0)], data),
        "removed ggml type": build_gguf(arch, [("t", [32], 4, 0)], data),
        "tensor outside file": build_gguf(arch, [("t", [8], 0, 1 << 20)], data),
        "tensor past end": build_gguf(arch, [("t", [16], 0, 0)], data),
        "tensor offset overflow": build_gguf(arch, [("t", [8], 0, huge - 31)], data),
        "overlapping tensors": build_gguf(arch, [("t", [8], 0, 0), ("u", [8], 0, 0)], data),
        "partly overlapping tensors": build_gguf(
            arch, [("t", [16], 0, 0), ("u", [8], 0, 32)], bytes(96)
        ),
        "misaligned tensor": build_gguf(arch, [("t", [4], 0, 4)], data),
        "shape overflow": build_gguf(arch, [("t", [1 << 40, 1 << 40], 0, 0)], data),
        "row not a block multiple": build_gguf(arch, [("t", [31], 2, 0)], data),
        "duplicate tensor": build_gguf(arch, [("t", [4], 0, 0), ("t", [4], 0, 0)], data),
        "long tensor name": build_gguf(arch, [("t" * 100, [8], 0, 0)], data),
        "zero alignment": build_gguf(arch + [("general.alignment", 4, 0)], one_f32, data),
        "alignment not a power of two": build_gguf(
            arch + [("general.alignment", 4, 48)], one_f32, data, alignment=48
        ),
        "alignment of wrong type": build_gguf(
            arch + [("general.alignment", 8, "32")], one_f32, data
        ),
        "truncated tensor table": build_gguf(arch, one_f32, data)[:-64],
    }


def _one_key(payload: bytes) -> bytes:
    """A header announcing one key/value, the key ``k``, then ``payload`` (type and value)."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _pack_string("k") + payload


def _nested(depth: int) -> tuple[int, list[Any]]:
    value: tuple[int, list[Any]] = (4, [1])
    for _ in range(depth):
        value = (9, [value])
    return value
