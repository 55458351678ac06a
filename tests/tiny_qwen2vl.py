"""A tiny Qwen2-VL pair, built at test time: an M-RoPE text model and its vision projector.

Qwen2-VL (and 2.5-VL, 3-VL) position image rows in 2-D: llama.cpp's ``qwen2vl`` text
architecture rotates each query and key by four position sections (``rope.dimension_sections``,
M-RoPE), and mtmd gives an image of ``nx`` × ``ny`` merged patches the positions
``(t, y, x) = (p, p + row, p + col)`` from its first position ``p``, while the text after it
continues at ``p + max(nx, ny)``, not at ``p + nx * ny`` (``runner/engine.py`` keeps both).

* :func:`write_qwen2vl_model` writes the text model: ``ggufgen.write_tiny_model``'s llama
  tensors (``qwen2vl`` loads the same names; q/k/v biases are optional) under the ``qwen2vl``
  architecture, with ``qwen2vl.rope.dimension_sections`` (an INT32 array of four that must
  sum to at most half the head width: [2, 3, 3, 0] for heads of 16).
* :func:`write_qwen2vl_projector` writes a ``"qwen2vl_merger"`` projector (``clip.cpp``'s
  ``clip_graph_qwen2vl``): two patch convolutions without bias (``v.patch_embd.weight`` and
  ``.weight.1``, summed, as for a still image), pre-norm blocks with layer norms and every
  bias (the graph adds ``q/k/v`` biases unconditionally), and the merger MLP ``mm.0`` ->
  GELU -> ``mm.2`` over 2 × 2 patches (4 × the encoder width in). The output width is
  ``mm.2.bias``'s length and must equal the text model's embedding length.

What must stay true for the loaders (checked against the vendored sources):

* the clip keys are typed as ``tiny_projector.py`` says (UINT32 numbers, FLOAT32 epsilon and
  mean/std arrays of 3, BOOL flags); ``feed_forward_length`` differs from
  ``embedding_length`` (else the loader swaps ``ffn_up``/``ffn_down``, as for "mlp");
* mtmd resizes every image to multiples of ``patch_size * 2`` holding between 8 and 4096
  merged patches (``set_limit_image_tokens(8, 4096)``): with :data:`PATCH_SIZE` 4, a
  32 × 24 image is 4 × 3 merged patches, 12 rows, taking 4 positions;
* the encoder's head width (``embedding_length / head_count``) is a multiple of 4 (its own
  M-RoPE has four equal sections).

Weights are random with a fixed seed; the text model's attention is strong enough (unit-scale
projections, not ggufgen's 0.02) that what the image rows hold, and where they sit, changes
the greedy answer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ggufgen import write_gguf, write_tiny_model

__all__ = [
    "CHATML",
    "N_EMBD",
    "PATCH_SIZE",
    "image_rows",
    "write_qwen2vl_model",
    "write_qwen2vl_projector",
]

N_EMBD = 64
"""The text model's embedding length (and so the projector's output width)."""

PATCH_SIZE = 4
_MERGE = 2  # clip.cpp's default spatial merge for Qwen2-VL
_ENC_WIDTH = 32
_ENC_FF = 48
_ENC_HEADS = 4
_SECTIONS = [2, 3, 3, 0]
# The attention's weights, in units of 1/sqrt(n_embd): what a row attends to outweighs the
# row itself (else the greedy answer repeats the prompt's last token whatever came before).
_ATTENTION_SCALES = {"attn_q": 2.0, "attn_k": 2.0, "attn_v": 1.0, "attn_output": 3.0}

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def image_rows(width: int, height: int) -> tuple[int, int]:
    """(rows, positions) of an image whose sides are already multiples of 8 and within the
    limits: its merged patches, and the positions it takes (the longer side's count)."""
    side = PATCH_SIZE * _MERGE
    nx, ny = width // side, height // side
    return nx * ny, max(nx, ny)


def write_qwen2vl_model(path: Path, *, seed: int = 0, n_vocab: int = 400) -> Path:
    """Write the tiny ``qwen2vl`` text model (ChatML template); return ``path``.

    ggufgen's tensors at its 0.02 scale make attention all but uniform and its output tiny,
    so the attention projections are rewritten at unit scale (``1/sqrt(n_embd)``): the
    answer then depends on what earlier rows hold and on their positions."""
    path = write_tiny_model(
        path,
        arch="qwen2vl",
        chat_template=CHATML,
        context_length=1024,
        n_embd=N_EMBD,
        n_head=4,
        n_vocab=n_vocab,
        extra_kv={"qwen2vl.rope.dimension_sections": (_SECTIONS, GGUFValueType.INT32)},
        seed=seed,
    )
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    rng = np.random.default_rng(seed + 1)
    for tensor in reader.tensors:
        scale = next((s for part, s in _ATTENTION_SCALES.items() if part in tensor.name), 0.0)
        if scale:
            data = tensor.data
            data[...] = rng.normal(0.0, scale / np.sqrt(N_EMBD), data.shape).astype(np.float32)
        elif tensor.name == "token_embd.weight":
            tensor.data[...] *= 50.0  # rows of norm ~8, as the RMS norm makes them anyway
    del reader
    return path


def write_qwen2vl_projector(path: Path, *, n_embd_out: int = N_EMBD, seed: int = 0) -> Path:
    """Write the tiny ``"qwen2vl_merger"`` projector; return ``path``. Its rows have about
    the norm of the model's token rows, and depend strongly on the image's content."""
    rng = np.random.default_rng(seed)
    d, f, p = _ENC_WIDTH, _ENC_FF, PATCH_SIZE
    fan_in = 3 * p * p
    tensors: dict[str, np.ndarray] = {
        "v.patch_embd.weight": rng.normal(0, 1 / np.sqrt(fan_in), (d, 3, p, p)),
        "v.patch_embd.weight.1": rng.normal(0, 1 / np.sqrt(fan_in), (d, 3, p, p)),
    }
    blk = "v.blk.0"
    for part in ("attn_q", "attn_k", "attn_v"):
        tensors[f"{blk}.{part}.weight"] = rng.normal(0, 1 / np.sqrt(d), (d, d))
        tensors[f"{blk}.{part}.bias"] = np.zeros(d)
    tensors[f"{blk}.attn_out.weight"] = rng.normal(0, 0.3 / np.sqrt(d), (d, d))
    tensors[f"{blk}.attn_out.bias"] = np.zeros(d)
    for norm in ("ln1", "ln2"):
        tensors[f"{blk}.{norm}.weight"] = np.ones(d)
        tensors[f"{blk}.{norm}.bias"] = np.zeros(d)
    tensors[f"{blk}.ffn_up.weight"] = rng.normal(0, 1 / np.sqrt(d), (f, d))  # ne [d, f]
    tensors[f"{blk}.ffn_up.bias"] = np.zeros(f)
    tensors[f"{blk}.ffn_down.weight"] = rng.normal(0, 0.3 / np.sqrt(f), (d, f))  # ne [f, d]
    tensors[f"{blk}.ffn_down.bias"] = np.zeros(d)
    tensors["v.post_ln.weight"] = np.ones(d)
    tensors["v.post_ln.bias"] = np.zeros(d)
    hidden = 4 * d
    tensors["mm.0.weight"] = rng.normal(0, 1 / np.sqrt(4 * d), (hidden, 4 * d))
    tensors["mm.0.bias"] = np.zeros(hidden)
    tensors["mm.2.weight"] = rng.normal(0, 8.0 / np.sqrt(hidden * 0.35), (n_embd_out, hidden))
    tensors["mm.2.bias"] = np.zeros(n_embd_out)  # its length is the output width
    kv = {
        "general.architecture": "clip",
        "general.type": "mmproj",
        "general.name": "tiny random qwen2vl projector",
        "general.file_type": (0, GGUFValueType.UINT32),
        "clip.projector_type": "qwen2vl_merger",
        "clip.has_vision_encoder": True,
        "clip.has_audio_encoder": False,
        "clip.vision.embedding_length": (d, GGUFValueType.UINT32),
        "clip.vision.feed_forward_length": (f, GGUFValueType.UINT32),
        "clip.vision.block_count": (1, GGUFValueType.UINT32),
        "clip.vision.projection_dim": (n_embd_out, GGUFValueType.UINT32),
        "clip.vision.attention.head_count": (_ENC_HEADS, GGUFValueType.UINT32),
        "clip.vision.attention.layer_norm_epsilon": (1e-5, GGUFValueType.FLOAT32),
        "clip.vision.image_size": (64, GGUFValueType.UINT32),
        "clip.vision.patch_size": (p, GGUFValueType.UINT32),
        "clip.vision.image_mean": ([0.5, 0.5, 0.5], GGUFValueType.FLOAT32),
        "clip.vision.image_std": ([0.5, 0.5, 0.5], GGUFValueType.FLOAT32),
    }
    arrays = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in tensors.items()}
    return write_gguf(path, kv, arrays)
