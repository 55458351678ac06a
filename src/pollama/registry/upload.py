"""Blob uploads for ``push`` (docs/ollama-behaviour.md#registry-endpoints, Ollama's
``server/upload.go``).

``HEAD`` first (a blob the registry has is not sent again), then ``POST …/blobs/uploads/``,
with ``?mount=<digest>&from=<ns/model>`` when the layer came from another model so the
registry can link it without a transfer (``201``). Otherwise the file goes in parts of
``total/16`` bytes clamped to [100 MB, 1000 MB], each a ``PATCH`` with ``Content-Range`` to the
URL the previous answer named (a ``307`` means ``PUT`` the part to the redirect instead, as
ollama.com asks), and a final ``PUT ?digest=…&etag=…`` commits it; the registry verifies the
digest. A failed attempt starts the blob's upload over, with backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator

import httpx

from pollama.names import ModelName
from pollama.registry.client import RegistrySession
from pollama.registry.errors import RegistryError, RegistryNotFound
from pollama.registry.transfer import TransferOptions
from pollama.store.blobs import BlobStore
from pollama.store.manifests import Layer

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20


def _location(response: httpx.Response) -> httpx.URL:
    location = response.headers.get("docker-upload-location") or response.headers.get("location")
    if not location:
        raise RegistryError(f"registry answered {response.status_code} without an upload URL")
    return response.url.join(location)


class BlobUpload:
    """One blob's upload; ``completed`` counts the bytes the registry accepted so far."""

    def __init__(
        self, session: RegistrySession, blobs: BlobStore, layer: Layer, opts: TransferOptions
    ) -> None:
        self.session = session
        self.blobs = blobs
        self.layer = layer
        self.opts = opts
        self.total = blobs.size(layer.digest)
        self.completed = 0
        self._part_md5s: list[bytes] = []

    async def run(self) -> None:
        tries = 0
        while True:
            try:
                await self._attempt()
                return
            except (httpx.TransportError, RegistryError) as exc:
                if isinstance(exc, RegistryError) and not (
                    exc.status_code in (0, 408, 429) or exc.status_code >= 500
                ):
                    raise
                tries += 1
                if tries > self.opts.max_retries:
                    raise RegistryError(f"max retries exceeded: {exc}") from exc
                delay = self.opts.backoff(tries)
                log.info(
                    "%s upload attempt %d failed: %s, retrying in %.1fs",
                    self.layer.digest[7:19],
                    tries,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _attempt(self) -> None:
        self.completed = 0
        self._part_md5s = []
        location = await self._start()
        if location is None:
            self.completed = self.total
            return
        for offset, size in self.opts.plan(self.total):
            location = await self._send_part(location, offset, size)
        await self._commit(location)

    async def _start(self) -> httpx.URL | None:
        """``POST`` a new upload (or a mount); None when the registry mounted the blob."""
        url = self.session.url("blobs", "uploads", "")
        source = ModelName.try_parse(self.layer.from_) if self.layer.from_ else None
        if source is not None:
            mount = {"mount": self.layer.digest, "from": source.display_namespace_model()}
            url = url.copy_merge_params(mount)
        async with self.session.stream("POST", url) as response:
            if response.status_code == 201:
                return None
            return _location(response)

    def _body(self, offset: int, size: int, md5: hashlib._Hash) -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            self.completed = offset
            with self.blobs.open(self.layer.digest) as f:
                position = offset
                while position < offset + size:
                    want = min(_READ_CHUNK, offset + size - position)
                    chunk = await asyncio.to_thread(os.pread, f.fileno(), want, position)
                    if not chunk:
                        raise RegistryError("blob file is shorter than its size")
                    md5.update(chunk)
                    position += len(chunk)
                    self.completed = position
                    yield chunk

        return chunks()

    async def _send_part(self, location: httpx.URL, offset: int, size: int) -> httpx.URL:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            "Content-Range": f"{offset}-{offset + size - 1}",
            "X-Redirect-Uploads": "1",
        }
        md5 = hashlib.md5(usedforsecurity=False)
        async with self.session.stream(
            "PATCH", location, headers=headers, content=lambda: self._body(offset, size, md5)
        ) as response:
            if response.status_code != 307:
                self._part_md5s.append(md5.digest())
                return _location(response)
            redirect = self.session.redirect_target(location, response.headers["location"])
            following = (
                _location(response) if response.headers.get("docker-upload-location") else location
            )
        md5 = hashlib.md5(usedforsecurity=False)
        put_headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        async with self.session.stream(
            "PUT", redirect, headers=put_headers, content=lambda: self._body(offset, size, md5)
        ):
            pass
        self._part_md5s.append(md5.digest())
        return following

    async def _commit(self, location: httpx.URL) -> None:
        etag = hashlib.md5(b"".join(self._part_md5s), usedforsecurity=False).hexdigest()
        url = location.copy_merge_params(
            {"digest": self.layer.digest, "etag": f"{etag}-{len(self._part_md5s)}"}
        )
        headers = {"Content-Type": "application/octet-stream", "Content-Length": "0"}
        async with self.session.stream("PUT", url, headers=headers, content=b""):
            pass
        self.completed = self.total


async def upload_blob(
    session: RegistrySession, blobs: BlobStore, layer: Layer, opts: TransferOptions
) -> AsyncIterator[tuple[int, int]]:
    """(total, completed) while a layer is pushed; once, complete, if the registry has it."""
    try:
        async with session.stream("HEAD", session.url("blobs", layer.digest)):
            pass
        yield layer.size, layer.size
        return
    except RegistryNotFound:
        pass
    upload = BlobUpload(session, blobs, layer, opts)
    task = asyncio.create_task(upload.run(), name=f"push {layer.digest}")
    try:
        yield upload.total, 0
        while True:
            done, _ = await asyncio.wait({task}, timeout=opts.progress_interval)
            if done:
                break
            yield upload.total, upload.completed
        task.result()
        yield upload.total, upload.total
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
