"""Hugging Face model folders written by the tests (safetensors, config.json, tokenizer.json),
and numpy references of what those models compute.

``write_safetensors`` writes the format from its specification with numpy (F32, F16, BF16),
independently of the converter's reader. ``llama_folder_from_gguf`` turns a llama GGUF (the
default model's SmolLM2) back into the folder Hugging Face would publish: weights dequantized,
query and key projections un-permuted to the rotary layout, a ``tokenizer.json`` built from
the GGUF's vocabulary and merges. ``tiny_bert_folder`` and ``tiny_llama_folder`` make small
random models for the unit tests. ``wordpiece`` and ``bert_forward`` are a plain numpy BERT
(tokenizer, embeddings, attention, GELU feed-forward) to compare llama.cpp's vectors with.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray],
                      dtype: str = "F32", dtypes: dict[str, str] | None = None) -> None:
    """The safetensors format: u64 header length, JSON header, data (8-byte aligned header)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        kind = (dtypes or {}).get(name, dtype if array.dtype.kind == "f" else "I64")
        if kind == "F32":
            data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        elif kind == "F16":
            data = np.ascontiguousarray(array, dtype="<f2").tobytes()
        elif kind == "BF16":
            data = to_bf16_bits(np.asarray(array)).astype("<u2").tobytes()
        else:
            data = np.ascontiguousarray(array, dtype="<i8").tobytes()
        header[name] = {"dtype": kind, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for data in blobs:
            f.write(data)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        data = raw[8 + n + begin:8 + n + end]
        if entry["dtype"] == "BF16":
            values = from_bf16_bits(np.frombuffer(data, dtype="<u2"))
        else:
            kind = {"F32": "<f4", "F16": "<f2", "I64": "<i8"}[entry["dtype"]]
            values = np.frombuffer(data, dtype=kind)
        out[name] = values.reshape(entry["shape"])
    return out


# -- a llama folder from a GGUF ---------------------------------------------------------------

_LLAMA_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's ``LlamaModel.permute``: interleaved pairs back to halves."""
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def hf_llama_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LLAMA_NAMES[parts[2]]}.{parts[3]}"
    return f"{_LLAMA_NAMES[parts[0]]}.{parts[1]}"


