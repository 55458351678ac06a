"""End to end: a real ``pollama serve`` process, the official ``ollama`` client, the CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import ollama
import pytest

from conftest import RunningServer, free_port, tree_snapshot
from ggufgen import write_tiny_model

pytestmark = pytest.mark.slow

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_official_client_manages_models(server: RunningServer, tmp_path: Path) -> None:
    tiny = write_tiny_model(tmp_path / "tiny.gguf", chat_template=CHATML)
    client = ollama.Client(host=server.url)
    digest = client.create_blob(tiny)
    assert digest == "sha256:" + hashlib.sha256(tiny.read_bytes()).hexdigest()

    progress = list(
        client.create(
            model="tiny",
            files={"tiny.gguf": digest},
            system="Be brief.",
            parameters={"num_ctx": 128},
            stream=True,
        )
    )
    assert progress[-1].status == "success"
    final = client.create(model="tiny-b", from_="tiny", system="Other.")
    assert final.status == "success"

    listed = client.list()
    assert sorted(m.model for m in listed.models) == ["tiny-b:latest", "tiny:latest"]
    assert all(m.details and m.details.family == "llama" for m in listed.models)

    shown = client.show("tiny")
    assert 'SYSTEM "Be brief."' in (shown.modelfile or "") or "SYSTEM Be brief." in (
        shown.modelfile or ""
    )
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.capabilities == ["completion"]
    assert "num_ctx" in (shown.parameters or "")

    client.copy("tiny", "tiny-copy")
    assert client.show("tiny-copy").modelfile == shown.modelfile.replace("tiny:", "tiny-copy:")
    client.delete("tiny-copy")
    with pytest.raises(ollama.ResponseError) as err:
        client.show("tiny-copy")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("never-existed")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("tiny", "tiny-b")
    assert err.value.status_code == 409
    client.close()


def _modelfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "Modelfile"
    path.write_text(text, encoding="utf-8")
    return path


def test_cli_create_list_show_cp_rm(server: RunningServer, tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny.gguf", chat_template=CHATML)
    mf = _modelfile(
        tmp_path,
        (
            "# a comment\n"
            "FROM ./tiny.gguf\n"
            'SYSTEM """你是由崔亮创建的AI助手，你叫亮仔。"""\n'
            "PARAMETER temperature 0.5\n"
            "PARAMETER num_ctx 128\n"
            "PARAMETER stop <|im_end|>\n"
            "LICENSE MIT License\n"
            "MESSAGE user hi\n"
            "MESSAGE assistant hello\n"
        ),
    )
    created = server.cli("create", "liang-ai", "-f", str(mf), check=True)
    lines = created.stderr.splitlines()
    assert lines[0] == "gathering model components"
    assert lines[1].startswith("copying file sha256:") and " 100% " in lines[1]
    assert lines[-2:] == ["writing manifest", "success"]
    assert "\x1b" not in created.stderr  # no escape codes when not a terminal

    listed = server.cli("list", check=True).stdout.splitlines()
    assert listed[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    row = listed[1].split()
    assert row[0] == "liang-ai:latest" and len(row[1]) == 12
    assert server.cli("ls", "LIANG", check=True).stdout.count("liang-ai") == 1
    assert "liang-ai" not in server.cli("ls", "other", check=True).stdout

    shown = server.cli("show", "liang-ai", check=True).stdout
    assert "  Model\n    architecture    " in shown
    assert "quantization        F32" in shown
    assert "  Capabilities\n    completion" in shown
    assert "  Parameters\n" in shown and "temperature" in shown
    assert "  System\n    你是由崔亮创建的AI助手" in shown
    assert "  License\n    MIT License" in shown

    assert (
        server.cli("show", "liang-ai", "--system", check=True).stdout
        == "你是由崔亮创建的AI助手，你叫亮仔。"
    )
    assert server.cli("show", "liang-ai", "--license", check=True).stdout == "MIT License\n"
    params = server.cli("show", "liang-ai", "--parameters", check=True).stdout
    assert 'stop                           "<|im_end|>"' in params
    assert "<|im_start|>" in server.cli("show", "liang-ai", "--template", check=True).stdout
    verbose = server.cli("show", "liang-ai", "-v", check=True).stdout
    assert "  Metadata\n" in verbose and "general.architecture" in verbose
    assert "  Tensors\n" in verbose and "token_embd.weight" in verbose
    both = server.cli("show", "liang-ai", "--system", "--license")
    assert both.returncode != 0 and "only one of" in both.stderr

    # The generated Modelfile builds the same model again.
    modelfile = server.cli("show", "liang-ai", "--modelfile", check=True).stdout
    _modelfile(tmp_path, modelfile)
    server.cli("create", "again", "-f", str(tmp_path / "Modelfile"), check=True)
    for flag in ("--system", "--parameters", "--template", "--license"):
        assert (
            server.cli("show", "again", flag).stdout == server.cli("show", "liang-ai", flag).stdout
        )

    assert (
        server.cli("cp", "liang-ai", "copy", check=True).stdout == "copied 'liang-ai' to 'copy'\n"
    )
    removed = server.cli("rm", "copy", "again", check=True).stdout
    assert removed == "deleted 'copy'\ndeleted 'again'\n"
    missing = server.cli("rm", "copy")
    assert missing.returncode == 1 and missing.stderr.startswith("Error: model 'copy' not found")


def test_cli_create_errors(server: RunningServer, tmp_path: Path) -> None:
    before = tree_snapshot(server.models)
    bad = _modelfile(tmp_path, "FROM ./tiny.gguf\nPARAMETER temprature 0.5\n")
    result = server.cli("create", "x", "-f", str(bad))
    assert result.returncode == 1
    assert "(line 2)" in result.stderr and "temprature" in result.stderr
    assert "temperature" in result.stderr  # lists the valid names

    (tmp_path / "fake.gguf").write_bytes(b"GGUF")  # magic only: CVE-2024-39720
    _modelfile(tmp_path, "FROM ./fake.gguf\n")
    result = server.cli("create", "x", "-f", str(tmp_path / "Modelfile"))
    assert result.returncode == 1 and "fake.gguf" in result.stderr
    assert "Traceback" not in result.stderr

    _modelfile(tmp_path, "FROM ./missing.gguf\n")
    result = server.cli("create", "x", "-f", str(tmp_path / "Modelfile"))
    assert result.returncode == 1 and "not found" in result.stderr

    result = server.cli("create", "bad name!", "-f", str(tmp_path / "Modelfile"))
    assert result.returncode == 1 and "invalid model name" in result.stderr
    assert server.cli("list", check=True).stdout.splitlines()[1:] == []
    blobs_left = tree_snapshot(server.models) - before
    assert all(p.startswith("blobs") or p == "manifests" for p in blobs_left)


def test_cli_starts_a_server_when_none_answers(isolated_env: Path) -> None:
    """Client commands start ``pollama serve`` in the background, say so in one line, and
    leave it running; a server that cannot start is a clear one-line error."""
    home = isolated_env
    port, broken_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update(HOME=str(home), OLLAMA_HOST=f"127.0.0.1:{port}",
               OLLAMA_MODELS=str(home / ".ollama" / "models"))

    def pollama(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pollama", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=90)

    log = home / ".ollama" / "logs" / "server.log"
    try:
        first = pollama("list")
        assert first.returncode == 0, first.stderr
        assert first.stderr == (f"started pollama server in the background at "
                                f"http://127.0.0.1:{port} (log: {log})\n")
        assert first.stdout.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
        second = pollama("list")
        assert second.returncode == 0 and second.stderr == ""
    finally:
        pid = int((home / ".ollama" / "logs" / "server.pid").read_text())
        os.kill(pid, signal.SIGTERM)
    broken = pollama("list", OLLAMA_HOST=f"127.0.0.1:{broken_port}",
                     OLLAMA_MODELS="/dev/null/models")
    assert broken.returncode == 1
    assert broken.stderr.startswith(
        f"Error: could not start pollama server at http://127.0.0.1:{broken_port}: "
        "'pollama serve' exited with code "
    )
    assert broken.stderr.endswith(f"; see {log}\n") and broken.stderr.count("\n") == 1


def test_cli_purge(server: RunningServer, tmp_path: Path) -> None:
    orphan = server.models / "blobs" / ("sha256-" + "c" * 64)
    orphan.write_bytes(b"x" * 2000)
    result = server.cli("purge")
    assert result.returncode != 0 and "--yes" in result.stderr
    assert orphan.exists()
    result = server.cli("purge", "--yes", check=True)
    assert "unreferenced blob" in result.stdout and "freed 2 KB" in result.stdout
    assert not orphan.exists()
    assert server.cli("purge", "--yes", check=True).stdout.strip() == "nothing to purge"


def test_cli_create_quantized(server: RunningServer, tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "f32.gguf", n_embd=256)
    mf = _modelfile(tmp_path, "FROM f32.gguf\n")
    result = server.cli("create", "small", "-q", "q8_0", "-f", str(mf), check=True)
    lines = result.stderr.splitlines()
    assert any(line.startswith("quantizing F32 model to Q8_0 100%") for line in lines)
    assert "verifying conversion" in lines and lines[-1] == "success"
    assert "quantization        Q8_0" in server.cli("show", "small", check=True).stdout
