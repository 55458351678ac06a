"""Tiny random-weight multimodal projector ("mmproj") GGUF files, built at test time.

No projector binary lives in the repository: a test calls :func:`write_vision_projector` (or
:func:`write_audio_projector`) to write one into its tmp dir. The files are in exactly the
format the pinned llama.cpp's CLIP loader (``tools/mtmd/clip.cpp`` in llama-cpp-python 0.3.36)
reads, so ``mtmd_init_from_file`` accepts them next to the default model (SmolLM2-135M,
``n_embd`` 576), and encoding takes milliseconds.

The vision projector is LLaVA-1.5's ``"mlp"`` type: a ViT (conv patch embedding, learned
position embedding, pre-layernorm, pre-norm transformer blocks) and a two-layer MLP
(``mm.0`` -> GELU -> ``mm.2``). It is the simplest type the loader supports with

* a fixed number of image tokens, :data:`VISION_TOKENS`, whatever the image size: with no
  ``clip.vision.image_grid_pinpoints`` mtmd uses its fixed-size preprocessor, which resizes
  every image (bicubic, aspect kept) to ``image_size`` square and pads the rest with the
  LLaVA grey (122, 116, 104); there is no slicing, tiling or dynamic resolution;
* ordinary causal decoding and ordinary 1-D positions (``mtmd_decode_use_non_causal`` and
  ``mtmd_decode_use_mrope`` are false for it) and no begin/end-of-image text tokens.

The audio projector is Ultravox's ``"ultravox"`` type: a Whisper encoder (two 1-D convs, the
second with stride 2, learned positions, pre-norm blocks) whose frames are stacked by
``clip.audio.projector.stack_factor`` and projected by an RMS-norm/SwiGLU MLP. Of the
Whisper-style types it is the one with no begin/end-of-audio text tokens ("qwen2a" and
"voxtral" add tokens SmolLM2's vocabulary does not have). mtmd cuts audio into 30-second
chunks (3000 mel frames, the last one padded with silence) and each chunk gives
:data:`AUDIO_TOKENS_PER_CHUNK` tokens, so a short sound's content is in the first few tokens
(one token per ``30 / AUDIO_TOKENS_PER_CHUNK`` seconds) and the rest encode silence.

What must stay true for the loader (verified against the vendored sources, not guessed):

* every ``clip.{vision,audio}.*`` number is a UINT32 and the epsilon a FLOAT32,
  ``image_mean``/``image_std`` are FLOAT32 arrays of 3, ``clip.has_*_encoder`` are BOOLs:
  the loader reads them with typed getters that abort the process on any other type;
* ``projection_dim`` is required although neither type uses it;
* the LLaVA graph runs only the first ``block_count - 1`` blocks (it takes the penultimate
  layer's output, as LLaVA does), yet every block's tensors must be present;
* ``feed_forward_length`` must differ from ``embedding_length``: the loader swaps ``ffn_up``
  and ``ffn_down`` of "mlp" projectors when ``ffn_down``'s input width equals
  ``embedding_length`` (a fix for old conversions);
* the Whisper graph asserts that the blocks have layer-norm biases and q/v biases but no
  k bias, and needs at least 1500 position rows (3000 frames after the stride-2 conv);
* the output width is ``mm.2.weight``'s (vision) or ``mm.a.mlp.2.weight``'s (audio) ggml
  ``ne[1]``; mtmd refuses a projector whose output width is not the text model's
  embedding length.

The weights are random with a fixed seed, scaled so that each embedding row has about the
norm of a SmolLM2-135M token embedding row (see :data:`TARGET_ROW_NORM`), and so that the
embeddings depend strongly on the content: two solid colours give clearly different rows,
and the same input always gives the same rows.
"""

from __future__ import annotations

import io
import math
import struct
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

__all__ = [
    "BENCH_SHAPE",
    "SLOW_SHAPE",
    "AUDIO_STACK_FACTOR",
    "AUDIO_TOKENS_PER_CHUNK",
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "TARGET_ROW_NORM",
    "VISION_TOKENS",
    "wav_bytes",
    "write_audio_projector",
    "write_vision_projector",
]

IMAGE_SIZE = 56
"""The square side every image is resized (and padded) to before encoding."""

PATCH_SIZE = 14

