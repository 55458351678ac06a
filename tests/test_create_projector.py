"""Models with a multimodal projector: create, show and capabilities, in process.

A vision model is a model GGUF plus a projector ("mmproj") GGUF, two FROM lines in a
Modelfile, which the store keeps as a model layer and a projector layer. These tests pin what
Ollama does with such models and where pollama does better than Ollama's users met:
the FROM lines in either order (told apart by their headers), vision kept by ``FROM
<existing vision model>`` (ollama#9967), ``ADAPTER`` naming a projector refused with advice
(ollama#15346 gave a 500), and a projector made for another model refused at create time
with both widths, before anything is written. The CLI side is in
``tests/test_e2e_create_projector.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import tree_snapshot
from ggufgen import write_gguf, write_projector_header, write_tiny_model
from inprocess import create, upload
from pollama.cli.models import format_show
from pollama.gguf import read_gguf
from pollama.names import ModelName
from pollama.store import Layer, Manifest, Store
from pollama.store.manifests import CONFIG_MEDIA_TYPE, MEDIA_MODEL, MEDIA_PROJECTOR
from pollama.store.projector import input_width, output_widths

N_EMBD = 64  # write_tiny_model's default embedding length



def layers(models_dir: Path, name: str) -> list[str]:
    model = Store(models_dir).get(ModelName.parse(name))
    return [layer.media_type for layer in model.layers]


def show(api: TestClient, name: str, verbose: bool = False) -> dict[str, Any]:
    response = api.post("/api/show", json={"model": name, "verbose": verbose})
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny.gguf")


@pytest.fixture
def mmproj(tmp_path: Path) -> Path:
    return write_projector_header(tmp_path / "mmproj.gguf", width=N_EMBD)


# --- create: which file is which --------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_key", "projector_key"),
    [("tiny.gguf", "mmproj.gguf"), ("z-model.gguf", "a-projector.gguf")],
)
def test_model_and_projector_are_told_apart_by_header_not_order(
    api: TestClient, models_dir: Path, tiny: Path, mmproj: Path, model_key: str,
    projector_key: str,
) -> None:
    """Whichever sorts (or comes) first, the model GGUF is the model layer and the clip GGUF
    the projector: the model's family is llama, never clip."""
    files = {projector_key: upload(api, mmproj), model_key: upload(api, tiny)}
    statuses = [s["status"] for s in create(api, {"model": "seer", "files": files})]
    assert statuses.count("parsing GGUF") == 2
    assert layers(models_dir, "seer")[:2] == [MEDIA_MODEL, MEDIA_PROJECTOR]
    shown = show(api, "seer")
    assert shown["capabilities"] == ["completion", "vision"]
    assert shown["details"]["family"] == "llama"
    assert shown["details"]["families"] == ["llama", "clip"]  # as Ollama's vision models
    assert shown["model_info"]["general.architecture"] == "llama"


def test_create_from_existing_vision_model_keeps_its_projector(
    api: TestClient, models_dir: Path, tiny: Path, mmproj: Path
) -> None:
    """ollama#9967: a model made FROM a vision model is still a vision model."""
    files = {"tiny.gguf": upload(api, tiny), "mmproj.gguf": upload(api, mmproj)}
    create(api, {"model": "seer", "files": files})
    create(api, {"model": "seer-terse", "from": "seer", "system": "Be terse."})
    assert MEDIA_PROJECTOR in layers(models_dir, "seer-terse")
    shown = show(api, "seer-terse")
    assert "vision" in shown["capabilities"]
    assert shown["details"]["families"] == ["llama", "clip"]
    assert shown["projector_info"] == show(api, "seer")["projector_info"]
    assert shown["system"] == "Be terse."


