"""DNS rebinding (CVE-2024-28224) and cross-origin browser access (OLLAMA_ORIGINS)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from pollama.server.security import HostGuard, OriginPolicy, is_loopback_bind

ALLOWED_HOSTS = [
    "", "localhost", "LOCALHOST:11434", "127.0.0.1", "127.0.0.1:11434", "127.9.9.9",
    "[::1]:11434", "::1", "0.0.0.0:11434", "10.1.2.3", "172.16.0.1", "192.168.1.20:80",
    "[fd00::1]", "foo.localhost", "printer.local", "svc.cluster.internal", "localhost.",
    socket.gethostname(), socket.gethostname().upper(), "ollama:11434", "pollama",
]  # fmt: skip
REFUSED_HOSTS = [
    "evil.example", "evil.example:11434", "localhost.evil.example", "127.0.0.1.nip.io",
    "8.8.8.8", "[2001:4860:4860::8888]:11434", "169.254.169.254", "my-ollama.example.com",
    "xlocalhost.com", "localhost.evil.example.", "évil",
]  # fmt: skip


@pytest.mark.parametrize("host", ALLOWED_HOSTS)
def test_host_allowed(host: str) -> None:
    assert HostGuard("127.0.0.1").allowed(host)


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_host_refused(host: str) -> None:
    assert not HostGuard("127.0.0.1").allowed(host)
    assert not HostGuard("0.0.0.0").allowed(host)  # Ollama allows every host here


def test_host_guard_extra_names_and_bound_name() -> None:
    guard = HostGuard("0.0.0.0", ("ollama.example.com", "*.corp.example", " "))
    assert guard.allowed("ollama.example.com:443") and guard.allowed("a.b.corp.example")
    assert not guard.allowed("corp.example.evil") and not guard.allowed("evil.example")
    assert HostGuard("my-box.example").allowed("my-box.example:11434")
    assert HostGuard("0.0.0.0", ("*",)).allowed("anything.example")


def test_own_addresses_are_hosts() -> None:
    """Addresses of this machine's interfaces are allowed, whatever their range."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing address
            own = s.getsockname()[0]
        except OSError:
            pytest.skip("no IPv4 route")
    assert HostGuard("0.0.0.0").allowed(f"{own}:11434")


def test_loopback_bind() -> None:
    assert is_loopback_bind("127.0.0.1") and is_loopback_bind("::1")
    assert is_loopback_bind("localhost") and is_loopback_bind("127.0.0.2")
    for host in ("0.0.0.0", "::", "", "10.0.0.1", "8.8.8.8", "no-such-host.invalid"):
        assert not is_loopback_bind(host), host


