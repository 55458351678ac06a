"""``RegistrySession``: the HTTP side of one pull or push against one registry.

Every request of a transfer goes through :meth:`RegistrySession.send`, which is where the
rules that keep credentials and the network safe live:

* connections go through :func:`pollama.registry.hosts.guarded_transport`, so each address
  connected to is checked by the host policy;
* redirects are followed by hand, at most :data:`MAX_REDIRECTS`; an https URL never
  redirects to http unless the transfer is ``insecure``;
* an ``Authorization`` header (a token from the exchange, or a Docker login) is attached
  only to requests whose ``host:port`` is the one it was issued for, never to a redirect
  target or a CDN;
* a ``401`` triggers one token exchange (docs/ollama-behaviour.md#registry-authentication) and one
  retry, then ``unauthorized``;
* bodies that are read whole (manifests, tokens, error texts) are read with a byte cap after
  decompression (CVE-2024-12886, the gzip bomb).

A session is reference-counted (:meth:`acquire`/:meth:`release`) because a download that two
pulls share outlives the pull that started it.
"""

from __future__ import annotations

import logging
import platform
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from pollama import OLLAMA_API_VERSION, __version__
from pollama.names import ModelName
from pollama.registry.auth import (
    Challenge,
    DockerCredentials,
    IdentityKey,
    parse_challenge,
    signing_payload,
    token_url,
)
from pollama.registry.errors import HostNotAllowed, RegistryError, RegistryNotFound, Unauthorized
from pollama.registry.hosts import HostPolicy, guarded_transport

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10
MAX_ERROR_BODY = 64 << 10
MAX_TOKEN_BODY = 1 << 20
_SHOWN_ERROR_CHARS = 1000

Content = bytes | Callable[[], AsyncIterator[bytes]] | None

"""The Ollama release whose registry behaviour this matches (also in ``/api/version``)."""