def test_a_model_name_and_a_projector_file_add_vision(
    api: TestClient, models_dir: Path, tiny: Path, mmproj: Path, tmp_path: Path
) -> None:
    """``FROM <local model>`` plus ``FROM ./mmproj.gguf`` gives that model a projector (Ollama
    drops the file in silence), replacing one it had; only projectors may come that way."""
    create(api, {"model": "plain", "files": {"tiny.gguf": upload(api, tiny)}})
    assert show(api, "plain")["capabilities"] == ["completion"]
    create(api, {"model": "seer", "from": "plain", "files": {"mmproj.gguf": upload(api, mmproj)}})
    assert layers(models_dir, "seer").count(MEDIA_PROJECTOR) == 1
    assert show(api, "seer")["capabilities"] == ["completion", "vision"]

    other = write_projector_header(tmp_path / "other.gguf", width=N_EMBD, hidden=8)
    create(api, {"model": "seer2", "from": "seer", "files": {"other.gguf": upload(api, other)}})
    assert layers(models_dir, "seer2").count(MEDIA_PROJECTOR) == 1
    assert show(api, "seer2")["projector_info"]["clip.vision.embedding_length"] == 8

    response = api.post("/api/create", json={"model": "bad", "from": "plain",
                                             "files": {"tiny.gguf": upload(api, tiny)}})
    assert response.status_code == 400
    assert "may only add its multimodal projector" in response.json()["error"]


# --- create: refusals ----------------------------------------------------------------------


def test_adapter_naming_a_projector_is_a_400_with_advice(
    api: TestClient, models_dir: Path, tiny: Path, mmproj: Path
) -> None:
    """ollama#15346 answered a 500; the advice says what to write instead."""
    files = {"tiny.gguf": upload(api, tiny)}
    adapters = {"mmproj.gguf": upload(api, mmproj)}
    before = tree_snapshot(models_dir)
    response = api.post("/api/create", json={"model": "x", "files": files, "adapters": adapters})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "'mmproj.gguf' is a multimodal projector, not a LoRA adapter" in error
    assert "write it as a second FROM line: FROM ./mmproj.gguf" in error
    assert tree_snapshot(models_dir) == before


@pytest.mark.parametrize("stream", [True, False])
def test_projector_of_another_width_is_refused_naming_both_and_writes_nothing(
    api: TestClient, models_dir: Path, tiny: Path, tmp_path: Path, stream: bool
) -> None:
    wrong = write_projector_header(tmp_path / "mmproj.gguf", width=32)
    files = {"tiny.gguf": upload(api, tiny), "mmproj.gguf": upload(api, wrong)}
    before = tree_snapshot(models_dir)
    response = api.post("/api/create", json={"model": "seer", "files": files, "stream": stream})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "outputs 32-wide embeddings but the model's embedding length is 64" in error
    assert "'mmproj.gguf'" in error and "'tiny.gguf'" in error
    assert tree_snapshot(models_dir) == before  # no blob, no manifest
    assert api.get("/api/tags").json() == {"models": []}


def test_projector_of_another_width_is_refused_beside_a_model_name(
    api: TestClient, tiny: Path, tmp_path: Path
) -> None:
    create(api, {"model": "plain", "files": {"tiny.gguf": upload(api, tiny)}})
    wrong = write_projector_header(tmp_path / "mmproj.gguf", width=48)
    response = api.post("/api/create", json={"model": "seer", "from": "plain",
                                             "files": {"mmproj.gguf": upload(api, wrong)}})
    assert response.status_code == 400
    assert "outputs 48-wide embeddings but the model's embedding length is 64" in (
        response.json()["error"]
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"clip.projector_type": "some-future-type"},  # a type llama.cpp may know, we do not
        {"clip.projector_type": "gemma3"},  # its tensor (mm.input_projection) is absent
    ],
)
def test_projector_of_unknown_width_is_not_refused(
    api: TestClient, tiny: Path, tmp_path: Path, extra: dict[str, Any]
) -> None:
    """When the width cannot be worked out, the worker's load reports llama.cpp's error."""
    odd = write_projector_header(tmp_path / "mmproj.gguf", width=32, extra_kv=extra)
    files = {"tiny.gguf": upload(api, tiny), "mmproj.gguf": upload(api, odd)}
    create(api, {"model": "seer", "files": files})
    assert "vision" in show(api, "seer")["capabilities"]


def test_files_must_make_one_model(api: TestClient, tiny: Path, mmproj: Path,
                                   tmp_path: Path) -> None:
    other_model = write_tiny_model(tmp_path / "other.gguf", seed=1)
    other_projector = write_projector_header(tmp_path / "proj2.gguf", width=N_EMBD, hidden=8)
    cases = {
        "no model weights among the FROM files ('mmproj.gguf')": {"mmproj.gguf": mmproj},
        "more than one model GGUF among the FROM files ('other.gguf', 'tiny.gguf')": {
            "tiny.gguf": tiny, "other.gguf": other_model},
        "more than one multimodal projector among the FROM files": {
            "tiny.gguf": tiny, "mmproj.gguf": mmproj, "proj2.gguf": other_projector},
    }
    for message, paths in cases.items():
        files = {key: upload(api, path) for key, path in paths.items()}
        response = api.post("/api/create", json={"model": "x", "files": files})
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
    assert api.get("/api/tags").json() == {"models": []}


