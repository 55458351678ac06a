"""API keys: created and revoked by ``pollama keys``, checked by the server on every request.

Ollama has no authentication, so guides tell users to put nginx in front of it to check a
Bearer key; pollama checks keys itself. What must stay true:

* **No key is ever stored.** A key is 256 random bits (``pollama_`` + 43 URL-safe
  characters) shown once at creation; the file keeps its SHA-256 (a slow password hash buys
  nothing against 256 random bits) plus a four-character hint for ``keys list``.
* **Comparison is constant time**: the presented key's hash is compared with every stored
  hash with :func:`hmac.compare_digest`, with no early exit, so timing reveals neither which
  key nearly matched nor how many keys there are beyond their count.
* **The file is owner-only.** It is written ``0600`` through a temp file and an atomic
  rename (a reader never sees half a file), under a lock so two ``keys create`` at once do
  not lose one. A file that another user owns, or that group or others may write, is
  refused: anyone who can write it could add a key.
* **Changes take effect at once.** The server stats the file on each check and reloads
  when its identity (inode, size, mtime, ctime) changes; no restart, no signal.
* **A key may also come from the environment** (``POLLAMA_API_KEY``, for containers):
  :class:`EnvKey` keeps only its hash, compares it in constant time like the file's keys,
  and refuses a key too short to resist guessing (:data:`MIN_ENV_KEY_LENGTH`). It is
  written nowhere; its record has the fixed id ``env``.
* **Failure is closed.** A file that exists but cannot be read or trusted, and a path that
  is a symbolic link to nothing (the file or a folder above it), make
  :meth:`KeyStore.authenticate` refuse every key (the server logs why) and ``pollama serve``
  refuse to start; only a path with nothing at all there means "no keys".
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pollama.errors import InvalidRequest, NotFound, PollamaError

__all__ = [
    "ENV_KEY_ID",
    "KEY_PREFIX",
    "MIN_ENV_KEY_LENGTH",
    "ApiKey",
    "EnvKey",
    "KeyFileError",
    "KeyStore",
    "Permission",
    "Scope",
]

log = logging.getLogger(__name__)

KEY_PREFIX = "pollama_"
ENV_KEY_ID = "env"
"""The id of the ``POLLAMA_API_KEY`` key: file keys have 8 hex digits, so never this one."""
ENV_KEY_VARIABLE = "POLLAMA_API_KEY"
MIN_ENV_KEY_LENGTH = 16
"""The shortest ``POLLAMA_API_KEY`` accepted: 16 random characters are 64 bits or more (hex
digits are the poorest), beyond guessing over HTTP; a word or a PIN is not."""
_FORMAT_VERSION = 1
_MAX_NAME = 64
_MAX_FILE = 4 << 20
_UNKNOWN: tuple[int, ...] = (-1,)  # forces the next check to reload
_DANGLING: tuple[int, ...] = (-2,)  # the path is a symbolic link to nothing


class Permission(StrEnum):
    """What a route needs. Every key may ``read``; scopes add the rest."""

    READ = "read"  # list, show, ps, version, metrics
    INFERENCE = "inference"  # generate, chat, embed, /v1/*
    MANAGE = "manage"  # create, delete, copy, pull, push, blob uploads, purge


class Scope(StrEnum):
    """What a key may do; chosen at creation (``--scope``)."""

    INFERENCE = "inference"
    MANAGE = "manage"
    ALL = "all"

    @property
    def permissions(self) -> frozenset[Permission]:
        if self is Scope.INFERENCE:
            return frozenset({Permission.READ, Permission.INFERENCE})
        if self is Scope.MANAGE:
            return frozenset({Permission.READ, Permission.MANAGE})
        return frozenset(Permission)


class KeyFileError(PollamaError):
    """The keys file exists but cannot be used (unreadable, malformed, or unsafe to trust)."""


@dataclass(frozen=True)
class ApiKey:
    """One stored key: never the key itself, only its hash and what to show about it."""

    id: str
    name: str
    scope: Scope
    sha256: str
    hint: str
    created_at: str

    def allows(self, permission: Permission) -> bool:
        return permission in self.scope.permissions

    def public(self) -> dict[str, str]:
        """What ``keys list`` shows: everything but the hash."""
        return {"id": self.id, "name": self.name, "scope": self.scope.value,
                "hint": self.hint, "created_at": self.created_at}  # fmt: skip


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KeyStore:
    """The keys file at ``path`` (``~/.ollama/api_keys.json`` by default).

    Thread-safe: the server calls :meth:`authenticate` from its event loop and the CLI
    calls :meth:`create`/:meth:`revoke` from another process; each reload replaces an
    immutable tuple, so a check sees either the old keys or the new ones.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # (file identity, keys, error), replaced as one object so readers never mix two.
        self._snapshot: tuple[tuple[int, ...] | None, tuple[ApiKey, ...], KeyFileError | None]
        self._snapshot = (_UNKNOWN, (), None)

    # -- reading -----------------------------------------------------------------------

    def _current(self) -> tuple[tuple[ApiKey, ...], KeyFileError | None]:
        """The keys as the file holds them now, reloading if it changed since last time."""
        dangling: Path | None = None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            dangling = _dangling_link(self.path)
            identity = None if dangling is None else _DANGLING
        except OSError as exc:
            return (), KeyFileError(f"cannot read keys file {self.path}: {exc.strerror}")
        else:
            identity = _identity(st)
        seen, keys, error = self._snapshot
        if identity == seen:
            return keys, error
        with self._lock:
            if identity is None:
                keys, error = (), None
            else:
                try:
                    if dangling is not None:
                        raise _dangling_error(self.path, dangling)
                    keys, error = self._load(), None
                except KeyFileError as exc:
                    keys, error = (), exc
                    log.error("%s; every API key is refused until it is fixed", exc)
            self._snapshot = (identity, keys, error)
        return keys, error

    def _forget(self) -> None:
        self._snapshot = (_UNKNOWN, (), None)

    def _load(self) -> tuple[ApiKey, ...]:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            raise KeyFileError(f"cannot read keys file {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            _check_trusted(self.path, st)
            data = f.read(_MAX_FILE + 1)
        if len(data) > _MAX_FILE:
            raise KeyFileError(f"keys file {self.path} is larger than {_MAX_FILE} bytes")
        return _parse(self.path, data)

    def keys(self) -> list[ApiKey]:
        """Every key, oldest first; raises :class:`KeyFileError` if the file is unusable."""
        keys, error = self._current()
        if error is not None:
            raise error
        return list(keys)

    def state(self) -> tuple[bool, KeyFileError | None]:
        """``(keys configured, error)``: whether the server must ask for a key at all.

        An unusable file counts as configured, so that it fails closed.
        """
        keys, error = self._current()
        return bool(keys) or error is not None, error

    def authenticate(self, presented: str | None) -> ApiKey | None:
        """The stored key matching ``presented``, or None. Constant time in the key."""
        keys, error = self._current()
        if not presented or error is not None or not keys:
            return None
        digest = _hash(presented)
        found: ApiKey | None = None
        for key in keys:  # no early exit: every hash is compared
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    # -- writing (the ``pollama keys`` commands) ----------------------------------------

    def create(self, name: str = "", scope: Scope | str = Scope.ALL) -> tuple[str, ApiKey]:
        """Make a new key; return ``(the key, its record)``. The key is not kept anywhere."""
        scope = _parse_scope(scope)
        name = name.strip()
        if len(name) > _MAX_NAME or any(ord(c) < 32 for c in name):
            raise InvalidRequest(
                f"key name must be at most {_MAX_NAME} printable characters"
            )
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._locked_file() as keys:
            used = {k.id for k in keys}
            key_id = secrets.token_hex(4)
            while key_id in used:
                key_id = secrets.token_hex(4)
            if name and any(k.name == name for k in keys):
                raise InvalidRequest(f'a key named "{name}" already exists')
            record = ApiKey(
                id=key_id,
                name=name or f"key-{key_id}",
                scope=scope,
                sha256=_hash(secret),
                hint=secret[-4:],
                created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            keys.append(record)
        return secret, record

    def revoke(self, id_or_name: str) -> ApiKey:
        """Remove the key with this id or name; the server refuses it from its next request."""
        with self._locked_file() as keys:
            for i, key in enumerate(keys):
                if id_or_name in (key.id, key.name):
                    return keys.pop(i)
        raise NotFound(f'no API key with id or name "{id_or_name}"')

    @contextlib.contextmanager
    def _locked_file(self) -> Iterator[list[ApiKey]]:
        """Hold the lock file, yield the keys as a list to edit, then write them back."""
        directory = self.path.parent
        dangling = _dangling_link(self.path)
        if dangling is not None:  # never create a file where a link points at nothing
            raise _dangling_error(self.path, dangling)
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            _flock(lock_fd)
            self._forget()  # reload under the lock
            keys = self.keys()
            before = list(keys)
            yield keys
            if keys != before:
                self._write(keys)
        finally:
            os.close(lock_fd)

    def _write(self, keys: list[ApiKey]) -> None:
        body = {
            "version": _FORMAT_VERSION,
            "note": "API keys for pollama serve; only SHA-256 hashes, never the keys. "
            "Edit with 'pollama keys'.",
            "keys": [{**asdict(k), "scope": k.scope.value} for k in keys],
        }
        data = (json.dumps(body, indent=2) + "\n").encode()
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._forget()


def _dangling_link(path: Path) -> Path | None:
    """The symbolic link that makes ``path`` missing (the file itself or a folder above it),
    or None when the path is simply absent. A link whose target is gone is a keys file
    someone meant to have (moved, unmounted), not "no keys": it must not open the server."""
    for candidate in (path, *path.parents):
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode) and not candidate.exists():
            return candidate
        return None
    return None


def _dangling_error(path: Path, link: Path) -> KeyFileError:
    return KeyFileError(
        f"cannot read keys file {path}: {link} is a symbolic link to something that does "
        "not exist"
    )


def _flock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def _check_trusted(path: Path, st: os.stat_result) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"keys file {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise KeyFileError(
            f"keys file {path} is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.geteuid()}); refusing to trust it"
        )
    if st.st_mode & 0o022:
        raise KeyFileError(
            f"keys file {path} may be written by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run 'chmod 600 {path}'"
        )
    if st.st_mode & 0o044:
        log.warning("keys file %s is readable by other users; run 'chmod 600 %s'", path, path)