def llama_folder_from_gguf(gguf_path: Path, folder: Path) -> dict[str, Any]:
    """Write ``folder`` as the Hugging Face release of a llama GGUF; returns its config."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    kv = {name: field.contents() for name, field in reader.fields.items()}
    heads, kv_heads = kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        values = values.reshape([int(n) for n in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            values = unpermute(values, heads)
        elif t.name.endswith("attn_k.weight"):
            values = unpermute(values, kv_heads)
        name = hf_llama_name(t.name)
        tensors[name] = values
        dtypes[name] = "F32" if values.ndim == 1 else "F16"
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", tensors, dtypes=dtypes)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": kv["llama.embedding_length"],
        "intermediate_size": kv["llama.feed_forward_length"],
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": kv["llama.block_count"],
        "max_position_embeddings": kv["llama.context_length"],
        "rms_norm_eps": kv["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": kv["llama.rope.freq_base"], "vocab_size": len(kv["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": kv["tokenizer.ggml.bos_token_id"],
        "eos_token_id": kv["tokenizer.ggml.eos_token_id"],
        "hidden_act": "silu", "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _bpe_tokenizer_files(kv, folder)
    return config


def _bpe_tokenizer_files(kv: dict[str, Any], folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json as SmolLM2's release has them."""
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)) if kind == 3]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": list(kv["tokenizer.ggml.merges"])},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    name = {key: tokens[kv[f"tokenizer.ggml.{key}_token_id"]] for key in ("bos", "eos")}
    config = {
        "add_prefix_space": False, "bos_token": name["bos"], "eos_token": name["eos"],
        "unk_token": tokens[kv["tokenizer.ggml.unknown_token_id"]],
        "pad_token": tokens[kv["tokenizer.ggml.padding_token_id"]],
        "model_max_length": kv["llama.context_length"], "tokenizer_class": "GPT2Tokenizer",
        "chat_template": kv.get("tokenizer.chat_template"),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# -- tiny random folders ----------------------------------------------------------------------

BERT_WORDS = ("the", "cat", "sat", "on", "mat", "dog", "##s", "##ing", "run", "hello", "world",
              "!", ".", ",", "a", "b", "c")


def bert_weights(rng: np.random.Generator, *, hidden: int = 32, layers: int = 2, ff: int = 64,
                 vocab: int = 40, positions: int = 64, types: int = 2,
                 prefix: str = "") -> dict[str, np.ndarray]:
    """BertModel's tensors with Hugging Face's names (``prefix`` "bert." as in
    ``*ForSequenceClassification``)."""
    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    out = {
        "embeddings.word_embeddings.weight": w(vocab, hidden),
        "embeddings.position_embeddings.weight": w(positions, hidden),
        "embeddings.token_type_embeddings.weight": w(types, hidden),
        "embeddings.LayerNorm.weight": 1 + w(hidden), "embeddings.LayerNorm.bias": w(hidden),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            out[p + name + ".weight"], out[p + name + ".bias"] = w(hidden, hidden), w(hidden)
        out[p + "intermediate.dense.weight"] = w(ff, hidden)
        out[p + "intermediate.dense.bias"] = w(ff)
        out[p + "output.dense.weight"], out[p + "output.dense.bias"] = w(hidden, ff), w(hidden)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[p + norm + ".weight"], out[p + norm + ".bias"] = 1 + w(hidden), w(hidden)
    out["pooler.dense.weight"], out["pooler.dense.bias"] = w(hidden, hidden), w(hidden)
    return {prefix + name: value for name, value in out.items()}


def bert_vocab(size: int = 40) -> list[str]:
    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    return base + [f"[unused{i}]" for i in range(size - len(base))]


def bert_tokenizer_json(vocab: list[str]) -> dict[str, Any]:
    specials = [{"id": i, "content": t, "special": True, "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False}
                for i, t in enumerate(vocab) if t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    return {
        "version": "1.0", "added_tokens": specials,
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": {t: i for i, t in enumerate(vocab)}},
    }


def tiny_bert_folder(folder: Path, *, seed: int = 0, architecture: str = "BertModel",
                     tokenizer: str = "json", pooling: str | None = "mean",
                     window: int | None = None, labels: int = 0, dtype: str = "F32",
                     **sizes: int) -> dict[str, np.ndarray]:
    """A small random BERT folder as sentence-transformers (or a cross-encoder) publishes
    one; returns its tensors by name."""
    rng = np.random.default_rng(seed)
    classify = architecture == "BertForSequenceClassification"
    weights = bert_weights(rng, prefix="bert." if classify else "", **sizes)
    hidden = sizes.get("hidden", 32)
    if classify:
        head = rng.standard_normal((labels or 1, hidden)) * 0.2
        weights["classifier.weight"] = head.astype(np.float32)
        weights["classifier.bias"] = (rng.standard_normal(labels or 1) * 0.2).astype(np.float32)
    weights["embeddings.position_ids" if not classify else "bert.embeddings.position_ids"] = (
        np.arange(sizes.get("positions", 64), dtype=np.int64)[None, :])
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", weights, dtype=dtype)
    config = {
        "architectures": [architecture], "model_type": "bert", "hidden_act": "gelu",
        "hidden_size": hidden, "intermediate_size": sizes.get("ff", 64),
        "num_attention_heads": 4, "num_hidden_layers": sizes.get("layers", 2),
        "max_position_embeddings": sizes.get("positions", 64), "layer_norm_eps": 1e-12,
        "type_vocab_size": sizes.get("types", 2), "vocab_size": sizes.get("vocab", 40),
        "pad_token_id": 0, "position_embedding_type": "absolute",
    }
    if classify:
        config["id2label"] = {str(i): f"class{i}" for i in range(labels or 1)}
    (folder / "config.json").write_text(json.dumps(config))
    vocab = bert_vocab(sizes.get("vocab", 40))
    if tokenizer == "json":
        (folder / "tokenizer.json").write_text(json.dumps(bert_tokenizer_json(vocab)))
    elif tokenizer == "vocab.txt":
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "cls_token": "[CLS]", "mask_token": "[MASK]", "tokenizer_class": "BertTokenizer"}))
    if pooling is not None:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "",
             "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}]))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        key = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
               "max": "pooling_mode_max_tokens"}.get(pooling, f"pooling_mode_{pooling}")
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden, key: True}))
    if window is not None:
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": window}))
    return weights


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table (the ``Ġ`` for a space)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


