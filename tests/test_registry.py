"""Pull and push against a real registry (Debian's docker-registry) through a fault proxy.

These drive :class:`pollama.registry.RegistryService` directly (no HTTP server in between),
with small parts so that a ~0.4 MB test model is fetched in several parallel parts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ggufgen import write_tiny_model
from pollama.names import ModelName
from pollama.registry import (
    DEFAULT_REGISTRY_HOSTS,
    BlobDigestMismatch,
    InsufficientDiskSpace,
    RegistryError,
    RegistryService,
    TransferOptions,
    TransferProgress,
)
from pollama.store import Store
from pollama.store.manifests import CONFIG_MEDIA_TYPE, MEDIA_MODEL, MEDIA_PARAMS, Layer, Manifest
from registry_helpers import DockerRegistry, Fault, FaultProxy

FAST = TransferOptions(
    min_part_size=64 * 1024,
    backoff_base=0.02,
    backoff_max=0.1,
    stall_timeout=0.5,
    checkpoint_interval=0.05,
    progress_interval=0.02,
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "models")
    s.ensure()
    return s


LOOPBACK_REGISTRIES = (*DEFAULT_REGISTRY_HOSTS, "127.0.0.1", "localhost")
"""The registries of these tests run on loopback, so they are listed by name, as a user
lists a registry of their own: ``insecure`` alone reaches no host the settings do not list."""


def service(store: Store, home: Path, opts: TransferOptions = FAST) -> RegistryService:
    return RegistryService(store, user_home=home, allowed_hosts=LOOPBACK_REGISTRIES, options=opts)


def make_model(store: Store, name: ModelName, tmp: Path, seed: int = 0, **kw: Any) -> Manifest:
    """A tiny real model (GGUF, params and config layers) stored under ``name``."""
    key = (seed, *sorted(kw.items()))
    if key not in _GGUF_CACHE or not _GGUF_CACHE[key].exists():
        _GGUF_CACHE[key] = write_tiny_model(tmp / f"m{seed}.gguf", seed=seed, **kw)
    gguf = _GGUF_CACHE[key]
    model = store.blobs.put_file(gguf)
    params = store.blobs.put_bytes(json.dumps({"seed": seed}).encode())
    config = store.blobs.put_bytes(b'{"model_format":"gguf","model_family":"llama"}\n')
    manifest = Manifest(
        Layer(CONFIG_MEDIA_TYPE, config.digest, config.size),
        (
            Layer(MEDIA_MODEL, model.digest, model.size),
            Layer(MEDIA_PARAMS, params.digest, params.size),
        ),
    )
    store.manifests.write(name, manifest)
    return manifest


async def collect(events: AsyncIterator[TransferProgress]) -> list[dict[str, Any]]:
    return [item.to_json() async for item in events]


def run(events: AsyncIterator[TransferProgress]) -> list[dict[str, Any]]:
    return asyncio.run(collect(events))


def statuses(items: list[dict[str, Any]]) -> list[str]:
    """The status sequence with repeats of one layer's progress collapsed."""
    out: list[str] = []
    for item in items:
        if not out or out[-1] != item["status"]:
            out.append(item["status"])
    return out


def strays(store: Store) -> list[str]:
    return sorted(e.name for e in store.blobs.stray_files())


def strays_besides_resumable(store: Store, manifest: Manifest, bad: str) -> list[str]:
    """After a pull that failed on the layer ``bad``: the stray files that are not the
    resumable ``-partial`` files of the manifest's other layers (downloads fetched ahead,
    which the failed pull cancelled wherever they were; the next pull resumes them)."""
    others = {digest[7:] for digest in manifest.digests() if digest != bad}
    return [
        name for name in strays(store)
        if not any(name.startswith(f"sha256-{hex_}-partial") for hex_ in others)
    ]


def model_layer(manifest: Manifest) -> Layer:
    return next(layer for layer in manifest.layers if layer.media_type == MEDIA_MODEL)


