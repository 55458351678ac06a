"""``RegistryService``: pull and push models, as the server's ``/api/pull`` and ``/api/push``.

Both are async generators of :class:`TransferProgress`, with Ollama's statuses in Ollama's order
(docs/ollama-behaviour.md#pull-and-push-progress). Checks that the caller can act on (the name,
the host policy and the name host's addresses, ``insecure protocol http``) run before the first
item, so an HTTP front-end can still answer them with their own status code; everything after
the first item is a transfer.

What a pull guarantees: a model appears in the store only after every one of its blobs is
present and verified and its manifest (the registry's bytes, unchanged, so the model ID
matches the registry's) has been written atomically. A failed or cancelled pull leaves at
most ``-partial`` files, which the next pull of the same blobs resumes, and verified blobs of
the layers it had fetched ahead, which the next pull reuses (unused ones are pruned at the
next start, as any blob no manifest names).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pollama.config import Settings
from pollama.errors import InvalidRequest, ModelNotFound, PollamaError
from pollama.format import human_bytes
from pollama.names import ModelName
from pollama.registry.auth import DockerCredentials, IdentityKey
from pollama.registry.client import RegistrySession
from pollama.registry.download import BlobDownload, DownloadManager
from pollama.registry.errors import InsufficientDiskSpace, RegistryError
from pollama.registry.hosts import DEFAULT_REGISTRY_HOSTS, HostPolicy
from pollama.registry.transfer import TransferOptions
from pollama.registry.upload import upload_blob
from pollama.store import Store
from pollama.store.blobs import PARTIAL_SUFFIX
from pollama.store.manifests import (
    MANIFEST_MEDIA_TYPE,
    MAX_MANIFEST_BYTES,
    InvalidManifest,
    Layer,
    Manifest,
)

log = logging.getLogger(__name__)

LAYERS_AHEAD = 3
"""How many layers after the one being reported a pull already downloads."""

__all__ = ["TransferProgress", "RegistryService"]


@dataclass(frozen=True)
class TransferProgress:
    """One progress object of a pull or push (Go's ``api.ProgressResponse``; ``received``
    is for the server's metrics, not the client)."""

    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0
    received: int = 0  # of ``completed``, the bytes this download fetched (not resumed)

    def to_json(self) -> dict[str, Any]:
        """Go's ``omitempty``: digest, total and completed only when non-zero."""
        out: dict[str, Any] = {"status": self.status}
        if self.digest:
            out["digest"] = self.digest
        if self.total:
            out["total"] = self.total
        if self.completed:
            out["completed"] = self.completed
        return out


def _prefixed(exc: PollamaError, prefix: str) -> PollamaError:
    exc.message = f"{prefix}{exc.message}"
    exc.args = (exc.message,)
    return exc


class RegistryService:
    """Pull/push for one store; holds the downloads in flight so pulls can share them."""

    def __init__(
        self,
        store: Store,
        *,
        user_home: Path,
        allowed_hosts: Iterable[str] = DEFAULT_REGISTRY_HOSTS,
        options: TransferOptions | None = None,
    ) -> None:
        self.store = store
        self.user_home = Path(user_home)
        self.key = IdentityKey(self.user_home / ".ollama")
        self.allowed_hosts = tuple(allowed_hosts)
        self.options = options or TransferOptions()
        self.downloads = DownloadManager()

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> RegistryService:
        """``POLLAMA_REGISTRY_HOSTS`` and ``POLLAMA_PULL_STALL_TIMEOUT``; the key and the
        Docker config are the user's (``HOME``)."""
        return cls(
            store,
            user_home=settings.user_home,
            allowed_hosts=settings.registry_hosts,
            options=TransferOptions(stall_timeout=settings.pull_stall_timeout),
        )

    def session(self, name: ModelName, insecure: bool) -> RegistrySession:
        policy = HostPolicy(self.allowed_hosts, insecure=insecure)
        timeout = self.options.idle_timeout
        return RegistrySession(
            name,
            policy=policy,
            key=self.key,
            credentials=DockerCredentials.load(self.user_home),
            timeout=timeout,
        )

    # -- pull ---------------------------------------------------------------------------------

    async def pull(
        self, name: ModelName, *, insecure: bool = False
    ) -> AsyncIterator[TransferProgress]:
        store = self.store
        target = await asyncio.to_thread(store.manifests.resolve, name) or name
        session = self.session(target, insecure)
        try:
            await session.check_host()
            previous = await asyncio.to_thread(self._existing_digests, target)
            yield TransferProgress("pulling manifest")
            manifest, raw = await self._fetch_manifest(session)
            layers = [*manifest.layers, manifest.config]
            await asyncio.to_thread(self._check_space, target, layers)
            async with aclosing(self._download_layers(session, layers)) as progress:
                async for item in progress:  # (closed at once if the caller leaves)
                    yield item
            yield TransferProgress("verifying sha256 digest")
            missing = [lay.digest for lay in layers if not store.blobs.exists(lay.digest)]
            if missing:
                raise RegistryError(
                    f"blob {missing[0]} disappeared before the manifest was written"
                )
            yield TransferProgress("writing manifest")
            await asyncio.to_thread(self._write_manifest, target, raw)
            unused = previous - manifest.digests()
            if unused and not store.noprune:
                yield TransferProgress("removing unused layers")
                await asyncio.to_thread(store.prune, unused)
            yield TransferProgress("success")
        finally:
            await session.release()

    def _existing_digests(self, name: ModelName) -> set[str]:
        try:
            return self.store.manifests.read(name).manifest.digests()
        except ModelNotFound:
            return set()
        except InvalidRequest as exc:
            log.warning("pulling over an unreadable manifest of %s: %s", name, exc)
            return set()

    async def _fetch_manifest(self, session: RegistrySession) -> tuple[Manifest, bytes]:
        """The manifest and its exact bytes; size-capped and schema-checked."""
        url = session.url("manifests", session.name.tag)
        prefix = "pull model manifest: "
        try:
            _, raw = await session.read(
                "GET", url, MAX_MANIFEST_BYTES, "manifest", headers={"Accept": MANIFEST_MEDIA_TYPE}
            )
            manifest = Manifest.from_bytes(raw)
        except InvalidManifest as exc:
            raise RegistryError(f"{prefix}{exc}") from exc
        except PollamaError as exc:
            raise _prefixed(exc, prefix) from None
        except httpx.HTTPError as exc:
            raise RegistryError(f"{prefix}{type(exc).__name__}: {exc}") from exc
        if not manifest.layers:
            raise RegistryError(f"{prefix}the manifest has no layers")
        return manifest, raw

    def _check_space(self, name: ModelName, layers: list[Layer]) -> None:
        """Refuse early when the blobs still to fetch cannot fit on the disk."""
        blobs = self.store.blobs
        blobs.ensure()
        needed = 0
        for digest, size in {layer.digest: layer.size for layer in layers}.items():
            if blobs.exists(digest):
                continue
            partial = Path(str(blobs.path(digest)) + PARTIAL_SUFFIX)
            try:
                have = partial.stat().st_blocks * 512
            except FileNotFoundError:
                have = 0
            needed += max(0, size - have)
        free = shutil.disk_usage(blobs.dir).free
        if needed > free:
            raise InsufficientDiskSpace(
                f"not enough disk space to pull {name.display_shortest()}: it needs "
                f"{human_bytes(needed)} more, and {human_bytes(free)} is free in {self.store.root}"
            )

    async def _download_layers(
        self, session: RegistrySession, layers: list[Layer]
    ) -> AsyncIterator[TransferProgress]:
        """Each layer's progress in the manifest's order, while the downloads of the next
        :data:`LAYERS_AHEAD` layers already run: a model's small layers (its config,
        template, parameters) cost a round trip each, which then overlaps the large one's
        transfer instead of following it. At most that many more downloads run at once,
        whatever the manifest lists, and every one this pull started but did not follow is
        released when it ends (the last pull to leave a download cancels it)."""
        ahead: deque[BlobDownload | None] = deque()  # held, in order; None: already stored
        try:
            for i, layer in enumerate(layers):
                for nxt in layers[i + len(ahead) : i + 1 + LAYERS_AHEAD]:
                    ahead.append(await self._start(session, nxt))
                download = ahead.popleft()
                status = f"pulling {layer.digest[7:19]}"
                if download is None:
                    size = await asyncio.to_thread(self.store.blobs.size, layer.digest)
                    yield TransferProgress(status, layer.digest, size, size)
                    continue
                try:
                    async for total, completed in download.follow():
                        received = max(0, completed - download.resumed)
                        yield TransferProgress(status, layer.digest, total, completed, received)
                finally:
                    download.release()
        finally:
            for held in ahead:
                if held is not None:
                    held.release()

    async def _start(self, session: RegistrySession, layer: Layer) -> BlobDownload | None:
        """The layer's download, started (or joined) and held; None if the store has it."""
        blobs = self.store.blobs
        if await asyncio.to_thread(blobs.exists, layer.digest):
            return None
        download = self.downloads.get(blobs, layer.digest, layer.size, session, self.options)
        download.hold()
        return download

    def _write_manifest(self, name: ModelName, raw: bytes) -> None:
        with self.store.lock:
            self.store.manifests.write_raw(name, raw)

    # -- push ---------------------------------------------------------------------------------

    async def push(
        self, name: ModelName, *, insecure: bool = False
    ) -> AsyncIterator[TransferProgress]:
        store = self.store
        session = self.session(name, insecure)  # host policy and scheme: before any output
        try:
            await session.check_host()
            yield TransferProgress("retrieving manifest")
            try:
                stored = await asyncio.to_thread(store.manifests.read, name)
                raw = await asyncio.to_thread(stored.path.read_bytes)
            except (ModelNotFound, FileNotFoundError, InvalidRequest):
                yield TransferProgress("couldn't retrieve manifest")
                raise ModelNotFound(f"model '{name.display_shortest()}' not found") from None
            if stored.name != name:  # stored with other casing: push under the stored name
                await session.release()
                session = self.session(stored.name, insecure)
            manifest = Manifest.from_bytes(raw)
            for layer in [*manifest.layers, manifest.config]:
                status = f"pushing {layer.digest[7:19]}"
                async for total, completed in upload_blob(
                    session, store.blobs, layer, self.options
                ):
                    yield TransferProgress(status, layer.digest, total, completed)
            yield TransferProgress("pushing manifest")
            url = session.url("manifests", stored.name.tag)
            media_type = manifest.media_type or MANIFEST_MEDIA_TYPE
            async with session.stream(
                "PUT", url, headers={"Content-Type": media_type}, content=raw
            ):
                pass
            yield TransferProgress("success")
        except httpx.HTTPError as exc:
            raise RegistryError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            await session.release()