VISION_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
"""Image tokens (embedding rows) per image, whatever the input image size: 16."""

AUDIO_STACK_FACTOR = 30
"""Whisper frames (after the stride-2 conv, 20 ms each) stacked into one audio token."""

AUDIO_TOKENS_PER_CHUNK = 1500 // AUDIO_STACK_FACTOR
"""Audio tokens per 30-second chunk: 50, one per 0.6 s. A sound under 30 s is one chunk."""

TARGET_ROW_NORM = 3.0
"""Aimed-at L2 norm of an embedding row: SmolLM2-135M's token rows are 1.8-7.5, mean 3.2."""

_N_EMBD = 32  # the encoders' hidden width
_N_FF = 64  # must differ from _N_EMBD (see the module docstring)
_N_HEAD = 4
_N_LAYER = 2  # vision runs block 0 only; block 1 is loaded and unused, as in LLaVA
_EPS = 1e-5
_N_MEL = 128  # Whisper large-v3's mel bins, as Ultravox uses
_AUDIO_POSITIONS = 1500  # Whisper's: 3000 mel frames after the stride-2 conv
_AUDIO_MLP_HIDDEN = 64  # the SwiGLU's output width (mm.a.mlp.1 writes twice that)

_Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class EncoderShape:
    """A vision encoder's size: the tests' tiny default, or a bigger one whose encode costs
    what a real projector's does (the benchmark's, :data:`BENCH_SHAPE`)."""

    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    width: int = _N_EMBD
    ff: int = _N_FF
    heads: int = _N_HEAD
    layers: int = _N_LAYER

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


TINY_SHAPE = EncoderShape()
BENCH_SHAPE = EncoderShape(image_size=224, patch_size=14, width=768, ff=3072, heads=12, layers=12)
"""ViT-B's size (86 M parameters) at 224 px, 256 image tokens (Gemma 3's count): an encode
that takes about a second on two CPU cores, like a small real projector."""

SLOW_SHAPE = EncoderShape(image_size=224, patch_size=14, width=512, ff=2048, heads=8, layers=8)
"""Big enough that an encode lasts a few hundred milliseconds (the tests that act during
one), small enough to write in a second."""


def write_vision_projector(
    path: Path, *, n_embd_out: int = 576, seed: int = 0, shape: EncoderShape = TINY_SHAPE
) -> Path:
    """Write a tiny LLaVA-style ("mlp") vision projector GGUF to ``path``; return ``path``.

    ``n_embd_out`` is the width of each image embedding row it produces; it must equal the
    text model's embedding length for mtmd to accept the pair (576 for SmolLM2-135M), so a
    test passes another value to build a projector that must be refused. ``seed`` fixes the
    random weights: the same arguments always write the same file.
    """
    rng = np.random.default_rng(seed)
    tensors = {**_vit_tensors(rng, shape), **_mlp_tensors(rng, n_embd_out, shape.width)}
    return _write(
        Path(path), lambda writer: _add_vision_metadata(writer, n_embd_out, shape), tensors
    )


def write_audio_projector(path: Path, *, n_embd_out: int = 576, seed: int = 0) -> Path:
    """Write a tiny Ultravox-style ("ultravox") audio projector GGUF to ``path``; return it.

    As :func:`write_vision_projector`: ``n_embd_out`` is the embedding row width (the text
    model's embedding length, or another to test refusal) and ``seed`` fixes the weights.
    mtmd resamples any input to 16 kHz mono, so :func:`wav_bytes` at any rate works.
    """
    rng = np.random.default_rng(seed)
    tensors = {**_whisper_tensors(rng), **_ultravox_tensors(rng, n_embd_out)}
    return _write(Path(path), lambda writer: _add_audio_metadata(writer, n_embd_out), tensors)


def wav_bytes(seconds: float, freq: float, sample_rate: int = 16000) -> bytes:
    """A mono 16-bit PCM WAV file, in memory, of a sine tone at ``freq`` Hz (half scale).

    Two tones of different frequency light different mel bins, so they give different audio
    embeddings; ``freq=0`` gives silence.
    """
    n = round(seconds * sample_rate)
    samples = (round(16383 * math.sin(2 * math.pi * freq * i / sample_rate)) for i in range(n))
    frames = struct.pack(f"<{n}h", *samples)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(frames)
    return buffer.getvalue()


