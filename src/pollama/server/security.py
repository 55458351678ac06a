"""Who may call what: the Host, Origin (CORS) and API-key checks, in one ASGI middleware.

One choke point for every route, including routes added after this module was written
(vLLM's ``--api-key`` covered only some prefixes; docs/security.md#the-http-surface). The checks
run in this order, and each refusal is a JSON body that says what to change:

1. **Host** (DNS rebinding, CVE-2024-28224). The ``Host`` header must name this server:
   empty, ``localhost``, the machine's hostname, ``*.localhost``/``*.local``/``*.internal``,
   a single-label name (``ollama``: a Compose service), a loopback/private/unspecified IP or
   one of this machine's own addresses, the bound host, or a name in
   ``POLLAMA_ALLOWED_HOSTS``. Unlike Ollama, this holds on every bind address, ``0.0.0.0``
   included. Else 403.
2. **Origin**, as Ollama's gin-contrib/cors setup: ``OLLAMA_ORIGINS`` plus the built-in list
   (``Settings.allowed_origins``), wildcards allowed. A same-origin request (``Origin`` equal
   to ``http(s)://<Host>``) is not a CORS request. An allowed preflight gets 204 with the
   CORS headers, before any key is asked for (browsers never send keys on a preflight); a
   refused Origin gets 403 naming ``OLLAMA_ORIGINS`` (Ollama's 403 is empty). A ``*`` in a
   pattern matches any run of characters, except that a final ``:*`` matches a port only:
   ``http://localhost:*`` does not match ``http://localhost.evil.example`` (gin-contrib
   drops the ``:`` before the ``*``, so Ollama lets any ``localhost.<attacker domain>`` in).
3. **API key.** Keys are required when any exist (``pollama keys create``, or one given by
   ``POLLAMA_API_KEY``, :class:`~pollama.keys.EnvKey`), and always when the server is bound
   to a non-loopback address without ``POLLAMA_ALLOW_NO_AUTH``, so that revoking the last
   key closes the server instead of opening it. The key comes from
   ``Authorization: Bearer <key>`` or ``x-api-key`` (Anthropic clients). What a route needs
   is decided from its method and path template by :func:`permission_for`; routes it does not
   know that write anything need the ``manage`` scope (fail closed). Only ``/healthz``,
   ``/readyz`` and the chat page's own files (``GET /ui``, ``routes_ui.PAGE_ROUTES``: the
   page must load to ask for a key) are open. A missing or wrong key gets 401, a key
   without the scope 403, in the error shape of the route's protocol.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pollama.config import Settings
from pollama.keys import MIN_ENV_KEY_LENGTH, ApiKey, EnvKey, KeyFileError, KeyStore, Permission
from pollama.server.access_log import RequestRecord, current_record, route_template
from pollama.server.refusals import json_error
from pollama.server.routes_ui import PAGE_ROUTES

__all__ = [
    "KEY_ID_STATE",
    "PUBLIC_ROUTES",
    "AccessPolicy",
    "auth_summary",
    "bind_refusal",
    "HostGuard",
    "OriginPolicy",
    "SecurityMiddleware",
    "is_loopback_bind",
    "permission_for",
]

KEY_ID_STATE = "api_key_id"
"""``request.state`` attribute holding the id of the API key a request was let in with (absent
on a server that requires no key)."""
PUBLIC_ROUTES = frozenset({"/healthz", "/readyz"}) | PAGE_ROUTES
"""Answered without a key (GET and HEAD only): ``/healthz`` and ``/readyz`` say only whether
the process is alive and ready; the chat page's static files (``routes_ui``) hold no data, and
the page needs them to show its key form. The API calls the page makes need a key as before."""

_INFERENCE_ROUTES = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/api/rerank",
        "/rerank",  # llama-server's path
        "/api/tokenize",  # they load the model, as generate does
        "/api/detokenize",
    }
)
_READ_ONLY_POSTS = frozenset({"/api/show"})
_READ_METHODS = frozenset({"GET", "HEAD"})


def permission_for(method: str, template: str | None) -> Permission | None:
    """What a request needs: None (open), READ, INFERENCE or MANAGE.

    ``template`` is the matched route's path template (``/api/blobs/{digest}``), or None
    when no route matches (the answer will be 404/405, so any valid key will do).
    """
    if template is None:
        return Permission.READ
    if template in PUBLIC_ROUTES and method in _READ_METHODS:
        return None
    if template in _INFERENCE_ROUTES or template.startswith("/v1/"):
        return Permission.INFERENCE
    if method in _READ_METHODS or (method == "POST" and template in _READ_ONLY_POSTS):
        return Permission.READ
    return Permission.MANAGE


# -- Host ------------------------------------------------------------------------------------

_LOCAL_TLDS = (".localhost", ".local", ".internal")
_GO_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


def _split_host(value: str) -> str:
    """The host part of a ``Host`` header, lowercased, without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host = value[1:end] if end > 0 else value
    elif value.count(":") == 1:
        host = value.partition(":")[0]
    else:
        host = value
    return host[:-1] if host.endswith(".") else host


