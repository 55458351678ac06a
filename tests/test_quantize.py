"""Re-quantization through llama.cpp's quantizer, in a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ggufgen import write_gguf, write_tiny_model
from pollama.errors import InternalError, UnsupportedQuantization
from pollama.gguf import read_gguf
from pollama.store.quantize import normalize_quantization, quantize_file

OLLAMA_MESSAGE = (
    "unsupported quantization type {} - supported types are F32, F16, Q4_K_S, Q4_K_M, Q8_0"
)


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 256 so that K-quants get real Q4_K/Q6_K blocks, not fallbacks."""
    path = tmp_path_factory.mktemp("src") / "tiny-f32.gguf"
    return write_tiny_model(path, n_embd=256, n_layer=1, n_head=4)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("q4_k_m", "Q4_K_M"), ("Q4_K", "Q4_K_M"), (" q8_0 ", "Q8_0"), ("f16", "F16"),
     ("BF16", "BF16"), ("q4_K_s", "Q4_K_S"), ("q4_0", "Q4_0"), ("F32", "F32")],
)  # fmt: skip
def test_normalize_quantization(given: str, canonical: str) -> None:
    assert normalize_quantization(given) == canonical


@pytest.mark.parametrize("bad", ["Q9_0", "", "q4", "IQ2_XXS", "Q4_K_X"])
def test_unsupported_type_has_ollamas_message(bad: str) -> None:
    with pytest.raises(UnsupportedQuantization) as exc:
        normalize_quantization(bad)
    assert str(exc.value) == OLLAMA_MESSAGE.format(bad)


@pytest.mark.parametrize(
    ("target", "matrix_types"),
    [("q4_0", {"Q4_0"}), ("q8_0", {"Q8_0"}), ("q4_K_M", {"Q4_K", "Q6_K"})],
)
def test_quantize_tiny_f32_model(
    f32_model: Path, tmp_path: Path, target: str, matrix_types: set[str]
) -> None:
    dst = tmp_path / "out.gguf"
    calls: list[tuple[int, int]] = []
    quantize_file(f32_model, dst, target, on_progress=lambda d, t: calls.append((d, t)))
    info = read_gguf(dst)
    assert info.file_type == target.upper()
    assert info.architecture == "llama" and info.context_length == 256
    types = {t.name: t.type_name for t in info.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay F32
    assert {types["blk.0.attn_q.weight"], types["blk.0.ffn_down.weight"]} <= matrix_types
    assert matrix_types & set(types.values()) == matrix_types
    assert dst.stat().st_size < f32_model.stat().st_size
    total = f32_model.stat().st_size
    assert calls and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_quantized_model_still_runs(f32_model: Path, tmp_path: Path) -> None:
    """The output is a working model, checked in a child so llama.cpp stays out of pytest."""
    dst = tmp_path / "q.gguf"
    quantize_file(f32_model, dst, "Q4_K_M")
    script = (
        "import sys, llama_cpp\n"
        "m = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False)\n"
        "tokens = m.tokenize(b'hello world')\n"
        "m.eval(tokens)\n"
        "print(len(tokens), len(m.scores[m.n_tokens - 1]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(dst)], capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    n_tokens, n_vocab = map(int, out.stdout.split())
    assert n_tokens > 1 and n_vocab == 400


def test_f16_source_is_accepted(tmp_path: Path) -> None:
    src = write_tiny_model(tmp_path / "f16.gguf", file_type="F16")
    quantize_file(src, tmp_path / "out.gguf", "Q8_0")
    assert read_gguf(tmp_path / "out.gguf").file_type == "Q8_0"


def test_quantized_source_is_refused(tmp_path: Path) -> None:
    src = write_tiny_model(tmp_path / "q8.gguf", file_type="Q8_0")
    dst = tmp_path / "out.gguf"
    with pytest.raises(UnsupportedQuantization) as exc:
        quantize_file(src, dst, "Q4_K_M")
    assert str(exc.value) == "quantization is only supported for F16, BF16 and F32 models"
    assert not dst.exists()


def test_callers_file_type_is_trusted(f32_model: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedQuantization):
        quantize_file(f32_model, tmp_path / "out.gguf", "Q8_0", source_file_type="Q4_K_M")


def test_bad_target_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedQuantization, match="Q3_X"):
        quantize_file(tmp_path / "missing.gguf", tmp_path / "out.gguf", "Q3_X")


def test_quantizer_failure_is_internal_error_without_paths(tmp_path: Path) -> None:
    # Well-formed GGUF, F16 by its metadata, but no architecture llama.cpp knows.
    src = write_gguf(tmp_path / "odd.gguf", {"general.architecture": "nosuch",
                                             "general.file_type": 1})  # fmt: skip
    dst = tmp_path / "out.gguf"
    with pytest.raises(InternalError) as exc:
        quantize_file(src, dst, "Q8_0")
    message = str(exc.value)
    assert message.startswith("quantizing to Q8_0 failed: ")
    assert "nosuch" in message or "architecture" in message
    assert str(tmp_path) not in message
    assert not dst.exists()


def test_raising_progress_callback_stops_and_cleans_up(f32_model: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.gguf"

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_file(f32_model, dst, "Q8_0", on_progress=stop)
    assert not dst.exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pollama.runner.quantize", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_success_and_case_insensitive_type(f32_model: Path, tmp_path: Path) -> None:
    result = _run_cli(str(f32_model), str(tmp_path / "o.gguf"), "q4_k_s")
    assert result.returncode == 0, result.stderr
    assert read_gguf(tmp_path / "o.gguf").file_type == "Q4_K_S"


@pytest.mark.parametrize(
    ("args", "reason"),
    [(("{src}", "{dst}", "Q9_9"), "unknown file type"),
     (("{missing}", "{dst}", "Q8_0"), "failed to load model")],
)  # fmt: skip
def test_cli_failure_is_one_line(
    f32_model: Path, tmp_path: Path, args: tuple[str, ...], reason: str
) -> None:
    paths = {"src": f32_model, "dst": tmp_path / "o.gguf", "missing": tmp_path / "none.gguf"}
    result = _run_cli(*(a.format(**{k: str(v) for k, v in paths.items()}) for a in args))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0]
