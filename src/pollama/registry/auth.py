"""Registry credentials: Ollama's ed25519 identity key, the token exchange, Docker logins.

* **Identity key** (``~/.ollama/id_ed25519``, OpenSSH format, mode 0600, with
  ``id_ed25519.pub`` beside it): created on first need, exactly as Ollama writes it, so a key
  registered on ollama.com or Hugging Face works with both programs.
* **Token exchange** (docs/ollama-behaviour.md#registry-authentication): on a ``401`` with
  ``WWW-Authenticate: Bearer realm=...``, ``GET <realm>?service=..&scope=..&ts=..&nonce=..``
  signed with the key (header ``<base64 public key blob>:<base64 signature>`` over
  ``GET,<url>,<base64(hex(sha256("")))>``) answers ``{"token": ...}``. The realm's host must
  equal the registry's host: a registry that names another host would otherwise receive a signed
  request and leak the token (CVE-2025-51471).
* **Docker logins**: ``auths`` of a Docker ``config.json`` (``$DOCKER_CONFIG`` or
  ``~/.docker/config.json``), used for ``Basic`` challenges and, in place of the signature,
  for a same-host token realm, so private distribution registries work. An entry's
  ``registrytoken`` is sent as ``Bearer`` from the first request, as Docker does: that is how
  a pull from another pollama that requires API keys presents one. Credential helpers
  (``credsStore``) are not run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

__all__ = [
    "Challenge",
    "DockerCredentials",
    "IdentityKey",
    "parse_challenge",
    "token_url",
]

KEY_NAME = "id_ed25519"


def _crypto() -> tuple[Any, Any]:
    """``cryptography``'s serialization module and ed25519 key class, imported on first use:
    only pulls and pushes sign, and the server stays ~9 MB smaller without them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return serialization, Ed25519PrivateKey


class IdentityKey:
    """The ed25519 key pair under ``~/.ollama`` (the directory is passed in)."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / KEY_NAME
        self.public_path = self.path.with_name(KEY_NAME + ".pub")
        self._key: Ed25519PrivateKey | None = None

    def ensure(self) -> bool:
        """Create the pair if it does not exist yet; True when this call created it."""
        if self.path.exists():
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        serialization, key_class = _crypto()
        key = key_class.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False  # another process won the race; use its key
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        self.public_path.write_text(self._public_line(key) + "\n", encoding="ascii")
        log.info("created a new identity key at %s", self.path)
        return True

    def _load(self) -> Ed25519PrivateKey:
        if self._key is None:
            self.ensure()
            serialization, key_class = _crypto()
            key = serialization.load_ssh_private_key(self.path.read_bytes(), password=None)
            if not isinstance(key, key_class):
                raise ValueError(f"{self.path} is not an ed25519 key")
            self._key = key
        return self._key

    @staticmethod
    def _public_line(key: Ed25519PrivateKey) -> str:
        serialization, _key_class = _crypto()
        return (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode("ascii")
        )

    def public_key(self) -> str:
        """``ssh-ed25519 AAAA...``: the line a user registers with a registry."""
        return self._public_line(self._load())

    def sign(self, data: bytes) -> str:
        """Ollama's ``auth.Sign``: ``<base64 SSH public key blob>:<base64 raw signature>``."""
        key = self._load()
        blob = self._public_line(key).split(" ")[1]
        signature = base64.b64encode(key.sign(data)).decode("ascii")
        return f"{blob}:{signature}"


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header."""

    scheme: str  # "bearer" or "basic" (lowercase), "" when absent
    realm: str = ""
    service: str = ""
    scope: str = ""


_PARAM_RE = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


def parse_challenge(header: str | None) -> Challenge:
    """Parse ``Bearer realm="…",service="…",scope="…"`` (or ``Basic realm="…"``)."""
    if not header:
        return Challenge("")
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _PARAM_RE.finditer(rest)
    }
    return Challenge(
        scheme.lower(), params.get("realm", ""), params.get("service", ""), params.get("scope", "")
    )


def token_url(challenge: Challenge) -> httpx.URL:
    """The realm URL with service, each scope, ``ts`` and a random ``nonce`` (Go's URL())."""
    url = httpx.URL(challenge.realm)
    params = list(url.params.multi_items())
    params.append(("service", challenge.service))
    params += [("scope", scope) for scope in challenge.scope.split(" ")]
    params.append(("ts", str(int(time.time()))))
    params.append(("nonce", base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")))
    params.sort(key=lambda item: item[0])  # Go's url.Values.Encode sorts by key
    return url.copy_with(params=params)


def signing_payload(url: httpx.URL) -> bytes:
    """What Ollama signs for a token request: ``GET,<url>,<base64(hex(sha256("")))>``."""
    empty = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
    return f"GET,{url},{empty}".encode()


def _normalize_registry_key(key: str) -> str:
    """``https://host:port/v1/`` → ``host:port`` (Docker config keys come in both forms)."""
    key = key.strip().lower()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0]


class DockerCredentials:
    """Logins from a Docker ``config.json``; looked up by exact ``host[:port]``."""

    def __init__(
        self,
        logins: dict[str, tuple[str, str]] | None = None,
        tokens: dict[str, str] | None = None,
    ) -> None:
        self._logins = logins or {}
        self._tokens = tokens or {}

    @classmethod
    def load(cls, home: Path, environ: dict[str, str] | None = None) -> DockerCredentials:
        """Read ``$DOCKER_CONFIG/config.json`` or ``<home>/.docker/config.json``; a missing
        or malformed file means no logins (logged), never an error."""
        env = os.environ if environ is None else environ
        folder = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
        path = folder / "config.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable Docker config %s: %s", path, exc)
            return cls()
        logins: dict[str, tuple[str, str]] = {}
        tokens: dict[str, str] = {}
        auths = doc.get("auths") if isinstance(doc, dict) else None
        for key, entry in (auths or {}).items():
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("registrytoken"), str) and entry["registrytoken"]:
                tokens[_normalize_registry_key(key)] = entry["registrytoken"]
            user, password = entry.get("username"), entry.get("password")
            if isinstance(entry.get("auth"), str) and entry["auth"]:
                try:
                    decoded = base64.b64decode(entry["auth"]).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    continue
                user, _, password = decoded.partition(":")
            if isinstance(user, str) and isinstance(password, str) and user:
                logins[_normalize_registry_key(key)] = (user, password)
        return cls(logins, tokens)

    def bearer_header(self, netloc: str) -> str | None:
        """``Bearer <registrytoken>`` for exactly this host, or None."""
        token = self._tokens.get(netloc.lower())
        return f"Bearer {token}" if token else None

    def basic_header(self, netloc: str) -> str | None:
        """``Basic <base64 user:password>`` for exactly this host, or None."""
        login = self._logins.get(netloc.lower())
        if login is None:
            return None
        raw = f"{login[0]}:{login[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")
