"""Path traversal through every route that takes a model name, a digest or a path
(CVE-2024-37032 Probllama, CVE-2025-44779, CVE-2026-7020, CVE-2026-103663), and the
file-existence oracle of ``/api/create`` (CVE-2024-39719, CVE-2024-39722, CVE-2024-39721).

Each hostile value must get a 4xx, and nothing outside the models directory may be
created, changed or removed. A route added later that takes a name or a digest must be
added to :data:`CASES` (``test_every_route_is_classified`` fails until it is)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from conftest import tree_snapshot
from ggufgen import write_tiny_model
from pollama.server.access_log import app_routes
from pollama.server.routes_ui import PAGE_ROUTES
from tiny_projector import wav_bytes

BAD_NAMES = [
    "../../../../etc/passwd", "a/../../b", "/abs/path", "registry.ollama.ai/library/../../../x",
    "x:../../y", "..\\..\\windows", "%2e%2e/%2e%2e/x", "name\x00.gguf", "..", ".",
    "library/..", "m:tag/../../x", "registry.ollama.ai/../../etc:latest", "a" * 400,
    "host:99999999/ns/m", "::", "~/.ssh/id_rsa", "file:///etc/passwd",
]  # fmt: skip
BAD_DIGESTS = [
    "sha256:../../x", "sha256-../../../etc/passwd", "sha256:" + "A" * 64, "sha256:" + "a" * 63,
    "sha256:" + "a" * 65, "sha256:%2e%2e%2f" + "a" * 55, "../sha256:" + "a" * 64,
    "sha256:" + "a" * 64 + "/../../x", "sha512:" + "a" * 64, "sha256:" + "g" * 64,
    "sha256:" + "a" * 64 + "\x00", "/etc/passwd",
]  # fmt: skip


def _name_bodies(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    msg = [{"role": "user", "content": "hi"}]
    return {
        ("POST", "/api/show"): {"model": name},
        ("DELETE", "/api/delete"): {"model": name},
        ("POST", "/api/copy"): {"source": name, "destination": "ok"},
        ("POST", "/api/create"): {"model": name, "from": "ok", "stream": False},
        ("POST", "/api/generate"): {"model": name, "prompt": "hi", "stream": False},
        ("POST", "/api/chat"): {"model": name, "messages": msg, "stream": False},
        ("POST", "/api/embed"): {"model": name, "input": "hi"},
        ("POST", "/api/embeddings"): {"model": name, "prompt": "hi"},
        ("POST", "/api/tokenize"): {"model": name, "content": "hi"},
        ("POST", "/api/detokenize"): {"model": name, "tokens": [1]},
        ("POST", "/api/pull"): {"model": name, "stream": False},
        ("POST", "/api/push"): {"model": name, "stream": False},
        ("POST", "/v1/chat/completions"): {"model": name, "messages": msg},
        ("POST", "/v1/completions"): {"model": name, "prompt": "hi"},
        ("POST", "/v1/embeddings"): {"model": name, "input": "hi"},
        ("POST", "/api/rerank"): {"model": name, "query": "hi", "documents": ["a"]},
        ("POST", "/v1/rerank"): {"model": name, "query": "hi", "documents": ["a"]},
        ("POST", "/rerank"): {"model": name, "query": "hi", "documents": ["a"]},
        ("POST", "/v1/responses"): {"model": name, "input": "hi"},
        ("POST", "/v1/messages"): {"model": name, "max_tokens": 1, "messages": msg},
        ("POST", "/v1/messages/count_tokens"): {"model": name, "messages": msg},
    }


# Routes that take a name, a digest or a path, and those that take none.
CASES = set(_name_bodies("x")) | {
    ("GET", "/v1/models/{model:path}"), ("HEAD", "/api/blobs/{digest}"),
    ("POST", "/api/blobs/{digest}"), ("POST", "/api/purge"),
    ("POST", "/v1/audio/transcriptions"),  # a multipart form: test_names_cannot_traverse
    # stored response ids are looked up in SQLite, never joined to a path; still tried below
    ("GET", "/v1/responses/{ident}"), ("DELETE", "/v1/responses/{ident}"),
    ("GET", "/v1/responses/{ident}/input_items"),
    ("GET", "/v2/{namespace}/{model}/manifests/{reference}"),
    ("GET", "/v2/{namespace}/{model}/blobs/{digest}"),
}  # fmt: skip
NO_NAME = {"/", "/api/version", "/api/tags", "/api/ps", "/metrics", "/healthz", "/readyz",
           "/openapi.json", "/v1/models", "/api/status", "/v2/"} | PAGE_ROUTES  # fmt: skip


@pytest.fixture
def victim(isolated_env: Path) -> Path:
    """A real model file outside the models directory: the target of every attempt."""
    return write_tiny_model(isolated_env / "victim.gguf")


def _outside_models(home: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(home)): p.read_bytes()
        for p in home.rglob("*")
        if p.is_file() and ".ollama/models" not in str(p) and not p.name.endswith(".log")
    }


def _check(response: Any, where: str) -> None:
    assert 400 <= response.status_code < 500, (where, response.status_code, response.text)


def test_every_route_is_classified(api: TestClient) -> None:
    for route in app_routes(api.app):
        for method in getattr(route, "methods", None) or ():
            known = (method, route.path) in CASES or route.path in NO_NAME
            known = known or (method == "HEAD" and ("GET", route.path) in CASES)
            assert known, f"{method} {route.path}: add it to this traversal suite"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_cannot_traverse(api: TestClient, isolated_env: Path, victim: Path,
                               name: str) -> None:  # fmt: skip
    before = _outside_models(isolated_env)
    routes = {(r.path, m) for r in app_routes(api.app) for m in (getattr(r, "methods", ()) or ())}
    for (method, path), body in _name_bodies(name).items():
        if (path, method) not in routes:
            continue  # not written yet; test_every_route_is_classified watches for it
        _check(api.request(method, path, json=body), f"{method} {path}")
    _check(api.post("/api/copy", json={"source": "ok", "destination": name}), "copy dest")
    form = {"model": (None, name), "file": ("a.wav", wav_bytes(0.1, 440))}
    _check(api.post("/v1/audio/transcriptions", files=form), "transcriptions")
    quoted = quote(name, safe="")
    paths = [f"/v1/models/{quoted}", f"/v2/{quoted}/m/manifests/latest",
             f"/v2/library/{quoted}/manifests/x", f"/v2/library/m/manifests/{quoted}",
             f"/v1/responses/{quoted}", f"/v1/responses/{quoted}/input_items"]
    for path in paths if name not in (".", "..") else ():  # clients resolve dot segments
        _check(api.get(path), path)
    if name not in (".", ".."):
        _check(api.delete(f"/v1/responses/{quoted}"), "delete a response")
    assert _outside_models(isolated_env) == before
    assert victim.exists()


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_digests_cannot_traverse(api: TestClient, isolated_env: Path, victim: Path,
                                 digest: str) -> None:  # fmt: skip
    before = _outside_models(isolated_env)
    models_before = tree_snapshot(isolated_env / ".ollama" / "models")
    data = victim.read_bytes()
    in_path = quote(digest, safe=":/")
    for method in ("HEAD", "POST"):
        _check(api.request(method, f"/api/blobs/{in_path}", content=data), method)
    _check(api.get(f"/v2/library/m/blobs/{in_path}"), "/v2 blobs")
    for body in (
        {"model": "m", "files": {"model.gguf": digest}, "stream": False},
        {"model": "m", "files": {"../../victim.gguf": "sha256:" + "0" * 64}, "stream": False},
        {"model": "m", "files": {"/etc/passwd": "sha256:" + "0" * 64}, "stream": False},
        {"model": "m", "from": "ok", "adapters": {"a.gguf": digest}, "stream": False},
    ):
        _check(api.post("/api/create", json=body), f"create {body}")
    assert _outside_models(isolated_env) == before
    assert tree_snapshot(isolated_env / ".ollama" / "models") <= models_before | {"blobs"}
    assert victim.read_bytes() == data


def test_purge_only_removes_store_garbage(api: TestClient, isolated_env: Path,
                                          victim: Path) -> None:  # fmt: skip
    before = _outside_models(isolated_env)
    for paths in (["../../victim.gguf"], [str(victim)], ["../victim.gguf"], ["blobs/../../x"]):
        response = api.post("/api/purge", json={"dry_run": False, "paths": paths})
        assert response.status_code < 500
        assert response.json().get("freed", 0) == 0
    assert _outside_models(isolated_env) == before


def test_create_from_server_paths_is_refused_uniformly(
    api: TestClient, isolated_env: Path, victim: Path
) -> None:
    """No remote caller may name a server file, and the answer must not reveal whether one
    exists (CVE-2024-39719/39722), nor read a device or FIFO (CVE-2024-39721)."""
    import os

    fifo = isolated_env / "fifo"
    os.mkfifo(fifo)
    answers = {}
    for source in (str(victim), str(isolated_env / "missing.gguf"), "/dev/zero", str(fifo),
                   "/etc/passwd", "/etc/no-such-file"):  # fmt: skip
        response = api.post("/api/create", json={"model": "m", "from": source, "stream": False})
        assert response.status_code == 400, response.text
        answers[source] = response.json()["error"].replace(source, "<path>")
    assert len(set(answers.values())) == 1, answers
    assert api.get("/api/tags").json() == {"models": []}


def test_blob_digest_must_match_the_content(api: TestClient, victim: Path) -> None:
    data = victim.read_bytes()
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    response = api.post(f"/api/blobs/{wrong}", content=data)
    assert response.status_code == 400 and "digest mismatch" in response.json()["error"]
    assert api.head(f"/api/blobs/{wrong}").status_code == 404


def test_name_traversal_helper_covers_routes(make_client: Callable[..., TestClient]) -> None:
    """The body table names each route once, so a renamed field shows up as a 200 above."""
    assert len(_name_bodies("x")) == len({path for _, path in _name_bodies("x")})
