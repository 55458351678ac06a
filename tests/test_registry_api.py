"""``/api/pull``, ``/api/push`` and the ``/v2/`` read side, through the app in-process."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pollama.config import Settings, load_settings
from pollama.names import ModelName
from pollama.server.app import create_app
from pollama.store import Store
from pollama.store.manifests import MANIFEST_MEDIA_TYPE
from registry_helpers import DockerRegistry
from test_registry import make_model

BASE = "http://127.0.0.1:11434"


def app_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), base_url=BASE)


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_pull_and_push_over_the_api(registry: DockerRegistry, tmp_path: Path) -> None:
    settings = load_settings(registry_hosts=(registry.netloc,))  # the user's own registry
    store = Store(settings.models)
    store.ensure()
    name = ModelName.parse(f"{registry.netloc}/library/api-model:v1")
    manifest = make_model(store, name, tmp_path)
    model_id = store.manifests.read(name).digest
    with app_client(settings) as api:
        response = api.post("/api/push", json={"model": str(name), "insecure": True})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        items = lines(response.text)
        assert items[0] == {"status": "retrieving manifest"}
        assert items[-2:] == [{"status": "pushing manifest"}, {"status": "success"}]
        assert api.request("DELETE", "/api/delete", json={"model": str(name)}).status_code == 200
        assert api.get("/api/tags").json()["models"] == []

        response = api.post(
            "/api/pull", json={"model": str(name), "insecure": True, "stream": False}
        )
        assert response.status_code == 200
        assert response.json() == {"status": "success"}
        models = api.get("/api/tags").json()["models"]
        assert [(m["name"], m["digest"]) for m in models] == [(str(name), model_id)]
        assert set(store.blobs.digests()) == manifest.digests()
        downloaded = _pull_bytes(api)
        assert downloaded == manifest.config.size + sum(layer.size for layer in manifest.layers)

        # The name "name" field and a streamed pull of a model already here.
        response = api.post("/api/pull", json={"name": str(name), "insecure": True})
        items = lines(response.text)
        statuses = [i["status"] for i in items]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        layer_items = [i for i in items if "digest" in i]
        assert all(i["completed"] == i["total"] for i in layer_items)  # cache hits
        assert _pull_bytes(api) == downloaded  # nothing new came down


def _pull_bytes(api: Any) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith("pollama_pull_bytes_total "):
            return float(line.split()[1])
    raise AssertionError("no pollama_pull_bytes_total")


def test_api_errors(registry: DockerRegistry) -> None:
    with app_client(load_settings(registry_hosts=(registry.netloc,))) as api:
        assert api.post("/api/pull", content=b"").json() == {"error": "missing request body"}
        response = api.post("/api/pull", json={"model": ""})
        assert (response.status_code, response.json()) == (400, {"error": "model is required"})
        response = api.post("/api/pull", json={"model": "bad name!"})
        assert response.status_code == 400
        assert response.json()["error"].startswith("invalid model name")
        # A host the settings do not list: 400 before anything is sent, insecure or not.
        for insecure in (False, True):
            body = {"model": "reg.example:5000/library/x", "insecure": insecure}
            response = api.post("/api/pull", json=body)
            assert response.status_code == 400
            assert "is not allowed" in response.json()["error"]
        response = api.post("/api/pull", json={"model": "http://reg.example/library/x"})
        assert response.json() == {"error": "insecure protocol http"}
        # A missing tag: in-stream after "pulling manifest", or a 500 with stream false.
        body = {"model": f"{registry.netloc}/library/absent", "insecure": True}
        response = api.post("/api/pull", json=body)
        assert response.status_code == 200
        assert lines(response.text) == [
            {"status": "pulling manifest"},
            {"error": "pull model manifest: file does not exist"},
        ]
        response = api.post("/api/pull", json={**body, "stream": False})
        assert response.status_code == 500
        assert response.json() == {"error": "pull model manifest: file does not exist"}
        # Pushing a model that is not here.
        response = api.post("/api/push", json=body)
        assert lines(response.text) == [
            {"status": "retrieving manifest"},
            {"status": "couldn't retrieve manifest"},
            {"error": f"model '{registry.netloc}/library/absent:latest' not found"},
        ]


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[TestClient, Store, ModelName]]:
    settings = load_settings(serve_registry=True)
    store = Store(settings.models)
    store.ensure()
    name = ModelName.parse("tiny:latest")
    make_model(store, name, tmp_path)
    with app_client(settings) as api:
        yield api, store, name


def test_v2_serves_manifests_and_blobs(serving: tuple[TestClient, Store, ModelName]) -> None:
    api, store, name = serving
    root = api.get("/v2/")
    assert (root.status_code, root.json()) == (200, {})
    assert root.headers["docker-distribution-api-version"] == "registry/2.0"
    stored = store.manifests.read(name)
    raw = stored.path.read_bytes()
    for method in ("GET", "HEAD"):
        response = api.request(method, "/v2/library/tiny/manifests/latest")
        assert response.status_code == 200
        assert response.headers["content-type"] == MANIFEST_MEDIA_TYPE
        assert response.headers["docker-content-digest"] == f"sha256:{stored.digest}"
        assert response.headers["content-length"] == str(len(raw))
        assert response.content == (raw if method == "GET" else b"")
    by_digest = api.get(f"/v2/library/tiny/manifests/sha256:{stored.digest}")
    assert by_digest.content == raw
    assert api.get("/v2/library/tiny/manifests/other").status_code == 404

    layer = stored.manifest.layers[0]
    data = store.blobs.path(layer.digest).read_bytes()
    blob = api.get(f"/v2/library/tiny/blobs/{layer.digest}")
    assert blob.status_code == 200 and blob.content == data
    assert blob.headers["docker-content-digest"] == layer.digest
    assert hashlib.sha256(blob.content).hexdigest() == layer.digest[7:]
    ranged = api.get(f"/v2/library/tiny/blobs/{layer.digest}", headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == data[10:20]
    head = api.head(f"/v2/library/tiny/blobs/{layer.digest}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))


def test_v2_refuses_traversal_and_unlisted_blobs(
    serving: tuple[TestClient, Store, ModelName], tmp_path: Path
) -> None:
    api, store, _ = serving
    secret = store.blobs.put_bytes(b"a blob no manifest of this repository references")
    before = sorted(p.name for p in store.blobs.dir.iterdir())
    for digest in (
        "sha256:..%2F..%2F..%2Fetc%2Fpasswd",
        "..%2F..%2Fmanifests",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256-" + "a" * 64,
        "md5:" + "a" * 32,
    ):
        response = api.get(f"/v2/library/tiny/blobs/{digest}")
        assert response.status_code in (400, 404), digest
        if response.status_code == 400:
            assert response.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert api.get(f"/v2/library/tiny/blobs/{secret.digest}").status_code == 404
    assert api.get(f"/v2/library/other/blobs/{secret.digest}").status_code == 404
    assert sorted(p.name for p in store.blobs.dir.iterdir()) == before
    for method in ("PUT", "POST", "PATCH", "DELETE"):
        assert api.request(method, "/v2/library/tiny/manifests/latest").status_code in (404, 405)


def test_v2_is_off_by_default(api: TestClient) -> None:
    response = api.get("/v2/")
    assert response.status_code == 404
    assert "POLLAMA_SERVE_REGISTRY" in response.json()["errors"][0]["message"]


def test_settings_reach_the_service(tmp_path: Path) -> None:
    from pollama.registry import DEFAULT_REGISTRY_HOSTS, RegistryService

    settings = load_settings(
        {
            "POLLAMA_PULL_STALL_TIMEOUT": "2s",
            "POLLAMA_REGISTRY_HOSTS": "reg.lan:5000, *.corp",
            "HOME": str(tmp_path),
        }
    )
    svc = RegistryService.from_settings(settings, Store(tmp_path / "models"))
    assert svc.options.stall_timeout == 2.0
    assert svc.allowed_hosts == ("reg.lan:5000", "*.corp")
    assert svc.key.path == tmp_path / ".ollama" / "id_ed25519"
    default = RegistryService.from_settings(load_settings({"HOME": str(tmp_path)}), Store(tmp_path))
    assert default.options.stall_timeout == 30.0
    assert "hf.co" in default.allowed_hosts and "modelscope.cn" in default.allowed_hosts
    # The setting's default and the policy's list of public registries are one list.
    assert default.allowed_hosts == DEFAULT_REGISTRY_HOSTS
