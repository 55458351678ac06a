"""``GET /ui``: the chat page, a few static files shipped in the package (``server/ui/``).

The page is a client of the public API like any other: it lists models with ``/api/tags``,
reads their capabilities with ``/api/show`` and chats over ``/api/chat``, sending the key the
user types as ``Authorization: Bearer``. Its own files hold nothing but the page, and are
answered without a key (``security.PUBLIC_ROUTES`` includes :data:`PAGE_ROUTES`) because the
page must load before it can ask for one; every API call it makes needs a key as before, and
the Host and Origin checks cover these routes as every other. ``/`` keeps answering "Ollama
is running": clients probe it.

Each shipped file is a route of its own, listed in :data:`ASSETS`: there is no path
parameter, so no request can name a file outside that list, whatever its dots and escapes
(an unknown name is no route at all: 404, or 401 first where keys are required). Every answer
carries a Content-Security-Policy that allows scripts, styles and connections from this
origin only, no inline code, no plugins, no framing, no form posts; model output rendered by
the page cannot load anything from elsewhere. ``Cache-Control: no-cache`` with an ``ETag``
lets a browser keep the files yet see a new version after an upgrade at once.

The vendored libraries come unchanged from the npm registry, less their source-map comment:
``marked`` 18.3.0 (``lib/marked.umd.js``, MIT) and ``dompurify`` 3.5.0
(``dist/purify.min.js``, Apache-2.0), each with its license beside it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

_TEXT = "text/plain; charset=utf-8"
_JS = "text/javascript; charset=utf-8"
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": _JS,
    "vendor/marked.umd.js": _JS,
    "vendor/marked.LICENSE": _TEXT,
    "vendor/purify.min.js": _JS,
    "vendor/purify.LICENSE": _TEXT,
}
"""Every file the page is made of (under ``server/ui/``), with its content type."""

PAGE_ROUTES = frozenset({"/ui", "/ui/", *(f"/ui/{name}" for name in ASSETS)})
"""The routes of this module, all GET/HEAD, all open (see the module docstring)."""

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'", "script-src 'self'", "style-src 'self'",
    "img-src 'self' data: blob:", "connect-src 'self'", "object-src 'none'",
    "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'",
])  # fmt: skip
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
    "Cache-Control": "no-cache",
}

router = APIRouter()


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def _asset(name: str) -> _Asset:
    """A shipped file, read once: they change only with the package."""
    body = resources.files("pollama.server").joinpath("ui", *name.split("/")).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return _Asset(body, ASSETS[name], etag)


def _not_modified(request: Request, etag: str) -> bool:
    """Whether the browser's copy is this one (``If-None-Match``, weak tags included)."""
    header = request.headers.get("if-none-match", "")
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return etag in tags or "*" in tags


def _endpoint(name: str) -> Callable[[Request], Awaitable[Response]]:
    """The handler of one file: its name is fixed here, never taken from the request."""

    async def serve(request: Request) -> Response:
        asset = _asset(name)
        headers = {**_HEADERS, "ETag": asset.etag}
        if _not_modified(request, asset.etag):
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    serve.__name__ = "ui_" + name.replace("/", "_").replace(".", "_")
    return serve


for _path, _name in [("/ui", "index.html"), ("/ui/", "index.html"),
                     *((f"/ui/{name}", name) for name in ASSETS)]:  # fmt: skip
    router.add_api_route(_path, _endpoint(_name), methods=["GET", "HEAD"],
                         include_in_schema=False)  # fmt: skip