def test_push_then_pull_gives_the_same_model(
    proxy: FaultProxy, registry: DockerRegistry, store: Store, tmp_path: Path
) -> None:
    name = ModelName.parse(f"{proxy.netloc}/library/roundtrip:v1")
    manifest = make_model(store, name, tmp_path)
    model_id = store.manifests.read(name).digest
    pushed = run(service(store, tmp_path).push(name, insecure=True))
    hexes = [layer.digest[7:19] for layer in (*manifest.layers, manifest.config)]
    assert statuses(pushed) == [
        "retrieving manifest",
        *(f"pushing {h}" for h in hexes),
        "pushing manifest",
        "success",
    ]
    # The registry holds our manifest byte for byte, so a pull gets the same model ID.
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    raw = httpx.get(f"{registry.url}/v2/library/roundtrip/manifests/v1", headers=accept).content
    assert hashlib.sha256(raw).hexdigest() == model_id
    assert "PATCH" in {r.method for r in proxy.requests}

    store.delete(name)
    assert list(store.blobs.digests()) == []
    pulled = run(service(store, tmp_path).pull(name, insecure=True))
    assert statuses(pulled) == [
        "pulling manifest",
        *(f"pulling {h}" for h in hexes),
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    for item in pulled:
        if "digest" in item:
            assert item["total"] > 0 and item.get("completed", 0) <= item["total"]
    assert store.manifests.read(name).digest == model_id
    assert set(store.blobs.digests()) == manifest.digests()
    assert strays(store) == []

    # Pushing again sends no data: every blob is found by HEAD.
    proxy.requests.clear()
    again = run(service(store, tmp_path).push(name, insecure=True))
    assert again[-1] == {"status": "success"}
    assert {r.method for r in proxy.requests} == {"HEAD", "PUT"}
    # Pulling again fetches nothing but the manifest: blobs present are cache hits.
    proxy.requests.clear()
    run(service(store, tmp_path).pull(name, insecure=True))
    assert proxy.paths() == ["/v2/library/roundtrip/manifests/v1"]


def test_push_mounts_layers_from_another_repository(
    proxy: FaultProxy, store: Store, tmp_path: Path
) -> None:
    source = ModelName.parse(f"{proxy.netloc}/library/mount-src:latest")
    manifest = make_model(store, source, tmp_path, seed=3)
    run(service(store, tmp_path).push(source, insecure=True))
    target = ModelName.parse(f"{proxy.netloc}/other/mount-dst:latest")
    layers = tuple(
        Layer(layer.media_type, layer.digest, layer.size, from_=str(source))
        for layer in manifest.layers
    )
    config = Layer(CONFIG_MEDIA_TYPE, manifest.config.digest, manifest.config.size, str(source))
    store.manifests.write(target, Manifest(config, layers))
    proxy.requests.clear()
    items = run(service(store, tmp_path).push(target, insecure=True))
    assert items[-1] == {"status": "success"}
    posts = [r.target for r in proxy.requests if r.method == "POST"]
    assert any("mount=" in t and "from=library%2Fmount-src" in t for t in posts)
    assert "PATCH" not in {r.method for r in proxy.requests}


_GGUF_CACHE: dict[tuple[Any, ...], Path] = {}


@pytest.fixture(scope="module")
def shared_model(registry: DockerRegistry, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """A model pushed once, straight to the registry, as ``library/shared:latest``."""
    tmp = tmp_path_factory.mktemp("shared")
    scratch = Store(tmp / "models")
    scratch.ensure()
    name = ModelName.parse(f"{registry.netloc}/library/shared:latest")
    manifest = make_model(scratch, name, tmp, seed=1, n_embd=128)
    run(service(scratch, tmp).push(name, insecure=True))
    return manifest


@pytest.fixture
def pushed(proxy: FaultProxy, shared_model: Manifest) -> tuple[ModelName, Manifest]:
    """The shared model's name as seen through this test's proxy."""
    return ModelName.parse(f"{proxy.netloc}/library/shared:latest"), shared_model


def test_dropped_connections_resume_without_refetching(
    proxy: FaultProxy, store: Store, tmp_path: Path, pushed: tuple[ModelName, Manifest]
) -> None:
    name, manifest = pushed
    size = model_layer(manifest).size
    proxy.add(Fault(path="/blobs/", action="drop", after=40_000, times=4))
    items = run(service(store, tmp_path).pull(name, insecure=True))
    assert items[-1] == {"status": "success"}
    assert set(store.blobs.digests()) == manifest.digests()
    assert proxy.faults[0].hits == 4
    assert proxy.blob_bytes() < 2 * size
    ranges = [r.headers.get("range") for r in proxy.requests if r.method == "GET"]
    # A retried part asks only for what it is missing.
    assert any(
        r
        and not r.startswith("bytes=0-")
        and r.split("=")[1].split("-")[0] not in {str(o) for o in range(0, size, 64 * 1024)}
        for r in ranges
    )
    assert strays(store) == []


def test_wrong_bytes_install_nothing(
    proxy: FaultProxy, store: Store, tmp_path: Path, pushed: tuple[ModelName, Manifest]
) -> None:
    name, manifest = pushed
    unrelated = store.blobs.put_bytes(b"somebody else's blob")
    layer = model_layer(manifest)
    proxy.add(Fault(path=layer.digest, action="corrupt", after=5, times=None))
    with pytest.raises(BlobDigestMismatch) as info:
        run(service(store, tmp_path).pull(name, insecure=True))
    assert str(info.value).startswith(
        f"digest mismatch, file must be downloaded again: want {layer.digest}, got sha256:"
    )
    assert store.manifests.resolve(name) is None
    # the other layers, fetched beside it, may stay (verified, for the next pull; pruned at
    # the next start if none comes): never the blob whose bytes were wrong
    present = set(store.blobs.digests())
    left = present - {unrelated.digest}
    assert unrelated.digest in present and layer.digest not in left
    assert left <= manifest.digests()
    for digest in left:
        assert hashlib.sha256(store.blobs.path(digest).read_bytes()).hexdigest() == digest[7:]
    assert strays_besides_resumable(store, manifest, layer.digest) == []


def test_a_stalled_part_is_retried_at_once(
    proxy: FaultProxy, store: Store, tmp_path: Path, pushed: tuple[ModelName, Manifest]
) -> None:
    name, manifest = pushed
    proxy.add(Fault(path=model_layer(manifest).digest, action="stall", after=10_000, seconds=5))
    started = time.monotonic()
    items = run(service(store, tmp_path).pull(name, insecure=True))
    assert items[-1] == {"status": "success"}
    assert time.monotonic() - started < 4  # not waiting out the 5 s stall
    assert proxy.faults[0].hits == 1


def test_the_next_layers_download_while_one_is_reported(
    proxy: FaultProxy, store: Store, tmp_path: Path, pushed: tuple[ModelName, Manifest]
) -> None:
    """The small layers after the model's (its parameters, its config) are fetched while the
    model's layer is still coming, so they cost no round trip of their own at the end; the
    progress still reports the layers one after another, in the manifest's order."""
    name, manifest = pushed
    layer = model_layer(manifest)
    proxy.add(Fault(path=layer.digest, action="throttle", rate=400_000, times=None))
    items = run(service(store, tmp_path).pull(name, insecure=True))
    assert items[-1] == {"status": "success"}
    order = [lay.digest for lay in [*manifest.layers, manifest.config]]
    reported = [item["digest"] for item in items if "digest" in item]
    assert [d for i, d in enumerate(reported) if i == 0 or reported[i - 1] != d] == order
    for later in order[order.index(layer.digest) + 1 :]:
        first = next(item for item in items if item.get("digest") == later)
        assert first["completed"] == first["total"]  # already whole when first reported


def test_a_pull_that_ends_early_releases_the_layers_it_fetched_ahead(
    proxy: FaultProxy, store: Store, tmp_path: Path, pushed: tuple[ModelName, Manifest]
) -> None:
    """The layers after the one being reported are downloaded ahead and held by the pull:
    when it ends early (the client went away), it lets go of them, and a download nobody
    follows any more is cancelled; nothing keeps running."""
    name, manifest = pushed
    later = [lay.digest for lay in [*manifest.layers, manifest.config]][1:]
    for digest in later:  # seconds for a few bytes: still running when the client goes
        proxy.add(Fault(path=digest, action="throttle", rate=5, times=None))
    proxy.add(Fault(path=model_layer(manifest).digest, action="throttle", rate=20_000,
                    times=None))
    svc = service(store, tmp_path)

    async def leave_early() -> None:
        events = svc.pull(name, insecure=True)
        async for item in events:
            if item.digest:
                assert set(svc.downloads.active()) >= set(later)  # fetched ahead
                break
        await events.aclose()
        deadline = time.monotonic() + 1.5  # well before the slow layers could finish
        while svc.downloads.active() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert svc.downloads.active() == []
        assert not set(store.blobs.digests()) & set(later)  # cancelled, not completed
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not [t for t in others if t.get_name().startswith("pull ")]

    asyncio.run(leave_early())
    assert store.manifests.resolve(name) is None


def test_cancelled_pull_resumes_from_the_bytes_on_disk(
    proxy: FaultProxy, store: Store, tmp_path: Path, pushed: tuple[ModelName, Manifest]
) -> None:
    name, manifest = pushed
    layer = model_layer(manifest)
    # Slow enough that the pull is far from done when the client goes: the rate is per
    # connection, and the parts download side by side (at 400 KB/s a loaded machine once
    # saw every part finish between the break and the close).
    throttle = proxy.add(Fault(path=layer.digest, action="throttle", rate=20_000, times=None))
    svc = service(store, tmp_path)

    async def pull_part_way() -> None:
        events = svc.pull(name, insecure=True)
        async for item in events:
            if item.digest == layer.digest and item.completed > layer.size // 3:
                break
        await events.aclose()  # the client goes away
        await asyncio.sleep(0.3)  # the download notices and saves its state

    asyncio.run(pull_part_way())
    assert store.manifests.resolve(name) is None
    deadline = time.monotonic() + 10  # a loaded machine may take longer to save the state
    while True:
        partial = [n for n in strays(store) if n.endswith("-partial")]
        states = [
            json.loads((store.blobs.dir / n).read_text())
            for n in strays(store) if "-partial-" in n
        ]
        if (partial and states) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert partial and states
    saved = sum(s["Completed"] for s in states)
    assert 0 < saved < layer.size
    first_run = proxy.blob_bytes()

    throttle.times = 0  # full speed now
    items = run(service(store, tmp_path).pull(name, insecure=True))
    assert items[-1] == {"status": "success"}
    assert set(store.blobs.digests()) == manifest.digests()
    assert proxy.blob_bytes() - first_run <= layer.size - saved + 64 * 1024
    assert strays(store) == []


def test_concurrent_pulls_share_one_download(
    proxy: FaultProxy, store: Store, tmp_path: Path, pushed: tuple[ModelName, Manifest]
) -> None:
    name, manifest = pushed
    layer = model_layer(manifest)
    proxy.add(Fault(path=layer.digest, action="throttle", rate=2_000_000, times=None))
    svc = service(store, tmp_path)

    async def both() -> list[list[dict[str, Any]]]:
        return list(
            await asyncio.gather(
                collect(svc.pull(name, insecure=True)), collect(svc.pull(name, insecure=True))
            )
        )

    first, second = asyncio.run(both())
    assert first[-1] == second[-1] == {"status": "success"}
    assert proxy.blob_bytes() < 1.2 * layer.size
    assert set(store.blobs.digests()) == manifest.digests()


def test_pull_replaces_a_tag_and_removes_unused_layers(
    proxy: FaultProxy, store: Store, tmp_path: Path
) -> None:
    scratch = Store(tmp_path / "scratch")
    name = ModelName.parse(f"{proxy.netloc}/library/moving:latest")
    old = make_model(scratch, name, tmp_path, seed=5)
    run(service(scratch, tmp_path).push(name, insecure=True))
    run(service(store, tmp_path).pull(name, insecure=True))
    assert set(store.blobs.digests()) == old.digests()
    new = make_model(scratch, name, tmp_path, seed=6)
    run(service(scratch, tmp_path).push(name, insecure=True))
    items = run(service(store, tmp_path).pull(name, insecure=True))
    assert statuses(items)[-3:] == ["writing manifest", "removing unused layers", "success"]
    assert set(store.blobs.digests()) == new.digests()


def test_missing_tag_and_registry_errors(proxy: FaultProxy, store: Store, tmp_path: Path) -> None:
    name = ModelName.parse(f"{proxy.netloc}/library/nothing-here:latest")
    with pytest.raises(RegistryError, match=r"^pull model manifest: file does not exist$"):
        run(service(store, tmp_path).pull(name, insecure=True))
    proxy.add(
        Fault(
            path="/manifests/", action="reply", method=None, reply=_reply(500, b"registry on fire")
        )
    )
    with pytest.raises(RegistryError, match=r"^pull model manifest: 500: registry on fire$"):
        run(service(store, tmp_path).pull(name, insecure=True))
    missing = ModelName.parse(f"{proxy.netloc}/library/not-local:latest")
    with pytest.raises(Exception, match="not found"):
        run(service(store, tmp_path).push(missing, insecure=True))


def test_layers_that_cannot_fit_on_disk_are_refused_up_front(
    proxy: FaultProxy, store: Store, tmp_path: Path
) -> None:
    huge = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": "sha256:" + "a" * 64, "size": 10},
        "layers": [{"mediaType": MEDIA_MODEL, "digest": "sha256:" + "b" * 64, "size": 10**17}],
    }
    proxy.add(
        Fault(path="/manifests/", action="reply", reply=_reply(200, json.dumps(huge).encode()))
    )
    name = ModelName.parse(f"{proxy.netloc}/library/huge:latest")
    with pytest.raises(InsufficientDiskSpace, match="not enough disk space"):
        run(service(store, tmp_path).pull(name, insecure=True))
    assert proxy.paths() == ["/v2/library/huge/manifests/latest"]  # no blob request at all
    assert strays(store) == []


def _reply(status: int, body: bytes, headers: dict[str, str] | None = None) -> Any:
    from registry_helpers import Reply

    return Reply(status, {"content-type": "application/json", **(headers or {})}, body)
