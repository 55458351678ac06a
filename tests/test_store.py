"""The store: digests, atomic blob writes, Ollama-compatible manifests, pruning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pollama.errors import AlreadyExists, DigestMismatch, InvalidDigest, ModelNotFound
from pollama.names import ModelName
from pollama.store import BlobStore, Layer, Manifest, Store, parse_digest
from pollama.store.manifests import CONFIG_MEDIA_TYPE, MEDIA_MODEL, InvalidManifest

HEX = "a" * 64


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sha256:",
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,
        "sha256:../../etc/passwd",
        "sha256:" + "a" * 60 + "/../",
        "md5:" + HEX,
        HEX,
        "sha256:" + "g" * 64,
        "sha256/" + HEX,
        "../sha256:" + HEX,
        "sha256:" + HEX + "\n",
        "sha256:" + HEX + "\x00",
    ],
)
def test_bad_digests_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidDigest):
        parse_digest(bad)
    with pytest.raises(InvalidDigest):
        BlobStore(tmp_path).path(bad)


def test_digest_forms() -> None:
    assert parse_digest("sha256:" + HEX) == "sha256:" + HEX
    assert parse_digest("sha256-" + HEX) == "sha256:" + HEX


def test_blob_write_is_hashed_and_atomic(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    data = b"hello world" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    stored = blobs.put_bytes(data)
    assert stored.digest == digest and stored.size == len(data) and stored.created
    assert blobs.path(digest) == tmp_path / "blobs" / f"sha256-{digest[7:]}"
    assert blobs.path(digest).read_bytes() == data
    assert blobs.put_bytes(data).created is False
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [f"sha256-{digest[7:]}"]


def test_blob_mismatch_leaves_nothing(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    with pytest.raises(DigestMismatch) as err:
        with blobs.writer("sha256:" + HEX) as w:
            w.write(b"not what was promised")
            w.commit()
    assert "digest mismatch" in str(err.value)
    assert list((tmp_path / "blobs").iterdir()) == []


def test_blob_writer_aborts_on_exception(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    with pytest.raises(RuntimeError):
        with blobs.writer() as w:
            w.write(b"partial")
            raise RuntimeError("client went away")
    assert list((tmp_path / "blobs").iterdir()) == []
    assert not blobs.active


# A manifest exactly as Ollama's Go encoder writes it, typed by hand from
# docs/ollama-behaviour.md#manifests-and-config rather than produced by our writer.
OLLAMA_MANIFEST = (
    '{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
    '"config":{"mediaType":"application/vnd.docker.container.image.v1+json",'
    '"digest":"sha256:CONFIG","size":CSIZE},'
    '"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:MODEL",'
    '"size":MSIZE},{"mediaType":"application/vnd.ollama.image.template",'
    '"digest":"sha256:TEMPLATE","size":TSIZE}]}\n'
)


def _write_ollama_store(root: Path) -> tuple[str, dict[str, bytes]]:
    """Lay out a models folder by hand, as Ollama would leave it."""
    payloads = {
        "MODEL": b"GGUF-not-really-but-a-blob",
        "TEMPLATE": b"{{ .Prompt }}",
        "CONFIG": b'{"model_format":"gguf","model_family":"llama","model_families":["llama"],'
        b'"model_type":"135M","file_type":"Q4_1","architecture":"amd64","os":"linux"}\n',
    }
    text = OLLAMA_MANIFEST
    (root / "blobs").mkdir(parents=True)
    for key, payload in payloads.items():
        hexd = hashlib.sha256(payload).hexdigest()
        (root / "blobs" / f"sha256-{hexd}").write_bytes(payload)
        text = text.replace(f"sha256:{key}", f"sha256:{hexd}")
        text = text.replace(f"{key[0]}SIZE", str(len(payload)))
    path = root / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode())
    return text, payloads


def test_reads_a_store_written_by_ollama(tmp_path: Path) -> None:
    text, payloads = _write_ollama_store(tmp_path)
    store = Store(tmp_path)
    model = store.get(ModelName.parse("smollm2:135m"))
    assert model.digest == hashlib.sha256(text.encode()).hexdigest()
    assert model.size == sum(len(p) for p in payloads.values())
    assert model.template() == "{{ .Prompt }}"
    assert model.config()["model_family"] == "llama"
    assert [m.name.display_shortest() for m in store.list()] == ["smollm2:135m"]
    # Re-serializing what we read gives Ollama's exact bytes back.
    assert model.stored.manifest.to_bytes() == text.encode()


def test_names_match_case_insensitively(tmp_path: Path) -> None:
    _write_ollama_store(tmp_path)
    store = Store(tmp_path)
    model = store.get(ModelName.parse("SmolLM2:135M"))
    assert model.name.display_shortest() == "smollm2:135m"


def test_manifest_written_in_ollama_layout(tmp_path: Path) -> None:
    store = Store(tmp_path)
    blob = store.blobs.put_bytes(b"weights")
    config = store.blobs.put_bytes(b"{}")
    manifest = Manifest(
        Layer(CONFIG_MEDIA_TYPE, config.digest, config.size),
        (Layer(MEDIA_MODEL, blob.digest, blob.size),),
    )
    model_id = store.manifests.write(ModelName.parse("hf.co/User/Repo:Q4_K_M"), manifest)
    path = tmp_path / "manifests" / "hf.co" / "User" / "Repo" / "Q4_K_M"
    raw = path.read_bytes()
    assert model_id == hashlib.sha256(raw).hexdigest()
    assert raw.endswith(b"}\n") and b" " not in raw
    doc = json.loads(raw)
    assert list(doc) == ["schemaVersion", "mediaType", "config", "layers"]
    assert doc["layers"][0] == {"mediaType": MEDIA_MODEL, "digest": blob.digest, "size": 7}
    assert not list(path.parent.glob(".*"))  # no temp file left behind


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"[]",
        b"{}",
        b'{"layers":[]}',
        b"not json",
        b'{"config":{"mediaType":"x","digest":"sha256:../../x","size":1},"layers":[]}',
        b'{"config":{"mediaType":"x","digest":"sha256:' + HEX.encode() + b'","size":-1},'
        b'"layers":[]}',
        b'{"config":{"mediaType":"x","digest":"sha256:' + HEX.encode() + b'","size":1},'
        b'"layers":[{"mediaType":"m","digest":"sha256:' + b"A" * 64 + b'","size":1}]}',
    ],
)
def test_invalid_manifests_are_refused(bad: bytes) -> None:
    with pytest.raises(InvalidManifest):
        Manifest.from_bytes(bad)


def _model(store: Store, name: str, *payloads: bytes) -> None:
    layers = tuple(
        Layer(MEDIA_MODEL, b.digest, b.size) for b in (store.blobs.put_bytes(p) for p in payloads)
    )
    config = store.blobs.put_bytes(name.encode())
    store.manifests.write(
        ModelName.parse(name),
        Manifest(Layer(CONFIG_MEDIA_TYPE, config.digest, config.size), layers),
    )


def test_delete_prunes_only_unshared_blobs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _model(store, "a:1", b"shared", b"only-a")
    _model(store, "b:1", b"shared")
    store.delete(ModelName.parse("a:1"))
    remaining = set(store.blobs.digests())
    assert store.blobs.put_bytes(b"shared").created is False
    assert "sha256:" + hashlib.sha256(b"only-a").hexdigest() not in remaining
    assert not (tmp_path / "manifests" / "registry.ollama.ai" / "library" / "a").exists()
    with pytest.raises(ModelNotFound):
        store.delete(ModelName.parse("a:1"))


def test_noprune_keeps_blobs(tmp_path: Path) -> None:
    store = Store(tmp_path, noprune=True)
    _model(store, "a:1", b"only-a")
    before = set(store.blobs.digests())
    store.delete(ModelName.parse("a:1"))
    assert set(store.blobs.digests()) == before


def test_corrupt_manifest_blocks_pruning(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _model(store, "a:1", b"only-a")
    _model(store, "b:1", b"only-b")
    bad = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "b" / "1"
    bad.write_text("{corrupt")
    store.delete(ModelName.parse("a:1"))
    assert "sha256:" + hashlib.sha256(b"only-a").hexdigest() in set(store.blobs.digests())
    assert store.garbage() == []


def test_copy_refuses_to_overwrite(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _model(store, "a:1", b"x")
    _model(store, "b:1", b"y")
    before = (tmp_path / "manifests" / "registry.ollama.ai" / "library" / "b" / "1").read_bytes()
    with pytest.raises(AlreadyExists):
        store.copy(ModelName.parse("a:1"), ModelName.parse("B:1"))
    after = (tmp_path / "manifests" / "registry.ollama.ai" / "library" / "b" / "1").read_bytes()
    assert before == after
    store.copy(ModelName.parse("a:1"), ModelName.parse("c:1"))
    assert store.get(ModelName.parse("c:1")).digest == store.get(ModelName.parse("a:1")).digest


def test_garbage_finds_strays(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _model(store, "a:1", b"x")
    orphan = store.blobs.put_bytes(b"orphan")
    partial = tmp_path / "blobs" / f"sha256-{HEX}-partial"
    partial.write_bytes(b"half")
    found = {(g.path.name, g.kind) for g in store.garbage()}
    assert found == {
        (f"sha256-{orphan.digest[7:]}", "unreferenced blob"),
        (partial.name, "partial download"),
    }
    freed = store.remove_garbage(store.garbage())
    assert freed == len(b"orphan") + len(b"half")
    assert store.garbage() == []
    assert store.get(ModelName.parse("a:1"))