@lru_cache(maxsize=256)
def _is_own_address(ip: str) -> bool:
    """Whether ``ip`` is an address of this machine: binding to it succeeds only then."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def is_loopback_bind(host: str) -> bool:
    """Whether binding ``host`` listens on loopback only (``""`` and ``0.0.0.0`` do not).

    A name counts only if every address it resolves to is loopback.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).partition("%")[0]).is_loopback for a in addresses
    )


class HostGuard:
    """Decides whether a ``Host`` header names this server (see the module docstring)."""

    def __init__(self, bind_host: str, extra: Iterable[str] = ()) -> None:
        self.names = {"localhost"}
        try:
            self.names.add(socket.gethostname().lower())
        except OSError:  # pragma: no cover
            pass
        if bind_host:
            self.names.add(_split_host(bind_host))
        self.allow_all = False
        self.suffixes: list[str] = list(_LOCAL_TLDS)
        for entry in extra:
            entry = entry.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.allow_all = True
            elif entry.startswith("*."):
                self.suffixes.append(entry[1:])
            else:
                self.names.add(_split_host(entry))

    def allowed(self, header: str) -> bool:
        if self.allow_all:
            return True
        host = _split_host(header)
        if host == "" or host in self.names or host.endswith(tuple(self.suffixes)):
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            # A single-label name ("ollama", a Docker Compose service) is resolved only by
            # local means (hosts file, search domains, container DNS): no web page can make
            # its own origin one, which is what rebinding needs.
            return "." not in host and ":" not in host and host.isascii()
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback or ip.is_unspecified or any(ip in net for net in _GO_PRIVATE):
            return True
        return _is_own_address(str(ip))


# -- Origin ----------------------------------------------------------------------------------

_ALLOW_HEADERS = ",".join([
    "Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With",
    # OpenAI compatibility headers (Ollama's list)
    "Openai-Beta", "X-Stainless-Arch", "X-Stainless-Async", "X-Stainless-Custom-Poll-Interval",
    "X-Stainless-Helper-Method", "X-Stainless-Lang", "X-Stainless-Os",
    "X-Stainless-Package-Version", "X-Stainless-Poll-Helper", "X-Stainless-Retry-Count",
    "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Timeout",
    # pollama's: Anthropic clients' key and version headers, request ids
    "X-Api-Key", "Anthropic-Version", "Anthropic-Beta",
    "Anthropic-Dangerous-Direct-Browser-Access", "X-Request-Id",
])  # fmt: skip
_ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD"
_MAX_AGE = str(12 * 3600)


