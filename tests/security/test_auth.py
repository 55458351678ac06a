"""API keys on every route (CVE-2025-63389: unauthenticated management endpoints), scopes,
the refusal to serve a network without keys, and the official clients with a key."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from fastapi.testclient import TestClient

from conftest import stop_server
from pollama.keys import KeyStore, Permission
from pollama.server.access_log import app_routes
from pollama.server.security import PUBLIC_ROUTES, permission_for

from .conftest import concrete, launch

MANAGE_ROUTES = {
    ("POST", "/api/create"), ("DELETE", "/api/delete"), ("POST", "/api/copy"),
    ("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/blobs/{digest}"),
    ("POST", "/api/purge"),
}  # fmt: skip


def _requests(client: TestClient) -> list[tuple[str, str, str]]:
    """(method, template, concrete path) for every method of every route of the app."""
    out = []
    for route in app_routes(client.app):
        for method in sorted(getattr(route, "methods", None) or ()):
            out.append((method, route.path, concrete(route.path)))
    return out


def test_every_route_refuses_a_request_without_a_key(
    make_client: Callable[..., TestClient], keys: KeyStore
) -> None:
    client = make_client()
    keys.create("only")
    requests = _requests(client)
    assert len(requests) >= 20
    templates = {template for _, template, _ in requests}
    assert {"/api/tags", "/api/chat", "/api/generate", "/metrics", "/api/blobs/{digest}",
            "/v1/chat/completions"} <= templates  # fmt: skip
    for method, template, path in requests:
        response = client.request(method, path, json={})
        if template in PUBLIC_ROUTES:
            assert response.status_code == 200, (method, path)
            continue
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        body = response.json() if method != "HEAD" else None
        if body is None:
            continue
        if path.startswith("/v1/messages"):
            assert body["error"]["type"] == "authentication_error"
        elif path.startswith("/v1/") or path == "/rerank":  # OpenAI's shape, as llama-server
            assert body["error"]["code"] == "invalid_api_key"
            assert "Authorization: Bearer" in body["error"]["message"]
        else:
            assert "Authorization: Bearer <key>" in body["error"]
            assert "OLLAMA_API_KEY" in body["error"] and "pollama keys create" in body["error"]


def test_routes_added_later_and_unknown_paths_need_a_key(
    make_client: Callable[..., TestClient], keys: KeyStore
) -> None:
    client = make_client()
    secret, _ = keys.create("k")

    @client.app.post("/api/brand-new")  # type: ignore[misc]
    async def brand_new() -> dict[str, str]:
        return {"ok": "yes"}

    assert client.post("/api/brand-new").status_code == 401
    auth = {"Authorization": f"Bearer {secret}"}
    assert client.post("/api/brand-new", headers=auth).json() == {"ok": "yes"}
    # No route: still 401 first, so the route table cannot be probed without a key.
    assert client.get("/no/such/route").status_code == 401
    assert client.get("/no/such/route", headers=auth).status_code == 404
    assert client.get("/api/tags/", headers={}).status_code == 401


def test_scopes(make_client: Callable[..., TestClient], keys: KeyStore) -> None:
    client = make_client()
    inference, _ = keys.create("inf", "inference")
    manage, _ = keys.create("man", "manage")
    everything, _ = keys.create("all", "all")
    for method, template, path in _requests(client):
        needed = permission_for(method, template)
        if needed is None or template == "/openapi.json":  # its warnings are not ours
            continue
        for secret, allowed in ((inference, {Permission.READ, Permission.INFERENCE}),
                                (manage, {Permission.READ, Permission.MANAGE}),
                                (everything, set(Permission))):  # fmt: skip
            response = client.request(method, path, json={},
                                      headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
            if needed in allowed:
                assert response.status_code not in (401, 403), (method, path, response.text)
            else:
                assert response.status_code == 403, (method, path)
                if method != "HEAD" and not path.startswith("/v1/") and path != "/rerank":
                    assert "scope" in response.json()["error"]
    # The management routes of the issue are exactly what an inference key cannot reach.
    for method, template in MANAGE_ROUTES:
        assert permission_for(method, template) is Permission.MANAGE
    assert permission_for("POST", "/api/show") is Permission.READ
    assert permission_for("POST", "/v1/messages") is Permission.INFERENCE
    for tokenizer in ("/api/tokenize", "/api/detokenize"):  # they load the model
        assert permission_for("POST", tokenizer) is Permission.INFERENCE
    assert permission_for("PUT", "/api/some-future-write") is Permission.MANAGE


def test_key_header_forms(make_client: Callable[..., TestClient], keys: KeyStore) -> None:
    client = make_client()
    secret, _ = keys.create("k")
    for headers in ({"Authorization": f"Bearer {secret}"}, {"authorization": f"bearer {secret}"},
                    {"Authorization": f"Bearer   {secret}  "}, {"x-api-key": secret}):  # fmt: skip
        assert client.get("/api/tags", headers=headers).status_code == 200, headers
    for headers in ({"Authorization": secret}, {"Authorization": f"Basic {secret}"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {secret}x"},
                    {"x-api-key": secret[:-1]}):  # fmt: skip
        response = client.get("/api/tags", headers=headers)
        assert response.status_code == 401, headers
    wrong = client.get("/api/tags", headers={"Authorization": "Bearer nope"}).json()["error"]
    assert wrong.startswith("invalid API key")
    missing = client.get("/api/tags").json()["error"]
    assert missing.startswith("unauthorized")


def test_no_keys_on_loopback_is_open_as_ollama(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert client.get("/api/tags").status_code == 200
    assert client.post("/api/copy", json={"source": "a", "destination": "b"}).status_code == 404


def test_create_and_revoke_take_effect_at_once(
    make_client: Callable[..., TestClient], keys: KeyStore
) -> None:
    client = make_client()
    assert client.get("/api/tags").status_code == 200
    first, _ = keys.create("first")
    assert client.get("/api/tags").status_code == 401
    assert client.get("/api/tags", headers={"Authorization": f"Bearer {first}"}).status_code == 200
    second, _ = keys.create("second")
    keys.revoke("first")
    assert client.get("/api/tags", headers={"Authorization": f"Bearer {first}"}).status_code == 401
    assert client.get("/api/tags", headers={"x-api-key": second}).status_code == 200


def test_unusable_keys_file_locks_everyone_out(
    make_client: Callable[..., TestClient], keys: KeyStore
) -> None:
    client = make_client()
    secret, _ = keys.create("k")
    keys.path.write_text("{broken")
    assert client.get("/api/tags", headers={"x-api-key": secret}).status_code == 401
    assert client.get("/healthz").status_code == 200


def test_a_keys_file_link_to_nothing_locks_everyone_out(
    make_client: Callable[..., TestClient], keys: KeyStore, tmp_path: Path
) -> None:
    """Before, a dangling symlink at the keys path counted as "no keys": an open server."""
    client = make_client()
    keys.path.parent.mkdir(parents=True, exist_ok=True)
    keys.path.symlink_to(tmp_path / "gone.json")
    response = client.get("/api/tags")
    assert response.status_code == 401
    assert "cannot read its API keys file" in response.json()["error"]
    v1 = client.get("/v1/models")
    assert v1.status_code == 401 and "API keys file" in v1.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


# -- real servers --------------------------------------------------------------------------


def _serve(home: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``pollama serve``; return its exit code and output if it exits within 20s."""
    server = launch(home, env.pop("BIND"), env, wait=False)
    try:
        code = server.process.wait(timeout=20)
    except Exception:  # still running: it started
        stop_server(server)
        raise
    return code, server.log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_serve_refuses_a_network_bind_without_keys(isolated_env: Path, bind: str) -> None:
    code, output = _serve(isolated_env, {"BIND": bind})
    assert code == 1
    assert "refusing to listen on" in output and "without API keys" in output
    assert "pollama keys create" in output and "POLLAMA_ALLOW_NO_AUTH=1" in output


