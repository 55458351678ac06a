"""Multimodal projectors ("mmproj" GGUFs): what one is, what it can take in, and whether it
fits a model, read from its header alone (the tensor data is never read).

llama.cpp's multimodal library (``tools/mtmd``) loads a projector beside a model and refuses
the pair at load time when the projector's output width differs from the model's input
embedding width (``mtmd.cpp``: "mismatch between text model (n_embd = …) and mmproj
(n_embd = …)"). ``create`` asks :func:`output_widths` and :func:`input_width` first, so a
wrong pair is a 400 that names both numbers instead of a model that fails at every load
(docs/ollama-behaviour.md#create). What must stay true:

* :func:`output_widths` mirrors ``clip_n_mmproj_embd`` of ``tools/mtmd/clip.cpp``
  (llama-cpp-python 0.3.36): for each projector type, the dimension of the tensor that
  function reads. A type it does not know, or a tensor that is absent, gives no width, and
  then nothing is refused here (the worker's load reports llama.cpp's own error).
* ``clip.vision.projection_dim`` is deliberately not a fallback: in LLaVA-style projectors it
  is the CLIP encoder's own projection (768 for ViT-L/14 beside a 4096-wide Llama), not the
  width the language model receives, so trusting it would refuse good pairs.
"""

from __future__ import annotations

import re
from typing import Final

from pollama.gguf import GGUFInfo, TensorInfo

__all__ = ["can_hear", "can_see", "input_width", "is_projector", "output_widths"]

# projector type (``clip.projector_type``) -> (tensor, index into its ggml shape) read by
# clip_n_mmproj_embd. "mlp" and "qwen3vl_merger" are worked out in code below.
_OUTPUT_TENSOR: Final[dict[str, tuple[str, int]]] = {
    "ldp": ("mm.model.mb_block.1.block.2.1.bias", 0),
    "ldpv2": ("mm.model.peg.0.bias", 0),
    "resampler": ("resampler.proj.weight", 0),
    "minicpmv4_6": ("mm.down.weight", 1),
    "adapter": ("adapter.linear.dense_4h_to_h.weight", 1),
    "minimax_m3": ("mm.merger.fc2.bias", 0),
    "qwen2vl_merger": ("mm.2.bias", 0),
    "qwen2.5vl_merger": ("mm.2.bias", 0),
    "exaone4_5": ("mm.2.bias", 0),
    "youtuvl": ("mm.2.bias", 0),
    "ling3vl": ("mm.2.bias", 0),
    "janus_pro": ("mm.1.bias", 0),
    "gemma3": ("mm.input_projection.weight", 0),
    "gemma3nv": ("mm.input_projection.weight", 0),
    "gemma4v": ("mm.input_projection.weight", 1),
    "gemma4uv": ("mm.input_projection.weight", 1),
    "gemma4a": ("mm.a.input_projection.weight", 1),
    "gemma4ua": ("mm.a.input_projection.weight", 1),
    "glm4v": ("mm.down.weight", 1),
    "glm5v": ("mm.down.weight", 1),
    "cogvlm": ("mm.down.weight", 1),
    "internvl": ("mm.model.mlp.3.weight", 1),
    "nemotron_v2_vl": ("mm.model.mlp.3.weight", 1),
    "dots3note_a": ("mm.a.mlp.3.weight", 1),
    "meralion": ("mm.a.mlp.3.weight", 1),
    "qwen2a": ("mm.a.fc.weight", 1),
    "lfm2a": ("a.position_embd.weight", 0),
    **dict.fromkeys(
        ("step3vl", "llama4", "hunyuanvl", "idefics3", "deepseekocr", "deepseekocr2"),
        ("mm.model.fc.weight", 1),
    ),
    **dict.fromkeys(
        ("phi4", "pixtral", "lightonocr", "dots_ocr", "dots3note_v", "muse-glimmer", "mimovl",
         "lfm2", "kimivl", "paddleocr", "kimik25", "yasa2", "deepseek4v"),
        ("mm.2.weight", 1),
    ),
    **dict.fromkeys(
        ("ultravox", "voxtral", "musicflamingo", "qwen3a", "glma", "mimo_audio", "parakeet"),
        ("mm.a.mlp.2.weight", 1),
    ),
}  # fmt: skip

_DEEPSTACK = re.compile(r"v\.deepstack\.\d+\.fc1\.weight")