class OriginPolicy:
    """Which ``Origin`` values may make cross-origin requests (``Settings.allowed_origins``)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.exact: set[str] = set()
        regexes: list[str] = []
        self.allow_all = False
        for raw in patterns:
            pattern = raw.strip().lower()
            if not pattern:
                continue
            if pattern == "*":
                self.allow_all = True
            elif "*" in pattern:
                port = pattern.endswith(":*")  # "http://localhost:*": any port, nothing else
                head = pattern[:-2] if port else pattern
                regex = ".*".join(re.escape(part) for part in head.split("*"))
                regexes.append(regex + (r":[0-9]{1,5}" if port else ""))
            else:
                self.exact.add(pattern)
        self._wildcard = re.compile("|".join(f"(?:{r})" for r in regexes)) if regexes else None

    def allowed(self, origin: str) -> bool:
        if self.allow_all:
            return True
        origin = origin.strip().lower()
        if origin in self.exact:
            return True
        return self._wildcard is not None and self._wildcard.fullmatch(origin) is not None

    def headers(self, origin: str, preflight: bool) -> list[tuple[bytes, bytes]]:
        """The CORS headers for an allowed request (gin-contrib/cors, as Ollama sets it up)."""
        out: list[tuple[bytes, bytes]] = []
        if preflight:
            out += [(b"access-control-allow-methods", _ALLOW_METHODS.encode()),
                    (b"access-control-allow-headers", _ALLOW_HEADERS.encode()),
                    (b"access-control-max-age", _MAX_AGE.encode())]  # fmt: skip
        if self.allow_all:
            out.append((b"access-control-allow-origin", b"*"))
        else:
            out.append((b"vary", b"Origin"))
            if preflight:
                out += [(b"vary", b"Access-Control-Request-Method"),
                        (b"vary", b"Access-Control-Request-Headers")]  # fmt: skip
            out.append((b"access-control-allow-origin", origin.encode("latin-1", "replace")))
        return out


# -- the policy and the middleware -----------------------------------------------------------


@dataclass
class AccessPolicy:
    """Everything the middleware decides with, built once per app from the settings."""

    keys: KeyStore
    hosts: HostGuard
    origins: OriginPolicy
    keys_always_required: bool
    env_key: EnvKey | None = None  # POLLAMA_API_KEY

    @classmethod
    def from_settings(cls, settings: Settings, keys: KeyStore | None = None) -> AccessPolicy:
        bind = settings.host.bind_host
        return cls(
            keys=keys or KeyStore(settings.api_keys_path),
            hosts=HostGuard(settings.host.host, settings.allowed_hosts),
            origins=OriginPolicy(settings.allowed_origins()),
            keys_always_required=not settings.allow_no_auth and not is_loopback_bind(bind),
            env_key=_env_key(settings),
        )

    def keys_required(self) -> bool:
        configured, _ = self.keys.state()
        return configured or self.env_key is not None or self.keys_always_required

    def authenticate(self, presented: str | None) -> ApiKey | None:
        """The key ``presented`` is, from the keys file or ``POLLAMA_API_KEY``, else None.

        Both are always checked (no early exit). A keys file that cannot be used refuses
        the environment's key too: failure is closed for every key, as ``pollama serve``'s
        start refusal and the 401 message say.
        """
        found = self.keys.authenticate(presented)
        if self.env_key is not None:
            from_env = self.env_key.authenticate(presented)
            if found is None and self.keys.state()[1] is None:
                found = from_env
        return found


def _env_key(settings: Settings) -> EnvKey | None:
    """``POLLAMA_API_KEY`` as a key, or None when it is not set (an empty value is unset)."""
    return EnvKey(settings.server_api_key) if settings.server_api_key else None


_HOW_TO_PASS = (
    "pass it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>'); the pollama and "
    "ollama CLIs send the key in OLLAMA_API_KEY"
)


def _presented_key(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("x-api-key") or None


@dataclass(frozen=True)
class _Refusal:
    """A request the middleware answers itself: ``reason`` is the access log's and the
    metrics' ``refused`` label, ``kind`` Anthropic's error type."""

    reason: str
    status: int
    kind: str
    message: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class SecurityMiddleware:
    """Host, then Origin, then key (see the module docstring); everything else passes."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        record = current_record()
        refusal, cors = self._host_and_origin(scope["method"], headers)
        if refusal is None and scope["method"] == "OPTIONS":
            await _empty(204, cors)(scope, receive, send)
            return
        if refusal is None:
            refusal = self._key_refusal(scope, headers, record, cors)
        if refusal is not None:
            if record is not None:
                record.refused = refusal.reason
            await json_error(scope["path"], refusal.status, refusal.kind, refusal.message,
                             refusal.headers)(scope, receive, send)  # fmt: skip
            return
        if not cors:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _host_and_origin(self, method: str, headers: Headers
                         ) -> tuple[_Refusal | None, list[tuple[bytes, bytes]]]:
        """The refusal of a foreign Host or a refused Origin, else the CORS headers to add
        (none for a request that is not cross-origin)."""
        host = headers.get("host", "")
        if not self.policy.hosts.allowed(host):
            shown = _split_host(host)[:100]
            return _Refusal("host", 403, "permission_error", (
                f"host '{shown}' is not allowed: requests must be addressed to this server's "
                "own address or to localhost (DNS rebinding protection); to serve requests "
                f"for this name, add it to POLLAMA_ALLOWED_HOSTS (e.g. POLLAMA_ALLOWED_HOSTS="
                f"{shown}) and restart pollama serve"
            )), []  # fmt: skip
        origin = headers.get("origin")
        if not origin or origin in (f"http://{host}", f"https://{host}"):
            return None, []
        if not self.policy.origins.allowed(origin):
            shown = origin[:200]
            return _Refusal("origin", 403, "permission_error", (
                f"origin '{shown}' is not allowed to call this server from a browser; to "
                f"allow it, add it to OLLAMA_ORIGINS (comma-separated, '*' wildcards "
                f"allowed, e.g. OLLAMA_ORIGINS={shown}) and restart pollama serve"
            )), []  # fmt: skip
        return None, self.policy.origins.headers(origin, preflight=method == "OPTIONS")

    def _key_refusal(self, scope: Scope, headers: Headers, record: RequestRecord | None,
                     cors: list[tuple[bytes, bytes]]) -> _Refusal | None:
        """The refusal of a missing or wrong key (401) or of a key without the route's
        scope (403), when the route needs a key; the key's name goes to the access log."""
        method: str = scope["method"]
        template = record.route if record is not None else route_template(scope)
        permission = permission_for(method, template)
        if permission is None or not self.policy.keys_required():
            return None
        key = self.policy.authenticate(_presented_key(headers))
        if key is None:
            message = _refusal_message(self.policy, headers)
            return _Refusal("key", 401, "authentication_error", message, cors + [
                (b"www-authenticate", b'Bearer realm="pollama"')
            ])  # fmt: skip
        if record is not None:
            record.key_name = key.name
        # Who owns what a request stores (routes_responses: stored responses, per key).
        scope.setdefault("state", {})[KEY_ID_STATE] = key.id
        if key.allows(permission):
            return None
        return _Refusal("scope", 403, "permission_error", (
            f"forbidden: the API key '{key.name}' has scope '{key.scope.value}', which "
            f"does not allow {method} {scope['path']}; use a key created with --scope "
            f"{'manage' if permission is Permission.MANAGE else 'inference'} or --scope all"
        ), cors)  # fmt: skip


