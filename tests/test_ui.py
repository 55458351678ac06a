"""The chat page's files (``GET /ui``, server/routes_ui.py), in process: what is served, with
which headers, what is not, and who may load it. The page itself runs in a real browser in
tests/test_e2e_ui_browser.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient

from pollama.config import load_settings
from pollama.keys import KeyStore
from pollama.server.access_log import app_routes
from pollama.server.app import create_app
from pollama.server.routes_ui import ASSETS, PAGE_ROUTES

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "src" / "pollama" / "server" / "ui"
BASE = "http://127.0.0.1:11434"
CSP_DIRECTIVES = {
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'",
}  # fmt: skip


class _Page(HTMLParser):
    """What index.html refers to, and any inline code in it (the CSP would block it)."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.references += [v for k, v in attrs if k in ("src", "href") and v]
        self.inline += [f"{tag} {k}" for k, _ in attrs if k == "style" or k.startswith("on")]
        if tag == "style":
            self.inline.append("<style>")
        self._in_script = tag == "script"
        if self._in_script and not values.get("src"):
            self.inline.append("<script> without src")

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("script text")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


def _page() -> _Page:
    parser = _Page()
    parser.feed((UI / "index.html").read_text())
    return parser


def _check_headers(response: object) -> None:
    headers = response.headers  # type: ignore[attr-defined]
    directives = {d.strip() for d in headers["content-security-policy"].split(";")}
    assert CSP_DIRECTIVES <= directives
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-cache" and headers["etag"]


def test_the_page_is_served_with_a_strict_csp(api: TestClient) -> None:
    for path in ("/ui", "/ui/", "/ui/index.html"):
        response = api.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.text == (UI / "index.html").read_text()
        _check_headers(response)
    assert api.head("/ui").status_code == 200


def test_the_page_has_no_inline_code() -> None:
    """``script-src 'self'`` and ``style-src 'self'``: inline code would not run; the page's
    own code is in its files."""
    assert _page().inline == []
    script = (UI / "app.js").read_text()
    for forbidden in ("innerHTML", "eval(", "new Function", "document.write", ".style."):
        assert forbidden not in script, forbidden


def test_every_asset_the_page_references_is_served(api: TestClient) -> None:
    references = [r for r in _page().references if not r.startswith("data:")]
    assert {"/ui/app.js", "/ui/app.css", "/ui/vendor/marked.umd.js",
            "/ui/vendor/purify.min.js"} <= set(references)  # fmt: skip
    for reference in references:
        response = api.get(reference)
        assert response.status_code == 200, reference
        name = reference.removeprefix("/ui/")
        assert response.headers["content-type"] == ASSETS[name]
        assert response.content == (UI / name).read_bytes()
        _check_headers(response)


def test_the_allow_list_is_the_shipped_files_and_the_package_ships_them() -> None:
    shipped = {str(p.relative_to(UI)) for p in UI.rglob("*") if p.is_file()}
    assert shipped == set(ASSETS)
    for name in ASSETS:
        assert (UI.parent / "ui" / name).stat().st_size > 0
    assert PAGE_ROUTES == {"/ui", "/ui/", *(f"/ui/{n}" for n in ASSETS)}
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["pollama"]  # fmt: skip
    for name in ASSETS:
        path = f"server/ui/{name}"
        assert any(fnmatch.fnmatch(path, p) and path.count("/") == p.count("/")
                   for p in patterns), f"{path} is not in [tool.setuptools.package-data]"
    assert (UI / "vendor" / "marked.LICENSE").read_text().startswith("# License")
    assert "Apache License" in (UI / "vendor" / "purify.LICENSE").read_text()


