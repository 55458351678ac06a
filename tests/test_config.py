"""Settings from OLLAMA_* variables, mirroring Ollama's ``envconfig/config_test.go``."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from pollama.config import (
    FOREVER_SECONDS,
    RUN_ENV_VARS,
    SERVE_ENV_VARS,
    HostAddress,
    Settings,
    describe_env,
    env_help,
    load_settings,
    parse_host,
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_defaults(home: Path) -> None:
    s = load_settings({"HOME": str(home)})
    assert s.host == HostAddress("http", "127.0.0.1", 11434, "")
    assert str(s.host) == s.host.url == "http://127.0.0.1:11434"
    assert s.models == home / ".ollama" / "models"
    assert s.home == home / ".ollama"
    assert s.history_path == home / ".ollama" / "history"
    assert s.keep_alive == 300.0
    assert s.load_timeout == 300.0
    assert s.num_parallel == 1
    assert s.max_loaded_models == 0
    assert s.max_queue == 512
    assert s.context_length == 0
    assert s.log_level == 0 and not s.debug and s.python_log_level == logging.INFO
    assert s.flash_attention is None
    assert s.igpu_enable is None
    assert s.kv_cache_type == ""
    assert (s.noprune, s.nohistory, s.sched_spread, s.no_cloud, s.auth) == (False,) * 5
    assert (s.vulkan, s.go_template) == (True, True)
    assert s.debug_log_requests is False
    assert s.gpu_overhead == 0
    assert s.max_transfer_streams == 4
    assert s.remotes == ("ollama.com",)
    assert s.origins == ()
    assert s.experiment == ()
    assert s.api_key is None
    assert s.editor == "" and s.llm_library == ""


def test_slow_client_settings(home: Path) -> None:
    """Each phase of a request has its own deadline, and one address a connection cap."""
    s = load_settings({"HOME": str(home)})
    assert (s.header_timeout, s.client_timeout, s.body_timeout) == (5.0, 30.0, 60.0)
    assert s.min_upload_rate == 256 << 10
    assert (s.max_connections, s.max_connections_per_client) == (1024, 64)
    s = load_settings({"HOME": str(home), "POLLAMA_HEADER_TIMEOUT": "2s",
                       "POLLAMA_BODY_TIMEOUT": "1m30s", "POLLAMA_MIN_UPLOAD_RATE": "0",
                       "POLLAMA_MAX_CONNECTIONS_PER_CLIENT": "8"})  # fmt: skip
    assert (s.header_timeout, s.body_timeout) == (2.0, 90.0)
    assert (s.min_upload_rate, s.max_connections_per_client) == (0, 8)
    s = load_settings({"HOME": str(home), "POLLAMA_MAX_CONNECTIONS_PER_CLIENT": "-1"})
    assert s.max_connections_per_client == 64  # not a count: the default is kept


def test_settings_reads_os_environ(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "4")
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:8080")
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    s = Settings()
    assert s.num_parallel == 4
    assert s.host.port == 8080
    assert s.models == home / ".ollama" / "models"
    assert load_settings().num_parallel == 4
    # keyword arguments win over the environment
    assert Settings(num_parallel=2).num_parallel == 2
    assert load_settings(num_parallel=3).num_parallel == 3


def test_given_mapping_ignores_os_environ(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "4")
    assert load_settings({"HOME": str(home)}).num_parallel == 1


def test_models_override_and_frozen(home: Path) -> None:
    s = load_settings({"HOME": str(home), "OLLAMA_MODELS": " '/data/models' "})
    assert s.models == Path("/data/models")
    assert s.home == home / ".ollama"  # keys and history stay in ~/.ollama
    with pytest.raises(ValidationError):
        s.num_parallel = 3  # type: ignore[misc]


# envconfig TestHost
@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("", "http://127.0.0.1:11434"),
        ("1.2.3.4", "http://1.2.3.4:11434"),
        (":1234", "http://:1234"),
        ("1.2.3.4:1234", "http://1.2.3.4:1234"),
        ("example.com", "http://example.com:11434"),
        ("example.com:1234", "http://example.com:1234"),
        (":0", "http://:0"),
        (":66000", "http://:11434"),
        (":-1", "http://:11434"),
        ("[::1]", "http://[::1]:11434"),
        ("[::]", "http://[::]:11434"),
        ("::1", "http://[::1]:11434"),
        ("[::1]:1337", "http://[::1]:1337"),
        (" 1.2.3.4 ", "http://1.2.3.4:11434"),
        ('"1.2.3.4"', "http://1.2.3.4:11434"),
        (' " 1.2.3.4 " ', "http://1.2.3.4:11434"),
        ("'1.2.3.4'", "http://1.2.3.4:11434"),
        ("http://1.2.3.4", "http://1.2.3.4:80"),
        ("http://1.2.3.4:4321", "http://1.2.3.4:4321"),
        ("https://1.2.3.4", "https://1.2.3.4:443"),
        ("https://1.2.3.4:4321", "https://1.2.3.4:4321"),
        ("https://example.com/ollama", "https://example.com:443/ollama"),
        ("ollama.com", "https://ollama.com:443"),
        ("0.0.0.0", "http://0.0.0.0:11434"),
        ("localhost:abc", "http://localhost:11434"),
        ("host:", "http://host:11434"),
    ],
)
def test_host_forms(value: str, expect: str, home: Path) -> None:
    assert str(parse_host(value)) == expect
    assert str(load_settings({"HOME": str(home), "OLLAMA_HOST": value}).host) == expect


# envconfig TestConnectableHost: what clients dial
@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("", "http://127.0.0.1:11434"),
        ("127.0.0.1", "http://127.0.0.1:11434"),
        ("127.0.0.1:1234", "http://127.0.0.1:1234"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("0.0.0.0:1234", "http://127.0.0.1:1234"),
        ("[::]", "http://[::1]:11434"),
        ("[::]:1234", "http://[::1]:1234"),
        ("[::1]", "http://[::1]:11434"),
        ("[::1]:1234", "http://[::1]:1234"),
        ("192.168.1.5", "http://192.168.1.5:11434"),
        ("192.168.1.5:8080", "http://192.168.1.5:8080"),
        ("example.com", "http://example.com:11434"),
        ("example.com:1234", "http://example.com:1234"),
        ("https://0.0.0.0:4321", "https://127.0.0.1:4321"),
        (":8080", "http://127.0.0.1:8080"),
        ("https://example.com/ollama", "https://example.com:443/ollama"),
    ],
)
def test_host_client_url(value: str, expect: str) -> None:
    assert parse_host(value).url == expect


def test_host_bind_address() -> None:
    assert (parse_host("").bind_host, parse_host("").port) == ("127.0.0.1", 11434)
    assert parse_host("0.0.0.0:8080").bind_host == "0.0.0.0"
    assert parse_host(":8080").bind_host == "0.0.0.0"
    assert parse_host("[::1]:9").bind_host == "::1"
    assert parse_host("[::1]:9").netloc == "[::1]:9"


@pytest.mark.parametrize(
    ("value", "local"),
    [
        ("", True),
        ("localhost:8080", True),
        ("0.0.0.0", True),
        ("[::]:1", True),
        ("::1", True),
        ("127.0.0.2", True),
        ("http://127.0.0.1/x", True),
        (":8080", False),  # Go's isLocalhost: an empty host is not parsed as an IP
        ("192.168.1.5", False),
        ("example.com", False),
        ("ollama.com", False),
    ],
)
def test_host_is_local(value: str, local: bool) -> None:
    assert parse_host(value).is_local is local


def test_invalid_port_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pollama.config"):
        assert parse_host(":99999").port == 11434
    assert "invalid port" in caplog.text


# envconfig TestBool
@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("t", True),
        ("F", False),
        ("TRUE", True),
        ("False", False),
        ("random", True),
        ("something", True),
        ("no", True),  # not a ParseBool spelling: any non-empty value counts as true
        (" 'false' ", False),
        ('"0"', False),
    ],
)
def test_bool_parsing(value: str, expect: bool, home: Path) -> None:
    s = load_settings({"HOME": str(home), "OLLAMA_NOPRUNE": value, "OLLAMA_VULKAN": value})
    assert s.noprune is expect
    assert s.vulkan is expect


def test_empty_bool_keeps_default(home: Path) -> None:
    s = load_settings({"HOME": str(home), "OLLAMA_NOPRUNE": "  ", "OLLAMA_GO_TEMPLATE": ""})
    assert s.noprune is False
    assert s.go_template is True


def test_tristate_bools(home: Path) -> None:
    assert load_settings({"HOME": str(home), "OLLAMA_FLASH_ATTENTION": "1"}).flash_attention
    assert load_settings({"HOME": str(home), "OLLAMA_FLASH_ATTENTION": "0"}).flash_attention is (
        False
    )
    assert load_settings({"HOME": str(home), "OLLAMA_IGPU_ENABLE": "x"}).igpu_enable is True


# envconfig TestUint
@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("0", 0),
        ("1", 1),
        ("1337", 1337),
        ("", 512),
        ("-1", 512),
        ("0o10", 512),
        ("0x10", 512),
        ("string", 512),
        ("1_000", 512),
        ("+5", 512),
        ("18446744073709551616", 512),
    ],
)
def test_uint_parsing(value: str, expect: int, home: Path) -> None:
    assert load_settings({"HOME": str(home), "OLLAMA_MAX_QUEUE": value}).max_queue == expect


def test_invalid_uint_warns(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pollama.config"):
        assert load_settings({"HOME": str(home), "OLLAMA_NUM_PARALLEL": "two"}).num_parallel == 1
    assert "OLLAMA_NUM_PARALLEL" in caplog.text


# envconfig TestKeepAlive (seconds; Go's MaxInt64 "forever" is FOREVER_SECONDS = inf)
@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("", 300.0),
        ("1s", 1.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("5m0s", 300.0),
        ("1h2m3s", 3723.0),
        ("0", 0.0),
        ("60", 60.0),
        ("120", 120.0),
        ("3600", 3600.0),
        ("-0", 0.0),
        ("-1", FOREVER_SECONDS),
        ("-1m", FOREVER_SECONDS),
        ("1.5s", 1.5),
        ("300ms", 0.3),
        (" ", 300.0),
        ("???", 300.0),
        ("1d", 300.0),
        ("1y", 300.0),
        ("1w", 300.0),
        ("'10m'", 600.0),
    ],
)
def test_keep_alive(value: str, expect: float, home: Path) -> None:
    assert load_settings({"HOME": str(home), "OLLAMA_KEEP_ALIVE": value}).keep_alive == expect


# envconfig TestLoadTimeout
@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("", 300.0),
        ("1s", 1.0),
        ("1h2m3s", 3723.0),
        ("0", FOREVER_SECONDS),
        ("60", 60.0),
        ("-0", FOREVER_SECONDS),
        ("-1", FOREVER_SECONDS),
        ("-1m", FOREVER_SECONDS),
        ("???", 300.0),
        ("1d", 300.0),
    ],
)
def test_load_timeout(value: str, expect: float, home: Path) -> None:
    s = load_settings({"HOME": str(home), "OLLAMA_LOAD_TIMEOUT": value})
    assert s.load_timeout == expect


def test_forever_is_infinite() -> None:
    assert FOREVER_SECONDS == math.inf
    assert Settings(keep_alive=-5).keep_alive == math.inf
    assert Settings(load_timeout=0).load_timeout == math.inf
    assert Settings(keep_alive=0).keep_alive == 0.0
    assert Settings(keep_alive="2h").keep_alive == 7200.0


# envconfig TestVar: whitespace and quotes
@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("value", "value"),
        (" value ", "value"),
        (" 'value' ", "value"),
        (' "value" ', "value"),
        (" ' value ' ", " value "),
        (' " value " ', " value "),
    ],
)
def test_quote_stripping(value: str, expect: str, home: Path) -> None:
    assert load_settings({"HOME": str(home), "OLLAMA_KV_CACHE_TYPE": value}).kv_cache_type == (
        expect
    )


# envconfig TestLogLevel, as slog levels
@pytest.mark.parametrize(
    ("value", "level", "python_level"),
    [
        ("", 0, logging.INFO),
        ("false", 0, logging.INFO),
        ("f", 0, logging.INFO),
        ("0", 0, logging.INFO),
        ("true", -4, logging.DEBUG),
        ("t", -4, logging.DEBUG),
        ("1", -4, logging.DEBUG),
        ("2", -8, 5),
        ("-1", 4, logging.WARNING),
        ("-2", 8, logging.ERROR),
    ],
)
def test_log_level(value: str, level: int, python_level: int, home: Path) -> None:
    s = load_settings({"HOME": str(home), "OLLAMA_DEBUG": value})
    assert s.log_level == level
    assert s.python_log_level == python_level
    assert s.debug is (level <= -4)


def test_context_length(home: Path) -> None:
    assert load_settings({"HOME": str(home)}).context_length == 0
    s = load_settings({"HOME": str(home), "OLLAMA_CONTEXT_LENGTH": "2048"})
    assert s.context_length == 2048


_BUILTIN_ORIGINS = [
    "http://localhost",
    "https://localhost",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1",
    "https://127.0.0.1",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://0.0.0.0",
    "https://0.0.0.0",
    "http://0.0.0.0:*",
    "https://0.0.0.0:*",
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
]


# envconfig TestOrigins
@pytest.mark.parametrize(
    ("value", "extra"),
    [
        ("", []),
        ("http://10.0.0.1", ["http://10.0.0.1"]),
        ("http://172.16.0.1,https://192.168.0.1", ["http://172.16.0.1", "https://192.168.0.1"]),
    ],
)
def test_allowed_origins(value: str, extra: list[str], home: Path) -> None:
    s = load_settings({"HOME": str(home), "OLLAMA_ORIGINS": value})
    assert s.allowed_origins() == extra + _BUILTIN_ORIGINS


def test_lists(home: Path) -> None:
    s = load_settings(
        {
            "HOME": str(home),
            "OLLAMA_REMOTES": "ollama.com,example.com",
            "OLLAMA_EXPERIMENT": "a, b,,",
        }
    )
    assert s.remotes == ("ollama.com", "example.com")
    assert s.experiment == ("a", "b")


def test_strings_and_secrets(home: Path) -> None:
    s = load_settings(
        {
            "HOME": str(home),
            "OLLAMA_API_KEY": "sk-123",
            "OLLAMA_EDITOR": "vim",
            "OLLAMA_LLM_LIBRARY": "cpu",
            "OLLAMA_GPU_OVERHEAD": "1073741824",
            "OLLAMA_AUTH": "1",
        }
    )
    assert (s.api_key, s.editor, s.llm_library) == ("sk-123", "vim", "cpu")
    assert s.gpu_overhead == 1073741824
    assert s.auth is True
    assert "sk-123" not in repr(s)


def test_describe_env_and_help() -> None:
    pairs = describe_env()
    assert [name for name, _ in pairs] == list(SERVE_ENV_VARS)
    assert dict(pairs)["OLLAMA_HOST"] == (
        "IP Address for the ollama server (default 127.0.0.1:11434)"
    )
    assert all(description for _, description in pairs)
    text = env_help(RUN_ENV_VARS)
    assert text.startswith("\nEnvironment Variables:\n")
    assert "      OLLAMA_EDITOR                 Path to editor" in text
    assert "      OLLAMA_MAX_TRANSFER_STREAMS   Maximum parallel" in env_help()
    assert env_help(None) == env_help(SERVE_ENV_VARS) == env_help(iter(SERVE_ENV_VARS))
    assert describe_env(["OLLAMA_NOPE", "OLLAMA_HOST"]) == [
        ("OLLAMA_HOST", "IP Address for the ollama server (default 127.0.0.1:11434)")
    ]


def test_every_field_has_an_env_var_and_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
        if name == "presets":  # the file's [models."name"] tables: no variable can hold them
            continue
        extra = field.json_schema_extra
        assert isinstance(extra, dict) and isinstance(extra.get("env"), str), name


def test_settings_json_round_trip(home: Path) -> None:
    s = load_settings({"HOME": str(home), "OLLAMA_HOST": "0.0.0.0:1"})
    data = json.loads(s.model_dump_json())
    assert data["host"]["port"] == 1
