"""The tiny projector generator writes what llama.cpp's CLIP loader reads (tiny_projector.py).

Read back with the ``gguf`` package only: end-to-end encoding goes through the server (the
worker is the only importer of llama_cpp). These are the facts the loader and pollama's store
rely on: the clip architecture, the projector type and modality flags, the exact key types
(the loader aborts on others) and the output width, which mtmd compares with the text
model's embedding length.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from tiny_projector import (
    AUDIO_STACK_FACTOR,
    AUDIO_TOKENS_PER_CHUNK,
    IMAGE_SIZE,
    PATCH_SIZE,
    VISION_TOKENS,
    wav_bytes,
    write_audio_projector,
    write_vision_projector,
)


def _kv(reader: GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _shape(reader: GGUFReader, name: str) -> list[int]:
    """A tensor's ggml ``ne`` (numpy's shape reversed), as the loader sees it."""
    (tensor,) = [t for t in reader.tensors if t.name == name]
    return [int(n) for n in tensor.shape]


def test_vision_projector_is_a_clip_mlp_with_the_models_width(tmp_path: Path) -> None:
    reader = GGUFReader(write_vision_projector(tmp_path / "mmproj.gguf"))
    kv = _kv(reader)
    assert kv["general.architecture"] == "clip"
    assert kv["general.type"] == "mmproj"
    assert kv["clip.projector_type"] == "mlp"
    assert kv["clip.has_vision_encoder"] is True
    assert kv["clip.has_audio_encoder"] is False
    assert "clip.vision.image_grid_pinpoints" not in kv  # fixed size: no slicing
    assert _shape(reader, "mm.2.weight")[1] == 576  # the output width mtmd checks
    assert (kv["clip.vision.image_size"], kv["clip.vision.patch_size"]) == (IMAGE_SIZE, PATCH_SIZE)
    assert VISION_TOKENS == (IMAGE_SIZE // PATCH_SIZE) ** 2 == 16
    assert _shape(reader, "v.position_embd.weight") == [kv["clip.vision.embedding_length"], 16]
    assert kv["clip.vision.feed_forward_length"] != kv["clip.vision.embedding_length"]
    assert all(t.tensor_type.name == "F32" for t in reader.tensors)


def test_vision_keys_have_the_types_the_loader_demands(tmp_path: Path) -> None:
    reader = GGUFReader(write_vision_projector(tmp_path / "mmproj.gguf"))
    types = {name: field.types for name, field in reader.fields.items()}
    for key in (
        "image_size",
        "patch_size",
        "embedding_length",
        "feed_forward_length",
        "block_count",
        "projection_dim",
        "attention.head_count",
    ):
        assert types[f"clip.vision.{key}"] == [GGUFValueType.UINT32], key
    assert types["clip.vision.attention.layer_norm_epsilon"] == [GGUFValueType.FLOAT32]
    for key in ("image_mean", "image_std"):
        assert types[f"clip.vision.{key}"] == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
    assert types["clip.has_vision_encoder"] == [GGUFValueType.BOOL]


def test_every_block_has_what_the_graphs_need(tmp_path: Path) -> None:
    names = {t.name for t in GGUFReader(write_vision_projector(tmp_path / "v.gguf")).tensors}
    audio = {t.name for t in GGUFReader(write_audio_projector(tmp_path / "a.gguf")).tensors}
    for prefix, tensors in (("v.blk.0", names), ("v.blk.1", names), ("a.blk.0", audio)):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down"):
            assert f"{prefix}.{part}.weight" in tensors
        assert {f"{prefix}.ln1.bias", f"{prefix}.attn_q.bias", f"{prefix}.attn_v.bias"} <= tensors
        assert f"{prefix}.attn_k.bias" not in tensors  # Whisper's graph asserts there is none
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} <= names


@pytest.mark.parametrize("write", [write_vision_projector, write_audio_projector])
def test_a_wrong_width_is_written_as_asked_and_the_seed_fixes_the_file(
    tmp_path: Path, write: Any
) -> None:
    out = "mm.2.weight" if write is write_vision_projector else "mm.a.mlp.2.weight"
    assert _shape(GGUFReader(write(tmp_path / "w.gguf", n_embd_out=512)), out)[1] == 512
    first = write(tmp_path / "a.gguf").read_bytes()
    assert write(tmp_path / "b.gguf").read_bytes() == first
    assert write(tmp_path / "c.gguf", seed=1).read_bytes() != first


def test_vision_rows_are_scaled_like_token_embeddings(tmp_path: Path) -> None:
    """The final projection maps a unit-variance GELU output to rows of norm about 3."""
    reader = GGUFReader(write_vision_projector(tmp_path / "mmproj.gguf"))
    (w2,) = [np.asarray(t.data) for t in reader.tensors if t.name == "mm.2.weight"]
    hidden = np.random.default_rng(0).normal(size=(VISION_TOKENS, w2.shape[1]))
    rows = np.linalg.norm(hidden @ w2.T * np.sqrt(0.3456), axis=1)
    assert 2.0 < rows.mean() < 4.5


def test_audio_projector_is_a_clip_ultravox(tmp_path: Path) -> None:
    reader = GGUFReader(write_audio_projector(tmp_path / "mmproj.gguf"))
    kv = _kv(reader)
    assert kv["general.architecture"] == "clip"
    assert kv["clip.projector_type"] == "ultravox"
    assert kv["clip.has_audio_encoder"] is True
    assert kv["clip.has_vision_encoder"] is False
    assert kv["clip.audio.projector.stack_factor"] == AUDIO_STACK_FACTOR
    assert AUDIO_TOKENS_PER_CHUNK == 1500 // AUDIO_STACK_FACTOR == 50
    assert _shape(reader, "mm.a.mlp.2.weight")[1] == 576
    n_embd = kv["clip.audio.embedding_length"]
    assert _shape(reader, "a.position_embd.weight") == [n_embd, 1500]
    assert _shape(reader, "a.conv1d.1.weight") == [3, kv["clip.audio.num_mel_bins"], n_embd]
    assert _shape(reader, "mm.a.norm_pre.weight") == [n_embd * AUDIO_STACK_FACTOR]


def test_wav_bytes_is_a_mono_16_bit_tone() -> None:
    with wave.open(io.BytesIO(wav_bytes(0.5, 440, sample_rate=8000))) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 8000)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert len(samples) == 4000
    assert 16000 < int(np.abs(samples).max()) < 16400
    assert int(np.abs(np.frombuffer(wav_bytes(0.1, 0)[44:], dtype="<i2")).max()) == 0
