"""``Client``: the Python client of pollama's native API, used by the CLI and by users.

It speaks only HTTP (httpx) and can be given an ``httpx.Client`` (a test transport, a
``TestClient``). Errors are typed: :class:`ResponseError` carries the server's message and
status; :class:`ServerUnreachable` means nothing answered at the address, decided by the
exception type httpx raises, never by message text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from pollama import __version__
from pollama.errors import PollamaError

DEFAULT_HOST = "http://127.0.0.1:11434"
_UPLOAD_CHUNK = 1 << 20


class ResponseError(PollamaError):
    """The server answered with an error (``status_code`` is -1 for an in-stream error)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class ServerUnreachable(PollamaError):
    """No server answered at the client's address."""

    def __init__(self, url: str) -> None:
        super().__init__("could not connect to pollama server, run 'pollama serve' to start it")
        self.url = url


def _error_text(response: httpx.Response) -> str:
    if response.status_code == 401 and not response.content:
        return (
            "401 Unauthorized: this server requires an API key; set OLLAMA_API_KEY "
            "(create one on the server with 'pollama keys create')"
        )
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or f"{response.status_code} {response.reason_phrase}"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    return response.text.strip()


class Client:
    """A synchronous client for ``/api/*``."""

    def __init__(
        self,
        host: str | None = None,
        *,
        http: httpx.Client | None = None,
        timeout: float | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = (host or DEFAULT_HOST).rstrip("/")
        headers = {"User-Agent": f"pollama/{__version__}"}
        # OLLAMA_API_KEY as Ollama's clients read it; else the key a container's server was
        # given (POLLAMA_API_KEY), so `docker exec pollama pollama list` needs no wrapper.
        key = api_key if api_key is not None else (
            os.environ.get("OLLAMA_API_KEY") or os.environ.get("POLLAMA_API_KEY")
        )
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if http is None:
            # Over plain http no TLS is ever spoken (redirects are not followed), so no
            # verifying context is built: loading the CA bundle costs ~40 ms, at every CLI
            # command. An https host gets httpx's verifying default.
            plain = self.base_url.startswith("http://")
            http = httpx.Client(
                base_url=self.base_url, timeout=timeout, headers=headers, verify=not plain
            )
        else:
            http.headers.update(headers)
        self._http = http

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ServerUnreachable(self.base_url) from exc
        if response.status_code >= 400:
            raise ResponseError(_error_text(response), response.status_code)
        return response

    def _stream(self, method: str, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self._http.stream(method, path, json=body, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ResponseError(_error_text(response), response.status_code)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if isinstance(item, dict) and "error" in item:
                        raise ResponseError(str(item["error"]), -1)
                    yield item
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ServerUnreachable(self.base_url) from exc

    # -- API -----------------------------------------------------------------------------

    def heartbeat(self) -> None:
        self._request("HEAD", "/", timeout=5.0)

    def version(self) -> str:
        return str(self._request("GET", "/api/version").json()["version"])

    def list(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/api/tags").json()["models"])

    def show(self, model: str, *, verbose: bool = False, **extra: Any) -> dict[str, Any]:
        body = {"model": model, "verbose": verbose, **extra}
        result: dict[str, Any] = self._request("POST", "/api/show", json=body).json()
        return result

    def copy(self, source: str, destination: str) -> None:
        self._request("POST", "/api/copy", json={"source": source, "destination": destination})

    def delete(self, model: str) -> None:
        self._request("DELETE", "/api/delete", json={"model": model})

    def create(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Stream the progress of ``POST /api/create``."""
        return self._stream("POST", "/api/create", {**request, "stream": True})

    def blob_exists(self, digest: str) -> bool:
        try:
            self._request("HEAD", f"/api/blobs/{digest}")
        except ResponseError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    def push_blob(
        self, digest: str, path: Path, on_progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Upload a local file as a blob (the server verifies its digest)."""
        total = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            sent = 0
            with open(path, "rb") as f:
                while chunk := f.read(_UPLOAD_CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if on_progress:
                        on_progress(sent, total)

        headers = {"Content-Length": str(total), "Content-Type": "application/octet-stream"}
        self._request(
            "POST", f"/api/blobs/{digest}", content=chunks(), headers=headers, timeout=None
        )

    def purge(self, *, dry_run: bool, paths: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"dry_run": dry_run}
        if paths is not None:
            body["paths"] = paths
        result: dict[str, Any] = self._request("POST", "/api/purge", json=body).json()
        return result

    def generate(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Stream ``POST /api/generate`` (an empty prompt answers one load/unload object)."""
        return self._stream("POST", "/api/generate", {**body, "stream": True})

    def chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self._stream("POST", "/api/chat", {**body, "stream": True})

    def ps(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/api/ps").json()["models"])

    def pull(self, model: str, *, insecure: bool = False) -> Iterator[dict[str, Any]]:
        """Stream the progress of ``POST /api/pull``."""
        return self._stream("POST", "/api/pull", {"model": model, "insecure": insecure})

    def push(self, model: str, *, insecure: bool = False) -> Iterator[dict[str, Any]]:
        """Stream the progress of ``POST /api/push``."""
        return self._stream("POST", "/api/push", {"model": model, "insecure": insecure})

    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/embed``: ``{"model", "embeddings": [[...]], ...}``."""
        result: dict[str, Any] = self._request("POST", "/api/embed", json=body, timeout=None).json()
        return result
