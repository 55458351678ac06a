"""``POST /api/rerank``, ``/v1/rerank`` and ``/rerank``: one handler over the rerank service
(``pollama.inference.rerank``); shapes in ``pollama.protocol.rerank``.

``/api/rerank`` answers errors as Ollama does (``{"error": "..."}``) and adds Ollama's
durations; ``/v1/rerank`` and ``/rerank`` (llama-server's paths) answer errors in OpenAI's
shape, as llama-server does. All need the ``inference`` key scope.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from pollama.inference.rerank import RerankService
from pollama.protocol.rerank import RerankRequest, rerank_body
from pollama.server.body import parse_body
from pollama.server.disconnect import while_connected
from pollama.server.errors import error_response, openai_error_response

__all__ = ["router"]

router = APIRouter()


async def _rerank(
    request: Request, *, native: bool, on_error: Callable[[BaseException], JSONResponse]
) -> Response:
    service: RerankService = request.app.state.rerank
    try:
        body = await parse_body(request, RerankRequest)
        job = body.to_job()
        result = await while_connected(request.receive, service.rerank(service.prepare(job)))
    except Exception as exc:  # noqa: BLE001 - one mapping, in server.errors
        return on_error(exc)
    return JSONResponse(rerank_body(body, job, result, native=native))


@router.post("/api/rerank")
async def rerank_native(request: Request) -> Response:
    return await _rerank(request, native=True, on_error=error_response)


@router.post("/v1/rerank")
async def rerank_v1(request: Request) -> Response:
    return await _rerank(request, native=False, on_error=openai_error_response)


@router.post("/rerank")
async def rerank_bare(request: Request) -> Response:
    return await _rerank(request, native=False, on_error=openai_error_response)
