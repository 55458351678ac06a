"""BERT: ``BertModel``, ``BertForMaskedLM`` and ``BertForSequenceClassification`` folders
(sentence-transformers embedding models such as all-MiniLM, BGE and E5; cross-encoders).

Follows llama.cpp's ``conversion/bert.py`` (the ``bert`` architecture, keys and tensor names
its loader reads) and Ollama's ``convert/convert_bert.go`` (pooling from the
sentence-transformers ``modules.json``, ``bert.normalize_embeddings``), with three choices of
our own, each to make the GGUF compute what the Hugging Face model computes:

* the context length is the sentence-transformers window (``sentence_bert_config.json``
  ``max_seq_length``) when it is shorter than ``max_position_embeddings``, with the position
  embeddings cut to it, so a longer text is truncated (or refused) where sentence-transformers
  truncates it, not embedded with positions the model was never trained on;
* a ``*ForSequenceClassification`` model is written with pooling type **rank** and its whole
  head, the pooler (``cls``: dense and tanh over the CLS token) then the classifier
  (``cls.output``), which is what transformers computes (llama.cpp's converter drops the
  pooler); its labels are ``bert.classifier.output_labels``, one per classifier row;
* a ``BertModel`` without a pooling configuration gets CLS pooling (BERT's own sentence
  representation) rather than none, which would make it a generation model to the runner.
"""

from __future__ import annotations

from typing import Any

import gguf

from pollama.convert.source import HFFolder
from pollama.convert.tensors import Layout, hparam, map_tensors
from pollama.convert.vocab import wordpiece_vocab
from pollama.convert.writer import ConvertPlan
from pollama.errors import ConversionError

__all__ = ["ARCHITECTURES", "plan_bert"]

ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")

MEAN, CLS, LAST, RANK = 1, 2, 3, 4  # gguf.PoolingType
_POOLING_MODES = {"mean": MEAN, "cls": CLS, "lasttoken": LAST}
_GELU = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_SKIPPED = ("embeddings.position_ids", "cls.predictions.", "cls.seq_relationship.")


def _pooling_config(folder: HFFolder) -> tuple[str | None, bool]:
    """The sentence-transformers pooling config's file name, and whether a Normalize module
    follows (``modules.json``; ``1_Pooling/config.json`` alone where there is none)."""
    modules = folder.json("modules.json")
    if modules is None:
        found = "1_Pooling/config.json"
        return (found if folder.has(found) else None), False
    if not isinstance(modules, list):
        raise ConversionError("'modules.json' is not a JSON list")
    path, normalize = None, False
    for module in modules:
        kind = module.get("type", "") if isinstance(module, dict) else ""
        if isinstance(kind, str) and kind.endswith("Pooling") and path is None:
            path = module.get("path")
            if not isinstance(path, str):
                raise ConversionError("'modules.json' names a Pooling module without a path")
        elif isinstance(kind, str) and kind.endswith("Normalize"):
            normalize = True
    if path is None:
        return None, normalize
    name = f"{path.strip('/')}/config.json" if path.strip("/") else "config.json"
    if not folder.has(name):
        raise ConversionError(f"the model folder has no '{name}' (modules.json names it)")
    return name, normalize


def _pooling(folder: HFFolder) -> tuple[int, bool]:
    name, normalize = _pooling_config(folder)
    if name is None:
        return CLS, normalize
    config = folder.json_object(name)
    if config.get("pooling_mode_mean_tokens"):
        return MEAN, normalize
    if config.get("pooling_mode_cls_token"):
        return CLS, normalize
    if config.get("pooling_mode_lasttoken"):
        return LAST, normalize
    if config.get("pooling_mode") in _POOLING_MODES:
        return _POOLING_MODES[config["pooling_mode"]], normalize
    raise ConversionError(
        f"'{name}' asks for a pooling llama.cpp does not have: only mean, CLS and last-token"
    )


def _window(folder: HFFolder, positions: int) -> int:
    """The context length: the sentence-transformers window when shorter (module docstring)."""
    config = folder.json_object("sentence_bert_config.json")
    window = config.get("max_seq_length")
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < positions:
        return window
    return positions