def test_a_cached_copy_is_revalidated(api: TestClient) -> None:
    etag = api.get("/ui/app.js").headers["etag"]
    again = api.get("/ui/app.js", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    _check_headers(again)
    assert api.get("/ui/app.js", headers={"If-None-Match": '"other"'}).status_code == 200


def _raw_status(api: TestClient, raw_path: bytes) -> int:
    """The status of a GET of ``raw_path`` exactly as sent: HTTP clients (httpx included)
    remove ``..`` segments before sending, an attacker's client need not."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": unquote(raw_path.decode()), "raw_path": raw_path,
        "query_string": b"", "root_path": "", "headers": [(b"host", b"127.0.0.1:11434")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 11434), "state": {},
    }  # fmt: skip
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    assert api.portal is not None
    api.portal.call(api.app, scope, receive, send)
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


TRAVERSALS = [
    b"/ui/../api/tags", b"/ui/%2e%2e/", b"/ui/app.js/..", b"/ui/%2e%2e/api/tags",
    b"/ui/..%2fapi/tags", b"/ui/../routes_ui.py", b"/ui/%2E%2E/%2E%2E/pyproject.toml",
    b"/ui/vendor/../app.js", b"/ui/./app.js", b"/ui//app.js", b"/ui/app.js%00",
    b"/ui/%5c..%5capp.js", b"/ui/vendor/", b"/ui/vendor", b"/ui/routes_ui.py", b"/ui/nope",
    b"/ui/APP.JS", b"/ui/index.html/x", b"/ui/vendor/marked.umd.js.map",
]  # fmt: skip


@pytest.mark.parametrize("raw_path", TRAVERSALS)
def test_unknown_files_and_traversals_are_404(api: TestClient, raw_path: bytes) -> None:
    assert _raw_status(api, raw_path) == 404


def test_a_trailing_slash_redirects_to_the_file_as_on_every_route(api: TestClient) -> None:
    response = api.get("/ui/app.js/", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == f"{BASE}/ui/app.js"


def test_root_still_answers_ollama_is_running(api: TestClient) -> None:
    response = api.get("/")
    assert response.status_code == 200 and response.text == "Ollama is running"
    assert "content-security-policy" not in response.headers


URL = re.compile(rb"https?://([^/\s\"'`)<>]*)")
# Strings in the vendored libraries that are never fetched: DOMPurify's XML namespace names
# (compared with element namespaces), the projects' addresses in comments and messages, and
# marked's autolink patterns (a scheme and no host).
NOT_FETCHED = {b"www.w3.org", b"github.com", b""}


def test_no_asset_loads_anything_from_another_host() -> None:
    """Offline: no CDN, no fonts, no analytics; the page's own files have no URL at all."""
    code = [name for name in ASSETS if not name.endswith(".LICENSE")]  # licenses: for people
    assert len(code) == 5
    for name in code:
        hosts = set(URL.findall((UI / name).read_bytes()))
        assert hosts <= (NOT_FETCHED if name.startswith("vendor/") else set()), (name, hosts)
    page = (UI / "index.html").read_text() + (UI / "app.css").read_text()
    assert "@import" not in page and "url(" not in page


def test_the_page_calls_only_the_public_api(api: TestClient) -> None:
    called = set(re.findall(r"\"(/api/[a-z]+)\"", (UI / "app.js").read_text()))
    assert called == {"/api/tags", "/api/show", "/api/chat"}
    templates = {getattr(r, "path", None) for r in app_routes(api.app)}
    assert called <= templates


@pytest.fixture
def keyed(api: TestClient, isolated_env: Path) -> Iterator[str]:
    """A key in the keys file the ``api`` app reads: keys are now required."""
    secret, _ = KeyStore(isolated_env / ".ollama" / "api_keys.json").create("ui")
    yield secret


def test_the_page_loads_without_a_key_while_the_api_needs_one(
    api: TestClient, keyed: str
) -> None:
    for path in sorted(PAGE_ROUTES):
        assert api.get(path).status_code == 200, path
        assert api.head(path).status_code == 200, path
    refused = api.get("/api/tags")
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert api.post("/api/chat", json={"model": "x"}).status_code == 401
    assert api.post("/api/show", json={"model": "x"}).status_code == 401
    auth = {"Authorization": f"Bearer {keyed}"}
    assert api.get("/api/tags", headers=auth).status_code == 200
    # Open means GET and HEAD only, and an unknown name under /ui/ still asks for a key
    # first, so the route table cannot be probed.
    assert api.post("/ui").status_code == 401
    assert api.get("/ui/nope").status_code == 401
    assert api.get("/ui/nope", headers=auth).status_code == 404
    assert _raw_status(api, b"/ui/../api/tags") == 401


def _client(home: Path, **env: str) -> TestClient:
    environ = {"HOME": str(home), "OLLAMA_MODELS": str(home / ".ollama" / "models"), **env}
    return TestClient(create_app(load_settings(environ)), base_url=BASE)


def test_a_foreign_origin_is_refused_as_on_every_route(isolated_env: Path) -> None:
    with _client(isolated_env) as client:
        for path in ("/ui", "/ui/app.js"):
            refused = client.get(path, headers={"Origin": "https://evil.example"})
            assert refused.status_code == 403, path
            assert "OLLAMA_ORIGINS" in refused.json()["error"]
        same = client.get("/ui", headers={"Origin": BASE})  # same origin: not CORS
        assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
        rebinding = client.get("/ui", headers={"Host": "evil.example"})
        assert rebinding.status_code == 403 and "POLLAMA_ALLOWED_HOSTS" in rebinding.text


def test_an_origin_allowed_by_ollama_origins_is_answered(isolated_env: Path) -> None:
    with _client(isolated_env, OLLAMA_ORIGINS="https://chat.example") as client:
        allowed = client.get("/ui", headers={"Origin": "https://chat.example"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://chat.example"
        _check_headers(allowed)
        other = client.get("/ui", headers={"Origin": "https://evil.example"})
        assert other.status_code == 403