LLAMA_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def bpe_tokenizer_json(pre: dict[str, Any] | None = None) -> dict[str, Any]:
    """A byte-level BPE tokenizer: three special tokens, the 256 byte characters, and a few
    merges (``Ġthe``, ``he``…), SmolLM's pre-tokenizer unless ``pre`` says otherwise."""
    table = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(LLAMA_SPECIALS)}
    for b in range(256):
        vocab[table[b]] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    added = [{"id": i, "content": t, "special": True, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False} for i, t in enumerate(LLAMA_SPECIALS)]
    return {
        "version": "1.0", "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre or {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False,
                  "byte_fallback": False, "vocab": vocab,
                  "merges": [f"{a} {b}" for a, b in merges]},
    }


def tiny_llama_folder(folder: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                      heads: int = 4, kv_heads: int = 2, ff: int = 96, tied: bool = True,
                      dtype: str = "F32", config_extra: dict[str, Any] | None = None,
                      tokenizer: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """A small random LlamaForCausalLM folder with a byte-level BPE tokenizer."""
    rng = np.random.default_rng(seed)
    tok = tokenizer or bpe_tokenizer_json()
    vocab = len(tok["model"]["vocab"])
    hd = hidden // heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": 1 + w(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": w(heads * hd, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * hd),
            p + "mlp.gate_proj.weight": w(ff, hidden), p + "mlp.up_proj.weight": w(ff, hidden),
            p + "mlp.down_proj.weight": w(hidden, ff),
            p + "input_layernorm.weight": 1 + w(hidden),
            p + "post_attention_layernorm.weight": 1 + w(hidden),
            p + "self_attn.rotary_emb.inv_freq": w(hd // 2),
        })
    if not tied:
        weights["lm_head.weight"] = w(vocab, hidden)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", weights, dtype=dtype)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ff, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "vocab_size": vocab, "tie_word_embeddings": tied,
        "bos_token_id": 1, "eos_token_id": 2, **(config_extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "<|im_end|>\n{% endfor %}"}))
    return weights


# -- a numpy BERT ------------------------------------------------------------------------------

def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _bert_words(text: str) -> list[str]:
    """transformers' BertNormalizer (clean text, CJK characters apart, lowercase, accents
    stripped) and BertPreTokenizer (whitespace and punctuation)."""
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp in (0, 0xFFFD) or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            cleaned.append(" ")
        elif _is_cjk(cp):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(ch)
    lowered = unicodedata.normalize("NFD", "".join(cleaned).lower())
    lowered = "".join(c for c in lowered if unicodedata.category(c) != "Mn")
    words: list[str] = []
    for chunk in lowered.split():
        current = ""
        for ch in chunk:
            if _is_punct(ch):
                words += [current, ch] if current else [ch]
                current = ""
            else:
                current += ch
        if current:
            words.append(current)
    return words


def _piece(word: str, start: int, end: int) -> str:
    return word[start:end] if start == 0 else "##" + word[start:end]