def test_a_pulled_projector_is_not_rechecked(api: TestClient, models_dir: Path, tiny: Path,
                                             tmp_path: Path) -> None:
    """Pulls copy layers as they are: a stored pair of other widths still shows and can be
    the FROM of a new model (only files newly put together are checked)."""
    store = Store(models_dir)
    store.ensure()
    wrong = write_projector_header(tmp_path / "mmproj.gguf", width=32)
    model_blob, projector_blob = store.blobs.put_file(tiny), store.blobs.put_file(wrong)
    config = store.blobs.put_bytes(b'{"model_format":"gguf","model_family":"llama"}\n')
    store.manifests.write(ModelName.parse("pulled"), Manifest(
        config=Layer(CONFIG_MEDIA_TYPE, config.digest, config.size),
        layers=(Layer(MEDIA_MODEL, model_blob.digest, model_blob.size),
                Layer(MEDIA_PROJECTOR, projector_blob.digest, projector_blob.size)),
    ))
    assert "vision" in show(api, "pulled")["capabilities"]
    create(api, {"model": "copy", "from": "pulled", "system": "hi"})
    assert MEDIA_PROJECTOR in layers(models_dir, "copy")


# --- show and capabilities ---------------------------------------------------------------------


def test_show_has_projector_info_as_ollama(api: TestClient, tiny: Path, tmp_path: Path) -> None:
    """The projector's whole metadata (``general.name`` kept), the computed parameter
    count, and arrays over 5 elements as ``[]`` unless verbose, as ``model_info``."""
    long = [float(i) for i in range(8)]
    mmproj = write_projector_header(
        tmp_path / "mmproj.gguf", width=N_EMBD, extra_kv={"clip.vision.long": long})
    files = {"tiny.gguf": upload(api, tiny), "mmproj.gguf": upload(api, mmproj)}
    create(api, {"model": "seer", "files": files})
    info = show(api, "seer")["projector_info"]
    header = read_gguf(mmproj)
    assert info["general.architecture"] == "clip"
    assert info["general.name"] == "tiny projector"
    assert info["general.parameter_count"] == header.parameter_count > 0
    assert info["clip.has_vision_encoder"] is True
    assert info["clip.vision.embedding_length"] == 16
    assert info["clip.vision.image_mean"] == [0.5, 0.5, 0.5]
    assert info["clip.vision.long"] == []
    assert show(api, "seer", verbose=True)["projector_info"]["clip.vision.long"] == long
    assert "clip.projector_type" not in show(api, "seer")["model_info"]

    create(api, {"model": "plain", "files": {"tiny.gguf": files["tiny.gguf"]}})
    assert "projector_info" not in show(api, "plain")


@pytest.mark.parametrize(
    ("vision", "audio", "expected"),
    [
        (True, False, ["completion", "vision"]),
        (False, True, ["completion", "audio"]),
        (True, True, ["completion", "vision", "audio"]),
        (None, False, ["completion", "vision"]),  # older file: vision blocks, no flag
        (False, False, ["completion"]),  # a projector that can neither see nor hear
    ],
)
def test_capabilities_follow_the_projector_encoders(
    api: TestClient, tiny: Path, tmp_path: Path, vision: bool | None, audio: bool,
    expected: list[str],
) -> None:
    mmproj = write_projector_header(tmp_path / "mmproj.gguf", width=N_EMBD, vision=vision,
                                    audio=audio)
    files = {"tiny.gguf": upload(api, tiny), "mmproj.gguf": upload(api, mmproj)}
    create(api, {"model": "m", "files": files})
    assert show(api, "m")["capabilities"] == expected
    tags = api.get("/api/tags").json()["models"]
    assert tags[0]["details"]["families"] == ["llama", "clip"]


def test_vision_blocks_in_the_model_itself_still_mean_vision(api: TestClient,
                                                             tmp_path: Path) -> None:
    own = write_tiny_model(tmp_path / "own.gguf", extra_kv={"llama.vision.block_count": 2})
    create(api, {"model": "own", "files": {"own.gguf": upload(api, own)}})
    assert show(api, "own")["capabilities"] == ["completion", "vision"]