@pytest.mark.slow
def test_serve_refuses_an_untrusted_keys_file(isolated_env: Path) -> None:
    store = KeyStore(isolated_env / ".ollama" / "api_keys.json")
    store.create("k")
    store.path.chmod(0o646)
    code, output = _serve(isolated_env, {"BIND": "127.0.0.1"})
    assert code == 1 and "chmod 600" in output


@pytest.mark.slow
def test_serve_refuses_a_keys_file_link_to_nothing(isolated_env: Path) -> None:
    path = isolated_env / ".ollama" / "api_keys.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(isolated_env / "unmounted" / "api_keys.json")
    code, output = _serve(isolated_env, {"BIND": "127.0.0.1"})
    assert code == 1
    assert f"{path} is a symbolic link to something that does not exist" in output
    assert "POLLAMA_KEYS_FILE" in output


@pytest.mark.slow
def test_network_bind_with_opt_out_serves_without_keys(isolated_env: Path) -> None:
    server = launch(isolated_env, "0.0.0.0", {"POLLAMA_ALLOW_NO_AUTH": "1"})
    try:
        assert httpx.get(server.url + "/api/tags").status_code == 200
    finally:
        stop_server(server)


@pytest.mark.slow
def test_network_bind_with_keys_and_the_official_clients(isolated_env: Path) -> None:
    """Bound to 0.0.0.0 with a key: the ollama, openai and anthropic clients work with it,
    fail without it; the CLI sends OLLAMA_API_KEY; revoking the last key closes the server
    rather than opening it; the Host check still applies (Ollama skips it there)."""
    store = KeyStore(isolated_env / ".ollama" / "api_keys.json")
    secret, _ = store.create("clients", "all")
    server = launch(isolated_env, "0.0.0.0")
    closing: list[ollama.Client | openai.OpenAI | anthropic.Anthropic] = []
    try:
        url = server.url
        good = ollama.Client(host=url, headers={"Authorization": f"Bearer {secret}"})
        closing.append(good)
        assert good.list().models == []
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            bad = ollama.Client(host=url, headers=headers)
            closing.append(bad)
            with pytest.raises(ollama.ResponseError) as exc:
                bad.list()
            assert exc.value.status_code == 401 and "API key" in exc.value.error

        oai = openai.OpenAI(base_url=url + "/v1", api_key=secret)
        oai_bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        closing += [oai, oai_bad]
        assert oai.models.list().data == []
        with pytest.raises(openai.AuthenticationError):
            oai_bad.models.list()

        message: anthropic.types.MessageParam = {"role": "user", "content": "hi"}
        claude = anthropic.Anthropic(base_url=url, api_key=secret, max_retries=0)
        claude_bad = anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0)
        closing += [claude, claude_bad]
        with pytest.raises((anthropic.NotFoundError, anthropic.BadRequestError)):
            claude.messages.create(model="nope", max_tokens=1, messages=[message])
        with pytest.raises(anthropic.AuthenticationError):
            claude_bad.messages.create(model="nope", max_tokens=1, messages=[message])

        listed = server.cli("list", timeout=60)
        assert listed.returncode == 1 and "401" in listed.stderr
        server.env["OLLAMA_API_KEY"] = secret
        listed = server.cli("list", timeout=60)
        assert listed.returncode == 0 and "NAME" in listed.stdout

        rebinding = httpx.get(url + "/api/tags", headers={"Host": "evil.example",
                                                           "Authorization": f"Bearer {secret}"})
        assert rebinding.status_code == 403 and "POLLAMA_ALLOWED_HOSTS" in rebinding.text

        store.revoke("clients")
        time.sleep(0.01)
        assert httpx.get(url + "/api/tags").status_code == 401
        with pytest.raises(ollama.ResponseError):
            good.list()
        assert httpx.get(url + "/healthz").status_code == 200
    finally:
        for client in closing:
            client.close()
        stop_server(server)