def wordpiece(text: str, vocab: dict[str, int], window: int = 0) -> list[int]:
    """[CLS] + greedy longest-match-first WordPiece + [SEP], as transformers' fast BERT
    tokenizer; ``window`` truncates as it does (the [SEP] kept)."""
    ids = [vocab["[CLS]"]]
    for word in _bert_words(text):
        if len(word) > 100:
            ids.append(vocab["[UNK]"])
            continue
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and _piece(word, start, end) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[_piece(word, start, end)])
            start = end
        ids += pieces
    if window and len(ids) + 1 > window:
        ids = ids[:window - 1]
    return ids + [vocab["[SEP]"]]


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz and Stegun 7.1.26)."""
    sign = np.sign(x)
    x = np.abs(x)
    t = 1 / (1 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                         + t * 1.061405429))))
    return sign * (1 - poly * np.exp(-x * x))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def bert_forward(ids: list[int], weights: dict[str, np.ndarray], config: dict[str, Any],
                 prefix: str = "") -> np.ndarray:
    """The last hidden states of a BERT (transformers' BertModel, float64): embeddings and
    LayerNorm, then per layer self-attention, LayerNorm, GELU feed-forward, LayerNorm."""
    W = {k.removeprefix(prefix): v.astype(np.float64) for k, v in weights.items()
         if k.startswith(prefix) and v.dtype.kind == "f"}
    heads, eps = config["num_attention_heads"], config["layer_norm_eps"]
    x = (W["embeddings.word_embeddings.weight"][ids]
         + W["embeddings.position_embeddings.weight"][: len(ids)]
         + W["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    n, d = x.shape
    hd = d // heads
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def linear(name: str, h: np.ndarray, p: str = p) -> np.ndarray:
            return h @ W[p + name + ".weight"].T + W[p + name + ".bias"]

        q, k, v = (linear(f"attention.self.{m}", x).reshape(n, heads, hd).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        context = (scores @ v).transpose(1, 0, 2).reshape(n, d)
        x = _layer_norm(linear("attention.output.dense", context) + x,
                        W[p + "attention.output.LayerNorm.weight"],
                        W[p + "attention.output.LayerNorm.bias"], eps)
        h = linear("intermediate.dense", x)
        h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))
        x = _layer_norm(linear("output.dense", h) + x, W[p + "output.LayerNorm.weight"],
                        W[p + "output.LayerNorm.bias"], eps)
    return x


def mean_pooled(hidden: np.ndarray) -> np.ndarray:
    vector = hidden.mean(0)
    return vector / np.linalg.norm(vector)


def cross_encoder_folder(minilm: Path, folder: Path, *, seed: int = 18) -> dict[str, np.ndarray]:
    """A BERT cross-encoder made from all-MiniLM's weights (as ``bert.*``, its pooler kept)
    and a random one-label classification head (fixed seed), written as the folder of a
    ``BertForSequenceClassification``; returns its weights."""
    shutil.copytree(minilm, folder, ignore=shutil.ignore_patterns("model.safetensors",
                                                                   "modules.json", "1_Pooling"))
    weights = {f"bert.{k}": v for k, v in read_safetensors(minilm / "model.safetensors").items()}
    rng = np.random.default_rng(seed)
    weights["classifier.weight"] = (rng.standard_normal((1, 384)) * 0.05).astype(np.float32)
    weights["classifier.bias"] = np.asarray([0.25], dtype=np.float32)
    write_safetensors(folder / "model.safetensors", weights)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    (folder / "config.json").write_text(json.dumps(config))
    return weights


def cross_encoder_score(ids: list[int], weights: dict[str, np.ndarray],
                        config: dict[str, Any]) -> float:
    """What transformers' BertForSequenceClassification computes for a pair's ``ids``
    (token type 0 throughout, as llama.cpp's BERT graph has no segment ids): the pooler's
    dense layer and tanh over the [CLS] row, then the classifier."""
    hidden = bert_forward(ids, weights, config, prefix="bert.")
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    pooled = np.tanh(w["bert.pooler.dense.weight"] @ hidden[0] + w["bert.pooler.dense.bias"])
    return float((w["classifier.weight"] @ pooled + w["classifier.bias"])[0])


def folder_reference(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, int]]:
    """A Hugging Face BERT folder's weights, ``config.json`` and WordPiece vocabulary, for the
    numpy reference (:func:`bert_forward`, :func:`wordpiece`)."""
    weights = read_safetensors(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return weights, config, vocab
