"""Llama folders to GGUF (``pollama.convert``), and the CLI's side of ``FROM`` a folder.

A small random ``LlamaForCausalLM`` folder with a byte-level BPE tokenizer is converted and
read back: llama.cpp's keys and names, the query and key projections permuted to llama.cpp's
RoPE layout (checked against an independent inverse), tied and untied output, the tokenizer
(merges, the pre-tokenizer's name, special tokens and their add flags, the chat template),
RoPE scaling. The real SmolLM2 round trip (dequantized, written out as a folder, imported
back, same next tokens) is in ``tests/test_e2e_safetensors.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hfgen import LLAMA_SPECIALS, bpe_tokenizer_json, tiny_bert_folder, tiny_llama_folder, unpermute
from pollama.cli.create import _split_froms, hf_model_files
from pollama.convert.vocab import pre_tokenizer_name
from pollama.errors import InvalidRequest
from test_convert_bert import convert, kv, refused, tensor


def test_a_llama_folder_becomes_llama_cpps_llama(tmp_path: Path) -> None:
    weights = tiny_llama_folder(tmp_path / "m")
    reader = convert(tmp_path / "m")
    meta = kv(reader)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 1
    assert (meta["llama.block_count"], meta["llama.embedding_length"]) == (2, 64)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert (meta["llama.feed_forward_length"], meta["llama.context_length"]) == (96, 512)
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.rope.freq_base"] == 10000.0
    assert abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp uses token_embd
    assert not any("rotary" in n or "inv_freq" in n for n in names)
    assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_gate.weight",
            "blk.1.attn_norm.weight", "blk.1.ffn_norm.weight"} <= names
    for layer in range(2):
        for gguf_name, hf_name, heads in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
            written, kind = tensor(reader, f"blk.{layer}.{gguf_name}.weight")
            assert kind == "F16"
            source = weights[f"model.layers.{layer}.self_attn.{hf_name}.weight"]
            assert not np.allclose(written, source, atol=1e-2)  # rearranged...
            np.testing.assert_allclose(unpermute(written, heads), source, atol=1e-3)  # ...exactly
    v, _ = tensor(reader, "blk.0.attn_v.weight")  # the values are not permuted
    np.testing.assert_allclose(v, weights["model.layers.0.self_attn.v_proj.weight"], atol=1e-3)
    norm, kind = tensor(reader, "blk.0.attn_norm.weight")
    assert kind == "F32"
    np.testing.assert_array_equal(norm, weights["model.layers.0.input_layernorm.weight"])


def test_the_tokenizer_is_written_as_llama_cpp_reads_gpt2_vocabularies(tmp_path: Path) -> None:
    tiny_llama_folder(tmp_path / "m")
    meta = kv(convert(tmp_path / "m"))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[:3] == list(LLAMA_SPECIALS) and "Ġthe" in tokens and "Ġ" in tokens
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert meta["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at"]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.unknown_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is False  # a ByteLevel post-processor
    assert meta["tokenizer.chat_template"].startswith("{% for m in messages %}")


def test_an_untied_head_bf16_weights_and_attention_biases(tmp_path: Path) -> None:
    weights = tiny_llama_folder(tmp_path / "m", tied=False, dtype="BF16")
    reader = convert(tmp_path / "m")
    assert kv(reader)["general.file_type"] == 32
    output, kind = tensor(reader, "output.weight")
    assert kind == "BF16"
    np.testing.assert_allclose(output, weights["lm_head.weight"], rtol=1e-2, atol=1e-3)


def test_llama_3_tokenizers_templates_and_rope_scaling(tmp_path: Path) -> None:
    llama3_pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": (
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
            "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}  # fmt: skip
    tok = bpe_tokenizer_json(llama3_pre)
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}]}
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    tiny_llama_folder(tmp_path / "m", tokenizer=tok, config_extra={"rope_scaling": scaling})
    reader = convert(tmp_path / "m")
    meta = kv(reader)
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.add_bos_token"] is True
    freqs, kind = tensor(reader, "rope_freqs.weight")
    assert kind == "F32" and freqs.shape == (8,)
    assert freqs[0] == 1.0 and freqs[-1] == 8.0  # high frequencies kept, low ones scaled
    tiny_llama_folder(tmp_path / "lin", config_extra={"rope_scaling": {"type": "linear",
                                                                        "factor": 2}})
    meta = kv(convert(tmp_path / "lin"))
    assert (meta["llama.rope.scaling.type"], meta["llama.rope.scaling.factor"]) == ("linear", 2.0)
    tiny_llama_folder(tmp_path / "yarn", config_extra={"rope_scaling": {"rope_type": "yarn",
                                                                         "factor": 4}})
    assert "RoPE scaling pollama cannot convert: yarn" in refused(tmp_path / "yarn")


@pytest.mark.parametrize(
    ("pre", "name"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
        ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                {"type": "ByteLevel", "use_regex": True}]},
         "smollm"),
        ({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": (
                "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
                "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")}},
            {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
        ({"type": "Metaspace"}, "default"),
        (None, "default"),
    ],
)
def test_the_pre_tokenizer_is_recognised_from_its_definition(pre: Any, name: str) -> None:
    assert pre_tokenizer_name({"pre_tokenizer": pre}) == name


def test_tokenizers_this_converter_cannot_write_are_refused(tmp_path: Path) -> None:
    tok = bpe_tokenizer_json()
    tok["model"]["byte_fallback"] = True
    tiny_llama_folder(tmp_path / "spm", tokenizer=tok)
    assert "SentencePiece-style BPE" in refused(tmp_path / "spm")
    tiny_llama_folder(tmp_path / "none")
    (tmp_path / "none/tokenizer.json").unlink()
    (tmp_path / "none/tokenizer.model").write_bytes(b"\x0a\x00")
    message = refused(tmp_path / "none")
    assert "no 'tokenizer.json'" in message and "'tokenizer.model' (SentencePiece)" in message
    tok = bpe_tokenizer_json()
    tok["model"]["merges"] = []
    tiny_llama_folder(tmp_path / "nomerges", tokenizer=tok)
    assert refused(tmp_path / "nomerges") == "'tokenizer.json' has no BPE merges"


def test_inconsistent_configurations_are_refused(tmp_path: Path) -> None:
    tiny_llama_folder(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    for change, expected in (({"num_key_value_heads": 3}, "not a multiple of the key-value"),
                             ({"hidden_size": 72}, "has shape"),
                             ({"num_hidden_layers": 3}, "no tensor for 'blk.2.")):
        (tmp_path / "m/config.json").write_text(json.dumps({**config, **change}))
        assert expected in refused(tmp_path / "m"), change
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    weights = tiny_llama_folder(tmp_path / "moe")
    from hfgen import write_safetensors

    write_safetensors(tmp_path / "moe/model.safetensors", {
        **weights, "model.layers.0.block_sparse_moe.gate.weight": np.zeros((4, 64), "f4")})
    assert "does not know: 'model.layers.0.block_sparse_moe.gate.weight'" in refused(
        tmp_path / "moe")


# -- the CLI: which files a folder uploads -----------------------------------------------------


def test_the_cli_uploads_what_the_converter_reads(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    tiny_bert_folder(folder)
    (folder / "README.md").write_text("not uploaded")
    (folder / "pytorch_model.bin").write_bytes(b"not uploaded either")
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense/model.safetensors").write_bytes(b"")  # a module's own weights
    names = [name for name, _ in hf_model_files(folder)]
    assert names == ["model.safetensors", "1_Pooling/config.json", "config.json",
                     "modules.json", "tokenizer.json", "tokenizer_config.json"]
    assert hf_model_files(tmp_path) == []


def test_the_cli_refuses_pickles_lfs_pointers_and_a_folder_beside_other_froms(
    tmp_path: Path,
) -> None:
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled/pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InvalidRequest, match="pickled PyTorch weights"):
        _split_froms(["./pickled"], tmp_path)
    tiny_llama_folder(tmp_path / "lfs")
    (tmp_path / "lfs/model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(InvalidRequest, match="Git LFS pointer"):
        _split_froms(["./lfs"], tmp_path)
    tiny_llama_folder(tmp_path / "m")
    with pytest.raises(InvalidRequest, match="only FROM line"):
        _split_froms(["./m", "smollm2"], tmp_path)
    names, files = _split_froms(["./m"], tmp_path)
    assert names == [] and [n for n, _ in files] == [
        "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]