def user_agent() -> str:
    """Ollama's ``ollama/<ver> (<arch> <os>) Go/<ver>`` shape, naming pollama at the end:
    registries may choose what to serve by it (Hugging Face serves Ollama clients GGUF
    manifests), so it starts as Ollama's does."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return f"ollama/{OLLAMA_API_VERSION} ({arch} {sys.platform}) pollama/{__version__}"


def _netloc(url: httpx.URL) -> str:
    """``host[:port]`` as written in the URL (Go's ``url.Host``)."""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}" if url.port else host


async def read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """Read a (decompressed) body, refusing more than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise RegistryError(f"{what} is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class RegistrySession:
    """Requests of one transfer to the registry of one model name."""

    def __init__(
        self,
        name: ModelName,
        *,
        policy: HostPolicy,
        key: IdentityKey,
        credentials: DockerCredentials | None = None,
        timeout: float | None = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.insecure = policy.insecure
        self.base_url = httpx.URL(name.registry_base_url(self.insecure))  # scheme first
        policy.check_name_host(name.host)
        self.key = key
        self.credentials = credentials or DockerCredentials()
        self._auth: dict[str, str] = {}  # netloc -> Authorization header value
        preset = self.credentials.bearer_header(_netloc(self.base_url))
        if preset is not None:
            self._auth[_netloc(self.base_url)] = preset
        self._refs = 1
        # With a proxy the proxy connects, not our guarded backend: check URLs up front too.
        self._proxied = bool({"http", "https", "all"} & set(urllib.request.getproxies()))
        self._client = httpx.AsyncClient(
            transport=transport or guarded_transport(policy),
            timeout=httpx.Timeout(timeout, connect=30.0 if timeout is None else timeout),
            follow_redirects=False,
            headers={"User-Agent": user_agent()},
            trust_env=True,
        )

    # -- lifetime ------------------------------------------------------------------------

    def acquire(self) -> RegistrySession:
        self._refs += 1
        return self

    async def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            await self._client.aclose()

    async def check_host(self) -> None:
        """Refuse the registry host now if the policy would refuse its addresses, before a
        transfer sends or streams anything: every refusal then reaches the caller as the
        request's own error, the same one :meth:`HostPolicy.check_name_host` gives. A name
        that does not resolve is left to the transfer, which reports it after its retries."""
        try:
            await self.policy.check_url(self.base_url)
        except HostNotAllowed:
            raise self.policy.refusal(self.name.host) from None
        except httpx.ConnectError:
            pass

    # -- URLs ----------------------------------------------------------------------------

    def url(self, *parts: str) -> httpx.URL:
        """``<base>/v2/<namespace>/<model>/<parts...>``."""
        path = "/".join(("v2", self.name.namespace, self.name.model, *parts))
        return self.base_url.join("/" + path)

    def is_registry_host(self, url: httpx.URL) -> bool:
        return _netloc(url) == _netloc(self.base_url)

    # -- sending -------------------------------------------------------------------------

    def _headers_for(self, url: httpx.URL, headers: dict[str, str] | None) -> dict[str, str]:
        out = dict(headers or {})
        token = self._auth.get(_netloc(url))
        if token and "Authorization" not in out:
            out["Authorization"] = token
        return out

    async def _send_once(
        self,
        method: str,
        url: httpx.URL,
        headers: dict[str, str] | None,
        content: Content,
        same_host_only: bool,
    ) -> httpx.Response:
        """One request, following redirects by hand with the rules in the module docstring.

        With ``same_host_only`` a redirect to another host is not followed but returned, so
        the caller can use its Location as a direct URL (a blob's CDN address).
        """
        body: Any = content() if callable(content) else content
        for _ in range(MAX_REDIRECTS + 1):
            if self._proxied:
                await self.policy.check_url(url)
            request = self._client.build_request(
                method, url, headers=self._headers_for(url, headers), content=body
            )
            response = await self._client.send(request, stream=True)
            if response.status_code not in (301, 302, 303, 307, 308) or method not in (
                "GET",
                "HEAD",
            ):
                return response
            location = response.headers.get("location")
            if not location:
                await response.aclose()
                raise RegistryError(f"redirect without a Location from {url.host}")
            target = self.redirect_target(url, location)
            if same_host_only and _netloc(target) != _netloc(url):
                return response
            await response.aclose()
            url = target
        raise RegistryError(f"maximum redirects exceeded ({MAX_REDIRECTS})")

    def redirect_target(self, url: httpx.URL, location: str) -> httpx.URL:
        """Where a redirect leads, refusing a downgrade from https to http."""
        target = url.join(location)
        if target.scheme not in ("http", "https"):
            raise HostNotAllowed(f'redirect to an unsupported scheme "{target.scheme}"')
        if url.scheme == "https" and target.scheme == "http" and not self.insecure:
            raise HostNotAllowed(f"refusing a redirect from https to http ({target.host})")
        return target

    async def send(
        self,
        method: str,
        url: httpx.URL,
        *,
        headers: dict[str, str] | None = None,
        content: Content = None,
        ok_statuses: tuple[int, ...] = (),
        same_host_only: bool = False,
    ) -> httpx.Response:
        """A streamed response with Ollama's ``makeRequestWithRetry`` rules.

        A ``401`` is answered by one token exchange and one retry; a second ``401`` is
        :class:`Unauthorized`. ``404`` is :class:`RegistryNotFound` and any other status
        >= 400 a :class:`RegistryError` ``"<code>: <body>"``, unless listed in
        ``ok_statuses``. The caller must close the response (``aclose``).
        """
        for attempt in range(2):
            response = await self._send_once(method, url, headers, content, same_host_only)
            status = response.status_code
            if status in ok_statuses or status < 400:
                return response
            if status == 401:
                challenge = parse_challenge(response.headers.get("www-authenticate"))
                await response.aclose()
                if attempt == 0:
                    await self.authenticate(challenge, response.url)
                    continue
                raise Unauthorized()
            if status == 404:
                await response.aclose()
                raise RegistryNotFound()
            raise await self.error_from(response)
        raise Unauthorized()

    @asynccontextmanager
    async def stream(
        self, method: str, url: httpx.URL, **kwargs: Any
    ) -> AsyncIterator[httpx.Response]:
        response = await self.send(method, url, **kwargs)
        try:
            yield response
        finally:
            await response.aclose()

    async def read(
        self, method: str, url: httpx.URL, limit: int, what: str, **kwargs: Any
    ) -> tuple[httpx.Response, bytes]:
        async with self.stream(method, url, **kwargs) as response:
            return response, await read_capped(response, limit, what)

    @staticmethod
    async def error_from(response: httpx.Response) -> RegistryError:
        """``"<code>: <body>"`` (Ollama's wording), the body capped and shortened."""
        try:
            raw = await read_capped(response, MAX_ERROR_BODY, "error body")
        except (RegistryError, httpx.HTTPError):
            raw = b""
        finally:
            await response.aclose()
        text = raw.decode("utf-8", errors="replace").strip()
        if len(text) > _SHOWN_ERROR_CHARS:
            text = text[:_SHOWN_ERROR_CHARS] + "..."
        message = f"{response.status_code}: {text}" if text else str(response.status_code)
        return RegistryError(message, response.status_code)

    # -- authentication --------------------------------------------------------------------

    async def authenticate(self, challenge: Challenge, url: httpx.URL) -> None:
        """Obtain credentials for ``url``'s host after a 401 carrying ``challenge``."""
        netloc = _netloc(url)
        basic = self.credentials.basic_header(netloc)
        if challenge.scheme == "basic":
            if basic is None:
                raise Unauthorized()
            self._auth[netloc] = basic
            return
        if challenge.scheme == "bearer" and challenge.realm == "pollama":
            # Another pollama that requires API keys: it takes one as a Bearer token.
            raise Unauthorized(
                f"unauthorized: access denied: the pollama server at {netloc} requires an API "
                f'key; put one as "registrytoken" for "{netloc}" in the Docker config.json '
                "(~/.docker/config.json) of the user this server runs as"
            )
        if challenge.scheme != "bearer" or not challenge.realm.startswith(("https://", "http://")):
            raise Unauthorized()
        realm = token_url(challenge)
        if _netloc(realm) != netloc:
            # CVE-2025-51471: never sign for, or send credentials to, another host.
            raise Unauthorized(
                f'unauthorized: realm host "{_netloc(realm)}" does not match '
                f'original host "{netloc}"'
            )
        header = basic if basic is not None else self.key.sign(signing_payload(realm))
        request = self._client.build_request("GET", realm, headers={"Authorization": header})
        response = await self._client.send(request, stream=True)
        try:
            if response.status_code >= 400:
                raise await self.error_from(response)
            raw = await read_capped(response, MAX_TOKEN_BODY, "token response")
        finally:
            await response.aclose()
        try:
            doc = httpx.Response(200, content=raw).json()
        except ValueError as exc:
            raise RegistryError(f"token response is not JSON: {exc}") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError("token response has no token")
        self._auth[netloc] = f"Bearer {token}"
