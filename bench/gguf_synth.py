"""A stand-in for Qwen2.5-Coder-0.5B-Instruct Q4_K_M that travels in 2 MB instead of 491 MB.

The GPU machine reaches no package index and the device tool carries 64 MiB in all, so the real
model (tests/models.py) cannot go there. What a speed test needs of it is its *shape*: the same
architecture, tensor shapes and quantization types (Q4_K, Q5_0, Q6_K, Q8_0, F32) give the same
kernels, the same bytes read per token and the same KV cache; the same tokenizer and chat
template give the same prompt lengths. So:

``pack`` (here, with the real model) keeps the GGUF's header verbatim (metadata, tokenizer,
chat template, tensor table: everything before the tensor data, ~6 MB, ~2 MB compressed) and a
manifest of the tensors' types and places.

``make`` (there, numpy only) writes that header and then, for each tensor, quantized blocks with
random quants and scales chosen so the weights are zero-mean with a standard deviation of ~0.02
(no overflow in f16 on the GPU); norms are 1. The answers are nonsense by construction. The
output rows of the special tokens (ids from the first control token on: end of text, end of
turn, tool-call tags) are zero, so the nonsense never ends early and every run decodes the
number of tokens asked for.

    python bench/gguf_synth.py pack MODEL.gguf .gpu      # -> .gpu/qwen-skeleton.gguf.xz + .json
    python bench/gguf_synth.py make .gpu OUT.gguf        # the stand-in, same size as MODEL.gguf
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path
from typing import Any

import numpy as np

SKELETON = "qwen-skeleton.gguf.xz"
MANIFEST = "qwen-skeleton.json"
STD = 0.02
# Bytes per block and elements per block of the types the model uses (ggml-common.h).
BLOCKS = {"Q4_K": (144, 256), "Q5_0": (22, 32), "Q6_K": (210, 256), "Q8_0": (34, 32),
          "F32": (4, 1)}


def pack(model: Path, out_dir: Path) -> None:
    """Keep the header of ``model`` and a manifest of its tensors (runs where gguf is)."""
    from gguf import GGUFReader

    reader = GGUFReader(model)
    tensors = [
        {"name": t.name, "type": t.tensor_type.name, "rows": int(np.prod(t.shape[1:])),
         "row_elements": int(t.shape[0]), "bytes": int(t.n_bytes),
         "offset": int(t.data_offset) - reader.data_offset}  # from the start of the data
        for t in reader.tensors
    ]
    unknown = {t["type"] for t in tensors} - BLOCKS.keys()
    if unknown:
        raise SystemExit(f"no synthesis for tensor types {sorted(unknown)}")
    token_types = reader.fields["tokenizer.ggml.token_type"]
    types = [int(token_types.parts[i][0]) for i in token_types.data]
    # The first non-normal token (type 3 = control): Qwen's specials all follow it.
    first_special = next(i for i, kind in enumerate(types) if kind != 1)
    header = model.open("rb").read(reader.data_offset)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SKELETON).write_bytes(lzma.compress(header, preset=9))
    manifest = {"source": model.name, "size": model.stat().st_size,
                "data_offset": reader.data_offset, "first_special": first_special,
                "tensors": tensors}
    (out_dir / MANIFEST).write_text(json.dumps(manifest))
    print(f"{out_dir / SKELETON}: {(out_dir / SKELETON).stat().st_size} bytes "
          f"(header {reader.data_offset}), {len(tensors)} tensors")


def _f16(value: float) -> np.ndarray:
    return np.array([value], dtype="<f2").view(np.uint8)


def _blocks(kind: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``n_blocks`` blocks of ``kind`` with random quants and zero-mean weights of std ~STD."""
    size, _ = BLOCKS[kind]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    if kind == "Q5_0":  # d, qh[4], qs[16]: w = d * (q - 16), q uniform 0..31 (std 9.2)
        blocks[:, 0:2] = _f16(STD / 9.2)
    elif kind == "Q8_0":  # d, qs[32] int8: w = d * q (std 74)
        blocks[:, 0:2] = _f16(STD / 74)
    elif kind == "Q6_K":  # ql[128], qh[64], scales[16] int8, d: w = d * sc * (q - 32)
        blocks[:, 192:208] = 8
        blocks[:, 208:210] = _f16(STD / (8 * 18.5))
    elif kind == "Q4_K":  # d, dmin, scales[12], qs[128]: w = d * sc * q - dmin * m
        # Every scale byte 0x11 unpacks to sc = m (17 for sub-blocks 0-3, 1 for 4-7), so
        # dmin = 7.5 d centres q (uniform 0..15) on zero.
        d = STD / (17 * 4.6)
        blocks[:, 0:2] = _f16(d)
        blocks[:, 2:4] = _f16(7.5 * d)
        blocks[:, 4:16] = 0x11
    return blocks


def _tensor(spec: dict[str, Any], first_special: int, rng: np.random.Generator) -> bytes:
    kind = spec["type"]
    if kind == "F32":
        n = spec["bytes"] // 4
        if spec["name"].endswith("norm.weight"):
            return np.ones(n, dtype="<f4").tobytes()
        return rng.normal(0, STD, n).astype("<f4").tobytes()  # the attention biases
    size, per_block = BLOCKS[kind]
    per_row = spec["row_elements"] // per_block
    blocks = _blocks(kind, spec["bytes"] // size, rng)
    if spec["name"] == "output.weight":
        # A zero row gives logit 0 against a maximum of ~+2.5 among 150k random ones.
        blocks.reshape(spec["rows"], per_row, size)[first_special:] = 0
    return blocks.tobytes()


def make(pack_dir: Path, dest: Path) -> None:
    """Write the stand-in model to ``dest`` from a ``pack`` folder (numpy only)."""
    manifest = json.loads((pack_dir / MANIFEST).read_text())
    header = lzma.decompress((pack_dir / SKELETON).read_bytes())
    rng = np.random.default_rng(0)
    data_offset = manifest["data_offset"]
    tmp = dest.with_suffix(".partial")
    with tmp.open("wb") as f:
        f.write(header)
        for spec in manifest["tensors"]:
            f.seek(data_offset + spec["offset"])
            f.write(_tensor(spec, manifest["first_special"], rng))
        f.truncate(manifest["size"])
    tmp.replace(dest)
    print(f"{dest}: {dest.stat().st_size} bytes, a stand-in for {manifest['source']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_pack = sub.add_parser("pack", help="keep a real model's header and tensor table")
    p_pack.add_argument("model", type=Path)
    p_pack.add_argument("out_dir", type=Path)
    p_make = sub.add_parser("make", help="write the stand-in model")
    p_make.add_argument("pack_dir", type=Path)
    p_make.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.model, args.out_dir)
    else:
        make(args.pack_dir, args.dest)


if __name__ == "__main__":
    main(sys.argv[1:])
