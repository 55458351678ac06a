"""The stored responses of ``/v1/responses`` (``pollama.store.responses``): durable across a
reopen, bounded by count, age and bytes, private to their owner, and a damaged file kept
aside instead of lost."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from pollama.config import load_settings
from pollama.store.responses import ResponseRecord, ResponseStore

DAY = 24 * 3600.0


def store(path: Path, **bounds: float) -> ResponseStore:
    limits = {"max_count": 100, "max_age": DAY, "max_bytes": 1 << 20, **bounds}
    return ResponseStore(path, max_count=int(limits["max_count"]), max_age=limits["max_age"],
                         max_bytes=int(limits["max_bytes"]))


def record(ident: str, owner: str = "", text: str = "hi", created: float | None = None
           ) -> ResponseRecord:
    return ResponseRecord(
        id=ident, owner=owner, response={"id": ident, "output": [text]},
        input_items=[{"type": "message", "role": "user", "content": text}],
        conversation=[{"role": "user", "content": text}, {"role": "assistant", "content": "!"}],
        created=time.time() if created is None else created,
    )


def test_a_record_survives_a_reopen_and_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "home" / "responses.sqlite3"
    first = store(path)
    first.put(record("resp_a", text="über ✓"))
    first.close()
    again = store(path).get("resp_a", "")
    assert again is not None and again.response == {"id": "resp_a", "output": ["über ✓"]}
    assert again.conversation[1] == {"role": "assistant", "content": "!"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_only_the_owner_finds_or_deletes_a_record(tmp_path: Path) -> None:
    s = store(tmp_path / "r.db")
    s.put(record("resp_a", owner="key-alice"))
    assert s.get("resp_a", "key-bob") is None and s.get("resp_a", "") is None
    assert s.delete("resp_a", "key-bob") is False
    assert s.get("resp_a", "key-alice") is not None
    assert s.delete("resp_a", "key-alice") is True and s.get("resp_a", "key-alice") is None


def test_the_count_bound_drops_the_oldest(tmp_path: Path) -> None:
    s = store(tmp_path / "r.db", max_count=3)
    for i in range(5):
        s.put(record(f"resp_{i}", created=1_000_000 + i + time.time()))
    assert s.count() == 3
    assert [s.get(f"resp_{i}", "") is not None for i in range(5)] == [False, False, True, True,
                                                                       True]


def test_the_age_bound_hides_then_drops_old_records(tmp_path: Path) -> None:
    s = store(tmp_path / "r.db", max_age=60)
    s.put(record("resp_old", created=time.time() - 120))
    assert s.get("resp_old", "") is None  # expired: gone for reads at once
    s.put(record("resp_new"))
    assert s.count() == 1 and s.get("resp_new", "") is not None


def test_the_byte_bound_drops_the_oldest_and_never_the_newest(tmp_path: Path) -> None:
    noise = os.urandom(3000).hex()  # incompressible: each record is ~4.5 KiB compressed
    s = store(tmp_path / "r.db", max_bytes=10_000)
    for i in range(4):
        s.put(record(f"resp_{i}", text=noise + str(i), created=time.time() + i))
    kept = [i for i in range(4) if s.get(f"resp_{i}", "") is not None]
    assert kept == [2, 3]
    too_big = os.urandom(20000).hex()
    s.put(record("resp_huge", text=too_big, created=time.time() + 10))
    assert s.get("resp_huge", "") is None and s.count() == 2  # refused whole, nothing lost


def test_zero_count_stores_nothing(tmp_path: Path) -> None:
    s = store(tmp_path / "r.db", max_count=0)
    s.put(record("resp_a"))
    assert s.get("resp_a", "") is None and not (tmp_path / "r.db").exists()


def test_a_damaged_file_is_kept_aside_and_a_new_one_started(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    path = tmp_path / "r.db"
    path.write_bytes(b"this is not a database" * 100)
    s = store(path)
    s.put(record("resp_a"))
    assert s.get("resp_a", "") is not None
    (aside,) = tmp_path.glob("r.db.unreadable-*")
    assert aside.read_bytes() == b"this is not a database" * 100
    assert "unreadable" in caplog.text


def test_settings_bound_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLLAMA_RESPONSES_MAX", "7")
    monkeypatch.setenv("POLLAMA_RESPONSES_MAX_AGE", "2h")
    monkeypatch.setenv("POLLAMA_RESPONSES_MAX_BYTES", "12345")
    s = load_settings()
    assert (s.responses_max, s.responses_max_age, s.responses_max_bytes) == (7, 7200.0, 12345)
    assert s.responses_path == s.home / "responses.sqlite3"


def test_reads_of_an_empty_store_create_no_file(tmp_path: Path) -> None:
    s = store(tmp_path / "r.db")
    assert s.get("resp_a", "") is None and s.delete("resp_a", "") is False and s.count() == 0
    assert not (tmp_path / "r.db").exists()
