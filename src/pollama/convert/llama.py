"""Llama: ``LlamaForCausalLM`` folders with a byte-level BPE tokenizer (SmolLM, SmolLM2,
Llama 3.x and their fine-tunes).

Follows llama.cpp's ``conversion/llama.py`` (``LlamaModel``) and Ollama's
``convert/convert_llama.go``: the ``llama`` architecture's keys, llama.cpp's tensor names,
and the query and key projections permuted from Hugging Face's rotary layout (the two
halves of each head) back to the interleaved pairs llama.cpp's RoPE expects. Tied
embeddings need nothing (llama.cpp uses ``token_embd`` when there is no ``output``); Llama
3.1's ``llama3`` RoPE scaling becomes the ``rope_freqs`` tensor, linear scaling its two
keys; any other scaling is refused rather than converted wrong.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from pollama.convert.source import HFFolder
from pollama.convert.tensors import Layout, hparam, map_tensors
from pollama.convert.vocab import bpe_vocab
from pollama.convert.writer import ConvertPlan, OutTensor
from pollama.errors import ConversionError

__all__ = ["ARCHITECTURES", "permute", "plan_llama"]

ARCHITECTURES = ("LlamaForCausalLM",)


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute``: each head's rows from (first half, second half) to
    interleaved pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _permute_heads(head_dim: int) -> Any:
    """:func:`permute` over a block of whole heads (the writer's blocks keep heads whole)."""
    return lambda block: permute(block, block.shape[0] // head_dim)


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    hp: dict[str, Any] = {
        "layers": hparam(config, "num_hidden_layers", "n_layers"),
        "embd": hparam(config, "hidden_size"),
        "ff": hparam(config, "intermediate_size"),
        "heads": hparam(config, "num_attention_heads"),
        "context": hparam(config, "max_position_embeddings", default=2048),
        "eps": hparam(config, "rms_norm_eps", default=1e-6, kind=float),
        "theta": hparam(config, "rope_theta", default=10000.0, kind=float),
    }
    hp["kv_heads"] = hparam(config, "num_key_value_heads", default=hp["heads"])
    if "head_dim" not in config and hp["embd"] % hp["heads"]:
        raise ConversionError("'config.json' hidden_size is not a multiple of the head count")
    hp["head_dim"] = hparam(config, "head_dim", default=hp["embd"] // hp["heads"])
    if hp["heads"] % hp["kv_heads"] or hp["head_dim"] % 2:
        raise ConversionError(
            "'config.json' has a head count that is not a multiple of the key-value head "
            "count, or an odd head size"
        )
    return hp


def _layout(hp: dict[str, Any]) -> Layout:
    embd, ff, hd = hp["embd"], hp["ff"], hp["head_dim"]
    q_rows, kv_rows = hp["heads"] * hd, hp["kv_heads"] * hd
    layout = Layout()
    layout.add("token_embd.weight", hp["vocab"], embd)
    layout.add("output.weight", hp["vocab"], embd, optional=True)
    layout.add("output_norm.weight", embd)
    for i in range(hp["layers"]):
        for name, rows, cols in (("attn_q", q_rows, embd), ("attn_k", kv_rows, embd),
                                 ("attn_v", kv_rows, embd), ("attn_output", embd, q_rows),
                                 ("ffn_gate", ff, embd), ("ffn_up", ff, embd),
                                 ("ffn_down", embd, ff)):  # fmt: skip
            layout.add(f"blk.{i}.{name}.weight", rows, cols)
            layout.add(f"blk.{i}.{name}.bias", rows, optional=True)
        layout.add(f"blk.{i}.attn_norm.weight", embd)
        layout.add(f"blk.{i}.ffn_norm.weight", embd)
        for part in ("weight", "bias"):
            for name in ("attn_q", "attn_k"):
                layout.transforms[f"blk.{i}.{name}.{part}"] = (_permute_heads(hd), hd)
    return layout


def _rope(
    config: dict[str, Any], hp: dict[str, Any]
) -> tuple[list[tuple[str, Any]], list[OutTensor]]:
    """The RoPE scaling keys, or the ``rope_freqs`` tensor of Llama 3.1's scaling
    (``LlamaModel.generate_extra_tensors``)."""
    scaling = config.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ConversionError("'config.json' rope_scaling is not an object")
    kind = str(scaling.get("rope_type", scaling.get("type", "default"))).lower()
    if kind == "default":
        return [], []
    factor = scaling.get("factor")
    if kind == "linear" and isinstance(factor, int | float) and factor > 0:
        return [("llama.rope.scaling.type", "linear"),
                ("llama.rope.scaling.factor", float(factor))], []  # fmt: skip
    if kind != "llama3":
        raise ConversionError(f"'config.json' has a RoPE scaling pollama cannot convert: {kind}")
    dim = hp["head_dim"]
    freqs = 1.0 / (hp["theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    data = np.asarray(factors, dtype=np.float32)
    return [], [OutTensor("rope_freqs.weight", data.shape, "F32", data=data)]


def _rename(tensor_map: gguf.TensorNameMap) -> Any:
    def rename(name: str) -> str | None:
        if name.endswith(".rotary_emb.inv_freq"):
            return None
        return tensor_map.get_name(name, try_suffixes=(".weight", ".bias")) or name

    return rename


def plan_llama(folder: HFFolder, config: dict[str, Any], architecture: str) -> ConvertPlan:
    del architecture  # one architecture so far
    hp = _hparams(config)
    vocab = bpe_vocab(folder, config)
    hp["vocab"] = len(vocab.tokens)
    rope_kv, extra = _rope(config, hp)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["layers"])
    tensors = map_tensors(folder.tensors(), _rename(tensor_map), _layout(hp)) + extra
    kv: list[tuple[str, Any]] = [
        ("llama.block_count", hp["layers"]),
        ("llama.context_length", hp["context"]),
        ("llama.embedding_length", hp["embd"]),
        ("llama.feed_forward_length", hp["ff"]),
        ("llama.attention.head_count", hp["heads"]),
        ("llama.attention.head_count_kv", hp["kv_heads"]),
        ("llama.rope.freq_base", hp["theta"]),
        ("llama.attention.layer_norm_rms_epsilon", hp["eps"]),
        ("llama.vocab_size", hp["vocab"]),
        ("llama.rope.dimension_count", hp["head_dim"]),
    ]
    if "head_dim" in config:
        kv += [("llama.attention.key_length", hp["head_dim"]),
               ("llama.attention.value_length", hp["head_dim"])]  # fmt: skip
    return ConvertPlan("llama", kv + rope_kv + vocab.kv(), tensors)
