"""``pollama create``: read a Modelfile, upload its files as blobs, ask the server to create.

The server never opens a path we give it: every local file named by FROM, ADAPTER or DRAFT
is hashed here, uploaded with ``HEAD``/``POST /api/blobs/<digest>`` (skipped when the server
already has it), and referred to in ``files``/``adapters``/``draft_files`` by digest
(docs/ollama-behaviour.md#create). A DRAFT that is no file may name a local model
(``draft``), whose weights the server then keeps as the draft. ``FROM`` a Hugging Face
folder uploads the files the server's converter reads (:func:`hf_model_files`, Ollama's
``filesForModel``), named by their paths in the folder (``1_Pooling/config.json``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import click

from pollama.cli.common import client, reports_errors
from pollama.cli.progress import ProgressDisplay
from pollama.client import Client
from pollama.errors import InvalidRequest
from pollama.modelfile import Modelfile
from pollama.names import ModelName

_HASH_CHUNK = 1 << 20


def _expand(value: str, base: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _looks_like_path(value: str) -> bool:
    """A FROM value that cannot be a model name is a path the user mistyped."""
    return value.startswith((".", "/", "~", "\\")) or value.lower().endswith(".gguf")


_HF_EXTRAS = ("tokenizer.model", "vocab.txt", "merges.txt", "chat_template.jinja")
_PICKLES = ("pytorch_model*.bin", "consolidated*.pth", "*.pt", "*.pth", "*.ckpt")
_LFS_POINTER = b"version https://git-lfs"


def _files(folder: Path, *patterns: str) -> list[Path]:
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def hf_model_files(folder: Path) -> list[tuple[str, Path]]:
    """The files of a Hugging Face folder that a conversion reads, by their names in it:
    the ``*.safetensors`` weights, the JSON files of the folder and of its sub-folders one
    level down (a sentence-transformers ``1_Pooling/config.json``), and the tokenizer files
    that are not JSON. Empty when the folder has no safetensors weights."""
    weights = _files(folder, "*.safetensors")
    if not weights:
        return []
    for path in weights:
        with open(path, "rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise InvalidRequest(
                    f"'{path}' is a Git LFS pointer, not the weights: run 'git lfs pull' first"
                )
    found = weights + _files(folder, "*.json", "*/*.json", *_HF_EXTRAS)
    return [(p.relative_to(folder).as_posix(), p) for p in found]


def _model_files(path: Path) -> list[Path]:
    """The GGUF files a FROM path stands for: the file itself, or a folder's *.gguf."""
    if path.is_dir():
        found = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if not found and _files(path, *_PICKLES):
            raise InvalidRequest(
                f"'{path}' holds pickled PyTorch weights, which pollama never loads "
                "(unpickling runs code): convert the model to safetensors first"
            )
        if not found:
            raise InvalidRequest(f"no GGUF or safetensors files found in directory '{path}'")
        return found
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise InvalidRequest(f"'{path}' is not a regular file")
    return [path]


def _digest(path: Path, display: ProgressDisplay) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _named(paths: list[Path]) -> list[tuple[str, Path]]:
    """GGUF files by basename, or by path relative to their common folder."""
    root = Path(os.path.commonpath([p.parent for p in paths])) if len(paths) > 1 else None
    return [(path.relative_to(root).as_posix() if root else path.name, path) for path in paths]


def _upload(
    api: Client, files: list[tuple[str, Path]], display: ProgressDisplay
) -> dict[str, str]:
    """Upload files, returning the ``files`` map (name → digest)."""
    mapping: dict[str, str] = {}
    for key, path in files:
        digest = _digest(path, display)
        title = f"copying file {digest}"
        total = path.stat().st_size
        if not api.blob_exists(digest):
            api.push_blob(digest, path, lambda done, total, t=title: display.bar(t, t, done, total))
        display.bar(title, title, total, total)
        mapping[key] = digest
    return mapping