def _refusal_message(policy: AccessPolicy, headers: Headers) -> str:
    """Why a request without a valid key is refused. A keys file the server cannot use
    refuses every key (fail closed); saying so keeps callers from doubting a good key. The
    file's path and the reason are only in the server's log."""
    if policy.keys.state()[1] is not None:
        return ("unauthorized: this pollama server cannot read its API keys file, so it "
                "refuses every request until the file is fixed (the server log says why)")
    if _presented_key(headers) is not None:
        message = "invalid API key: the key sent is not one of this server's keys"
    else:
        message = "unauthorized: this pollama server requires an API key"
    return message + f"; {_HOW_TO_PASS}. Create keys on the server with 'pollama keys create'"


def _empty(status: int, headers: list[tuple[bytes, bytes]]) -> Any:
    async def app(_scope: Scope, _receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app


def bind_refusal(settings: Settings, keys: KeyStore | None = None) -> str | None:
    """Why ``pollama serve`` must not start with these settings, or None.

    It refuses a non-loopback bind with no key configured (unless ``POLLAMA_ALLOW_NO_AUTH``),
    and, whatever the bind, a keys file it cannot trust or a ``POLLAMA_API_KEY`` too weak
    to be a key: each would leave the server open or silently locked. The message gives the
    ways forward. ``POLLAMA_API_KEY`` alone counts as a configured key.
    """
    keys = keys or KeyStore(settings.api_keys_path)
    configured, error = keys.state()
    if error is not None:
        return f"{error}. Fix or remove the file, or point POLLAMA_KEYS_FILE at another one."
    env_key = _env_key(settings)
    if env_key is not None and env_key.problem is not None:
        return env_key.problem
    bind = settings.host.bind_host
    if configured or env_key is not None or settings.allow_no_auth or is_loopback_bind(bind):
        return None
    where = f"[{bind}]:{settings.host.port}" if ":" in bind else f"{bind}:{settings.host.port}"
    return (
        f"refusing to listen on {where} without API keys: anyone who can reach this address "
        "could run, pull and delete models (Ollama servers exposed this way are found and "
        "abused daily). Either:\n"
        "  1. create a key, and give it to clients as 'Authorization: Bearer <key>' "
        "(the pollama and ollama CLIs read OLLAMA_API_KEY):\n"
        "       pollama keys create --name <who-uses-it>\n"
        "     or give the server one in the environment (at least "
        f"{MIN_ENV_KEY_LENGTH} characters; stored nowhere):\n"
        "       POLLAMA_API_KEY=$(openssl rand -hex 32) pollama serve\n"
        "  2. or, only on a network you trust, allow requests without a key:\n"
        "       POLLAMA_ALLOW_NO_AUTH=1 pollama serve\n"
        "  (or bind to loopback only: OLLAMA_HOST=127.0.0.1)"
    )


def auth_summary(settings: Settings, keys: KeyStore | None = None) -> str:
    """One line for ``pollama serve`` to print: whether callers need a key."""
    keys = keys or KeyStore(settings.api_keys_path)
    try:
        count = len(keys.keys())
    except KeyFileError:
        count = 0
    where = [f"{count} in {keys.path}"] if count else []
    if settings.server_api_key:  # named, never shown
        where.insert(0, "one from the environment (POLLAMA_API_KEY)")
    if where:
        return f"API keys required ({', '.join(where)})"
    if not is_loopback_bind(settings.host.bind_host):
        return ("WARNING: no API keys and POLLAMA_ALLOW_NO_AUTH is set: anyone who can reach "
                "this address can use every route")
    return "no API keys: loopback callers need none ('pollama keys create' to require one)"