def _flag(info: GGUFInfo, key: str) -> bool | None:
    value = info.kv.get(key)
    return value if isinstance(value, bool) else None


def is_projector(info: GGUFInfo) -> bool:
    """A projector, not a model: ``general.type`` says so, or it has vision blocks but no
    text blocks (Ollama's rule, so both classify the same file alike), or it is a ``clip``
    file without text blocks."""
    if info.general_type in ("projector", "mmproj"):
        return True
    arch = info.architecture or ""
    block_count = info.kv.get(f"{arch}.block_count") or 0
    vision_blocks = info.kv.get(f"{arch}.vision.block_count") or 0
    return bool(not block_count and vision_blocks) or (arch == "clip" and not block_count)


def can_see(info: GGUFInfo) -> bool:
    """The projector has an image encoder: ``clip.has_vision_encoder`` (what llama.cpp
    reads), or, in older files without that key, vision blocks or an image size."""
    flag = _flag(info, "clip.has_vision_encoder")
    if flag is not None:
        return flag
    arch = info.architecture or "clip"
    keys = ("clip.vision.block_count", "clip.vision.image_size", f"{arch}.vision.block_count")
    return any(key in info.kv for key in keys)


def can_hear(info: GGUFInfo) -> bool:
    """The projector has an audio encoder (``clip.has_audio_encoder``)."""
    return bool(_flag(info, "clip.has_audio_encoder"))


def input_width(info: GGUFInfo) -> int | None:
    """The embedding width a model takes in (llama.cpp's ``n_embd_inp``): its embedding
    length, times one plus its deepstack layers (Qwen3-VL feeds those beside the main
    path). None if the header does not say."""
    n_embd = info.embedding_length
    if not n_embd:
        return None
    arch = info.architecture
    deepstack = info.kv.get(f"{arch}.n_deepstack_layers")
    if isinstance(deepstack, int) and not isinstance(deepstack, bool) and deepstack > 0:
        return n_embd * (1 + deepstack)
    return n_embd


def _projector_types(info: GGUFInfo) -> dict[str, str]:
    """The projector type of each modality llama.cpp would load from this file, as
    ``clip_model_loader`` picks them: ``clip.projector_type`` for every modality, else the
    per-modality key. A file that says nothing of its encoders is taken as an image one."""
    seeing, hearing = _flag(info, "clip.has_vision_encoder"), can_hear(info)
    modalities = [m for m, on in (("vision", seeing), ("audio", hearing)) if on]
    if seeing is None and not hearing:
        modalities = ["vision"]
    found: dict[str, str] = {}
    for modality in modalities:
        value = info.kv.get("clip.projector_type") or info.kv.get(f"clip.{modality}.projector_type")
        if isinstance(value, str) and value:
            if value == "qwen2.5o":  # one type for two encoders, as clip.cpp splits it
                value = "qwen2.5vl_merger" if modality == "vision" else "qwen2a"
            found[modality] = value
    return found


def _dim(tensors: dict[str, TensorInfo], name: str, index: int) -> int | None:
    tensor = tensors.get(name)
    if tensor is None or len(tensor.shape) <= index:
        return None
    return tensor.shape[index] or None


def _width(kind: str, tensors: dict[str, TensorInfo]) -> int | None:
    if kind == "mlp":  # with an mm.3 it is Yi's "mlp_norm": its last bias gives the width
        if "mm.3.weight" in tensors:
            return _dim(tensors, "mm.3.bias", 0)
        return _dim(tensors, "mm.2.weight", 1)
    if kind == "qwen3vl_merger":
        width = _dim(tensors, "mm.2.bias", 0)
        deepstack = sum(1 for name in tensors if _DEEPSTACK.fullmatch(name))
        return width * (1 + deepstack) if width else None
    where = _OUTPUT_TENSOR.get(kind)
    return _dim(tensors, *where) if where else None


def output_widths(info: GGUFInfo) -> dict[str, int]:
    """The width of the embeddings the projector gives the model, per modality
    (``vision``, ``audio``), as llama.cpp's ``clip_n_mmproj_embd`` computes it; a modality
    whose width cannot be worked out from the header is left out."""
    tensors = {tensor.name: tensor for tensor in info.tensors}
    widths: dict[str, int] = {}
    for modality, kind in _projector_types(info).items():
        width = _width(kind, tensors)
        if width:
            widths[modality] = width
    return widths
