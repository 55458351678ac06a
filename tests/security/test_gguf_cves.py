"""Hostile GGUF files: one hand-written file per GGUF CVE of docs/security.md#model-files, a
structure-aware Hypothesis fuzzer, and the server's answer to each (a 400 naming the
problem; never a crash, a hang or a 500; the server keeps serving)."""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import stop_server
from ggufgen import build_gguf, corrupt_variants, valid_raw_gguf, write_tiny_model
from pollama.errors import GGUFError
from pollama.gguf import DEFAULT_MAX_ELEMENTS, GGML_TYPES, GGUFInfo, read_gguf
from pollama.runner.base import LoadSpec

from .conftest import launch

U64_MAX = (1 << 64) - 1
ARCH = [("general.architecture", 8, "llama")]
F32 = [("t", [8], 0, 0)]
DATA = bytes(32)


def _one_key(payload: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + payload


def _many_arrays(n_keys: int, each: int) -> bytes:
    """``n_keys`` u8 arrays of ``each`` elements: small per array, huge together."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, 0, n_keys))
    for i in range(n_keys):
        key = f"a{i}".encode()
        out += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, each)
        out += bytes(each)
    return bytes(out)


# CVE id -> {description: file bytes}. Every file must be refused with a GGUFError.
CVE_CORPUS: dict[str, dict[str, bytes]] = {
    "CVE-2024-39720 (magic-only file crashed create)": {
        "magic only": b"GGUF",
        "magic and version": b"GGUF" + struct.pack("<I", 3),
        "counts cut short": b"GGUF" + struct.pack("<IQ", 3, 1),
    },
    "CVE-2024-12055 (out-of-bounds read)": {
        "string past the end": _one_key(struct.pack("<IQ", 8, 1 << 20) + b"abc"),
        "key past the end": b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 100) + b"k",
        "tensor name past the end": b"GGUF" + struct.pack("<IQQQ", 3, 1, 0, 1000) + b"t",
        "tensor dims past the end": build_gguf(ARCH, [("t", [8, 8], 0, 0)])[:-20],
    },
    "CVE-2025-0312 (nil dereference on missing data)": {
        "kv count with no kv": build_gguf(n_kv=3),
        "tensor count with no tensors": build_gguf(ARCH, n_tensors=2),
        "array of unknown element type": _one_key(struct.pack("<IIQ", 9, 99, 1) + bytes(8)),
        "value of unknown type": _one_key(struct.pack("<I", 77) + bytes(8)),
    },
    "CVE-2025-0317 (division by zero in padding)": {
        "zero alignment": build_gguf(ARCH + [("general.alignment", 4, 0)], F32, DATA),
        "alignment 3": build_gguf(ARCH + [("general.alignment", 4, 3)], F32, DATA, alignment=3),
        "alignment 2^63": build_gguf(ARCH + [("general.alignment", 10, 1 << 63)], F32, DATA),
        "negative alignment": build_gguf(ARCH + [("general.alignment", 5, -32)], F32, DATA),
        "float alignment": build_gguf(ARCH + [("general.alignment", 6, 32.0)], F32, DATA),
    },
    "CVE-2025-0315 (unbounded allocation)": {
        "u64 max tensors": build_gguf(ARCH, n_tensors=U64_MAX),
        "u64 max keys": build_gguf(ARCH, n_kv=U64_MAX),
        "u64 max string": _one_key(struct.pack("<IQ", 8, U64_MAX) + bytes(16)),
        "2^62 array": _one_key(struct.pack("<IIQ", 9, 4, 1 << 62) + bytes(16)),
        "2^40 string array": _one_key(struct.pack("<IIQ", 9, 8, 1 << 40) + bytes(16)),
        "nested 2^40 arrays": _one_key(struct.pack("<IIQ", 9, 9, 1 << 40) + bytes(16)),
        "many arrays, huge together": _many_arrays(3, 3_000_000),
    },
    "CVE-2025-66959 (unchecked length copies)": {
        "tensor name of u64 max": b"GGUF" + struct.pack("<IQQQ", 3, 1, 0, U64_MAX) + bytes(8),
        "long tensor name": build_gguf(ARCH, [("n" * 64, [8], 0, 0)], DATA),
        "five dimensions": build_gguf(ARCH, [("t", [1, 1, 1, 1, 8], 0, 0)], DATA),
        "u32 max dimensions": b"GGUF" + struct.pack("<IQQQ", 3, 1, 0, 1) + b"t"
        + struct.pack("<I", 0xFFFFFFFF) + bytes(64),
    },
    "CVE-2025-66960 (GGUF v1 string lengths)": {
        "version 1": build_gguf(ARCH, version=1),
        "version 1, u32 lengths": b"GGUF" + struct.pack("<III", 1, 0, 1) + struct.pack("<I", 1)
        + b"k" + struct.pack("<II", 8, 0xFFFFFFFF),
        "version 0": build_gguf(ARCH, version=0),
        "version u32 max": build_gguf(ARCH, version=0xFFFFFFFF),
    },
    "CVE-2026-7482 Bleeding Llama (tensor data past the end of the file)": {
        "offset past the end": build_gguf(ARCH, [("t", [8], 0, 1 << 30)], DATA),
        "size past the end": build_gguf(ARCH, [("t", [1 << 20], 0, 0)], DATA),
        "offset overflows": build_gguf(ARCH, [("t", [8], 0, U64_MAX - 31)], DATA),
        "size overflows": build_gguf(ARCH, [("t", [1 << 32, 1 << 32, 1 << 8], 0, 0)], DATA),
        "offset not aligned": build_gguf(ARCH, [("t", [4], 0, 4)], DATA),
        "overlapping tensors": build_gguf(ARCH, [("t", [8], 0, 0), ("u", [8], 0, 0)], DATA),
        "row not a block multiple": build_gguf(ARCH, [("q", [40], 2, 0)], bytes(64)),
        "unknown dtype": build_gguf(ARCH, [("t", [8], 0xFFFFFFFF, 0)], DATA),
        "removed dtype": build_gguf(ARCH, [("t", [32], 5, 0)], DATA),
    },
}


def _corpus() -> list[tuple[str, str, bytes]]:
    return [(cve, name, data) for cve, files in CVE_CORPUS.items() for name, data in files.items()]


@pytest.mark.parametrize(("cve", "name", "data"), _corpus(),
                         ids=[f"{cve.split()[0]}: {name}" for cve, name, _ in _corpus()])
def test_cve_corpus_is_refused(tmp_path: Path, cve: str, name: str, data: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError) as exc:
            read_gguf(path, display_name="upload.gguf")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(exc.value)
    assert message.startswith("upload.gguf: ") and len(message) > 20, (cve, name)
    assert str(tmp_path) not in message
    # A list of u8 costs 8 bytes per element: memory stays within a small multiple of the
    # file, and within what the total element cap allows whatever the file.
    assert peak < (4 << 20) + 8 * len(data), (cve, name, peak)
    assert peak < (4 << 20) + 10 * DEFAULT_MAX_ELEMENTS, (cve, name, peak)


def test_total_caps(tmp_path: Path) -> None:
    """The caps on all arrays together and on the header's size (the gap in per-array caps:
    many arrays, each under its cap, could still amplify a file many times in memory)."""
    path = tmp_path / "m.gguf"
    path.write_bytes(_many_arrays(4, 1000))
    assert len(read_gguf(path, max_elements=4000).kv) == 4
    with pytest.raises(GGUFError, match="more than 3999 elements in all"):
        read_gguf(path, max_elements=3999)
    with pytest.raises(GGUFError, match="header too large"):
        read_gguf(path, max_header=2000)
    model = write_tiny_model(tmp_path / "tiny.gguf")
    info = read_gguf(model)
    read_gguf(model, max_header=info.data_offset)
    with pytest.raises(GGUFError, match="header too large"):
        read_gguf(model, max_header=info.data_offset - 100)


# -- structure-aware fuzzing -----------------------------------------------------------------

_EXTREME = st.sampled_from([0, 1, 2, 3, 31, 32, 33, 255, 256, 1 << 31, (1 << 32) - 1, 1 << 32,
                            (1 << 63) - 1, 1 << 63, U64_MAX])  # fmt: skip
_SMALL = st.integers(0, 70)
_SCALAR_TYPES = {0: st.integers(0, 255), 1: st.integers(-128, 127), 2: st.integers(0, 65535),
                 3: st.integers(-32768, 32767), 4: st.integers(0, (1 << 32) - 1),
                 5: st.integers(-(1 << 31), (1 << 31) - 1), 6: st.floats(width=32),
                 7: st.booleans(), 10: st.integers(0, U64_MAX),
                 11: st.integers(-(1 << 63), (1 << 63) - 1), 12: st.floats()}  # fmt: skip
_KEYS = st.sampled_from([
    "general.architecture", "general.alignment", "llama.block_count", "llama.context_length",
    "llama.embedding_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "tokenizer.ggml.tokens", "tokenizer.chat_template", "general.file_type", "x",
])  # fmt: skip


@st.composite
def _kv(draw: st.DrawFn) -> tuple[str, int, Any]:
    key = draw(_KEYS)
    kind = draw(st.sampled_from(["scalar", "string", "array", "extreme"]))
    if kind == "scalar":
        vtype = draw(st.sampled_from(sorted(_SCALAR_TYPES)))
        return key, vtype, draw(_SCALAR_TYPES[vtype])
    if kind == "string":
        return key, 8, draw(st.text(max_size=20))
    if kind == "array":
        sub = draw(st.sampled_from([0, 4, 6, 8]))
        item = st.text(max_size=5) if sub == 8 else _SCALAR_TYPES[sub]
        return key, 9, (sub, draw(st.lists(item, max_size=6)))
    return key, 10, draw(_EXTREME)


@st.composite
def _tensor(draw: st.DrawFn) -> tuple[str, list[int], int, int]:
    dims = draw(st.lists(st.one_of(_SMALL, _EXTREME), min_size=0, max_size=5))
    ggml_type = draw(st.one_of(st.sampled_from(sorted(GGML_TYPES)), st.integers(0, 50),
                               st.just(0xFFFFFFFF)))  # fmt: skip
    offset = draw(st.one_of(st.sampled_from([0, 32, 64, 96]), _EXTREME))
    return draw(st.sampled_from(["a", "b", "c"])), dims, ggml_type, offset


@st.composite
def _files(draw: st.DrawFn) -> bytes:
    kv = draw(st.lists(_kv(), max_size=6))
    tensors = draw(st.lists(_tensor(), max_size=4))
    data = bytes(draw(st.sampled_from([0, 32, 64, 128, 300])))
    alignment = draw(st.sampled_from([0, 1, 8, 32, 48, 64]))
    raw = build_gguf(
        kv, tensors, data,
        version=draw(st.sampled_from([2, 3, 3, 3, 1, 4])),
        n_kv=draw(st.one_of(st.none(), st.none(), _EXTREME)),
        n_tensors=draw(st.one_of(st.none(), st.none(), _EXTREME)),
        alignment=alignment,
    )  # fmt: skip
    cut = draw(st.one_of(st.none(), st.none(), st.integers(0, len(raw))))
    return raw if cut is None else raw[:cut]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=_files())
def test_generated_files_only_raise_gguf_error(tmp_path: Path, data: bytes) -> None:
    """Zero and huge alignment, zero block_count, lengths up to 2^64-1, wrong element types:
    the reader returns a consistent header or raises GGUFError, within a memory budget."""
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        try:
            info = read_gguf(path, display_name="fuzz.gguf")
        except GGUFError as e:
            assert str(e).startswith("fuzz.gguf: ")
            info = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (2 << 20) + 64 * len(data)
    if info is None:
        return
    assert isinstance(info, GGUFInfo) and info.alignment & (info.alignment - 1) == 0
    ends = sorted((t.offset, t.offset + t.nbytes) for t in info.tensors if t.nbytes)
    for (_, end), (start, _) in zip(ends, ends[1:], strict=False):
        assert end <= start
    for tensor in info.tensors:
        assert info.data_offset <= tensor.offset and tensor.offset % info.alignment == 0
        assert tensor.offset + tensor.nbytes <= len(data) and len(tensor.shape) <= 4
    # What the rest of pollama computes from a header must not divide by zero either.
    from pollama.scheduler.memory import estimate_memory

    spec = LoadSpec(model_path=str(path), num_ctx=2048)
    assert estimate_memory(info, spec) >= 0
    info.model_info()
    info.model_info(verbose=True)


# -- through the API ---------------------------------------------------------------------------


def _create(post: Callable[..., Any], data: bytes, name: str) -> tuple[int, str]:
    """Upload ``data`` as a blob and create a model from it (not streamed)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    uploaded = post(f"/api/blobs/{digest}", content=data)
    assert uploaded.status_code in (200, 201), uploaded.text
    response = post("/api/create", json={"model": name, "files": {"model.gguf": digest},
                                         "stream": False})  # fmt: skip
    return response.status_code, response.text