class EnvKey:
    """The key given by ``POLLAMA_API_KEY``: a container's key, stored nowhere.

    Only its SHA-256 is kept (the settings object holds the text, ``repr=False``), so a
    crash dump of this object or a log line with it shows nothing usable. A key that is too
    short or holds characters an HTTP header cannot carry has a :attr:`problem`: it then
    matches nothing (fail closed) and ``pollama serve`` refuses to start, saying why.
    """

    __slots__ = ("_digest", "problem", "record")

    def __init__(self, secret: str) -> None:
        self.problem = _env_key_problem(secret)
        self._digest = _hash(secret)
        self.record = ApiKey(id=ENV_KEY_ID, name=ENV_KEY_VARIABLE, scope=Scope.ALL,
                             sha256=self._digest, hint="", created_at="")  # fmt: skip

    def __repr__(self) -> str:
        return f"EnvKey(problem={self.problem!r})"

    def authenticate(self, presented: str | None) -> ApiKey | None:
        """This key's record if ``presented`` is it, else None; constant time in the key."""
        digest = _hash(presented or "")
        matched = hmac.compare_digest(digest, self._digest)  # always compared: no early exit
        return self.record if matched and presented and self.problem is None else None


def _env_key_problem(secret: str) -> str | None:
    """Why ``secret`` may not be the server's key, or None. The message never shows it."""
    how = (f"use a long random key, e.g. {ENV_KEY_VARIABLE}=$(openssl rand -hex 32), or "
           "create keys with 'pollama keys create' instead")
    if len(secret) < MIN_ENV_KEY_LENGTH:
        return (f"{ENV_KEY_VARIABLE} is too short ({len(secret)} characters; at least "
                f"{MIN_ENV_KEY_LENGTH}): anyone who can reach the server could guess it; {how}")
    if not all(33 <= ord(c) <= 126 for c in secret):
        return (f"{ENV_KEY_VARIABLE} holds spaces, control or non-ASCII characters, which "
                f"clients cannot send reliably in an Authorization header; {how}")
    return None


