"""``create`` from a Hugging Face safetensors folder: the store's side of the conversion.

The store turns the request's ``{name in the folder: digest}`` into blob paths (the
converter never sees a digest or builds a path), checks that the converted model fits on
disk, and writes the GGUF into a temporary folder of its own, which disappears with
whatever was half-written if the create fails or the client leaves
(docs/ollama-behaviour.md#create).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pollama import convert  # its numpy side loads on first use (pollama/convert/__init__.py)
from pollama.errors import BlobNotFound, InvalidRequest
from pollama.format import human_bytes
from pollama.store.blobs import StoredBlob, parse_digest
from pollama.store.models import Store

__all__ = ["check_gguf_upload", "convert_to_blob", "plan_import"]


def _paths(store: Store, files: dict[str, str]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for name in sorted(files):
        digest = parse_digest(files[name])
        path = store.blobs.path(digest)
        if not path.is_file():
            raise BlobNotFound(
                f"blob {digest} for file '{name}' not found: upload it first with "
                f"POST /api/blobs/{digest}"
            )
        paths[name] = path
    return paths


def check_gguf_upload(store: Store, files: dict[str, str]) -> None:
    """Files that are not a safetensors folder may still be pickled weights, refused with
    the same advice (``refuse_pickles``)."""
    paths = {name: store.blobs.path(parse_digest(digest)) for name, digest in files.items()}
    convert.refuse_pickles({name: path for name, path in paths.items() if path.is_file()})


def plan_import(store: Store, files: dict[str, str], *, quantize: bool) -> convert.ConvertPlan:
    """Every check, before anything is written: the folder (``ConversionError``, 400), and
    room on disk for the converted model (twice, when it is quantized afterwards: the
    16-bit file and the quantized one exist together for a moment)."""
    if any(name.lower().endswith(".gguf") for name in files):
        raise InvalidRequest(
            "the FROM files mix GGUF and safetensors files: a model is one or the other"
        )
    plan = convert.plan_conversion(_paths(store, files))
    store.ensure()
    needed = plan.output_bytes * (2 if quantize else 1)
    free = shutil.disk_usage(store.blobs.dir).free
    if needed > free:
        raise InvalidRequest(
            f"converting this model needs {human_bytes(needed)} of disk, and the models "
            f"directory has {human_bytes(free)} free"
        )
    return plan


def convert_to_blob(
    store: Store, plan: convert.ConvertPlan
) -> Iterator[tuple[int, int] | StoredBlob]:
    """Write the converted GGUF, yielding ``(done, total)`` bytes as it goes, then the blob
    it became. Nothing of it stays in the store if the iterator is not run to its end."""
    with tempfile.TemporaryDirectory(dir=store.blobs.dir, prefix="tmp-") as tmp:
        dest = Path(tmp) / "converted.gguf"
        yield from convert.write_gguf(plan, dest)
        yield store.blobs.put_file(dest)
