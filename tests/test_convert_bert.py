"""BERT folders to GGUF (``pollama.convert``): what is written, and what is refused.

Small random folders (``tests/hfgen.py``) are converted and read back with the ``gguf``
package: the keys llama.cpp's BERT loader reads, the tensor names it looks for, the values
(the source's, in F16 or BF16), the tokenizer in llama.cpp's phantom-space form, the
sentence-transformers pooling, and a cross-encoder's head as rank pooling. Every defect a
folder can have is refused with a ``ConversionError`` naming the file, and through
``/api/create`` it is a 400 that writes nothing. The real all-MiniLM-L6-v2 is checked
against a numpy BERT in ``tests/test_e2e_safetensors.py``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import tree_snapshot
from hfgen import bert_vocab, from_bf16_bits, tiny_bert_folder, to_bf16_bits, write_safetensors
from pollama.convert import KNOWN_ARCHITECTURES, plan_conversion, write_gguf
from pollama.errors import ConversionError


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


def convert(folder: Path) -> gguf.GGUFReader:
    out = folder.parent / f"{folder.name}.gguf"
    for _ in write_gguf(plan_conversion(folder_files(folder)), out):
        pass
    return gguf.GGUFReader(out)


def kv(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def tensor(reader: gguf.GGUFReader, name: str) -> tuple[np.ndarray, str]:
    t = next(t for t in reader.tensors if t.name == name)
    values = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        values = from_bf16_bits(values.view(np.uint16))
    shape = [int(n) for n in reversed(t.shape)]
    return values.reshape(shape).astype(np.float32), t.tensor_type.name


def refused(folder: Path) -> str:
    with pytest.raises(ConversionError) as err:
        plan_conversion(folder_files(folder))
    return str(err.value)


# -- what is written ---------------------------------------------------------------------------


def test_a_sentence_transformers_folder_becomes_llama_cpps_bert(tmp_path: Path) -> None:
    weights = tiny_bert_folder(tmp_path / "m", window=48)
    reader = convert(tmp_path / "m")
    meta = kv(reader)
    assert meta["general.architecture"] == "bert"
    assert meta["general.file_type"] == 1  # mostly F16
    assert (meta["bert.block_count"], meta["bert.embedding_length"]) == (2, 32)
    assert (meta["bert.feed_forward_length"], meta["bert.attention.head_count"]) == (64, 4)
    assert meta["bert.attention.causal"] is False
    assert meta["bert.pooling_type"] == 1 and meta["bert.normalize_embeddings"] is True
    assert meta["bert.context_length"] == 48  # the sentence-transformers window
    assert abs(meta["bert.attention.layer_norm_epsilon"] - 1e-12) < 1e-15
    assert meta["tokenizer.ggml.model"] == "bert"
    assert meta["tokenizer.ggml.token_type_count"] == 2
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = bert_vocab()
    assert tokens[:3] == ["[PAD]", "[UNK]", "[CLS]"]  # control tokens as they are
    assert tokens[vocab.index("the")] == "\u2581the" and tokens[vocab.index("##s")] == "s"
    types = meta["tokenizer.ggml.token_type"]
    assert types[vocab.index("[CLS]")] == 3 and types[vocab.index("the")] == 1
    ids = {k: meta[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id",
                                                    "seperator_token_id", "cls_token_id",
                                                    "unknown_token_id", "padding_token_id")}
    assert ids == {"bos_token_id": 2, "eos_token_id": 3, "seperator_token_id": 3,
                   "cls_token_id": 2, "unknown_token_id": 1, "padding_token_id": 0}
    assert meta["tokenizer.ggml.normalizer.lowercase"] is True
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "position_embd.weight", "token_types.weight",
            "token_embd_norm.weight", "blk.1.attn_q.weight", "blk.1.attn_output_norm.bias",
            "blk.1.ffn_up.weight", "blk.1.ffn_down.bias", "blk.1.layer_output_norm.weight"} <= names
    assert not any(n.startswith("cls") for n in names)  # no pooler for an embedding model
    values, kind = tensor(reader, "blk.0.attn_q.weight")
    assert kind == "F16"
    np.testing.assert_allclose(values, weights["encoder.layer.0.attention.self.query.weight"],
                               atol=1e-3)
    positions, kind = tensor(reader, "position_embd.weight")
    assert kind == "F32" and positions.shape == (48, 32)
    np.testing.assert_array_equal(positions, weights["embeddings.position_embeddings.weight"][:48])
    norm, kind = tensor(reader, "token_embd_norm.weight")
    assert kind == "F32"
    np.testing.assert_array_equal(norm, weights["embeddings.LayerNorm.weight"])


def test_a_cross_encoder_is_written_with_rank_pooling_and_its_whole_head(tmp_path: Path) -> None:
    weights = tiny_bert_folder(tmp_path / "m", architecture="BertForSequenceClassification",
                               labels=1, pooling=None)
    reader = convert(tmp_path / "m")
    meta = kv(reader)
    assert meta["bert.pooling_type"] == 4  # rank
    assert meta["bert.classifier.output_labels"] == ["class0"]
    head, _ = tensor(reader, "cls.output.weight")
    np.testing.assert_allclose(head, weights["classifier.weight"], atol=1e-3)
    bias, kind = tensor(reader, "cls.output.bias")
    assert kind == "F32"
    np.testing.assert_array_equal(bias, weights["classifier.bias"])
    pooler, _ = tensor(reader, "cls.weight")  # transformers applies the pooler first
    np.testing.assert_allclose(pooler, weights["bert.pooler.dense.weight"], atol=1e-3)
    embeddings, _ = tensor(reader, "token_embd.weight")  # the "bert." prefix is gone
    np.testing.assert_allclose(embeddings, weights["bert.embeddings.word_embeddings.weight"],
                               atol=1e-3)


def test_a_classifier_with_several_labels_keeps_them_in_order(tmp_path: Path) -> None:
    tiny_bert_folder(tmp_path / "m", architecture="BertForSequenceClassification", labels=3)
    meta = kv(convert(tmp_path / "m"))
    assert meta["bert.classifier.output_labels"] == ["class0", "class1", "class2"]
    assert meta["bert.pooling_type"] == 4


def test_bf16_weights_stay_bf16(tmp_path: Path) -> None:
    weights = tiny_bert_folder(tmp_path / "m", dtype="BF16")
    reader = convert(tmp_path / "m")
    assert kv(reader)["general.file_type"] == 32
    values, kind = tensor(reader, "blk.1.ffn_up.weight")
    assert kind == "BF16"
    source = from_bf16_bits(to_bf16_bits(weights["encoder.layer.1.intermediate.dense.weight"]))
    np.testing.assert_array_equal(values, source)  # exactly the stored values
    bias, kind = tensor(reader, "blk.1.ffn_up.bias")
    assert kind == "F32"
    np.testing.assert_array_equal(bias, from_bf16_bits(to_bf16_bits(
        weights["encoder.layer.1.intermediate.dense.bias"])))


def test_pooling_follows_the_sentence_transformers_config(tmp_path: Path) -> None:
    tiny_bert_folder(tmp_path / "cls", pooling="cls")
    assert kv(convert(tmp_path / "cls"))["bert.pooling_type"] == 2
    tiny_bert_folder(tmp_path / "none", pooling=None)  # a bare BertModel: BERT's CLS
    meta = kv(convert(tmp_path / "none"))
    assert meta["bert.pooling_type"] == 2 and meta["bert.normalize_embeddings"] is False
    assert meta["bert.context_length"] == 64  # no window: max_position_embeddings


def test_a_vocab_txt_tokenizer(tmp_path: Path) -> None:
    tiny_bert_folder(tmp_path / "m", tokenizer="vocab.txt")
    meta = kv(convert(tmp_path / "m"))
    vocab = bert_vocab()
    assert meta["tokenizer.ggml.tokens"][vocab.index("cat")] == "\u2581cat"
    assert meta["tokenizer.ggml.token_type"][vocab.index("[SEP]")] == 3
    assert meta["tokenizer.ggml.cls_token_id"] == 2
    assert meta["tokenizer.ggml.seperator_token_id"] == 3
    assert meta["tokenizer.ggml.normalizer.lowercase"] is True


# -- what is refused ---------------------------------------------------------------------------


def test_an_unknown_architecture_is_named_with_the_known_ones(tmp_path: Path) -> None:
    tiny_bert_folder(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "architectures": ["T5Model"]}))
    message = refused(tmp_path / "m")
    assert "'T5Model'" in message and all(name in message for name in KNOWN_ARCHITECTURES)
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "architectures": []}))
    assert "names no architecture" in refused(tmp_path / "m")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "training_args.bin"])
def test_pickled_weights_are_refused_before_anything_is_read(tmp_path: Path, name: str) -> None:
    tiny_bert_folder(tmp_path / "m")
    (tmp_path / "m" / name).write_bytes(b"\x80\x04 not read")
    message = refused(tmp_path / "m")
    assert f"'{name}'" in message and "safetensors" in message and "pickle" in message


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("config.json", b"{not json", "'config.json' does not parse as JSON"),
        ("config.json", b"[1, 2]", "'config.json' is not a JSON object"),
        ("tokenizer.json", b"\xff\xfe", "'tokenizer.json' does not parse as JSON"),
        ("modules.json", b"{}", "'modules.json' is not a JSON list"),
        ("1_Pooling/config.json", b'{"pooling_mode_max_tokens": true}', "only mean, CLS"),
    ],
)
def test_files_that_do_not_parse_are_named(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    tiny_bert_folder(tmp_path / "m")
    (tmp_path / "m" / name).write_bytes(content)
    assert expected in refused(tmp_path / "m")


def test_missing_files_are_named(tmp_path: Path) -> None:
    tiny_bert_folder(tmp_path / "a", tokenizer="none")
    message = refused(tmp_path / "a")
    assert "no tokenizer" in message and "'tokenizer.json'" in message
    tiny_bert_folder(tmp_path / "b")
    (tmp_path / "b/config.json").unlink()
    assert refused(tmp_path / "b") == "the model folder has no 'config.json'"
    tiny_bert_folder(tmp_path / "c")
    (tmp_path / "c/1_Pooling/config.json").unlink()
    assert "'1_Pooling/config.json' (modules.json names it)" in refused(tmp_path / "c")
    tiny_bert_folder(tmp_path / "d")
    (tmp_path / "d/model.safetensors").unlink()
    assert "no '*.safetensors' weights" in refused(tmp_path / "d")


def _header_file(
    path: Path, header: dict[str, Any], data: bytes = b"", claim: int | None = None
) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claim is None else claim) + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "claim", "expected"),
    [
        ({}, b"", 1 << 40, "its header claims 1099511627776 bytes"),
        ({}, b"", 200, "its header claims 200 bytes and the file has"),
        ({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}, b"x" * 16,
         None, "claims 16 bytes for a F32 tensor of shape [1048576, 1048576]"),
        ({"w": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}}, b"",
         None, "past the end of the file"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"x" * 24, None,
         "overlap"),
        ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"x" * 4, None,
         "unknown dtype 'Q4'"),
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"x" * 16, None,
         "invalid shape"),
    ],
)
def test_safetensors_headers_are_checked_against_the_file_before_any_allocation(
    tmp_path: Path, header: dict[str, Any], data: bytes, claim: int | None, expected: str
) -> None:
    tiny_bert_folder(tmp_path / "m")
    _header_file(tmp_path / "m/model.safetensors", header, data, claim)
    message = refused(tmp_path / "m")
    assert expected in message and "model.safetensors" in message


def test_tensors_must_match_the_configuration(tmp_path: Path) -> None:
    weights = tiny_bert_folder(tmp_path / "m")
    folder = tmp_path / "m"

    def rewrite(**changes: Any) -> str:
        tensors = {**weights, **changes}
        write_safetensors(folder / "model.safetensors",
                          {k: v for k, v in tensors.items() if v is not None})
        return refused(folder)

    message = rewrite(**{"encoder.layer.0.attention.self.key.weight": np.zeros((32, 16), "f4")})
    assert "has shape [32, 16], but config.json makes 'blk.0.attn_k.weight' [32, 32]" in message
    message = rewrite(**{"encoder.layer.1.output.LayerNorm.weight": None})
    assert message == "the model's weights have no tensor for 'blk.1.layer_output_norm.weight'"
    message = rewrite(**{"encoder.layer.0.adapter.weight": np.zeros(4, "f4")})
    assert "tensors this converter does not know: 'encoder.layer.0.adapter.weight'" in message
    message = rewrite(**{"embeddings.word_embeddings.weight": np.zeros((40, 32), "i8")})
    assert "'embeddings.word_embeddings.weight' in 'model.safetensors' is I64" in message


def test_a_second_shard_may_not_repeat_a_tensor(tmp_path: Path) -> None:
    weights = tiny_bert_folder(tmp_path / "m")
    write_safetensors(tmp_path / "m/model-2.safetensors",
                      {"pooler.dense.bias": weights["pooler.dense.bias"]})
    assert "'pooler.dense.bias' is in both" in refused(tmp_path / "m")


def test_configurations_llama_cpp_cannot_run_are_refused(tmp_path: Path) -> None:
    tiny_bert_folder(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    for change, expected in (({"hidden_act": "relu"}, "uses GELU"),
                             ({"position_embedding_type": "relative_key"}, "only absolute"),
                             ({"hidden_size": "32"}, "invalid hidden_size"),
                             ({"hidden_size": None}, "has no hidden_size"),
                             ({"vocab_size": 10}, "outside the model's vocabulary of 10")):
        (tmp_path / "m/config.json").write_text(json.dumps({**config, **change}))
        assert expected in refused(tmp_path / "m"), change


def test_oversized_json_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pollama.convert import source

    tiny_bert_folder(tmp_path / "m")
    monkeypatch.setattr(source, "MAX_TOKENIZER_BYTES", 1000)
    monkeypatch.setattr("pollama.convert.vocab.MAX_TOKENIZER_BYTES", 1000)
    assert "'tokenizer.json' is" in refused(tmp_path / "m")
    assert "more than the 1000 allowed" in refused(tmp_path / "m")


# -- through /api/create -----------------------------------------------------------------------


def upload_folder(api: TestClient, folder: Path) -> dict[str, str]:
    files = {}
    for name, path in folder_files(folder).items():
        data = path.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert api.post(f"/api/blobs/{digest}", content=data).status_code in (200, 201)
        files[name] = digest
    return files


def test_create_converts_and_reports_progress(api: TestClient, tmp_path: Path) -> None:
    tiny_bert_folder(tmp_path / "m")
    files = upload_folder(api, tmp_path / "m")
    response = api.post("/api/create", json={"model": "tiny-bert", "files": files})
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[0]["status"] == "converting model" and lines[0]["completed"] == 0
    converting = [line for line in lines if line["status"] == "converting model"]
    assert converting[-1]["completed"] == converting[-1]["total"] > 0
    assert lines[-1] == {"status": "success"}
    assert any(line["status"].startswith("creating new layer sha256:") for line in lines)
    show = api.post("/api/show", json={"model": "tiny-bert"}).json()
    assert show["capabilities"] == ["embedding"]
    assert show["details"]["family"] == "bert" and show["details"]["format"] == "gguf"
    assert show["model_info"]["bert.pooling_type"] == 1


def test_a_refused_folder_is_a_400_that_writes_nothing(
    api: TestClient, tmp_path: Path, models_dir: Path
) -> None:
    tiny_bert_folder(tmp_path / "m")
    (tmp_path / "m/config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    (tmp_path / "p").mkdir()
    (tmp_path / "p/pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "p/config.json").write_text("{}")
    for folder, expected in ((tmp_path / "m", "unsupported architecture 'GPT2LMHeadModel'"),
                             (tmp_path / "p", "'pytorch_model.bin' holds pickled")):
        files = upload_folder(api, folder)
        before = tree_snapshot(models_dir)
        response = api.post("/api/create", json={"model": "x", "files": files})
        assert response.status_code == 400 and expected in response.json()["error"], response.text
        assert tree_snapshot(models_dir) == before


def test_a_conversion_that_fails_midway_leaves_nothing_behind(
    api: TestClient, tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pollama.convert.safetensors import SourceTensor

    tiny_bert_folder(tmp_path / "m")
    files = upload_folder(api, tmp_path / "m")
    before = tree_snapshot(models_dir)
    calls = 0
    original = SourceTensor.read

    def failing(self: SourceTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 10:
            raise ConversionError(f"'{self.filename}' is shorter than its header says")
        return original(self, start, stop)

    monkeypatch.setattr(SourceTensor, "read", failing)
    response = api.post("/api/create", json={"model": "x", "files": files})
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[0]["status"] == "converting model"
    assert lines[-1] == {"error": "'model.safetensors' is shorter than its header says"}
    assert tree_snapshot(models_dir) == before


def test_a_folder_may_not_be_mixed_with_other_sources(api: TestClient, tmp_path: Path) -> None:
    tiny_bert_folder(tmp_path / "m")
    files = upload_folder(api, tmp_path / "m")
    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF")
    mixed = {**files, **upload_folder(api, tmp_path / "m")}
    mixed["x.gguf"] = next(iter(upload_folder(api, _only(gguf_file)).values()))
    cases = [({"files": mixed}, "mix GGUF and safetensors"),
             ({"files": files, "from": "other"}, "not a safetensors folder"),
             ({"files": files, "adapters": {"a.safetensors": files["model.safetensors"]}},
              "LoRA adapters as GGUF only")]  # fmt: skip
    for body, expected in cases:
        response = api.post("/api/create", json={"model": "x", **body})
        assert response.status_code == 400 and expected in response.json()["error"], response.text


def _only(path: Path) -> Path:
    folder = path.parent / f"{path.stem}-only"
    folder.mkdir()
    (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_a_gguf_under_an_old_bin_name_is_still_a_gguf(api: TestClient, tmp_path: Path) -> None:
    from ggufgen import write_tiny_model

    folder = tmp_path / "old"
    folder.mkdir()
    write_tiny_model(folder / "ggml-model.bin")
    files = upload_folder(api, folder)
    response = api.post("/api/create", json={"model": "old", "files": files})
    assert response.status_code == 200 and response.text.rstrip().endswith('{"status":"success"}')