def _all_bad_files() -> list[tuple[str, bytes]]:
    files = [(f"{cve.split()[0]} {name}", data) for cve, name, data in _corpus()]
    files += sorted(corrupt_variants().items())
    return [(label, data) for label, data in files if data]  # an empty blob is no upload


def test_every_bad_file_is_a_400_naming_the_problem(api: TestClient) -> None:
    for label, data in _all_bad_files():
        status, text = _create(api.post, data, "bad")
        assert status == 400, (label, status, text)
        message = json.loads(text)["error"]
        assert "model.gguf" in message and len(message) > len("model.gguf: ") + 5, label
    assert api.get("/api/tags").json() == {"models": []}


def test_degenerate_but_well_formed_headers_do_not_500(api: TestClient, tmp_path: Path) -> None:
    """Zero block_count / head counts (CVE-2024-8063's division by zero) and wrong value types
    for known keys: create and show answer without a server error."""
    kv_sets = [
        [("general.architecture", 8, "llama"), ("llama.block_count", 4, 0),
         ("llama.attention.head_count", 4, 0), ("llama.attention.head_count_kv", 4, 0),
         ("llama.embedding_length", 4, 0), ("llama.context_length", 4, 0)],
        [("general.architecture", 4, 7), ("llama.block_count", 8, "zero"),
         ("tokenizer.chat_template", 4, 1)],
        [],
    ]  # fmt: skip
    for i, kv in enumerate(kv_sets):
        data = build_gguf(kv, [("t", [8], 0, 0)], DATA)
        status, text = _create(api.post, data, f"odd{i}")
        assert status < 500, text
        if status == 200:
            shown = api.post("/api/show", json={"model": f"odd{i}"})
            assert shown.status_code < 500, shown.text


@pytest.mark.slow
def test_real_server_survives_every_bad_file(isolated_env: Path) -> None:
    server = launch(isolated_env, "127.0.0.1")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for label, data in _all_bad_files():
                status, _ = _create(http.post, data, "bad")
                assert status == 400, label
            assert server.process.poll() is None
            assert http.get("/api/tags").json() == {"models": []}
            good = valid_raw_gguf()
            status, text = _create(http.post, good, "fine")
            assert status == 200, text
    finally:
        stop_server(server)
