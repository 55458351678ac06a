"""Pull and push models over the registry protocol (Docker Registry v2, as Ollama speaks it).

* :class:`RegistryService` — ``pull``/``push`` as async generators of :class:`TransferProgress`;
  the server holds one per store, so concurrent pulls share downloads.
* :class:`HostPolicy` — which hosts and addresses transfers may reach (``POLLAMA_REGISTRY_HOSTS``).
* :class:`IdentityKey` — the ed25519 key in ``~/.ollama`` used for the token exchange.
* :class:`TransferOptions` — part sizes, retries, the stall timeout.

Modules: ``client`` (one transfer's HTTP session: redirects, auth, byte caps), ``download``
(resumable verified parts), ``partial`` (a download's data file: writes, in-order hash),
``netstream`` (the connections under ``client``: large reads, bodies past the parser),
``upload``, ``auth``, ``hosts``, ``errors``.
"""

from pollama.registry.auth import DockerCredentials, IdentityKey
from pollama.registry.errors import (
    BlobDigestMismatch,
    HostNotAllowed,
    InsufficientDiskSpace,
    RegistryError,
    RegistryNotFound,
    Unauthorized,
)
from pollama.registry.hosts import DEFAULT_REGISTRY_HOSTS, HostPolicy
from pollama.registry.service import RegistryService, TransferProgress
from pollama.registry.transfer import TransferOptions

__all__ = [
    "DEFAULT_REGISTRY_HOSTS",
    "BlobDigestMismatch",
    "DockerCredentials",
    "HostNotAllowed",
    "HostPolicy",
    "IdentityKey",
    "InsufficientDiskSpace",
    "TransferProgress",
    "RegistryError",
    "RegistryNotFound",
    "RegistryService",
    "TransferOptions",
    "Unauthorized",
]
