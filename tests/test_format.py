"""Formatting helpers, checked against the tables of Ollama's ``format/*_test.go`` and Go's
``time``/``strconv``/``fmt`` behaviour."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from pollama.format import (
    go_duration,
    go_duration_from_seconds,
    go_quote,
    go_value,
    human_bytes,
    human_number,
    human_time,
    parse_go_duration,
    parse_go_duration_ns,
    parse_rfc3339,
    rfc3339_local,
    rfc3339_utc,
)


# format/bytes_test.go TestHumanBytes, plus the >= 10 truncation rule
@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (999, "999 B"),
        (1000, "1 KB"),
        (1500, "1.5 KB"),
        (999999, "999 KB"),
        (1000000, "1 MB"),
        (1500000, "1.5 MB"),
        (999999999, "999 MB"),
        (1000000000, "1 GB"),
        (1500000000, "1.5 GB"),
        (999999999999, "999 GB"),
        (1000000000000, "1 TB"),
        (1500000000000, "1.5 TB"),
        (1999999999999, "2.0 TB"),
        (1234, "1.2 KB"),
        (1234567, "1.2 MB"),
        (1234567890, "1.2 GB"),
        (4_661_224_676, "4.7 GB"),
        (19_900_000_000, "19 GB"),
        (98_000_000, "98 MB"),
        (5_000_000_000_000_000, "5000 TB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


# format/format_test.go TestHumanNumber, plus the spec's examples
@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1K"),
        (1001, "1K"),
        (1000000, "1M"),
        (125000000, "125M"),
        (500500000, "500.50M"),
        (500550000, "500.55M"),
        (1000000000, "1B"),
        (2800000000, "2.8B"),
        (2850000000, "2.9B"),
        (1000000000000, "1000B"),
        (8_030_261_248, "8.0B"),
        (8_000_000_000, "8B"),
        (7_615_616_512, "7.6B"),
        (137_000_000, "137M"),
        (22_710_000, "22.71M"),
        (134_515_008, "134.52M"),
        (10_000, "10K"),
        (1_500, "2K"),
    ],
)
def test_human_number(n: int, text: str) -> None:
    assert human_number(n) == text


NOW = datetime(2025, 5, 10, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(0), "Less than a second ago"),
        (timedelta(milliseconds=999), "Less than a second ago"),
        (timedelta(seconds=1), "1 second ago"),
        (timedelta(seconds=59), "59 seconds ago"),
        (timedelta(seconds=60), "About a minute ago"),
        (timedelta(seconds=119), "About a minute ago"),
        (timedelta(minutes=2), "2 minutes ago"),
        (timedelta(minutes=59, seconds=59), "59 minutes ago"),
        (timedelta(minutes=60), "About an hour ago"),
        (timedelta(minutes=89), "About an hour ago"),
        (timedelta(minutes=90), "2 hours ago"),  # math.Round: half away from zero
        (timedelta(hours=47), "47 hours ago"),
        (timedelta(hours=48), "2 days ago"),
        (timedelta(days=4), "4 days ago"),
        (timedelta(days=13, hours=23), "13 days ago"),
        (timedelta(days=14), "2 weeks ago"),
        (timedelta(days=59), "8 weeks ago"),
        (timedelta(days=60), "2 months ago"),
        (timedelta(days=729), "24 months ago"),
        (timedelta(days=730), "2 years ago"),
        (timedelta(days=3650), "10 years ago"),
        (-timedelta(hours=48), "2 days from now"),
        (-timedelta(milliseconds=800), "Less than a second from now"),
        (-timedelta(minutes=4, seconds=59), "4 minutes from now"),
        (-timedelta(days=365 * 200), "Forever"),
        (-timedelta(days=365 * 20), "20 years from now"),
    ],
)
def test_human_time(delta: timedelta, text: str) -> None:
    assert human_time(NOW - delta, now=NOW) == text


def test_human_time_zero_values() -> None:
    assert human_time(None) == "Never"
    assert human_time(None, zero="never") == "never"
    assert human_time(datetime(1, 1, 1, tzinfo=UTC), now=NOW) == "Never"
    assert human_time(datetime(1, 1, 1), now=NOW, zero="") == ""


def test_human_time_mixes_naive_and_aware() -> None:
    local_now = datetime.now().astimezone()
    assert human_time(local_now.replace(tzinfo=None) - timedelta(days=3), now=local_now) == (
        "3 days ago"
    )
    assert human_time(datetime.now(UTC) - timedelta(hours=3)) == "3 hours ago"


# Go time.Duration.String()
@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (1, "1ns"),
        (999, "999ns"),
        (1_000, "1µs"),
        (1_100, "1.1µs"),
        (2_200_000, "2.2ms"),
        (812_500_000, "812.5ms"),
        (1_000_000_000, "1s"),
        (3_123_456_789, "3.123456789s"),
        (62_500_000_000, "1m2.5s"),
        (60_000_000_000, "1m0s"),
        (3_600_000_000_000, "1h0m0s"),
        (4_000_000_000_000, "1h6m40s"),
        (-1, "-1ns"),
        (-90_000_000_000, "-1m30s"),
        (2**63 - 1, "2562047h47m16.854775807s"),
        (-(2**63), "-2562047h47m16.854775808s"),
    ],
)
def test_go_duration(ns: int, text: str) -> None:
    assert go_duration(ns) == text


def test_go_duration_from_seconds() -> None:
    assert go_duration_from_seconds(300) == "5m0s"
    assert go_duration_from_seconds(1.5) == "1.5s"
    assert go_duration_from_seconds(0.0125) == "12.5ms"


# Go time.ParseDuration
@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("-0", 0),
        ("+0", 0),
        ("5s", 5 * 10**9),
        ("30s", 30 * 10**9),
        ("1478s", 1478 * 10**9),
        ("-5s", -5 * 10**9),
        ("+5s", 5 * 10**9),
        ("-0s", 0),
        ("5.0s", 5 * 10**9),
        ("5.6s", 5_600_000_000),
        ("5.s", 5 * 10**9),
        (".5s", 500_000_000),
        ("1.004s", 1_004_000_000),
        ("100.00100s", 100_001_000_000),
        ("10ns", 10),
        ("11us", 11_000),
        ("12µs", 12_000),
        ("12μs", 12_000),
        ("13ms", 13_000_000),
        ("14s", 14 * 10**9),
        ("15m", 15 * 60 * 10**9),
        ("16h", 16 * 3600 * 10**9),
        ("3h30m", (3 * 3600 + 30 * 60) * 10**9),
        ("10.5s4m", (4 * 60 + 10) * 10**9 + 500_000_000),
        ("-2m3.4s", -(2 * 60 * 10**9 + 3_400_000_000)),
        ("1h2m3s4ms5us6ns", 3_723_004_005_006),
        ("39h9m14.425s", 140_954_425_000_000),
        ("52763797000ns", 52_763_797_000),
        ("0.3333333333333333333h", 20 * 60 * 10**9),
        ("9007199254740993ns", 9_007_199_254_740_993),
        ("9223372036854775807ns", 2**63 - 1),
        ("9223372036.854775807s", 2**63 - 1),
        ("-9223372036854775808ns", -(2**63)),
        ("0.100000000000000000000h", 360 * 10**9),
        ("0.830103483285477580700h", 2_988_372_539_827),
    ],
)
def test_parse_go_duration(text: str, ns: int) -> None:
    assert parse_go_duration_ns(text) == ns
    assert parse_go_duration(text) == ns / 10**9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'time: invalid duration ""'),
        ("3", 'time: missing unit in duration "3"'),
        ("3600", 'time: missing unit in duration "3600"'),
        ("-", 'time: invalid duration "-"'),
        ("s", 'time: invalid duration "s"'),
        (".", 'time: invalid duration "."'),
        ("-.", 'time: invalid duration "-."'),
        (".s", 'time: invalid duration ".s"'),
        ("+.s", 'time: invalid duration "+.s"'),
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        ("1w", 'time: unknown unit "w" in duration "1w"'),
        # Go's time.quote writes each UTF-8 byte of a non-ASCII or control character as \xNN
        ("\x85\x85", 'time: invalid duration "\\xc2\\x85\\xc2\\x85"'),
        ("5µ", 'time: unknown unit "\\xc2\\xb5" in duration "5\\xc2\\xb5"'),
        ('1"x', 'time: unknown unit "\\"x" in duration "1\\"x"'),
        ("1\tm", 'time: unknown unit "\\x09m" in duration "1\\x09m"'),
        ("9223372036854775808ns", 'time: invalid duration "9223372036854775808ns"'),
        ("9223372036854775.808us", 'time: invalid duration "9223372036854775.808us"'),
        ("-9223372036854775809ns", 'time: invalid duration "-9223372036854775809ns"'),
        (" 5m", 'time: invalid duration " 5m"'),
    ],
)
def test_parse_go_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_go_duration_ns(text)
    assert str(info.value) == message


# fmt.Sprintf("%#v", v) on JSON-decoded values (numbers are float64)
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (4096, "4096"),
        (4096.0, "4096"),
        (0.7, "0.7"),
        (0.9, "0.9"),
        (-1, "-1"),
        (0, "0"),
        (1.1, "1.1"),
        (999999, "999999"),
        (123456.5, "123456.5"),
        (1000000, "1e+06"),
        (1234567, "1.234567e+06"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-7, "1.5e-07"),
        (1e21, "1e+21"),
        (1e100, "1e+100"),
        (608863452348.1149, "6.088634523481149e+11"),
        (0.1 + 0.2, "0.30000000000000004"),
        (True, "true"),
        (False, "false"),
        (None, "<nil>"),
        ([None], "[]interface {}{interface {}(nil)}"),
        ("<|eot_id|>", '"<|eot_id|>"'),
        ('say "hi"\n', '"say \\"hi\\"\\n"'),
        ("a\\b", '"a\\\\b"'),
        ("tab\there", '"tab\\there"'),
        ("\x00\x1b\x7f", '"\\x00\\x1b\\x7f"'),
        ("\a\b\f\r\v", '"\\a\\b\\f\\r\\v"'),
        ("héllo 世界 😀", '"héllo 世界 😀"'),
        ("\u00a0\u00ad\u2028\u200b", '"\\u00a0\\u00ad\\u2028\\u200b"'),
        ("\U000e0001", '"\\U000e0001"'),
        (["a", 1], '[]interface {}{"a", 1}'),
        ({"b": 2, "a": "x"}, 'map[string]interface {}{"a":"x", "b":2}'),
    ],
)
def test_go_value(value: object, text: str) -> None:
    assert go_value(value) == text


def test_go_quote_matches_show_parameter_lines() -> None:
    line = f"{'stop':<30} {go_quote('<|eot_id|>')}"
    assert line == 'stop                           "<|eot_id|>"'


def test_rfc3339_utc() -> None:
    assert rfc3339_utc(datetime(2024, 9, 12, 21, 17, 29, 110811, tzinfo=UTC)) == (
        "2024-09-12T21:17:29.110811Z"
    )
    assert rfc3339_utc(datetime(2024, 9, 12, 21, 17, 29, tzinfo=UTC)) == "2024-09-12T21:17:29Z"
    assert rfc3339_utc(datetime(2024, 9, 12, 21, 17, 29, 500000, tzinfo=UTC)) == (
        "2024-09-12T21:17:29.5Z"
    )
    offset = timezone(timedelta(hours=-7))
    assert rfc3339_utc(datetime(2025, 5, 10, 8, 6, 48, tzinfo=offset)) == "2025-05-10T15:06:48Z"
    assert rfc3339_utc(1_746_889_608_639_712_648) == "2025-05-10T15:06:48.639712648Z"
    assert rfc3339_utc(1_746_889_608_000_000_000) == "2025-05-10T15:06:48Z"
    # Go pads the year to four digits
    assert rfc3339_utc(datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0999-01-02T03:04:05Z"


def test_rfc3339_local(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset")
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        assert rfc3339_local(1_746_889_608_639_712_648) == "2025-05-10T08:06:48.639712648-07:00"
        assert rfc3339_local(1_736_500_000_000_000_000) == "2025-01-10T01:06:40-08:00"
        monkeypatch.setenv("TZ", "Asia/Kolkata")
        time.tzset()
        assert rfc3339_local(1_746_889_608_100_000_000) == "2025-05-10T20:36:48.1+05:30"
        monkeypatch.setenv("TZ", "UTC")
        time.tzset()
        # Go prints Z for a zero offset even in the local zone.
        assert rfc3339_local(1_746_889_608_000_000_000) == "2025-05-10T15:06:48Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_parse_rfc3339_round_trip() -> None:
    parsed = parse_rfc3339("2025-05-10T08:06:48.639712648-07:00")
    assert parsed == datetime(2025, 5, 10, 15, 6, 48, 639712, tzinfo=UTC)
    assert parse_rfc3339("2024-09-12T21:17:29.110811Z") == datetime(
        2024, 9, 12, 21, 17, 29, 110811, tzinfo=UTC
    )