def test_dns_rebinding_gets_403_naming_the_setting(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    response = client.get("/api/tags", headers={"Host": "evil.example"})
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert "evil.example" in message and "POLLAMA_ALLOWED_HOSTS" in message
    assert client.get("/api/tags", headers={"Host": "localhost:11434"}).status_code == 200
    # the open routes are behind the Host check too
    assert client.get("/healthz", headers={"Host": "evil.example"}).status_code == 403
    # OpenAI-shaped for /v1
    v1 = client.get("/v1/models", headers={"Host": "evil.example"})
    assert v1.status_code == 403 and "POLLAMA_ALLOWED_HOSTS" in v1.json()["error"]["message"]


def test_allowed_hosts_setting(make_client: Callable[..., TestClient]) -> None:
    client = make_client(POLLAMA_ALLOWED_HOSTS="ollama.example.com")
    assert client.get("/api/tags", headers={"Host": "ollama.example.com"}).status_code == 200
    assert client.get("/api/tags", headers={"Host": "evil.example"}).status_code == 403


def test_options_from_allowed_host_is_204(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert client.options("/api/tags").status_code == 204
    assert client.options("/api/tags", headers={"Host": "evil.example"}).status_code == 403


# -- Origin ------------------------------------------------------------------------------------

DEFAULT_ALLOWED = [
    "http://localhost", "https://localhost", "http://localhost:3000", "https://localhost:8443",
    "http://127.0.0.1:5173", "http://0.0.0.0:8080", "app://obsidian.md", "file://",
    "tauri://localhost", "vscode-webview://abc", "vscode-file://vscode-app",
]  # fmt: skip
DEFAULT_REFUSED = [
    "http://evil.example", "https://localhost.evil.example", "http://localhost.evil.example",
    "http://127.0.0.1.evil.example", "chrome-extension://abcdef", "null",
    "http://localhost:3000.evil.example",
]  # fmt: skip


def _defaults() -> OriginPolicy:
    from pollama.config import load_settings

    return OriginPolicy(load_settings({}).allowed_origins())


@pytest.mark.parametrize("origin", DEFAULT_ALLOWED)
def test_default_origins_allowed(origin: str) -> None:
    assert _defaults().allowed(origin)


@pytest.mark.parametrize("origin", DEFAULT_REFUSED)
def test_default_origins_refused(origin: str) -> None:
    """``http://localhost:*`` must not match ``http://localhost.evil.example`` (gin-contrib
    drops the colon before ``*`` and so lets any ``localhost.<attacker domain>`` in)."""
    assert not _defaults().allowed(origin)


def test_refused_origin_gets_403_naming_ollama_origins(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    response = client.post("/api/chat", json={}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    message = response.json()["error"]
    assert "https://evil.example" in message and "OLLAMA_ORIGINS" in message
    preflight = client.options("/api/chat", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and "OLLAMA_ORIGINS" in preflight.json()["error"]


def test_allowed_origin_preflight_and_request(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    origin = "http://localhost:3000"
    preflight = client.options("/api/chat", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})  # fmt: skip
    assert preflight.status_code == 204
    h = preflight.headers
    assert h["access-control-allow-origin"] == origin
    assert "POST" in h["access-control-allow-methods"]
    allow = h["access-control-allow-headers"].lower()
    assert all(x in allow for x in ("authorization", "content-type", "x-api-key", "openai-beta"))
    assert h["access-control-max-age"] == "43200"
    assert "Origin" in h["vary"]
    response = client.get("/api/tags", headers={"Origin": origin})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == origin
    assert response.headers["vary"] == "Origin"


def test_cors_headers_on_a_401_and_preflight_needs_no_key(
    make_client: Callable[..., TestClient], keys: object
) -> None:
    from pollama.keys import KeyStore

    assert isinstance(keys, KeyStore)
    keys.create("k")
    client = make_client()
    origin = "http://localhost:3000"
    preflight = client.options("/api/chat", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204  # browsers never send keys on a preflight
    refused = client.get("/api/tags", headers={"Origin": origin})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == origin  # the page can read why


def test_ollama_origins_setting(make_client: Callable[..., TestClient]) -> None:
    client = make_client(OLLAMA_ORIGINS="https://app.example.com,chrome-extension://*")
    for origin in ("https://app.example.com", "chrome-extension://abc", "http://localhost:1"):
        assert client.get("/api/tags", headers={"Origin": origin}).status_code == 200, origin
    assert client.get("/api/tags", headers={"Origin": "https://x.example.com"}).status_code == 403
    anything = make_client(OLLAMA_ORIGINS="*")
    response = anything.get("/api/tags", headers={"Origin": "https://x.example.com"})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"


def test_same_origin_is_not_cross_origin(make_client: Callable[..., TestClient]) -> None:
    client = make_client(POLLAMA_ALLOWED_HOSTS="ollama.example.com")
    headers = {"Host": "ollama.example.com", "Origin": "https://ollama.example.com"}
    response = client.get("/api/tags", headers=headers)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    # A rebinding page is same-origin with itself, so the Host check is what stops it.
    page = {"Host": "evil.example:11434", "Origin": "http://evil.example:11434"}
    assert client.get("/api/tags", headers=page).status_code == 403
