"""End to end: ``pollama create`` and ``pollama show`` with a multimodal projector, through a
real ``pollama serve`` process.

The CLI uploads every file a FROM line names (a folder's ``*.gguf`` files too) and the server
tells the model from its projector by their headers, so the FROM lines may come in any order
(ollama#17491: create hung with two FROM lines). ``ADAPTER`` naming a projector is refused
with the line to write instead, and ``pollama show`` prints Ollama's ``Projector`` section.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import RunningServer
from ggufgen import write_projector_header, write_tiny_model

pytestmark = pytest.mark.slow

PROJECTOR_SECTION = (
    "  Projector\n"
    "    architecture        clip    \n"
    "    parameters          14K     \n"
    "    embedding length    16      \n"
    "    dimensions          768     \n"
)


def _modelfile(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _from_lines(server: RunningServer, name: str) -> list[str]:
    """The FROM lines of the model's generated Modelfile: its weights' blob, then one per
    projector layer (Ollama's order)."""
    shown = httpx.post(f"{server.url}/api/show", json={"model": name}, timeout=30).json()
    return [line for line in shown["modelfile"].splitlines() if line.startswith("FROM ")]


def test_two_from_lines_in_either_order_and_a_folder(server: RunningServer,
                                                     tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny.gguf")
    write_projector_header(tmp_path / "mmproj.gguf", width=64)
    both = tmp_path / "both"
    both.mkdir()
    write_tiny_model(both / "model.gguf")
    write_projector_header(both / "mmproj-model-f16.gguf", width=64)
    modelfiles = {
        "model-first": "FROM ./tiny.gguf\nFROM ./mmproj.gguf\n",
        "projector-first": "FROM ./mmproj.gguf\nFROM ./tiny.gguf\n",
        "folder": "FROM ./both\n",
    }
    froms = []
    for name, text in modelfiles.items():
        path = _modelfile(tmp_path, f"Modelfile.{name}", text)
        created = server.cli("create", name, "-f", str(path), timeout=60, check=True)
        assert created.stderr.splitlines()[-1] == "success"
        shown = server.cli("show", name, check=True).stdout
        assert "  Capabilities\n    completion    \n    vision        \n" in shown
        assert "    architecture        llama    \n" in shown
        assert PROJECTOR_SECTION in shown
        froms.append(_from_lines(server, name))
    # The same two blobs (the folder's files have the same bytes), the model's weights
    # first, whatever the order of the FROM lines.
    assert froms[0] == froms[1] == froms[2]
    assert len(froms[0]) == 2


def test_adapter_naming_a_projector_says_what_to_write(server: RunningServer,
                                                       tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny.gguf")
    write_projector_header(tmp_path / "mmproj.gguf", width=64)
    path = _modelfile(tmp_path, "Modelfile", "FROM ./tiny.gguf\nADAPTER ./mmproj.gguf\n")
    result = server.cli("create", "seer", "-f", str(path), timeout=60)
    assert result.returncode != 0
    assert (
        "'mmproj.gguf' is a multimodal projector, not a LoRA adapter: write it as a second "
        "FROM line: FROM ./mmproj.gguf"
    ) in result.stderr
    assert "seer" not in server.cli("list", check=True).stdout


def test_a_projector_for_another_model_is_refused(server: RunningServer,
                                                  tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny.gguf")
    write_projector_header(tmp_path / "mmproj.gguf", width=576)
    path = _modelfile(tmp_path, "Modelfile", "FROM ./mmproj.gguf\nFROM ./tiny.gguf\n")
    result = server.cli("create", "seer", "-f", str(path), timeout=60)
    assert result.returncode != 0
    assert "outputs 576-wide embeddings but the model's embedding length is 64" in result.stderr
    assert "seer" not in server.cli("list", check=True).stdout


def test_a_local_model_name_beside_a_projector_file(server: RunningServer,
                                                    tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny.gguf")
    write_projector_header(tmp_path / "mmproj.gguf", width=64)
    plain = _modelfile(tmp_path, "Modelfile.plain", "FROM ./tiny.gguf\n")
    server.cli("create", "plain", "-f", str(plain), timeout=60, check=True)
    seer = _modelfile(tmp_path, "Modelfile.seer", "FROM ./mmproj.gguf\nFROM plain\n")
    server.cli("create", "seer", "-f", str(seer), timeout=60, check=True)
    assert "  Projector\n" in server.cli("show", "seer", check=True).stdout
    assert "  Projector\n" not in server.cli("show", "plain", check=True).stdout
