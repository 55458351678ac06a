"""Errors of registry transfers, placed in the domain tree of :mod:`pollama.errors`.

The server maps them by class (``pollama.server.errors``): what the caller can fix (a host
the settings do not allow, a redirect that would downgrade to http) is an
:class:`~pollama.errors.InvalidRequest` (400); what the remote registry did wrong is a
:class:`RegistryError`, an :class:`~pollama.errors.InternalError` (500), as Ollama answers
a failed pull with ``stream: false``. Messages keep Ollama's wording where its users and
clients know it (``pull model manifest: file does not exist``, ``unauthorized: access
denied``, ``digest mismatch, file must be downloaded again: ...``).
"""

from __future__ import annotations

from pollama.errors import InternalError, InvalidRequest


class RegistryError(InternalError):
    """The registry answered with an error, or could not be reached after the retries."""

    def __init__(self, message: str, status_code: int = 0) -> None:
        super().__init__(message)
        self.status_code = status_code


class RegistryNotFound(RegistryError):
    """The registry answered 404 (Ollama's ``os.ErrNotExist``: ``file does not exist``)."""

    def __init__(self, message: str = "file does not exist") -> None:
        super().__init__(message, 404)


class Unauthorized(RegistryError):
    """The registry still refused after one token exchange (Ollama's ``errUnauthorized``)."""

    def __init__(self, message: str = "unauthorized: access denied") -> None:
        super().__init__(message, 401)


class HostNotAllowed(InvalidRequest):
    """A registry host or address that the host policy does not let pollama reach."""


class BlobDigestMismatch(RegistryError):
    """Downloaded bytes whose sha256 is not the digest the manifest promised."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"digest mismatch, file must be downloaded again: want {expected}, got {actual}"
        )
        self.expected = expected
        self.actual = actual


class InsufficientDiskSpace(InternalError):
    """The layers to download do not fit in the free space of the models directory."""
