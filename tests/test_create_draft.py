"""Draft models (Modelfile ``DRAFT``, speculative decoding) at create time, in process.

A draft is a smaller GGUF with the model's vocabulary. The CLI uploads the file DRAFT names
and sends ``draft_files`` (or, for a DRAFT that names a local model, ``draft``); the store
keeps it as a layer of ``application/vnd.ollama.image.draft``, and ``show``'s Modelfile has
a ``DRAFT <blob path>`` line. These tests pin that, and what pollama refuses before writing
anything: a vocabulary llama.cpp would refuse beside the model at every load
(``common_speculative_are_compatible``: tokenizer type, BOS/EOS, sizes within 128, token
texts from id 5), an adapter or a projector given as a draft, two drafts, and a
``draft_quantize`` without a draft. ``quantize`` and ``draft_quantize`` are independent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from conftest import tree_snapshot
from ggufgen import tiny_vocab, write_projector_header, write_tiny_model
from inprocess import create, upload
from pollama.cli.main import cli
from pollama.client import Client
from pollama.gguf import read_gguf
from pollama.names import ModelName
from pollama.protocol.ollama import CreateRequest
from pollama.store import LocalModel, Store
from pollama.store.create import CreateSpec
from pollama.store.manifests import MEDIA_DRAFT, MEDIA_MODEL

MISMATCH = "the draft model's vocabulary does not match the model: "



def refused(api: TestClient, body: dict[str, Any], status: int = 400) -> str:
    response = api.post("/api/create", json=body)
    assert response.status_code == status, response.text
    return str(response.json()["error"])


def stored(models_dir: Path, name: str) -> LocalModel:
    return Store(models_dir).get(ModelName.parse(name))


def draft_layer_digest(models_dir: Path, name: str) -> str:
    (layer,) = stored(models_dir, name).layers_of(MEDIA_DRAFT)
    return layer.digest


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny.gguf")


@pytest.fixture
def draft(tmp_path: Path) -> Path:
    """Another model with the same vocabulary (and 28 tokens more: llama.cpp allows 128)."""
    return write_tiny_model(tmp_path / "draft.gguf", n_embd=32, n_layer=1, n_vocab=428, seed=1)


def with_draft(api: TestClient, tiny: Path, draft: Path, **extra: Any) -> dict[str, Any]:
    return {"model": "spec", "files": {"tiny.gguf": upload(api, tiny)},
            "draft_files": {"draft.gguf": upload(api, draft)}, **extra}


# --- stored, shown, kept ---------------------------------------------------------------------


def test_a_draft_with_the_models_vocabulary_is_stored_as_the_draft_layer(
    api: TestClient, models_dir: Path, tiny: Path, draft: Path
) -> None:
    body = with_draft(api, tiny, draft)
    statuses = [line["status"] for line in create(api, body)]
    assert statuses.count("parsing GGUF") == 2
    model = stored(models_dir, "spec")
    assert [layer.media_type for layer in model.layers][:2] == [MEDIA_MODEL, MEDIA_DRAFT]
    assert draft_layer_digest(models_dir, "spec") == body["draft_files"]["draft.gguf"]
    assert model.draft_path() == Store(models_dir).blobs.path(body["draft_files"]["draft.gguf"])
    assert model.draft_path() is not None and model.draft_path().read_bytes() == draft.read_bytes()
    entry = api.get("/api/tags").json()["models"][0]
    assert entry["details"]["family"] == "llama"  # the model's weights, never the draft's
    assert entry["size"] > tiny.stat().st_size + draft.stat().st_size


def test_show_modelfile_has_the_draft_line_after_from(
    api: TestClient, models_dir: Path, tiny: Path, draft: Path
) -> None:
    create(api, with_draft(api, tiny, draft))
    model = stored(models_dir, "spec")
    text = api.post("/api/show", json={"model": "spec"}).json()["modelfile"]
    lines = text.splitlines()
    from_line, draft_line = f"FROM {model.model_path()}", f"DRAFT {model.draft_path()}"
    assert lines[lines.index(from_line) + 1] == draft_line  # Ollama's order: FROM, ADAPTER, DRAFT
    create(api, {"model": "plain", "files": {"tiny.gguf": upload(api, tiny)}})
    assert "DRAFT" not in api.post("/api/show", json={"model": "plain"}).json()["modelfile"]


def test_from_a_model_with_a_draft_keeps_it_and_a_new_draft_replaces_it(
    api: TestClient, models_dir: Path, tiny: Path, draft: Path, tmp_path: Path
) -> None:
    create(api, with_draft(api, tiny, draft))
    create(api, {"model": "terse", "from": "spec", "system": "Be terse."})
    assert draft_layer_digest(models_dir, "terse") == draft_layer_digest(models_dir, "spec")
    other = write_tiny_model(tmp_path / "other.gguf", n_embd=32, n_layer=1, seed=2)
    create(api, {"model": "other", "from": "spec",
                 "draft_files": {"other.gguf": upload(api, other)}})
    assert len(stored(models_dir, "other").layers_of(MEDIA_DRAFT)) == 1
    assert draft_layer_digest(models_dir, "other") == upload(api, other)


def test_draft_naming_a_local_model_keeps_its_weights_as_the_draft(
    api: TestClient, models_dir: Path, tiny: Path, draft: Path
) -> None:
    create(api, {"model": "small", "files": {"draft.gguf": upload(api, draft)}})
    create(api, {"model": "big", "files": {"tiny.gguf": upload(api, tiny)}, "draft": "small"})
    small = stored(models_dir, "small")
    assert small.model_layer is not None
    (layer,) = stored(models_dir, "big").layers_of(MEDIA_DRAFT)
    assert (layer.digest, layer.from_) == (small.model_layer.digest, "small:latest")

    error = refused(api, {"model": "x", "from": "big", "draft": "nope"}, status=404)
    assert "draft model 'nope' not found" in error
    assert "invalid model name 'bad/../name' in DRAFT" in refused(
        api, {"model": "x", "from": "big", "draft": "bad/../name"})
    assert "the draft model is the model itself" in refused(
        api, {"model": "x", "from": "small", "draft": "small"})


# --- refused before anything is written --------------------------------------------------------


def _tokens_with(index: int, text: str) -> list[str]:
    tokens = tiny_vocab(400)[0]
    tokens[index] = text
    return tokens


@pytest.mark.parametrize(
    ("options", "difference"),
    [
        ({"extra_kv": {"tokenizer.ggml.tokens": _tokens_with(300, "foo")}},
         f"token 300 is 'foo' in the draft and {tiny_vocab(400)[0][300]!r} in the model"),
        ({"n_vocab": 529}, "it has 529 tokens in the draft and 400 in the model (llama.cpp "
                           "allows at most 128 more or fewer)"),
        ({"extra_kv": {"tokenizer.ggml.model": "gpt2"}},
         "the tokenizer is 'gpt2' in the draft and 'llama' in the model"),
        ({"extra_kv": {"tokenizer.ggml.add_bos_token": False}},
         "the draft does not add a BOS token and the model adds one"),
        ({"extra_kv": {"tokenizer.ggml.bos_token_id": 3}},
         "the BOS token is 3 in the draft and 1 in the model"),
        ({"extra_kv": {"tokenizer.ggml.add_eos_token": True}},
         "the draft adds an EOS token and the model does not add one"),
    ],
    ids=["token text", "size", "tokenizer", "add bos", "bos id", "add eos"],
)
@pytest.mark.parametrize("stream", [True, False])
def test_a_draft_with_another_vocabulary_is_refused_naming_the_difference(
    api: TestClient, models_dir: Path, tiny: Path, tmp_path: Path, options: dict[str, Any],
    difference: str, stream: bool,
) -> None:
    other = write_tiny_model(tmp_path / "draft.gguf", n_embd=32, n_layer=1, **options)
    body = with_draft(api, tiny, other, stream=stream)
    before = tree_snapshot(models_dir)
    assert refused(api, body) == MISMATCH + difference
    assert tree_snapshot(models_dir) == before  # no blob, no manifest
    assert api.get("/api/tags").json() == {"models": []}


def test_what_llama_cpp_does_not_compare_is_not_refused(
    api: TestClient, models_dir: Path, tiny: Path, tmp_path: Path
) -> None:
    """Token ids under 5 (the special tokens), and 128 tokens more."""
    special = write_tiny_model(tmp_path / "a.gguf", n_embd=32, n_layer=1,
                               extra_kv={"tokenizer.ggml.tokens": _tokens_with(3, "<|x|>")})
    create(api, with_draft(api, tiny, special))
    wider = write_tiny_model(tmp_path / "b.gguf", n_embd=32, n_layer=1, n_vocab=528)
    create(api, with_draft(api, tiny, wider))


def test_a_draft_named_by_model_with_another_vocabulary_is_refused(
    api: TestClient, tiny: Path, tmp_path: Path
) -> None:
    other = write_tiny_model(tmp_path / "other.gguf", n_vocab=600)
    create(api, {"model": "other", "files": {"other.gguf": upload(api, other)}})
    error = refused(api, {"model": "x", "files": {"tiny.gguf": upload(api, tiny)},
                          "draft": "other"})
    assert error == MISMATCH + "it has 600 tokens in the draft and 400 in the model " \
        "(llama.cpp allows at most 128 more or fewer)"
    assert [m["name"] for m in api.get("/api/tags").json()["models"]] == ["other:latest"]


def test_a_projector_or_an_adapter_is_no_draft(
    api: TestClient, models_dir: Path, tiny: Path, tmp_path: Path
) -> None:
    mmproj = write_projector_header(tmp_path / "mmproj.gguf", width=64)
    lora = write_tiny_model(tmp_path / "lora.gguf", extra_kv={"general.type": "adapter"})
    for path, what in ((mmproj, "a multimodal projector"), (lora, "a LoRA adapter")):
        body = {"model": "x", "files": {"tiny.gguf": upload(api, tiny)},
                "draft_files": {path.name: upload(api, path)}}
        snapshot = tree_snapshot(models_dir)
        assert refused(api, body).startswith(f"DRAFT '{path.name}' is {what}, not a model")
        assert tree_snapshot(models_dir) == snapshot
    assert api.get("/api/tags").json() == {"models": []}


def test_one_draft_given_one_way(api: TestClient, tiny: Path, draft: Path,
                                 tmp_path: Path) -> None:
    other = write_tiny_model(tmp_path / "other.gguf", n_embd=32, n_layer=1, seed=2)
    files = {"tiny.gguf": upload(api, tiny)}
    two = {"draft.gguf": upload(api, draft), "other.gguf": upload(api, other)}
    assert refused(api, {"model": "x", "files": files, "draft_files": two}) == (
        "only one draft model is currently supported")
    one = {"draft.gguf": two["draft.gguf"]}
    assert "not both" in refused(api, {"model": "x", "files": files, "draft_files": one,
                                       "draft": "small"})
    missing = "sha256:" + "a" * 64
    assert refused(api, {"model": "x", "files": files,
                         "draft_files": {"../d.gguf": missing}}) == "file path must be relative"
    assert "DRAFT names safetensors files" in refused(
        api, {"model": "x", "files": files, "draft_files": {"model.safetensors": missing}})
    assert "the draft model is the model itself" in refused(
        api, {"model": "x", "files": files, "draft_files": {"d.gguf": files["tiny.gguf"]}})
    assert api.get("/api/tags").json() == {"models": []}


# --- quantization --------------------------------------------------------------------------------


def test_draft_quantize_quantizes_the_draft_and_quantize_the_model(
    api: TestClient, models_dir: Path, tiny: Path, draft: Path
) -> None:
    body = with_draft(api, tiny, draft, draft_quantize="q8_0")
    statuses = [line["status"] for line in create(api, body)]
    assert "quantizing F32 draft model to Q8_0" in statuses
    assert not any(s.startswith("quantizing F32 model") for s in statuses)
    model = stored(models_dir, "spec")
    assert model.model_layer is not None
    assert model.model_layer.digest == body["files"]["tiny.gguf"]  # the model is as it was
    assert model.draft_path() is not None
    assert read_gguf(model.draft_path()).file_type == "Q8_0"

    body = with_draft(api, tiny, draft, model="spec2", quantize="q8_0")
    statuses = [line["status"] for line in create(api, body)]
    assert "quantizing F32 model to Q8_0" in statuses
    assert draft_layer_digest(models_dir, "spec2") == body["draft_files"]["draft.gguf"]
    assert api.post("/api/show", json={"model": "spec2"}).json()["details"][
        "quantization_level"] == "Q8_0"


def test_draft_quantize_needs_a_draft_and_a_known_type(api: TestClient, tiny: Path,
                                                       draft: Path) -> None:
    files = {"tiny.gguf": upload(api, tiny)}
    assert refused(api, {"model": "x", "files": files, "draft_quantize": "q8_0"}) == (
        "--draft-quantize requires a DRAFT model")
    assert "unsupported quantization type q3_bogus" in refused(
        api, with_draft(api, tiny, draft, draft_quantize="q3_bogus"))


# --- the wire and the CLI ------------------------------------------------------------------------


def test_create_request_carries_the_draft_fields_to_the_store() -> None:
    request = CreateRequest.model_validate({
        "model": "m", "from": "base", "draft_files": {"d.gguf": "sha256:" + "b" * 64},
        "draft_quantize": " q8_0 ",
    })  # fmt: skip
    assert request.to_spec() == CreateSpec(
        name="m", base="base", draft_files={"d.gguf": "sha256:" + "b" * 64},
        draft_quantize="q8_0",
    )  # fmt: skip
    named = CreateRequest.model_validate({"model": "m", "from": "base", "draft": "small"})
    assert named.to_spec().draft == "small"


# The client passes request timeouts, which Starlette's TestClient warns it ignores.
cli_in_process = pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")


def _cli_create(api: TestClient, monkeypatch: pytest.MonkeyPatch, folder: Path, text: str,
                *args: str) -> Any:
    """``pollama create`` against the in-process server."""
    monkeypatch.setattr("pollama.cli.create.client",
                        lambda: Client(str(api.base_url), http=api))
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    return CliRunner().invoke(cli, ["create", "spec", "-f", str(folder / "Modelfile"), *args])


@cli_in_process
def test_cli_uploads_the_draft_file_and_quantizes_it(
    api: TestClient, models_dir: Path, tiny: Path, draft: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tiny.parent
    result = _cli_create(api, monkeypatch, folder, "FROM ./tiny.gguf\nDRAFT ./draft.gguf\n",
                         "--draft-quantize", "q8_0")
    assert result.exit_code == 0, result.output
    assert "quantizing F32 draft model to Q8_0" in result.output
    model = stored(models_dir, "spec")
    assert model.draft_path() is not None
    assert read_gguf(model.draft_path()).file_type == "Q8_0"


@cli_in_process
def test_cli_draft_naming_a_local_model(
    api: TestClient, models_dir: Path, tiny: Path, draft: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create(api, {"model": "small", "files": {"draft.gguf": upload(api, draft)}})
    result = _cli_create(api, monkeypatch, tiny.parent, "FROM ./tiny.gguf\nDRAFT small\n")
    assert result.exit_code == 0, result.output
    assert draft_layer_digest(models_dir, "spec") == upload(api, draft)
    result = _cli_create(api, monkeypatch, tiny.parent, "FROM ./tiny.gguf\nDRAFT nothere\n")
    assert result.exit_code == 1
    assert "Error: draft model 'nothere' not found" in result.output


@cli_in_process
def test_cli_draft_of_a_missing_file_is_an_error_naming_it(
    api: TestClient, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _cli_create(api, monkeypatch, tiny.parent, "FROM ./tiny.gguf\nDRAFT ./nope.gguf\n")
    assert result.exit_code == 1
    assert "Error: DRAFT './nope.gguf' does not exist" in result.output
    assert api.get("/api/tags").json() == {"models": []}


@cli_in_process
def test_cli_draft_of_a_safetensors_folder_is_refused(
    api: TestClient, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tiny.parent / "hf").mkdir()
    (tiny.parent / "hf" / "model.safetensors").write_bytes(b"{}")
    result = _cli_create(api, monkeypatch, tiny.parent, "FROM ./tiny.gguf\nDRAFT ./hf\n")
    assert result.exit_code == 1
    assert "Error: DRAFT './hf' is a safetensors folder" in result.output