def test_format_show_prints_ollamas_projector_section() -> None:
    info = {
        "model_info": {"general.architecture": "llama", "general.parameter_count": 1000},
        "details": {"parameter_size": "1K", "quantization_level": "F32"},
        "capabilities": ["completion", "vision"],
        "projector_info": {
            "general.architecture": "clip",
            "general.parameter_count": 312_000_000,
            "clip.vision.embedding_length": 1024,
            "clip.vision.projection_dim": 768,
        },
        "parameters": "temperature                    0.5",
    }
    text = format_show(info)
    capabilities = text.index("  Capabilities\n")
    projector = text.index(
        "  Projector\n"
        "    architecture        clip    \n"
        "    parameters          312M    \n"
        "    embedding length    1024    \n"
        "    dimensions          768     \n\n"
    )
    assert capabilities < projector < text.index("  Parameters\n")
    audio_only = {**info, "projector_info": {"general.architecture": "clip",
                                             "clip.audio.embedding_length": 1280}}
    assert "  Projector\n    architecture        clip    \n    embedding length    1280" in (
        format_show(audio_only)
    )
    assert "Projector" not in format_show({**info, "projector_info": None})


# --- the width rules, file by file ---------------------------------------------------------


def _projector(path: Path, kind: str, tensors: dict[str, tuple[int, ...]],
               **kv: Any) -> Any:
    """A clip header with the given projector type and tensors (numpy shapes, so the ggml
    shape is reversed)."""
    arrays = {name: np.zeros(shape, dtype=np.float32) for name, shape in tensors.items()}
    return read_gguf(write_gguf(path, {"general.architecture": "clip",
                                       "clip.has_vision_encoder": True,
                                       "clip.projector_type": kind, **kv}, arrays))


@pytest.mark.parametrize(
    ("kind", "tensors", "width"),
    [
        ("mlp", {"mm.2.weight": (96, 16)}, 96),
        ("mlp", {"mm.2.weight": (16, 16), "mm.3.weight": (80, 16), "mm.3.bias": (80,)}, 80),
        ("gemma3", {"mm.input_projection.weight": (32, 112)}, 112),  # ne[0], as clip.cpp
        ("gemma4v", {"mm.input_projection.weight": (144, 32)}, 144),
        ("idefics3", {"mm.model.fc.weight": (576, 32)}, 576),
        ("qwen2vl_merger", {"mm.2.weight": (128, 32), "mm.2.bias": (128,)}, 128),
        ("qwen3vl_merger", {"mm.2.bias": (64,), "v.deepstack.0.fc1.weight": (8, 8),
                            "v.deepstack.3.fc1.weight": (8, 8)}, 192),
        ("internvl", {"mm.model.mlp.3.weight": (160, 32)}, 160),
        ("resampler", {"resampler.proj.weight": (32, 208)}, 208),
        ("pixtral", {"mm.2.weight": (224, 32)}, 224),
    ],
)
def test_output_width_follows_clip_n_mmproj_embd(
    tmp_path: Path, kind: str, tensors: dict[str, tuple[int, ...]], width: int
) -> None:
    assert output_widths(_projector(tmp_path / "p.gguf", kind, tensors)) == {"vision": width}


def test_output_widths_of_a_two_encoder_projector(tmp_path: Path) -> None:
    """qwen2.5o serves both encoders: the vision merger's bias and the audio fc."""
    info = _projector(tmp_path / "p.gguf", "qwen2.5o",
                      {"mm.2.bias": (96,), "mm.a.fc.weight": (96, 32)},
                      **{"clip.has_audio_encoder": True})
    assert output_widths(info) == {"vision": 96, "audio": 96}
    no_type = read_gguf(write_gguf(tmp_path / "q.gguf", {"general.architecture": "clip"},
                                   {"mm.2.weight": np.zeros((96, 16), dtype=np.float32)}))
    assert output_widths(no_type) == {}


def test_input_width_counts_deepstack_layers(tmp_path: Path) -> None:
    plain = read_gguf(write_tiny_model(tmp_path / "a.gguf"))
    assert input_width(plain) == N_EMBD
    deep = read_gguf(write_tiny_model(tmp_path / "b.gguf",
                                      extra_kv={"llama.n_deepstack_layers": 3}))
    assert input_width(deep) == 4 * N_EMBD
