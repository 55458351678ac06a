"""The store facade: models as a whole (get, list, copy, delete, garbage collection).

Deleting is the only operation that removes blobs, and it removes a blob only when no
readable manifest references it; if any manifest cannot be read, nothing is pruned, since
its references are unknown (Ollama's rule too). ``OLLAMA_NOPRUNE`` turns pruning off.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollama.errors import AlreadyExists, InvalidRequest, ModelNotFound, PollamaError
from pollama.names import ModelName
from pollama.store.blobs import BlobStore
from pollama.store.manifests import (
    MEDIA_ADAPTER,
    MEDIA_DRAFT,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_PROMPT,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    Layer,
    ManifestStore,
    StoredManifest,
)

log = logging.getLogger(__name__)


@dataclass
class LocalModel:
    """A model in the store: its manifest plus lazy access to its small layers."""

    stored: StoredManifest
    blobs: BlobStore

    @property
    def name(self) -> ModelName:
        return self.stored.name

    @property
    def digest(self) -> str:
        return self.stored.digest

    @property
    def size(self) -> int:
        return self.stored.manifest.size

    @property
    def mtime_ns(self) -> int:
        return self.stored.mtime_ns

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.stored.manifest.layers

    def layers_of(self, *media_types: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type in media_types]

    def _text(self, *media_types: str) -> str | None:
        found = self.layers_of(*media_types)
        if not found:
            return None
        return self.blobs.read_bytes(found[-1].digest).decode("utf-8", errors="replace")

    @property
    def model_layer(self) -> Layer | None:
        found = self.layers_of(MEDIA_MODEL)
        return found[0] if found else None

    def model_path(self) -> Path | None:
        layer = self.model_layer
        return self.blobs.path(layer.digest) if layer else None

    def adapter_paths(self) -> list[Path]:
        return [self.blobs.path(layer.digest) for layer in self.layers_of(MEDIA_ADAPTER)]

    def draft_path(self) -> Path | None:
        """The draft model's GGUF (Modelfile ``DRAFT``: speculative decoding), if any."""
        layers = self.layers_of(MEDIA_DRAFT)
        return self.blobs.path(layers[0].digest) if layers else None

    def projector_paths(self) -> list[Path]:
        return [self.blobs.path(layer.digest) for layer in self.layers_of(MEDIA_PROJECTOR)]

    def template(self) -> str | None:
        return self._text(MEDIA_TEMPLATE, MEDIA_PROMPT)

    def system(self) -> str | None:
        return self._text(MEDIA_SYSTEM)

    def licenses(self) -> list[str]:
        return [
            self.blobs.read_bytes(layer.digest).decode("utf-8", errors="replace")
            for layer in self.layers_of(MEDIA_LICENSE)
        ]

    def _json_layer(self, media_type: str) -> Any:
        text = self._text(media_type)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            log.warning("model %s has an unreadable %s layer", self.name, media_type)
            return None

    def params(self) -> dict[str, Any]:
        value = self._json_layer(MEDIA_PARAMS)
        return value if isinstance(value, dict) else {}

    def messages(self) -> list[dict[str, Any]]:
        value = self._json_layer(MEDIA_MESSAGES)
        if not isinstance(value, list):
            return []
        return [m for m in value if isinstance(m, dict)]

    def config(self) -> dict[str, Any]:
        try:
            raw = self.blobs.read_bytes(self.stored.manifest.config.digest)
            value = json.loads(raw)
        except (PollamaError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Garbage:
    """A file that no model needs, found by :meth:`Store.garbage`."""

    path: Path
    size: int
    kind: str  # "unreferenced blob" | "partial download" | "temporary file"


class Store:
    """Models rooted at one models directory."""

    def __init__(self, models_dir: Path, *, noprune: bool = False) -> None:
        self.root = Path(models_dir)
        self.blobs = BlobStore(self.root)
        self.manifests = ManifestStore(self.root)
        self.noprune = noprune
        # Serializes manifest-level writes (create, copy, delete, prune) in this process.
        self.lock = threading.RLock()

    def ensure(self) -> None:
        self.blobs.ensure()
        self.manifests.dir.mkdir(parents=True, exist_ok=True)

    def get(self, name: ModelName) -> LocalModel:
        return LocalModel(self.manifests.read(name), self.blobs)

    def find(self, name: ModelName) -> LocalModel | None:
        try:
            return self.get(name)
        except ModelNotFound:
            return None

    def list(self) -> list[LocalModel]:
        """Every readable model, newest first (as ``/api/tags`` sorts)."""
        models = [LocalModel(s, self.blobs) for s in self.manifests.list()]
        models.sort(key=lambda m: m.mtime_ns, reverse=True)
        return models

    def copy(self, source: ModelName, destination: ModelName) -> None:
        """Copy a manifest under a new name; refuses to overwrite an existing model."""
        with self.lock:
            src = self.manifests.read(source)
            existing = self.manifests.resolve(destination)
            if existing is not None:
                if existing == src.name:
                    shown = src.name.display_shortest()
                    raise AlreadyExists(f"source and destination are the same model: '{shown}'")
                raise AlreadyExists(
                    f"destination model '{existing.display_shortest()}' already exists; "
                    "delete it first with 'pollama rm'"
                )
            self.manifests.write_raw(destination, src.path.read_bytes())

    def delete(self, name: ModelName) -> None:
        with self.lock:
            stored = self.manifests.read(name)
            self.manifests.remove(stored.name)
            if not self.noprune:
                self.prune(stored.manifest.digests())

    def referenced_digests(self) -> set[str] | None:
        """Every digest some manifest uses, or None if any manifest is unreadable."""
        referenced: set[str] = set()
        for name in self.manifests.iter_names():
            try:
                referenced |= self.manifests.read(name).manifest.digests()
            except (InvalidRequest, ModelNotFound) as exc:
                log.warning("not pruning: manifest %s is unreadable: %s", name, exc)
                return None
        return referenced

    def prune(self, candidates: Iterable[str]) -> int:
        """Remove the candidate blobs no manifest references; return bytes freed."""
        with self.lock:
            referenced = self.referenced_digests()
            if referenced is None:
                return 0
            return sum(self.blobs.remove(d) for d in set(candidates) - referenced)

    def garbage(self, *, min_age_s: float = 0.0, exclude: Iterable[Path] = ()) -> list[Garbage]:
        """Files nothing needs: unreferenced blobs, partial downloads, temp files.

        ``min_age_s`` spares files modified recently (an upload that a create is about to
        use, a download in progress), ``exclude`` spares files an operation holds open.
        Empty when any manifest is unreadable, since its blobs cannot be told apart.
        """
        referenced = self.referenced_digests()
        if referenced is None:
            return []
        skip = {Path(p) for p in exclude} | set(self.blobs.active)
        cutoff = time.time() - min_age_s
        found: list[Garbage] = []
        for digest in self.blobs.digests():
            if digest in referenced:
                continue
            path = self.blobs.path(digest)
            self._collect(found, path, "unreferenced blob", cutoff, skip)
        for entry in self.blobs.stray_files():
            kind = "partial download" if "-partial" in entry.name else "temporary file"
            self._collect(found, Path(entry.path), kind, cutoff, skip)
        for path in self.manifests.dir.rglob(".*.tmp") if self.manifests.dir.is_dir() else []:
            self._collect(found, path, "temporary file", cutoff, skip)
        return found

    @staticmethod
    def _collect(
        found: list[Garbage], path: Path, kind: str, cutoff: float, skip: set[Path]
    ) -> None:
        if path in skip:
            return
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if st.st_mtime <= cutoff and not path.is_dir():
            found.append(Garbage(path, st.st_size, kind))

    def remove_garbage(self, items: Iterable[Garbage]) -> int:
        """Delete garbage found earlier, re-checking blobs are still unreferenced."""
        with self.lock:
            referenced = self.referenced_digests()
            if referenced is None:
                return 0
            freed = 0
            for item in items:
                if item.kind == "unreferenced blob":
                    digest = "sha256:" + item.path.name.removeprefix("sha256-")
                    if digest in referenced:
                        continue
                try:
                    size = item.path.lstat().st_size
                    os.unlink(item.path)
                    freed += size
                except FileNotFoundError:
                    pass
            return freed

    def prune_on_start(self, *, grace_s: float = 3600.0) -> int:
        """Ollama's startup prune: unreferenced blobs and strays older than an hour."""
        if self.noprune:
            return 0
        self.blobs.fix_legacy_names()
        self.manifests.prune_empty_dirs()
        return self.remove_garbage(self.garbage(min_age_s=grace_s))
