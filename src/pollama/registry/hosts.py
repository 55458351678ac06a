"""Which hosts and addresses registry transfers may reach: the one outbound choke point.

``/api/pull`` and ``/api/push`` make the server open connections to hosts a caller names,
and to hosts a registry redirects to. Without a policy that is a server-side request forgery
tool (CVE-2026-5530 and siblings): a name like ``169.254.169.254/latest/meta:x`` or a
redirect to ``http://10.0.0.5/`` would reach the server's private network, and the errors
of such pulls (connection refused, a timeout, a bad answer) would tell a caller which ports
are open there. The rules, which only the server's settings can change:

* **Name hosts.** The host of a model name must match an entry of ``POLLAMA_REGISTRY_HOSTS``
  (default: the public registries Ollama users pull from). An entry is a host (``hf.co``),
  a host with a port (``reg.lan:5000``), a wildcard (``*.example.com``) or ``*`` for any
  host. A request's ``insecure`` (``pull --insecure``) only lets a listed host be reached
  over plain http (and redirect from https to http); it allows no host and no address.
* **Addresses.** Every connection, to a name host or to any redirect target (a CDN), is
  checked against the addresses it actually connects to, after DNS resolution, so a public
  name resolving to a private address is caught too (and the check cannot be raced by DNS
  rebinding, since the checked address is the one connected to). Public addresses are always
  allowed. Loopback, private, link-local (cloud metadata), multicast and reserved addresses
  only for a host the user listed explicitly (an entry that is neither a wildcard nor one of
  the built-in public registries): that entry is the user saying the host is theirs.
* **One refusal.** Every refused host gets the same :class:`HostNotAllowed` (a 400 with one
  message, naming the host and the setting), raised before any connection to it is tried, so
  the answer does not depend on whether a port is open, closed or filtered, or on what the
  address is. A pull checks its name host's addresses before its first progress line, so a
  refusal is always the request's own status, never a line in a stream.

With an ``HTTP(S)_PROXY`` the proxy connects for us, so :meth:`HostPolicy.check_url` also
resolves and checks each URL before the request (best effort there).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import typing
from collections.abc import Iterable
from dataclasses import dataclass

import httpcore
import httpx

from pollama.registry import netstream
from pollama.registry.errors import HostNotAllowed

__all__ = ["DEFAULT_REGISTRY_HOSTS", "HostPolicy", "guarded_transport"]

DEFAULT_REGISTRY_HOSTS: tuple[str, ...] = (
    "registry.ollama.ai",
    "ollama.com",
    "hf.co",
    "huggingface.co",
    "modelscope.cn",
)
"""Public registries named by the issue and the seed guide; these may resolve only to
public addresses (being listed here is not a reason to trust a private answer from DNS)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _split_host_port(netloc: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) → (lowercase host, port or None)."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif netloc.count(":") == 1:
        host, _, port = netloc.partition(":")
    else:
        host, port = netloc, ""
    return host, int(port) if port.isdigit() else None


def _is_public(ip: IPAddress) -> bool:
    """Whether ``ip`` is on the public internet: not loopback, RFC 1918, ULA, CGNAT,
    unspecified, link-local (cloud metadata), multicast or reserved."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    special = ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast
    return ip.is_global and not special and not ip.is_reserved


def _join(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


class ResolveError(OSError):
    """A host name that DNS cannot resolve (becomes httpx's ConnectError for callers)."""


@dataclass(frozen=True)
class _Entry:
    host: str  # lowercase; "*" or "*.suffix" for wildcards
    port: int | None

    @classmethod
    def parse(cls, text: str) -> _Entry:
        host, port = _split_host_port(text)
        return cls(host, port)

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*")

    def matches(self, host: str, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and host != self.host[2:]
        return host == self.host


class HostPolicy:
    """Decides which name hosts may be used and which addresses may be connected to.

    One instance per transfer: ``insecure`` is that request's flag.
    """

    def __init__(self, allowed: Iterable[str] = DEFAULT_REGISTRY_HOSTS, *, insecure: bool = False):
        self.entries = tuple(_Entry.parse(e) for e in allowed if e.strip())
        self.insecure = insecure  # plain http to listed hosts (RegistrySession); nothing else
        defaults = {_Entry.parse(e) for e in DEFAULT_REGISTRY_HOSTS}
        self._trusted = tuple(e for e in self.entries if not e.wildcard and e not in defaults)

    def listed(self, netloc: str) -> bool:
        host, port = _split_host_port(netloc)
        return any(e.matches(host, port) for e in self.entries)

    def trusted(self, host: str, port: int | None) -> bool:
        """Whether the user named this host explicitly, so any address it has is wanted."""
        host = host.lower().strip("[]")
        return any(e.matches(host, port) for e in self._trusted)

    def check_name_host(self, netloc: str) -> None:
        """Refuse a model name whose registry host is not listed (``insecure`` or not)."""
        if not self.listed(netloc):
            raise self.refusal(netloc)

    def address_allowed(self, host: str, port: int | None, ip: IPAddress) -> bool:
        return _is_public(ip) or self.trusted(host, port)

    def refusal(self, host: str) -> HostNotAllowed:
        """The one error of every refused host, whatever the reason: nothing in it depends
        on the network (see the module docstring)."""
        return HostNotAllowed(
            f'registry host "{host}" is not allowed: add it to POLLAMA_REGISTRY_HOSTS on the '
            "server (--insecure only lets a listed host be reached over http)"
        )

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address ``host`` resolves to that the policy allows; raises if none."""
        host = host.strip("[]")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            ips = [literal]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise ResolveError(f"cannot resolve {host}: {exc}") from exc
            ips = []
            for info in infos:
                ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
                if ip not in ips:
                    ips.append(ip)
        allowed = [ip for ip in ips if self.address_allowed(host, port, ip)]
        if not allowed:
            raise self.refusal(_join(host, port))
        return allowed

    async def check_url(self, url: httpx.URL) -> None:
        """Resolve and check a URL's host before a request (covers proxied requests)."""
        if url.scheme not in ("http", "https"):
            raise HostNotAllowed(f'unsupported protocol scheme "{url.scheme}"')
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            await self.resolve(url.host, port)
        except ResolveError as exc:
            raise httpx.ConnectError(str(exc)) from exc


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses the policy allows, and to exactly the address it checked,
    with :mod:`pollama.registry.netstream`'s streams (large reads)."""

    def __init__(self, policy: HostPolicy) -> None:
        self._policy = policy

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self._policy.resolve(host, port)
        except ResolveError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        last: Exception | None = None
        for ip in addresses:
            try:
                return await netstream.connect(
                    str(ip),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise HostNotAllowed("registry connections over unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One verifying context per process: loading the CA bundle costs ~0.1 s each time."""
    return httpx.create_ssl_context()


def guarded_transport(policy: HostPolicy, *, max_connections: int = 64) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection goes through the policy's address check.

    httpx has no public hook for the network backend, so the transport's connection pool is
    replaced by an identical one built with the guarded backend.
    """
    transport = httpx.AsyncHTTPTransport(verify=_ssl_context())
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=_ssl_context(),
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=5.0,
        network_backend=_GuardedBackend(policy),
    )
    return transport