def _write(path: Path, add_metadata: Callable[[GGUFWriter], None], tensors: _Tensors) -> Path:
    """Write a "clip"-architecture GGUF: its metadata, then every tensor as F32."""
    writer = GGUFWriter(path, "clip")
    writer.add_type("mmproj")
    writer.add_file_type(0)  # all F32
    add_metadata(writer)
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_encoder_metadata(
    writer: GGUFWriter, modality: str, proj: int, shape: EncoderShape = TINY_SHAPE
) -> None:
    """The ``clip.<modality>.*`` keys every encoder needs, in the types the loader demands.

    ``general.architecture`` ("clip", written by ``GGUFWriter``) and ``general.type`` are not
    read by clip.cpp; they are what pollama (and Ollama) use to tell a projector from a model.
    """
    for key, value in (
        ("embedding_length", shape.width),
        ("feed_forward_length", shape.ff),
        ("block_count", shape.layers),
        ("projection_dim", proj),
        ("attention.head_count", shape.heads),
    ):
        writer.add_uint32(f"clip.{modality}.{key}", value)
    writer.add_float32(f"clip.{modality}.attention.layer_norm_epsilon", _EPS)


def _add_vision_metadata(writer: GGUFWriter, n_embd_out: int, shape: EncoderShape) -> None:
    """The keys ``clip_model_loader`` reads for a vision "mlp" projector."""
    writer.add_name("tiny random vision projector")
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_audio_encoder", False)
    _add_encoder_metadata(writer, "vision", n_embd_out, shape)
    writer.add_uint32("clip.vision.image_size", shape.image_size)
    writer.add_uint32("clip.vision.patch_size", shape.patch_size)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])


def _add_audio_metadata(writer: GGUFWriter, n_embd_out: int) -> None:
    """The keys ``clip_model_loader`` reads for an "ultravox" audio projector.

    The sample rate, FFT and hop sizes are not in the file: the loader fixes them (16 kHz,
    400, 160) for every Whisper-style type.
    """
    writer.add_name("tiny random audio projector")
    writer.add_string("clip.projector_type", "ultravox")
    writer.add_bool("clip.has_vision_encoder", False)
    writer.add_bool("clip.has_audio_encoder", True)
    _add_encoder_metadata(writer, "audio", n_embd_out, EncoderShape(layers=1))
    writer.add_uint32("clip.audio.num_mel_bins", _N_MEL)
    writer.add_uint32("clip.audio.projector.stack_factor", AUDIO_STACK_FACTOR)


def _normal(rng: np.random.Generator, scale: float, *shape: int) -> np.ndarray:
    return rng.normal(0.0, scale, shape)


def _blocks(rng: np.random.Generator, prefix: str, shape: EncoderShape) -> _Tensors:
    """Pre-norm transformer blocks, numpy order (GGUF stores the reversed shape as ggml ne).

    The residual branches are small (out and down projections at 0.3 of unit scale), so each
    row stays mostly its own input: the content survives the encoder. No k bias (Whisper's
    graph asserts there is none; LLaVA's does not care).
    """
    d, f = shape.width, shape.ff
    tensors: _Tensors = {}
    for il in range(shape.layers):
        blk = f"{prefix}.blk.{il}"
        for part in ("attn_q", "attn_k", "attn_v"):
            tensors[f"{blk}.{part}.weight"] = _normal(rng, 1 / np.sqrt(d), d, d)
        tensors[f"{blk}.attn_q.bias"] = np.zeros(d)
        tensors[f"{blk}.attn_v.bias"] = np.zeros(d)
        tensors[f"{blk}.attn_out.weight"] = _normal(rng, 0.3 / np.sqrt(d), d, d)
        tensors[f"{blk}.attn_out.bias"] = np.zeros(d)
        for norm in ("ln1", "ln2"):
            tensors[f"{blk}.{norm}.weight"] = np.ones(d)
            tensors[f"{blk}.{norm}.bias"] = np.zeros(d)
        tensors[f"{blk}.ffn_up.weight"] = _normal(rng, 1 / np.sqrt(d), f, d)  # ne [d, f]
        tensors[f"{blk}.ffn_up.bias"] = np.zeros(f)
        tensors[f"{blk}.ffn_down.weight"] = _normal(rng, 0.3 / np.sqrt(f), d, f)  # ne [f, d]
        tensors[f"{blk}.ffn_down.bias"] = np.zeros(d)
    return tensors


