"""Native model-management routes: tags, show, create, copy, delete, blobs, purge, version.

Handlers translate wire models to store calls and back; store work that touches the disk
runs in a thread. Name errors keep Ollama's wording where its clients print it.
"""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from pollama import OLLAMA_API_VERSION, __version__
from pollama.errors import InvalidRequest, ModelNotFound
from pollama.names import ModelName
from pollama.protocol.ollama import (
    CopyRequest,
    CreateRequest,
    GarbageItem,
    ListResponse,
    ModelRequest,
    ProgressResponse,
    PurgeRequest,
    PurgeResponse,
    VersionResponse,
)
from pollama.server.body import parse_body
from pollama.server.model_views import list_entry, show_response
from pollama.server.streaming import Ndjson, in_threads, last_response, stream_response
from pollama.store import Store, parse_digest
from pollama.store.create import CreateProgress, ModelCreator

# The Ollama release whose behaviour we match; clients gate features on /api/version.

router = APIRouter()


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _require_name(value: str) -> ModelName:
    if not value:
        raise InvalidRequest("model is required")
    return ModelName.parse(value)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> Response:
    return PlainTextResponse("Ollama is running")


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version() -> Response:
    body = VersionResponse(version=OLLAMA_API_VERSION, pollama_version=__version__)
    return JSONResponse(body.model_dump())


@router.api_route("/api/tags", methods=["GET", "HEAD"])
async def tags(request: Request) -> Response:
    store = _store(request)
    models = await run_in_threadpool(lambda: [list_entry(m) for m in store.list()])
    return JSONResponse(ListResponse(models=models).model_dump(exclude_none=True))


@router.post("/api/show")
async def show_model(request: Request) -> Response:
    req = await parse_body(request, ModelRequest)
    name = _require_name(req.target)
    store = _store(request)

    def build() -> dict[str, object]:
        model = store.find(name)
        if model is None:
            raise ModelNotFound(f"model '{req.target}' not found")
        resp = show_response(model, verbose=req.verbose, system=req.system, options=req.options)
        return resp.model_dump(exclude_none=True)

    return JSONResponse(await run_in_threadpool(build))


@router.post("/api/copy")
async def copy_model(request: Request) -> Response:
    req = await parse_body(request, CopyRequest)
    source = ModelName.try_parse(req.source)
    if source is None:
        raise InvalidRequest(f'source "{req.source}" is invalid')
    destination = ModelName.try_parse(req.destination)
    if destination is None:
        raise InvalidRequest(f'destination "{req.destination}" is invalid')
    store = _store(request)

    def copy() -> None:
        if store.find(source) is None:
            raise ModelNotFound(f'model "{req.source}" not found')
        store.copy(source, destination)

    await run_in_threadpool(copy)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete_model(request: Request) -> Response:
    req = await parse_body(request, ModelRequest)
    if not req.target:
        raise InvalidRequest("model is required")
    name = ModelName.try_parse(req.target)
    if name is None:
        raise InvalidRequest(f'name "{req.target}" is invalid')
    store = _store(request)

    def delete() -> None:
        if store.find(name) is None:
            raise ModelNotFound(f"model '{req.target}' not found")
        store.delete(name)

    await run_in_threadpool(delete)
    return Response(status_code=200)


def _progress_json(step: CreateProgress) -> dict[str, object]:
    return ProgressResponse.of(step).model_dump(exclude_none=True)


@router.post("/api/create")
async def create_model(request: Request) -> Response:
    """Checks that can fail run before any output, so they get their own status; the
    steps run in threads (disk, hashing, quantizing). A client that leaves a stream stops
    the create between two steps; ``stream: false`` runs it to its end."""
    req = await parse_body(request, CreateRequest)
    creator = await run_in_threadpool(ModelCreator, _store(request), req.to_spec())
    steps = in_threads(creator.run())
    if req.stream is not False:
        return await stream_response(steps, Ndjson(_progress_json))
    return await last_response(steps, _progress_json)


@router.head("/api/blobs/{digest}")
async def blob_exists(request: Request, digest: str) -> Response:
    store = _store(request)
    exists = await run_in_threadpool(store.blobs.exists, parse_digest(digest))
    return Response(status_code=200 if exists else 404)


@router.post("/api/blobs/{digest}")
async def upload_blob(request: Request, digest: str) -> Response:
    canonical = parse_digest(digest)
    store = _store(request)
    if await run_in_threadpool(store.blobs.exists, canonical):
        return Response(status_code=200)
    store.ensure()
    declared = request.headers.get("content-length")
    free = shutil.disk_usage(store.blobs.dir).free
    if declared and declared.isdigit() and int(declared) > free:
        raise InvalidRequest(
            f"blob of {declared} bytes does not fit: {free} bytes free in the models directory"
        )
    with store.blobs.writer(canonical) as writer:
        async for chunk in request.stream():
            writer.write(chunk)
            if writer.size > free:
                raise InvalidRequest("blob is larger than the free space in the models directory")
        blob = await run_in_threadpool(writer.commit)
    return Response(status_code=201 if blob.created else 200)


@router.post("/api/purge")
async def purge(request: Request) -> Response:
    """pollama's own: list (``dry_run``) or delete store files that no model needs."""
    req = await parse_body(request, PurgeRequest)
    store = _store(request)

    def run() -> PurgeResponse:
        found = store.garbage()
        if req.paths is not None:
            wanted = set(req.paths)
            found = [g for g in found if str(g.path.relative_to(store.root)) in wanted]
        freed = 0 if req.dry_run else store.remove_garbage(found)
        items = [
            GarbageItem(path=str(g.path.relative_to(store.root)), size=g.size, kind=g.kind)
            for g in found
        ]
        return PurgeResponse(items=items, total=sum(g.size for g in found), freed=freed)

    return JSONResponse((await run_in_threadpool(run)).model_dump())
