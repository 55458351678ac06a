"""The registry rows of the security spec: host policy (SSRF), hostile manifests, digest
traversal, gzip bombs, the token realm leak, and the credentials pollama sends.

Each hostile registry is a :class:`FaultProxy` that answers by itself (no upstream needed).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import ipaddress
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from conftest import tree_snapshot
from pollama.errors import InvalidModelName, InvalidRequest
from pollama.names import ModelName
from pollama.registry import (
    DEFAULT_REGISTRY_HOSTS,
    HostNotAllowed,
    HostPolicy,
    IdentityKey,
    RegistryError,
    Unauthorized,
)
from pollama.registry.auth import DockerCredentials, parse_challenge, signing_payload
from pollama.registry.client import RegistrySession
from pollama.store import Store
from pollama.store.manifests import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MEDIA_MODEL
from registry_helpers import Fault, FaultProxy, Reply, Request
from test_registry import FAST, run, service

GOOD = "sha256:" + "ab" * 32


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "models")
    s.ensure()
    return s


@pytest.fixture
def hostile() -> Iterator[FaultProxy]:
    """A registry that answers only what a test tells it to."""
    proxy = FaultProxy(upstream=None)
    yield proxy
    proxy.stop()


def manifest_doc(layers: Any, config: Any = None) -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "layers": layers}
    doc["config"] = config or {"mediaType": CONFIG_MEDIA_TYPE, "digest": GOOD, "size": 2}
    return json.dumps(doc).encode()


def serve_manifest(proxy: FaultProxy, body: bytes, headers: dict[str, str] | None = None) -> None:
    proxy.add(
        Fault(
            path="/manifests/",
            action="reply",
            times=None,
            reply=Reply(200, {"content-type": MANIFEST_MEDIA_TYPE, **(headers or {})}, body),
        )
    )


# -- host policy -----------------------------------------------------------------------------


def test_name_hosts_must_be_listed_even_when_insecure() -> None:
    policy = HostPolicy()
    for host in ("registry.ollama.ai", "hf.co", "huggingface.co", "modelscope.cn", "ollama.com"):
        policy.check_name_host(host)
    for host in ("evil.example", "169.254.169.254", "127.0.0.1:11434", "10.0.0.1", "localhost"):
        for insecure in (False, True):  # insecure is http to a listed host, nothing more
            with pytest.raises(HostNotAllowed) as info:
                HostPolicy(insecure=insecure).check_name_host(host)
            assert str(info.value) == (
                f'registry host "{host}" is not allowed: add it to POLLAMA_REGISTRY_HOSTS on '
                "the server (--insecure only lets a listed host be reached over http)"
            )
    listed = HostPolicy(["reg.lan:5000", "*.corp.example"])
    listed.check_name_host("reg.lan:5000")
    listed.check_name_host("a.corp.example")
    for host in ("reg.lan:5001", "corp.example", "evilcorp.example"):
        with pytest.raises(HostNotAllowed):
            listed.check_name_host(host)
    HostPolicy(["*"]).check_name_host("anything.example:1234")


@pytest.mark.parametrize(
    ("address", "default", "trusted"),
    [
        ("93.184.216.34", True, True),  # public
        ("2606:4700::1111", True, True),
        ("127.0.0.1", False, True),  # loopback
        ("::1", False, True),
        ("10.1.2.3", False, True),  # RFC 1918
        ("192.168.1.20", False, True),
        ("fd00::1", False, True),  # IPv6 ULA
        ("0.0.0.0", False, True),
        ("::ffff:127.0.0.1", False, True),  # v4-mapped loopback
        ("169.254.169.254", False, True),  # cloud metadata: link-local
        ("fe80::1", False, True),
        ("224.0.0.1", False, True),  # multicast
    ],
)
def test_address_rules(address: str, default: bool, trusted: bool) -> None:
    ip = ipaddress.ip_address(address)
    assert HostPolicy().address_allowed("hf.co", None, ip) is default
    # insecure changes the scheme only, never which addresses may be reached.
    assert HostPolicy(insecure=True).address_allowed("x.example", None, ip) is default
    # Listing a host of one's own trusts its addresses; built-in public hosts and wildcards
    # do not (a public registry resolving to 10.x is an attack, not a configuration).
    assert HostPolicy(["reg.lan"]).address_allowed("reg.lan", 5000, ip) is trusted
    assert HostPolicy(["*"]).address_allowed("reg.lan", 5000, ip) is default


def pull_error(store: Store, home: Path, name: str, *, insecure: bool, **kw: Any) -> Exception:
    svc = service(store, home)
    if kw:
        svc.allowed_hosts = kw["hosts"]
    with pytest.raises(Exception) as info:
        run(svc.pull(ModelName.parse(name), insecure=insecure))
    return info.value


def test_pulls_cannot_reach_private_addresses(
    hostile: FaultProxy, store: Store, tmp_path: Path
) -> None:
    port = hostile.netloc.split(":")[1]
    # Not listed: refused before any connection, with or without --insecure.
    for insecure in (False, True):
        exc = pull_error(store, tmp_path, f"127.0.0.1:{port}/library/x", insecure=insecure,
                         hosts=list(DEFAULT_REGISTRY_HOSTS))  # fmt: skip
        assert isinstance(exc, HostNotAllowed)
        assert "POLLAMA_REGISTRY_HOSTS" in str(exc)
    # Any host allowed by a wildcard, but a name resolving to loopback (through DNS or as a
    # literal) is refused before connecting, since only an explicit entry allows it.
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"0.0.0.0:{port}"):
        for insecure in (False, True):
            exc = pull_error(store, tmp_path, f"{host}/library/x", insecure=insecure,
                             hosts=["*"])  # fmt: skip
            assert isinstance(exc, HostNotAllowed), exc
            assert str(exc).startswith(f'registry host "{host}" is not allowed: ')
    assert hostile.requests == []
    with pytest.raises(HostNotAllowed, match="is not allowed"):
        session = RegistrySession(
            ModelName.parse(f"localhost:{port}/library/x"),
            policy=HostPolicy(["*"]),
            key=IdentityKey(tmp_path),
        )
        asyncio.run(_get(session, session.url("manifests", "latest")))
    # Listing the host explicitly is the user saying it is theirs.
    hostile.add(Fault(path="/", action="reply", method=None, times=None, reply=Reply(404)))
    exc = pull_error(
        store, tmp_path, f"localhost:{port}/library/x", insecure=True, hosts=[f"localhost:{port}"]
    )
    assert str(exc) == "pull model manifest: file does not exist"
    assert len(hostile.requests) == 1


async def _get(session: RegistrySession, url: httpx.URL) -> None:
    try:
        async with session.stream("GET", url):
            pass
    finally:
        await session.release()


def test_redirects_to_metadata_addresses_are_refused(
    hostile: FaultProxy, store: Store, tmp_path: Path
) -> None:
    serve_manifest(hostile, manifest_doc([{"mediaType": MEDIA_MODEL, "digest": GOOD, "size": 5}]))
    hostile.add(
        Fault(
            path="/blobs/",
            action="reply",
            method="HEAD",
            times=None,
            reply=Reply(200, {"content-length": "5"}),
        )
    )
    hostile.add(
        Fault(
            path="/blobs/",
            action="reply",
            times=None,
            reply=Reply(307, {"location": "http://169.254.169.254/latest/meta-data/iam"}),
        )
    )
    exc = pull_error(store, tmp_path, f"{hostile.netloc}/library/x", insecure=True)
    assert isinstance(exc, HostNotAllowed)
    assert "169.254.169.254" in str(exc)
    assert list(store.blobs.digests()) == []  # the partial download stays, for a retry


def test_https_never_redirects_to_http_unless_insecure(tmp_path: Path) -> None:
    session = RegistrySession(
        ModelName.parse("hf.co/u/r:Q4_K_M"), policy=HostPolicy(), key=IdentityKey(tmp_path)
    )
    url = session.url("blobs", GOOD)
    assert str(url) == f"https://hf.co/v2/u/r/blobs/{GOOD}"
    assert session.redirect_target(url, "https://cdn.example/x").host == "cdn.example"
    with pytest.raises(HostNotAllowed, match="https to http"):
        session.redirect_target(url, "http://cdn.example/x")
    with pytest.raises(HostNotAllowed, match="scheme"):
        session.redirect_target(url, "file:///etc/passwd")
    asyncio.run(session.release())


def test_names_and_schemes() -> None:
    assert (
        ModelName.parse("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M").registry_base_url()
        == "https://hf.co"
    )
    name = ModelName.parse("modelscope.cn/Qwen/Qwen2.5-3B-Instruct-GGUF")
    assert (name.host, name.namespace, name.model, name.tag) == (
        "modelscope.cn",
        "Qwen",
        "Qwen2.5-3B-Instruct-GGUF",
        "latest",
    )
    with pytest.raises(InvalidRequest, match="^insecure protocol http$"):
        ModelName.parse("http://reg.lan/library/x").registry_base_url(False)
    assert (
        ModelName.parse("192.168.1.20:11434/library/smollm2:135m").registry_base_url(True)
        == "http://192.168.1.20:11434"
    )
    with pytest.raises(InvalidModelName):
        ModelName.parse("reg.lan/library/x@sha256:" + "a" * 64)


# -- hostile manifests -------------------------------------------------------------------------

HOSTILE_LAYERS = [
    [{"mediaType": MEDIA_MODEL, "digest": "sha256:../../../../etc/ld.so.preload", "size": 5}],
    [{"mediaType": MEDIA_MODEL, "digest": "sha256:" + "AB" * 32, "size": 5}],
    [{"mediaType": MEDIA_MODEL, "digest": "sha256:" + "ab" * 31, "size": 5}],
    [{"mediaType": MEDIA_MODEL, "digest": "sha256:" + "ab" * 33, "size": 5}],
    [{"mediaType": MEDIA_MODEL, "digest": "sha512:" + "ab" * 32, "size": 5}],
    [{"mediaType": MEDIA_MODEL, "digest": GOOD + "/../../x", "size": 5}],
    [{"mediaType": MEDIA_MODEL, "digest": GOOD, "size": -1}],
    [{"mediaType": MEDIA_MODEL, "digest": GOOD, "size": "5"}],
    [{"mediaType": MEDIA_MODEL, "digest": GOOD}],
    ["not an object"],
    [],
    [{"mediaType": MEDIA_MODEL, "digest": GOOD, "size": 1}] * 5000,
]


@pytest.mark.parametrize("layers", HOSTILE_LAYERS, ids=range(len(HOSTILE_LAYERS)))
def test_hostile_manifests_are_refused_cleanly(
    hostile: FaultProxy, store: Store, tmp_path: Path, layers: Any
) -> None:
    serve_manifest(hostile, manifest_doc(layers))
    before = tree_snapshot(tmp_path)
    exc = pull_error(store, tmp_path, f"{hostile.netloc}/library/x", insecure=True)
    assert isinstance(exc, RegistryError)
    assert str(exc).startswith("pull model manifest: ")
    assert tree_snapshot(tmp_path) == before
    assert hostile.paths() == ["/v2/library/x/manifests/latest"]  # no blob was requested


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"schemaVersion": 2, "layers": []}).encode(),  # no config
        json.dumps({"schemaVersion": 2, "config": GOOD, "layers": [{}]}).encode(),
        b"{" + b" " * (5 << 20) + b"}",  # over the size cap
    ],
)
def test_malformed_manifests(
    hostile: FaultProxy, store: Store, tmp_path: Path, body: bytes
) -> None:
    serve_manifest(hostile, body)
    exc = pull_error(store, tmp_path, f"{hostile.netloc}/library/x", insecure=True)
    assert isinstance(exc, RegistryError)
    assert str(exc).startswith("pull model manifest: ")


def test_a_gzip_bomb_is_read_with_a_cap(hostile: FaultProxy, store: Store, tmp_path: Path) -> None:
    bomb = gzip.compress(b"{" + b" " * (64 << 20) + b"}", compresslevel=6)
    assert len(bomb) < 1 << 20
    serve_manifest(hostile, bomb, {"content-encoding": "gzip"})
    exc = pull_error(store, tmp_path, f"{hostile.netloc}/library/x", insecure=True)
    assert isinstance(exc, RegistryError)
    assert "larger than" in str(exc)


# -- credentials --------------------------------------------------------------------------------


def verify_signature(request: Request) -> bool:
    """What a registry's token endpoint checks (Ollama's scheme)."""
    blob, _, signature = request.headers.get("authorization", "").partition(":")
    url = httpx.URL(f"http://{request.headers['host']}{request.target}")
    public = serialization.load_ssh_public_key(b"ssh-ed25519 " + blob.encode())
    assert isinstance(public, Ed25519PublicKey)
    try:
        public.verify(base64.b64decode(signature), signing_payload(url))
    except Exception:  # noqa: BLE001
        return False
    return True


def bearer_registry(realm: str, *, grant: bool = True) -> Any:
    tokens: list[str] = []

    async def hook(request: Request) -> Reply | None:
        if request.path == "/token":
            tokens.append(request.target)
            if not verify_signature(request):
                return Reply(403, {}, b"bad signature")
            return Reply(200, {"content-type": "application/json"}, b'{"token":"t0k3n"}')
        if request.headers.get("authorization") != "Bearer t0k3n" or not grant:
            challenge = f'Bearer realm="{realm}",service="test",scope="repository:library/x:pull"'
            return Reply(401, {"www-authenticate": challenge}, b'{"errors":[]}')
        return Reply(404, {}, b"")

    hook.tokens = tokens  # type: ignore[attr-defined]
    return hook


def test_token_exchange_signs_with_the_identity_key(store: Store, tmp_path: Path) -> None:
    proxy = FaultProxy()
    try:
        proxy_realm = f"http://{proxy.netloc}/token"
        proxy.hook = bearer_registry(proxy_realm)
        exc = pull_error(store, tmp_path, f"{proxy.netloc}/library/x", insecure=True)
        # Authenticated, then the registry has no such tag: the token was accepted.
        assert str(exc) == "pull model manifest: file does not exist"
        assert len(proxy.hook.tokens) == 1  # type: ignore[attr-defined]
        token_request = next(r for r in proxy.requests if r.path == "/token")
        assert "scope=repository%3Alibrary%2Fx%3Apull" in token_request.target
        assert "nonce=" in token_request.target and "ts=" in token_request.target
        key_file = tmp_path / ".ollama" / "id_ed25519"
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert key_file.with_name("id_ed25519.pub").read_text().startswith("ssh-ed25519 AAAA")
        # A registry that keeps refusing: one exchange, one retry, then unauthorized.
        proxy.hook = bearer_registry(proxy_realm, grant=False)
        exc = pull_error(store, tmp_path, f"{proxy.netloc}/library/x", insecure=True)
        assert str(exc) == "pull model manifest: unauthorized: access denied"
        assert len(proxy.hook.tokens) == 1  # type: ignore[attr-defined]
    finally:
        proxy.stop()


def test_a_realm_on_another_host_gets_nothing(store: Store, tmp_path: Path) -> None:
    attacker = FaultProxy(upstream=None)
    registry = FaultProxy(hook=bearer_registry(f"http://{attacker.netloc}/token"))
    try:
        exc = pull_error(store, tmp_path, f"{registry.netloc}/library/x", insecure=True)
        assert isinstance(exc, Unauthorized)
        assert "does not match original host" in str(exc)
        assert attacker.requests == []
        assert all("authorization" not in r.headers for r in registry.requests)
    finally:
        registry.stop()
        attacker.stop()


def docker_login(home: Path, netloc: str, entry: dict[str, str]) -> None:
    folder = home / ".docker"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"auths": {f"https://{netloc}/v1/": entry}}))


def test_docker_logins_answer_basic_challenges_and_stay_on_their_host(
    store: Store, tmp_path: Path
) -> None:
    good = "Basic " + base64.b64encode(b"user:pa55").decode()

    async def hook(request: Request) -> Reply | None:
        if request.headers.get("authorization") != good:
            return Reply(401, {"www-authenticate": 'Basic realm="private"'}, b"")
        return Reply(404, {}, b"")

    proxy = FaultProxy(hook=hook)
    try:
        exc = pull_error(store, tmp_path, f"{proxy.netloc}/library/x", insecure=True)
        assert isinstance(exc, Unauthorized)
        docker_login(
            tmp_path, "elsewhere.example", {"auth": base64.b64encode(b"user:pa55").decode()}
        )
        exc = pull_error(store, tmp_path, f"{proxy.netloc}/library/x", insecure=True)
        assert isinstance(exc, Unauthorized)
        docker_login(tmp_path, proxy.netloc, {"username": "user", "password": "pa55"})
        exc = pull_error(store, tmp_path, f"{proxy.netloc}/library/x", insecure=True)
        assert str(exc) == "pull model manifest: file does not exist"
    finally:
        proxy.stop()


def test_a_registry_token_is_sent_from_the_first_request(store: Store, tmp_path: Path) -> None:
    async def hook(request: Request) -> Reply | None:
        if request.headers.get("authorization") != "Bearer pollama-key":
            return Reply(401, {}, b'{"error":"unauthorized"}')
        return Reply(404, {}, b"")

    proxy = FaultProxy(hook=hook)
    try:
        docker_login(tmp_path, proxy.netloc, {"registrytoken": "pollama-key"})
        exc = pull_error(store, tmp_path, f"{proxy.netloc}/library/x", insecure=True)
        assert str(exc) == "pull model manifest: file does not exist"
        assert len(proxy.requests) == 1
    finally:
        proxy.stop()


def test_credentials_are_never_sent_to_a_cdn(store: Store, tmp_path: Path) -> None:
    """The blob's bytes come from the cross-host redirect target without any credentials."""
    data = b"hello blob"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cdn = FaultProxy(upstream=None)
    cdn.add(Fault(path="/", action="reply", times=None, reply=Reply(206, {}, data)))

    async def hook(request: Request) -> Reply | None:
        if request.headers.get("authorization") != "Bearer pollama-key":
            return Reply(401, {}, b"")
        if request.path.endswith("/manifests/latest"):
            body = manifest_doc(
                [{"mediaType": MEDIA_MODEL, "digest": digest, "size": len(data)}],
                {"mediaType": CONFIG_MEDIA_TYPE, "digest": digest, "size": len(data)},
            )
            return Reply(200, {"content-type": MANIFEST_MEDIA_TYPE}, body)
        if request.method == "HEAD":
            return Reply(200, {"content-length": str(len(data))})
        # cdn.netloc is "127.0.0.1:<port>": name it "localhost" so it is another host.
        return Reply(307, {"location": f"http://localhost:{cdn.netloc.split(':')[1]}/b?sig=1"})

    proxy = FaultProxy(hook=hook)
    try:
        docker_login(tmp_path, proxy.netloc, {"registrytoken": "pollama-key"})
        items = run(
            service(store, tmp_path, FAST).pull(
                ModelName.parse(f"{proxy.netloc}/library/cdn"), insecure=True
            )
        )
        assert items[-1] == {"status": "success"}
        assert store.blobs.read_bytes(digest) == data
        assert cdn.requests and all("authorization" not in r.headers for r in cdn.requests)
        assert all(r.headers.get("range", "").startswith("bytes=") for r in cdn.requests)
    finally:
        proxy.stop()
        cdn.stop()