def _split_froms(froms: list[str], base: Path) -> tuple[list[str], list[tuple[str, Path]]]:
    """The FROM lines as at most one local model's name and the files to upload, in any
    order: the server tells the model's weights from its projector by their headers.
    Beside a model's name, files may only add its projector (the server checks). A
    Hugging Face folder is a whole model: it is the only FROM line."""
    names: list[str] = []
    paths: list[Path] = []
    folders: list[list[tuple[str, Path]]] = []
    for value in froms:
        path = _expand(value, base)
        hf = hf_model_files(path) if path.is_dir() else []
        if hf:
            folders.append(hf)
        elif path.exists():
            paths += _model_files(path)
        elif _looks_like_path(value):
            raise InvalidRequest(
                f"FROM '{value}': file not found (relative paths start from the Modelfile's "
                f"folder, {base})"
            )
        elif names:
            raise InvalidRequest(
                f"FROM '{value}' is neither a file nor a directory, and FROM '{names[0]}' "
                "already names the model"
            )
        else:
            names.append(value)
    if folders and (len(froms) > 1 or len(folders) > 1):
        raise InvalidRequest(
            "FROM a safetensors folder must be the model's only FROM line: the folder is "
            "the whole model"
        )
    return names, folders[0] if folders else _named(list(dict.fromkeys(paths)))


def _draft(api: Client, value: str, base: Path, display: ProgressDisplay) -> dict[str, Any]:
    """The request's draft model: the file (or a folder's one GGUF) DRAFT names, uploaded
    (``draft_files``), or, when no such file exists and the value cannot be a path, a
    local model's name (``draft``: the server checks it is one)."""
    path = _expand(value, base)
    if path.is_dir() and _files(path, "*.safetensors") and not _files(path, "*.gguf"):
        raise InvalidRequest(
            f"DRAFT '{value}' is a safetensors folder: pollama takes a draft model as one GGUF "
            "file (convert it with llama.cpp's convert_hf_to_gguf.py)"
        )
    if path.exists():
        return {"draft_files": _upload(api, _named(_model_files(path)), display)}
    if _looks_like_path(value):
        raise InvalidRequest(
            f"DRAFT '{value}' does not exist (relative paths start from the Modelfile's "
            f"folder, {base})"
        )
    return {"draft": value}


def build_request(
    api: Client,
    modelfile: Modelfile,
    base: Path,
    display: ProgressDisplay,
    quantize: str | None,
    draft_quantize: str | None = None,
) -> dict[str, Any]:
    """The ``/api/create`` body a Modelfile stands for, its local files uploaded first."""
    fields = modelfile.to_create_fields()
    request: dict[str, Any] = {}
    names, model_files = _split_froms(fields.froms, base)
    if names:
        request["from"] = names[0]
    if model_files:
        request["files"] = _upload(api, model_files, display)
    if fields.adapters:
        adapter_paths: list[Path] = []
        for value in fields.adapters:
            path = _expand(value, base)
            if not path.exists():
                raise InvalidRequest(f"ADAPTER '{value}' does not exist")
            adapter_paths += _model_files(path)
        request["adapters"] = _upload(api, _named(adapter_paths), display)
    if fields.draft:
        request.update(_draft(api, fields.draft, base, display))
    for key in ("template", "system", "renderer", "parser", "requires"):
        value = getattr(fields, key)
        if value is not None:
            request[key] = value
    if fields.license:
        request["license"] = fields.license
    if fields.parameters:
        request["parameters"] = fields.parameters
    if fields.messages:
        request["messages"] = fields.messages
    if quantize:
        request["quantize"] = quantize
    if draft_quantize:
        request["draft_quantize"] = draft_quantize
    return request


@click.command()
@click.argument("model")
@click.option(
    "-f", "--file", "file", default=None, help='Name of the Modelfile (default "Modelfile")'
)
@click.option(
    "-q", "--quantize", default=None, help="Quantize model to this level (e.g. q4_K_M, q8_0)"
)
@click.option(
    "--draft-quantize",
    "draft_quantize",
    default=None,
    help="Quantize the draft model to this level (e.g. q8_0)",
)
@reports_errors
def create(
    model: str, file: str | None, quantize: str | None, draft_quantize: str | None
) -> None:
    """Create a model from a Modelfile."""
    ModelName.parse(model)
    if file is None:
        path = Path("Modelfile")
        text = path.read_text(encoding="utf-8") if path.is_file() else "FROM ."
        base = Path.cwd()
    else:
        path = Path(file)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InvalidRequest(
                f"open {file}: {exc.strerror.lower() if exc.strerror else exc}"
            ) from None
        text = raw  # type: ignore[assignment]
        base = path.resolve().parent
    modelfile = Modelfile.parse(text)
    for warning in modelfile.warnings:
        click.echo(f"warning: {warning}", err=True)
    api = client()
    api.heartbeat()
    with ProgressDisplay() as display:
        display.status("gathering model components")
        request = build_request(api, modelfile, base, display, quantize, draft_quantize)
        request["model"] = model
        for item in api.create(request):
            display.handle(item)
