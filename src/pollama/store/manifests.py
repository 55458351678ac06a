"""Manifests: ``<models>/manifests/<host>/<namespace>/<model>/<tag>``, Ollama's layout.

A manifest is the Docker distribution v2 JSON Ollama writes (compact, fields in Go's
struct order, a trailing newline), so a folder written by either program is read by the
other. The model's ID (``digest`` in ``/api/tags``) is the sha256 of the manifest file's
bytes, which is why pulled manifests are stored byte for byte as received.

Every manifest read from disk or the network is validated before use: a layer digest that
is not a well-formed sha256 digest makes the whole manifest invalid, so no later code can
turn it into a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollama.errors import InvalidRequest, ModelNotFound
from pollama.names import ModelName
from pollama.store.blobs import is_digest

log = logging.getLogger(__name__)

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_PROMPT = "application/vnd.ollama.image.prompt"  # legacy name of the template layer
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_DRAFT = "application/vnd.ollama.image.draft"

MAX_MANIFEST_BYTES = 4 << 20
MAX_LAYERS = 4096


class InvalidManifest(InvalidRequest):
    """A manifest that is not valid JSON of the expected shape."""


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    from_: str = ""
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.from_:
            out["from"] = self.from_
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def from_json(cls, data: Any) -> Layer:
        if not isinstance(data, dict):
            raise InvalidManifest("manifest layer is not an object")
        digest, size, media = data.get("digest"), data.get("size"), data.get("mediaType")
        if not is_digest(digest):
            raise InvalidManifest(f"manifest layer has an invalid digest: {str(digest)[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidManifest("manifest layer has an invalid size")
        if not isinstance(media, str) or not media:
            raise InvalidManifest("manifest layer has no mediaType")
        from_, name = data.get("from", ""), data.get("name", "")
        if not isinstance(from_, str) or not isinstance(name, str):
            raise InvalidManifest("manifest layer has a non-string 'from' or 'name'")
        return cls(media, digest.replace("sha256-", "sha256:", 1), size, from_, name)


@dataclass(frozen=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...]
    schema_version: int = 2
    media_type: str = MANIFEST_MEDIA_TYPE

    def to_bytes(self) -> bytes:
        """Serialize as Go's ``json.NewEncoder(f).Encode(m)`` does: compact plus newline."""
        doc = {
            "schemaVersion": self.schema_version,
            "mediaType": self.media_type,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        return go_json(doc).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise InvalidManifest("manifest is too large")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidManifest(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidManifest("manifest is not a JSON object")
        layers = doc.get("layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise InvalidManifest("manifest has no valid 'layers' list")
        if "config" not in doc:
            raise InvalidManifest("manifest has no config")
        return cls(
            config=Layer.from_json(doc["config"]),
            layers=tuple(Layer.from_json(layer) for layer in layers),
            schema_version=doc.get("schemaVersion", 2),
            media_type=doc.get("mediaType", MANIFEST_MEDIA_TYPE),
        )

    @property
    def size(self) -> int:
        return self.config.size + sum(layer.size for layer in self.layers)

    def digests(self) -> set[str]:
        return {self.config.digest, *(layer.digest for layer in self.layers)}


def go_json(value: Any) -> str:
    """Compact JSON as Go's encoder writes it, including its HTML escaping of < > &."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass
class StoredManifest:
    """A manifest read from disk with what Ollama derives from the file itself."""

    name: ModelName
    manifest: Manifest
    digest: str  # sha256 hex of the file bytes: the model ID
    mtime_ns: int
    path: Path = field(repr=False)


class ManifestStore:
    """The ``manifests/`` tree of a models directory."""

    def __init__(self, models_dir: Path) -> None:
        self.dir = Path(models_dir) / "manifests"

    def path(self, name: ModelName) -> Path:
        host, namespace, model, tag = name.path_parts()
        return self.dir / host / namespace / model / tag

    def resolve(self, name: ModelName) -> ModelName | None:
        """The stored name matching ``name`` case-insensitively, with its stored casing."""
        if self.path(name).is_file():
            return name
        wanted = [part.casefold() for part in name.path_parts()]
        current = self.dir
        found: list[str] = []
        for part in wanted:
            try:
                entries = os.listdir(current)
            except (FileNotFoundError, NotADirectoryError):
                return None
            match = next((e for e in sorted(entries) if e.casefold() == part), None)
            if match is None:
                return None
            found.append(match)
            current = current / match
        if not current.is_file():
            return None
        return ModelName.parse(f"{found[0]}/{found[1]}/{found[2]}:{found[3]}")

    def read(self, name: ModelName) -> StoredManifest:
        resolved = self.resolve(name)
        if resolved is None:
            raise ModelNotFound(f"model '{name.display_shortest()}' not found")
        path = self.path(resolved)
        try:
            raw = path.read_bytes()
            mtime_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            raise ModelNotFound(f"model '{name.display_shortest()}' not found") from None
        manifest = Manifest.from_bytes(raw)
        return StoredManifest(resolved, manifest, hashlib.sha256(raw).hexdigest(), mtime_ns, path)

    def write(self, name: ModelName, manifest: Manifest) -> str:
        return self.write_raw(name, manifest.to_bytes())

    def write_raw(self, name: ModelName, raw: bytes) -> str:
        """Atomically write manifest bytes (validated first); return the model ID."""
        Manifest.from_bytes(raw)
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return hashlib.sha256(raw).hexdigest()

    def remove(self, name: ModelName) -> None:
        resolved = self.resolve(name)
        if resolved is None:
            raise ModelNotFound(f"model '{name.display_shortest()}' not found")
        self.path(resolved).unlink()
        self.prune_empty_dirs()

    def prune_empty_dirs(self) -> None:
        if not self.dir.is_dir():
            return
        for root, _dirs, _files in os.walk(self.dir, topdown=False):
            if Path(root) != self.dir:
                try:
                    os.rmdir(root)
                except OSError:
                    pass

    def iter_names(self) -> Iterator[ModelName]:
        """Every valid name with a manifest file (``manifests/*/*/*/*``)."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*/*/*/*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            host, namespace, model, tag = path.relative_to(self.dir).parts
            try:
                yield ModelName.parse(f"{host}/{namespace}/{model}:{tag}")
            except InvalidRequest:
                log.warning("ignoring manifest with an invalid name: %s", path)

    def list(self) -> list[StoredManifest]:
        """All readable manifests; a corrupt one is logged and skipped, never fatal."""
        out = []
        for name in self.iter_names():
            try:
                out.append(self.read(name))
            except (InvalidRequest, ModelNotFound) as exc:
                log.warning("ignoring unreadable manifest %s: %s", name, exc)
        return out