def _rename(classify: bool, tensor_map: gguf.TensorNameMap) -> Any:
    def rename(name: str) -> str | None:
        name = name.removeprefix("bert.")
        if name.endswith(".gamma"):
            name = name[: -len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[: -len(".beta")] + ".bias"
        if name.startswith(_SKIPPED):
            return None
        suffix = name[name.rfind(".") :]
        if name.startswith("pooler.dense."):
            return "cls" + suffix if classify else None
        if name.startswith("classifier."):
            return "cls.output" + suffix if classify else name
        return tensor_map.get_name(name, try_suffixes=(".weight", ".bias")) or name

    return rename


def _layout(hp: dict[str, int], window: int, labels: int) -> Layout:
    embd, ff = hp["embd"], hp["ff"]
    layout = Layout()
    layout.add("token_embd.weight", hp["vocab"], embd)
    layout.add("position_embd.weight", hp["positions"], embd)
    layout.rows["position_embd.weight"] = window
    layout.add("token_types.weight", hp["types"], embd)
    for part in ("weight", "bias"):
        layout.add(f"token_embd_norm.{part}", embd)
    for i in range(hp["layers"]):
        for name, rows, cols in (("attn_q", embd, embd), ("attn_k", embd, embd),
                                 ("attn_v", embd, embd), ("attn_output", embd, embd),
                                 ("ffn_up", ff, embd), ("ffn_down", embd, ff)):  # fmt: skip
            layout.add(f"blk.{i}.{name}.weight", rows, cols)
            layout.add(f"blk.{i}.{name}.bias", rows, optional=True)
        for norm in ("attn_output_norm", "layer_output_norm"):
            layout.add(f"blk.{i}.{norm}.weight", embd)
            layout.add(f"blk.{i}.{norm}.bias", embd)
    if labels:
        layout.add("cls.weight", embd, embd)
        layout.add("cls.bias", embd)
        layout.add("cls.output.weight", labels, embd)
        layout.add("cls.output.bias", labels, optional=True)
    return layout


def _hparams(config: dict[str, Any]) -> dict[str, int]:
    act = config.get("hidden_act", "gelu")
    if act not in _GELU:
        raise ConversionError(f"'config.json' hidden_act {act!r}: llama.cpp's BERT uses GELU")
    position = config.get("position_embedding_type", "absolute")
    if position not in ("absolute", None):
        raise ConversionError(
            f"'config.json' position_embedding_type {position!r}: only absolute positions"
        )
    hp = {
        "layers": hparam(config, "num_hidden_layers", "n_layers", "n_layer"),
        "embd": hparam(config, "hidden_size"),
        "ff": hparam(config, "intermediate_size"),
        "heads": hparam(config, "num_attention_heads"),
        "positions": hparam(config, "max_position_embeddings"),
        "types": hparam(config, "type_vocab_size", default=1),
    }
    if hp["embd"] % hp["heads"]:
        raise ConversionError("'config.json' hidden_size is not a multiple of the head count")
    return hp


def _labels(config: dict[str, Any], rows: int) -> list[str]:
    """One label per classifier row: id2label's, else LABEL_<i>."""
    id2label = config.get("id2label")
    labels = [f"LABEL_{i}" for i in range(rows)]
    if isinstance(id2label, dict):
        for key, value in id2label.items():
            if str(key).isdigit() and int(key) < rows and isinstance(value, str):
                labels[int(key)] = value
    return labels


def plan_bert(folder: HFFolder, config: dict[str, Any], architecture: str) -> ConvertPlan:
    hp = _hparams(config)
    vocab = wordpiece_vocab(folder, config)
    hp["vocab"] = len(vocab.tokens)
    vocab.token_type_count = hp["types"]
    sources = folder.tensors()
    classify = architecture == "BertForSequenceClassification"
    head = sources.get("classifier.weight")
    if classify and (head is None or len(head.shape) != 2):
        raise ConversionError("a BertForSequenceClassification model needs 'classifier.weight'")
    labels = head.shape[0] if classify and head is not None else 0
    window = _window(folder, hp["positions"])
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, hp["layers"])
    tensors = map_tensors(sources, _rename(classify, tensor_map), _layout(hp, window, labels))
    pooling, normalize = (RANK, False) if classify else _pooling(folder)
    eps = hparam(config, "layer_norm_eps", "layer_norm_epsilon", default=1e-12, kind=float)
    kv: list[tuple[str, Any]] = [
        ("bert.block_count", hp["layers"]),
        ("bert.context_length", window),
        ("bert.embedding_length", hp["embd"]),
        ("bert.feed_forward_length", hp["ff"]),
        ("bert.attention.head_count", hp["heads"]),
        ("bert.attention.layer_norm_epsilon", eps),
        ("bert.attention.causal", False),
        ("bert.pooling_type", pooling),
        ("bert.normalize_embeddings", normalize),
    ]
    if classify:
        kv.append(("bert.classifier.output_labels", _labels(config, labels)))
    return ConvertPlan("bert", kv + vocab.kv(), tensors)
