"""Registry routes: ``/api/pull`` and ``/api/push``, and the read side of ``/v2/``.

``/api/pull`` and ``/api/push`` stream :class:`pollama.registry.TransferProgress` objects as NDJSON
with Ollama's rules (docs/ollama-behaviour.md#errors-and-streaming): an error before the first
object gets its own status, later ones a final ``{"error": ...}`` line; ``stream: false``
answers the last object. When the client goes away, streamed or not, the progress stream is
closed at once, which lets a download that no other pull follows stop (keeping its bytes for the
next pull).

``/v2/`` (beyond Ollama, off unless ``POLLAMA_SERVE_REGISTRY``) serves the store's models to
other machines with the registry protocol's read side: ``GET /v2/``, manifests by tag and
blobs by digest (with ``Range``, so a pulling pollama uses parallel parts and resumes). It
lives in the same app, so the same access rules as the rest of the API apply. A blob is
served only when a manifest of the requested repository references it, and a digest is
validated before any path is built (a traversal attempt is a 400 that touches nothing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pollama.errors import InvalidDigest, InvalidRequest
from pollama.names import DEFAULT_HOST, ModelName
from pollama.protocol.ollama import OllamaModel
from pollama.server.body import parse_body
from pollama.server.errors import registry_body
from pollama.server.streaming import Ndjson, last_response, stream_response
from pollama.store import Store, parse_digest
from pollama.store.manifests import MANIFEST_MEDIA_TYPE, StoredManifest

if TYPE_CHECKING:
    from pollama.registry import RegistryService, TransferProgress
    from pollama.telemetry import Telemetry

router = APIRouter()


class PullRequest(OllamaModel):
    """``POST /api/pull`` (Go ``api.PullRequest``); ``username``/``password`` are ignored,
    as in Ollama (Docker logins come from the server's ``config.json``)."""

    model: str = ""
    name: str = ""  # deprecated spelling of ``model``
    insecure: bool = False
    username: str = ""
    password: str = ""
    stream: bool | None = None

    @property
    def target(self) -> str:
        return self.model or self.name


class PushRequest(PullRequest):
    """``POST /api/push`` (Go ``api.PushRequest``): the same fields."""


def _service(request: Request) -> RegistryService:
    """The server's one registry service, made on first use: the registry client (httpx,
    ed25519) is only imported when someone pulls or pushes, keeping the server small."""
    from pollama.registry import RegistryService

    service = getattr(request.app.state, "registry", None)
    if service is None:
        service = RegistryService.from_settings(request.app.state.settings, request.app.state.store)
        request.app.state.registry = service
    return service


async def _progress(request: Request, events: AsyncIterator[TransferProgress], *, stream: bool
                    ) -> Response:
    """NDJSON progress, or the last item; either way the transfer stops if the client
    leaves (the stream's items are closed, or the non-streamed work is cancelled)."""
    if stream:
        return await stream_response(events, Ndjson(_progress_json))
    return await last_response(events, _progress_json, receive=request.receive)


def _progress_json(item: TransferProgress) -> dict[str, Any]:
    return item.to_json()


def _parse_name(text: str) -> ModelName:
    if not text:
        raise InvalidRequest("model is required")
    return ModelName.parse(text)


async def _counting_downloads(
    events: AsyncIterator[TransferProgress], telemetry: Telemetry
) -> AsyncIterator[TransferProgress]:
    """The pull's progress, reporting the bytes each layer's download received since its
    last report (``pollama_pull_bytes_total``: downloaded now, not resumed from an earlier
    pull; a layer may have been fetched whole before its first report, while an earlier
    layer was being reported)."""
    seen: dict[str, int] = {}
    async with aclosing(events):
        async for item in events:
            before = seen.get(item.digest, 0)
            if item.digest and item.received > before:
                telemetry.pull_bytes(item.received - before)
                seen[item.digest] = item.received
            yield item


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    req = await parse_body(request, PullRequest)
    name = _parse_name(req.target)
    events = _service(request).pull(name, insecure=req.insecure)
    events = _counting_downloads(events, request.app.state.metrics)
    return await _progress(request, events, stream=req.stream is not False)


@router.post("/api/push")
async def push(request: Request) -> Response:
    req = await parse_body(request, PushRequest)
    name = _parse_name(req.target)
    events = _service(request).push(name, insecure=req.insecure)
    return await _progress(request, events, stream=req.stream is not False)


# -- the read side of the registry protocol ------------------------------------------------

_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def _registry_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(registry_body(code, message), status_code=status, headers=_API_VERSION)


def _serving(request: Request) -> Response | None:
    """None when serving is on, else the 404 that says how to turn it on."""
    if getattr(request.app.state.settings, "serve_registry", False):
        return None
    return _registry_error(
        404, "UNSUPPORTED", "this server does not serve models; set POLLAMA_SERVE_REGISTRY=1"
    )


def _manifests_of(store: Store, namespace: str, model: str) -> list[StoredManifest]:
    """Every readable manifest of ``namespace/model`` (any host, any tag), default host first."""
    key = (namespace.lower(), model.lower())
    found = [
        stored
        for stored in store.manifests.list()
        if (stored.name.namespace.lower(), stored.name.model.lower()) == key
    ]
    found.sort(key=lambda s: (s.name.host.lower() != DEFAULT_HOST, str(s.name)))
    return found


@router.api_route("/v2/", methods=["GET", "HEAD"], include_in_schema=False)
async def registry_root(request: Request) -> Response:
    refused = _serving(request)
    return refused or JSONResponse({}, headers=_API_VERSION)


@router.api_route(
    "/v2/{namespace}/{model}/manifests/{reference}",
    methods=["GET", "HEAD"],
    include_in_schema=False,
)
async def registry_manifest(
    request: Request, namespace: str, model: str, reference: str
) -> Response:
    refused = _serving(request)
    if refused is not None:
        return refused
    store: Store = request.app.state.store
    found = await run_in_threadpool(_manifests_of, store, namespace, model)
    if reference.startswith("sha256:"):
        match = [s for s in found if f"sha256:{s.digest}" == reference]
    else:
        match = [s for s in found if s.name.tag.lower() == reference.lower()]
    if not match:
        return _registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown")
    stored = match[0]
    raw = await run_in_threadpool(stored.path.read_bytes)
    headers = {
        **_API_VERSION,
        "Docker-Content-Digest": f"sha256:{stored.digest}",
        "Content-Length": str(len(raw)),
    }
    media_type = stored.manifest.media_type or MANIFEST_MEDIA_TYPE
    body = b"" if request.method == "HEAD" else raw
    return Response(body, headers=headers, media_type=media_type)


@router.api_route(
    "/v2/{namespace}/{model}/blobs/{digest}", methods=["GET", "HEAD"], include_in_schema=False
)
async def registry_blob(request: Request, namespace: str, model: str, digest: str) -> Response:
    refused = _serving(request)
    if refused is not None:
        return refused
    try:
        canonical = parse_digest(digest)
    except InvalidDigest:
        return _registry_error(400, "DIGEST_INVALID", "invalid digest format")
    if not digest.startswith("sha256:"):
        return _registry_error(400, "DIGEST_INVALID", "invalid digest format")
    store: Store = request.app.state.store
    found = await run_in_threadpool(_manifests_of, store, namespace, model)
    if not any(canonical in stored.manifest.digests() for stored in found):
        return _registry_error(404, "BLOB_UNKNOWN", "blob unknown to registry")
    path = store.blobs.path(canonical)
    if not await run_in_threadpool(path.is_file):
        return _registry_error(404, "BLOB_UNKNOWN", "blob unknown to registry")
    headers = {**_API_VERSION, "Docker-Content-Digest": canonical}
    return FileResponse(path, media_type="application/octet-stream", headers=headers)
