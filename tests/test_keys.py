"""The API key store and ``pollama keys``: hashed, owner-only, reloaded on change, fail closed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pollama.cli.main import cli
from pollama.errors import InvalidRequest, NotFound
from pollama.keys import KEY_PREFIX, KeyFileError, KeyStore, Permission, Scope


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "home" / ".ollama" / "api_keys.json")


def test_create_stores_only_a_hash(store: KeyStore) -> None:
    secret, record = store.create("laptop", "inference")
    assert secret.startswith(KEY_PREFIX) and len(secret) >= len(KEY_PREFIX) + 43
    text = store.path.read_text()
    assert secret not in text and secret[len(KEY_PREFIX):] not in text
    assert record.sha256 in text and record.hint == secret[-4:]
    data = json.loads(text)
    assert data["version"] == 1 and data["keys"][0]["name"] == "laptop"
    assert data["keys"][0]["scope"] == "inference"
    assert "sha256" not in record.public()


def test_file_and_directory_are_owner_only(store: KeyStore) -> None:
    store.create()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert not list(store.path.parent.glob(".*.tmp"))  # the temp file was renamed away


def test_authenticate(store: KeyStore) -> None:
    assert store.authenticate("anything") is None  # no file: no keys
    assert store.state() == (False, None)
    a, rec_a = store.create("a", Scope.ALL)
    b, rec_b = store.create("b", Scope.MANAGE)
    assert store.state() == (True, None)
    assert store.authenticate(a) == rec_a
    assert store.authenticate(b) == rec_b
    for wrong in ("", None, a + "x", a[:-1], b.upper(), "pollama_", "\udcff"):
        assert store.authenticate(wrong) is None


def test_scopes() -> None:
    assert Scope.INFERENCE.permissions == {Permission.READ, Permission.INFERENCE}
    assert Scope.MANAGE.permissions == {Permission.READ, Permission.MANAGE}
    assert Scope.ALL.permissions == set(Permission)


def test_changes_are_seen_by_another_store_at_once(store: KeyStore) -> None:
    server_side = KeyStore(store.path)  # as the server holds it
    secret, record = store.create("x")
    assert server_side.authenticate(secret) == record
    store.revoke("x")
    assert server_side.authenticate(secret) is None
    again, _ = store.create("y")
    assert server_side.authenticate(again) is not None
    store.path.unlink()
    assert server_side.authenticate(again) is None
    assert server_side.state() == (False, None)


def test_revoke_by_id_or_name(store: KeyStore) -> None:
    _, a = store.create("a")
    _, b = store.create("b")
    assert store.revoke(a.id) == a
    assert store.revoke("b") == b
    assert store.keys() == []
    with pytest.raises(NotFound):
        store.revoke("b")


def test_invalid_names_and_scopes(store: KeyStore) -> None:
    store.create("dup")
    with pytest.raises(InvalidRequest, match="already exists"):
        store.create("dup")
    with pytest.raises(InvalidRequest, match="unknown key scope"):
        store.create("z", "admin")
    with pytest.raises(InvalidRequest, match="printable"):
        store.create("a\nb")
    with pytest.raises(InvalidRequest):
        store.create("n" * 65)
    _, unnamed = store.create()
    assert unnamed.name == f"key-{unnamed.id}"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("not json", "not valid JSON"),
        ('{"version": 1}', 'no "keys" list'),
        ('{"version": 9, "keys": []}', "unsupported version"),
        ('{"version": 1, "keys": [{"id": "x"}]}', "malformed"),
        ('{"version": 1, "keys": [{"id": "x", "name": "n", "scope": "all", "sha256": "zz"}]}',
         "malformed hash"),
    ],
)
def test_unusable_file_fails_closed(store: KeyStore, content: str, words: str) -> None:
    secret, _ = store.create("ok")
    store.path.write_text(content)
    configured, error = store.state()
    assert configured and isinstance(error, KeyFileError) and words in str(error)
    assert store.authenticate(secret) is None
    with pytest.raises(KeyFileError, match=words):
        store.keys()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_file_writable_by_others_is_refused(store: KeyStore) -> None:
    secret, _ = store.create("ok")
    store.path.chmod(0o666)
    configured, error = store.state()
    assert configured and error is not None and "chmod 600" in str(error)
    assert store.authenticate(secret) is None
    store.path.chmod(0o600)
    assert store.authenticate(secret) is not None


@pytest.mark.skipif(os.name != "posix", reason="POSIX links")
def test_symlinked_file_is_refused(store: KeyStore, tmp_path: Path) -> None:
    secret, _ = store.create("ok")
    real = tmp_path / "elsewhere.json"
    store.path.rename(real)
    store.path.symlink_to(real)
    assert store.authenticate(secret) is None
    assert store.state()[1] is not None


@pytest.mark.skipif(os.name != "posix", reason="POSIX links")
@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_symlink_to_nothing_fails_closed(store: KeyStore, tmp_path: Path, where: str) -> None:
    """A keys file that was moved or sits on an unmounted disk is not "no keys": the link
    says keys were meant to be there, so every key is refused (and serve will not start)."""
    secret, _ = store.create("ok")
    if where == "file":
        store.path.rename(tmp_path / "moved.json")
        store.path.symlink_to(tmp_path / "gone.json")
        link = store.path
    else:  # ~/.ollama itself is a link to a folder that is gone
        link = store.path.parent
        link.rename(tmp_path / "moved")
        link.symlink_to(tmp_path / "unmounted")
    configured, error = store.state()
    assert configured and isinstance(error, KeyFileError)
    assert f"{link} is a symbolic link to something that does not exist" in str(error)
    assert store.authenticate(secret) is None
    with pytest.raises(KeyFileError, match="symbolic link"):
        store.create("another")
    # Nothing at all at the path still means no keys.
    link.unlink()
    assert store.state() == (False, None)


def test_concurrent_creates_lose_nothing(store: KeyStore) -> None:
    secrets: list[str] = []

    def make(i: int) -> None:
        secret, _ = KeyStore(store.path).create(f"k{i}")
        secrets.append(secret)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.keys()) == 16
    assert all(store.authenticate(s) is not None for s in secrets)


def _cli(home: Path, *args: str, **env: str) -> Result:
    """``pollama keys ARGS`` in-process (a subprocess costs seconds of imports)."""
    return CliRunner().invoke(cli, ["keys", *args], env={"HOME": str(home), **env})


def test_cli_create_list_revoke(isolated_env: Path) -> None:
    made = _cli(isolated_env, "create", "--name", "ci", "--scope", "inference")
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()  # stdout holds the key alone: KEY=$(pollama keys create)
    assert secret.startswith(KEY_PREFIX) and "\n" not in secret
    assert "OLLAMA_API_KEY" in made.stderr and "only now" in made.stderr
    store = KeyStore(isolated_env / ".ollama" / "api_keys.json")
    assert store.authenticate(secret) is not None

    listed = _cli(isolated_env, "list")
    assert listed.exit_code == 0
    assert "ci" in listed.stdout and "inference" in listed.stdout
    assert secret not in listed.stdout and f"{KEY_PREFIX}...{secret[-4:]}" in listed.stdout
    as_json = json.loads(_cli(isolated_env, "list", "--json").stdout)
    assert as_json[0]["name"] == "ci" and "sha256" not in as_json[0]

    bad = _cli(isolated_env, "create", "--scope", "root")
    assert bad.exit_code != 0 and "root" in bad.stderr

    assert _cli(isolated_env, "revoke", "ci").exit_code == 0
    assert store.authenticate(secret) is None
    missing = _cli(isolated_env, "revoke", "ci")
    assert missing.exit_code == 1 and "Error: no API key" in missing.stderr


def test_cli_honours_keys_file_setting(isolated_env: Path, tmp_path: Path) -> None:
    target = tmp_path / "custom" / "keys.json"
    made = _cli(isolated_env, "create", POLLAMA_KEYS_FILE=str(target))
    assert made.exit_code == 0, made.output
    assert KeyStore(target).authenticate(made.stdout.strip()) is not None


def test_cli_entry_point(isolated_env: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "POLLAMA_"))}
    env["HOME"] = str(isolated_env)
    made = subprocess.run([sys.executable, "-m", "pollama", "keys", "create"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(KEY_PREFIX)
