"""The model store: content-addressed blobs plus Ollama-layout manifests.

Only this package turns model names and digests into filesystem paths. It is rooted at a
models directory passed in by the caller (``Settings.models``), never a global path.
"""

from pollama.store.blobs import BlobStore, StoredBlob, parse_digest
from pollama.store.manifests import Layer, Manifest, ManifestStore, StoredManifest
from pollama.store.models import LocalModel, Store

__all__ = [
    "BlobStore",
    "Layer",
    "LocalModel",
    "Manifest",
    "ManifestStore",
    "Store",
    "StoredBlob",
    "StoredManifest",
    "parse_digest",
]