def _parse_scope(value: Scope | str) -> Scope:
    try:
        return Scope(value)
    except ValueError:
        choices = ", ".join(s.value for s in Scope)
        raise InvalidRequest(f"unknown key scope {value!r} (choose one of: {choices})") from None


def _parse(path: Path, data: bytes) -> tuple[ApiKey, ...]:
    try:
        body: Any = json.loads(data)
    except ValueError as exc:
        raise KeyFileError(f"keys file {path} is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        raise KeyFileError(f'keys file {path} has no "keys" list')
    if body.get("version") != _FORMAT_VERSION:
        raise KeyFileError(f"keys file {path} has unsupported version {body.get('version')!r}")
    keys: list[ApiKey] = []
    for i, item in enumerate(body["keys"]):
        try:
            key = ApiKey(
                id=str(item["id"]), name=str(item["name"]), scope=Scope(item["scope"]),
                sha256=str(item["sha256"]), hint=str(item.get("hint", "")),
                created_at=str(item.get("created_at", "")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise KeyFileError(f"keys file {path}: entry #{i} is malformed") from None
        if len(key.sha256) != 64 or any(c not in "0123456789abcdef" for c in key.sha256):
            raise KeyFileError(f"keys file {path}: entry #{i} has a malformed hash")
        keys.append(key)
    return tuple(keys)