def _vit_tensors(rng: np.random.Generator, shape: EncoderShape) -> _Tensors:
    """The vision encoder: the patch embedding is large next to the position embedding, so
    the image, not the token position, dominates every row (pre_ln then normalises it)."""
    d, patch = shape.width, shape.patch_size
    fan_in = 3 * patch * patch
    return {
        "v.patch_embd.weight": _normal(rng, 1 / np.sqrt(fan_in), d, 3, patch, patch),
        "v.patch_embd.bias": _normal(rng, 0.02, d),
        "v.position_embd.weight": _normal(rng, 0.1, shape.tokens, d),
        "v.pre_ln.weight": np.ones(d),
        "v.pre_ln.bias": np.zeros(d),
        **_blocks(rng, "v", shape),
    }


def _mlp_tensors(rng: np.random.Generator, n_embd_out: int, width: int) -> _Tensors:
    """LLaVA-1.5's projector: ``mm.2 @ gelu(mm.0 @ x + b0) + b2``, ``n_embd`` -> ``n_embd_out``.

    ``mm.0`` keeps unit-scale pre-activations; ``mm.2`` is scaled so a row's norm is about
    :data:`TARGET_ROW_NORM`. GELU's positive mean would add the same vector to every row
    whatever the image; ``b2`` cancels it (about), so the rows are mostly image content.
    """
    w0 = _normal(rng, 1 / np.sqrt(width), n_embd_out, width)
    w2 = _normal(rng, 1.0, n_embd_out, n_embd_out)
    gelu_mean, gelu_var = 0.2818, 0.3456  # of gelu(z), z ~ N(0, 1)
    w2 *= TARGET_ROW_NORM / np.sqrt(n_embd_out * n_embd_out * gelu_var)
    return {
        "mm.0.weight": w0,  # ne [n_embd, n_embd_out]
        "mm.0.bias": np.zeros(n_embd_out),
        "mm.2.weight": w2,  # ne [n_embd_out, n_embd_out]: ne[1] is the output width
        "mm.2.bias": -gelu_mean * w2.sum(axis=1),
    }


def _whisper_tensors(rng: np.random.Generator) -> _Tensors:
    """The Whisper encoder: conv kernels are ne [3, in, out]; conv biases are ne [1, out] so
    that they broadcast over time; the positions are small next to the conv output."""
    d = _N_EMBD
    return {
        "a.conv1d.1.weight": _normal(rng, 1 / np.sqrt(3 * _N_MEL), d, _N_MEL, 3),
        "a.conv1d.1.bias": np.zeros((d, 1)),
        "a.conv1d.2.weight": _normal(rng, 1 / np.sqrt(3 * d), d, d, 3),
        "a.conv1d.2.bias": np.zeros((d, 1)),
        "a.position_embd.weight": _normal(rng, 0.1, _AUDIO_POSITIONS, d),
        **_blocks(rng, "a", EncoderShape(layers=1)),
        "a.post_ln.weight": np.ones(d),
        "a.post_ln.bias": np.zeros(d),
    }


def _ultravox_tensors(rng: np.random.Generator, n_embd_out: int) -> _Tensors:
    """Ultravox's projector: ``mm2 @ rms(swiglu(mm1 @ rms(stacked frames)))``, no biases.

    The mid RMS norm fixes the scale, so ``mm.a.mlp.2`` alone sets the row norm to about
    :data:`TARGET_ROW_NORM`.
    """
    stacked, hidden = _N_EMBD * AUDIO_STACK_FACTOR, _AUDIO_MLP_HIDDEN
    w2_scale = TARGET_ROW_NORM / np.sqrt(hidden * n_embd_out)
    return {
        "mm.a.norm_pre.weight": np.ones(stacked),
        "mm.a.mlp.1.weight": _normal(rng, 1 / np.sqrt(stacked), 2 * hidden, stacked),
        "mm.a.norm_mid.weight": np.ones(hidden),
        "mm.a.mlp.2.weight": _normal(rng, w2_scale, n_embd_out, hidden),  # ne[1]: output width
    }