def test_pubkey_command_creates_and_prints_the_key(isolated_env: Path) -> None:
    from click.testing import CliRunner

    from pollama.cli.main import cli

    first = CliRunner().invoke(cli, ["pubkey"])
    assert first.exit_code == 0, first.output
    key_file = isolated_env / ".ollama" / "id_ed25519"
    assert f"Couldn't find '{key_file}'. Generated a new private key." in first.output
    line = first.output.strip().splitlines()[-1]
    assert line.startswith("ssh-ed25519 AAAA")
    again = CliRunner().invoke(cli, ["pubkey"])
    assert again.output.strip() == line
    assert IdentityKey(isolated_env / ".ollama").public_key() == line


def test_identity_key_and_challenge_parsing(tmp_path: Path) -> None:
    key = IdentityKey(tmp_path / ".ollama")
    assert key.ensure() is True
    assert key.ensure() is False
    assert key.path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    line = key.public_key()
    assert line == key.public_path.read_text().strip()
    blob, _, signature = key.sign(b"payload").partition(":")
    assert line.split(" ")[1] == blob
    public = serialization.load_ssh_public_key(line.encode())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(base64.b64decode(signature), b"payload")
    c = parse_challenge(
        'Bearer realm="https://r.example/token",service="svc",scope="a:b:pull b:c:push"'
    )
    assert (c.scheme, c.realm, c.service, c.scope) == (
        "bearer",
        "https://r.example/token",
        "svc",
        "a:b:pull b:c:push",
    )
    assert parse_challenge('Basic realm="x"').scheme == "basic"
    assert parse_challenge(None).scheme == ""
    assert DockerCredentials.load(tmp_path, {}).basic_header("x") is None


def test_redirects_are_capped(hostile: FaultProxy, store: Store, tmp_path: Path) -> None:
    hostile.add(
        Fault(
            path="/manifests/",
            action="reply",
            times=None,
            reply=Reply(302, {"location": "/v2/library/x/manifests/latest"}),
        )
    )
    exc = pull_error(store, tmp_path, f"{hostile.netloc}/library/x", insecure=True)
    assert str(exc) == "pull model manifest: maximum redirects exceeded (10)"
    assert len(hostile.requests) == 11
