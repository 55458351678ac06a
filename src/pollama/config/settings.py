"""Settings, read once from the ``OLLAMA_*`` environment variables with Ollama's rules.

Ollama reads its environment lazily through ``envconfig`` getters; pollama reads it once,
into a frozen :class:`Settings` that ``main`` builds and passes down (``create_app(settings)``,
the scheduler, the store). No module here holds state.

Value rules, as in Go's ``envconfig.Var`` and friends:

* surrounding whitespace, then ``"``/``'`` quotes, are stripped; an empty result means unset;
* booleans use ``strconv.ParseBool`` (``1 t T TRUE true True 0 f F FALSE false False``,
  :func:`pollama.options.go_parse_bool`) and **any other non-empty value counts as true**;
* counts are unsigned decimal integers; anything else logs a warning and keeps the default;
* ``OLLAMA_KEEP_ALIVE`` and ``OLLAMA_LOAD_TIMEOUT`` take a Go duration (``5m``, ``1h30m``)
  or integer seconds; unparsable values keep the default. A negative keep-alive (and a
  load timeout <= 0) means forever, stored as :data:`FOREVER_SECONDS` (``math.inf``);
* ``OLLAMA_HOST`` is parsed like Go ``envconfig.Host`` into a :class:`HostAddress`.

Each field's ``description`` is the text ``pollama serve --help`` prints (Ollama's own
wording where Ollama has the variable); :func:`describe_env` and :func:`env_help` render it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pollama.config.file import ConfigFile, ConfigFileError, find_config, read_config
from pollama.config.presets import ModelPreset
from pollama.format import NANOSECONDS_PER_SECOND, parse_go_duration_ns
from pollama.options import DEFAULT_NUM_CTX, go_parse_bool

__all__ = [
    "CLIENT_ENV_VARS",
    "ConfigFileError",
    "DEFAULT_PORT",
    "FOREVER_SECONDS",
    "RUN_ENV_VARS",
    "SERVE_ENV_VARS",
    "HostAddress",
    "Settings",
    "describe_env",
    "env_help",
    "load_settings",
    "config_path",
    "parse_host",
    "read_config_file",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 11434
FOREVER_SECONDS = math.inf
"""What "keep loaded forever" is stored as. Go stores ``time.Duration(math.MaxInt64)``
(about 292 years); code that turns a keep-alive into a date must treat ``inf`` as "never
expires" (``ollama ps`` shows ``Forever`` for anything over 20 years away)."""

# The variables each command's --help lists, in Ollama's order (cmd/cmd.go). Ollama's serve
# list also names LLAMA_ARG_FIT and LLAMA_ARG_FIT_TARGET, which tune its llama-server
# subprocess; pollama runs llama.cpp in-process in its worker and has no use for them.
SERVE_ENV_VARS: tuple[str, ...] = (
    "OLLAMA_DEBUG",
    "OLLAMA_HOST",
    "OLLAMA_CONTEXT_LENGTH",
    "OLLAMA_KEEP_ALIVE",
    "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_MAX_TRANSFER_STREAMS",
    "OLLAMA_MAX_QUEUE",
    "OLLAMA_MODELS",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_NO_CLOUD",
    "OLLAMA_NOPRUNE",
    "OLLAMA_ORIGINS",
    "OLLAMA_SCHED_SPREAD",
    "OLLAMA_FLASH_ATTENTION",
    "OLLAMA_KV_CACHE_TYPE",
    "OLLAMA_LLM_LIBRARY",
    "OLLAMA_GPU_OVERHEAD",
    "OLLAMA_IGPU_ENABLE",
    "OLLAMA_LOAD_TIMEOUT",
    "OLLAMA_RPC_SERVERS",
    # pollama's own (security and operations; see keys.py, server/security.py, limits.py)
    "POLLAMA_CONFIG",
    "POLLAMA_KEYS_FILE",
    "POLLAMA_API_KEY",
    "POLLAMA_ALLOW_NO_AUTH",
    "POLLAMA_ALLOWED_HOSTS",
    "POLLAMA_MAX_BODY_SIZE",
    "POLLAMA_MAX_UPLOADS",
    "POLLAMA_HEADER_TIMEOUT",
    "POLLAMA_CLIENT_TIMEOUT",
    "POLLAMA_BODY_TIMEOUT",
    "POLLAMA_MIN_UPLOAD_RATE",
    "POLLAMA_MAX_CONNECTIONS",
    "POLLAMA_MAX_CONNECTIONS_PER_CLIENT",
    "POLLAMA_MAX_IMAGES",
    "POLLAMA_MAX_IMAGE_BYTES",
    "POLLAMA_MAX_IMAGE_PIXELS",
    "POLLAMA_MAX_AUDIO_BYTES",
    "POLLAMA_MAX_AUDIO_SECONDS",
    "POLLAMA_ACCESS_LOG",
    "POLLAMA_LOG_PROMPTS",
    "POLLAMA_REQUIRE_GPU",
    "POLLAMA_KV_CACHE_MAX_BYTES",
    "POLLAMA_SPARE_WORKER",
    # pollama's own (registry transfers; see registry/hosts.py, registry/download.py)
    "POLLAMA_REGISTRY_HOSTS",
    "POLLAMA_PULL_STALL_TIMEOUT",
    "POLLAMA_SERVE_REGISTRY",
)
RUN_ENV_VARS: tuple[str, ...] = ("OLLAMA_EDITOR", "OLLAMA_HOST", "OLLAMA_NOHISTORY")
CLIENT_ENV_VARS: tuple[str, ...] = ("OLLAMA_HOST",)


# -- Go value parsing ------------------------------------------------------------------------


def _go_var(raw: str) -> str:
    """Go ``envconfig.Var``: trim whitespace, then any run of ``"``/``'`` at either end."""
    return raw.strip().strip("\"'")


def _env_bool(text: str) -> bool:
    """Ollama's rule: a non-empty value that ParseBool rejects counts as true."""
    parsed = go_parse_bool(text)
    return True if parsed is None else parsed


_UINT_RE = re.compile(r"[0-9]+")
_INT_RE = re.compile(r"[+-]?[0-9]+")


def _go_parse_uint(text: str) -> int | None:
    """Go ``strconv.ParseUint(s, 10, 64)``: plain decimal digits, below 2**64."""
    if _UINT_RE.fullmatch(text) is None or int(text) >= 2**64:
        return None
    return int(text)


def _go_parse_int(text: str, bits: int = 64) -> int | None:
    """Go ``strconv.ParseInt(s, 10, bits)``: optional sign and decimal digits, in range."""
    if _INT_RE.fullmatch(text) is None:
        return None
    value = int(text)
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        return None
    return value


def _parse_duration_setting(text: str) -> float | None:
    """A Go duration, else integer seconds (Go KeepAlive/LoadTimeout); None if neither."""
    try:
        return parse_go_duration_ns(text) / NANOSECONDS_PER_SECOND
    except ValueError:
        pass
    seconds = _go_parse_int(text)
    return None if seconds is None else float(seconds)


def _parse_log_level(text: str) -> int | None:
    """Go ``envconfig.LogLevel`` as a slog level: true/1 = DEBUG (-4), n = -4*n (2 = TRACE)."""
    if go_parse_bool(text):
        return -4
    number = _go_parse_int(text)
    if number:
        return -4 * number
    return 0


# -- OLLAMA_HOST -----------------------------------------------------------------------------


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host_port(hostport: str) -> tuple[str, str] | None:
    """Go ``net.SplitHostPort``; None where Go returns an error."""
    colon = hostport.rfind(":")
    if colon < 0:
        return None
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or end + 1 != colon:
            return None
        host, inner_start, inner_end = hostport[1:end], 1, end + 1
    else:
        host = hostport[:colon]
        if ":" in host:
            return None
        inner_start = inner_end = 0
    if "[" in hostport[inner_start:] or "]" in hostport[inner_end:]:
        return None
    return host, hostport[colon + 1 :]


def _parse_ip(text: str) -> str | None:
    """Go ``net.ParseIP(text).String()``, or None when ``text`` is not an IP address."""
    if "%" in text:  # Go's ParseIP rejects zones
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@dataclass(frozen=True)
class HostAddress:
    """Where the server listens and clients connect (``OLLAMA_HOST``).

    ``host`` has no brackets; ``""`` means every interface (from ``:8080``). ``path`` is the
    part after the first ``/`` of a ``scheme://host/path`` value, without its leading slash.
    """

    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str = ""

    def __str__(self) -> str:
        """Go's ``envconfig.Host().String()``: ``http://127.0.0.1:11434``, ``http://:8080``."""
        return self._format(self.host)

    def _format(self, host: str) -> str:
        suffix = "/" + self.path if self.path else ""
        return f"{self.scheme}://{_join_host_port(host, self.port)}{suffix}"

    @property
    def connect_host(self) -> str:
        """The host a client dials: unspecified bind addresses become loopback (Go
        ``ConnectableHost``); an empty host, which Go's dialer takes as the local machine,
        becomes ``127.0.0.1`` too."""
        if self.host == "":
            return "127.0.0.1"
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            return self.host
        if address.is_unspecified:
            return "127.0.0.1" if address.version == 4 else "::1"
        return self.host

    @property
    def url(self) -> str:
        """Base URL for clients, e.g. ``http://127.0.0.1:11434`` (no trailing slash)."""
        return self._format(self.connect_host)

    @property
    def bind_host(self) -> str:
        """The address the server binds; an empty host binds every IPv4 interface."""
        return self.host or "0.0.0.0"

    @property
    def is_local(self) -> bool:
        """Whether the host is this machine: ``localhost`` or a loopback or unspecified IP
        (Go ``cmd.isLocalhost``; an empty host does not count, as in Go)."""
        if self.host == "localhost":
            return True
        ip = _parse_ip(self.host)
        if ip is None:
            return False
        address = ipaddress.ip_address(ip)
        return address.is_loopback or address.is_unspecified

    @property
    def netloc(self) -> str:
        """``host:port`` as Go's ``url.Host`` holds it (IPv6 in brackets)."""
        return _join_host_port(self.host, self.port)


def parse_host(value: str) -> HostAddress:
    """Parse an ``OLLAMA_HOST`` value exactly as Go ``envconfig.Host`` does.

    Forms: ``""`` (``127.0.0.1:11434``), ``host``, ``:port``, ``host:port``, ``[v6]:port``,
    bare ``::1``, ``scheme://host[:port][/path]``. Without a port, ``http://`` means 80,
    ``https://`` 443, no scheme 11434. The literal ``ollama.com`` is
    ``https://ollama.com:443``. A port that is not a number in 0-65535 logs a warning and
    falls back to the default port.
    """
    text = _go_var(value).strip()
    default_port = str(DEFAULT_PORT)
    scheme, sep, hostport = text.partition("://")
    if not sep:
        scheme, hostport = "http", text
        if text == "ollama.com":
            scheme, hostport = "https", "ollama.com:443"
    elif scheme == "http":
        default_port = "80"
    elif scheme == "https":
        default_port = "443"
    hostport, _, path = hostport.partition("/")
    split = _split_host_port(hostport)
    if split is None:
        host, port_text = "127.0.0.1", default_port
        ip = _parse_ip(hostport.strip("[]"))
        if ip is not None:
            host = ip
        elif hostport:
            host = hostport
    else:
        host, port_text = split
    port = _go_parse_int(port_text, bits=32)
    if port is None or not 0 <= port <= 65535:
        log.warning("invalid port, using default: port=%s default=%s", port_text, default_port)
        port = int(default_port)
    return HostAddress(scheme=scheme, host=host, port=port, path=path)


# -- the settings ----------------------------------------------------------------------------


def _env(name: str, default: Any = None, description: str = "", **kwargs: Any) -> Any:
    """A settings field read from the environment variable ``name``."""
    return Field(default, description=description, json_schema_extra={"env": name}, **kwargs)


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def _parse_rpc_servers(text: str) -> tuple[str, ...] | None:
    """``host:port,host:port`` (llama.cpp's ``--rpc`` form: an IPv4 address or a name, and
    a port); None (keep the default, with a warning) when any entry is not one."""
    servers = tuple(part.strip() for part in text.split(",") if part.strip())
    for server in servers:
        host, sep, port = server.partition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return None
    return tuple(dict.fromkeys(servers))


# How each kind of field turns a (stripped, non-empty) environment string into a value;
# None means "invalid: keep the default".
_STRING_PARSERS: dict[str, Callable[[str], Any]] = {
    "host": parse_host,
    "origins": _split_list,
    "remotes": lambda s: _split_list(s.strip()),
    "experiment": lambda s: tuple(part.strip() for part in s.split(",") if part.strip()),
    "keep_alive": _parse_duration_setting,
    "load_timeout": _parse_duration_setting,
    "log_level": _parse_log_level,
    "num_parallel": _go_parse_uint,
    "max_loaded_models": _go_parse_uint,
    "max_queue": _go_parse_uint,
    "context_length": _go_parse_uint,
    "gpu_overhead": _go_parse_uint,
    "max_transfer_streams": _go_parse_uint,
    "allowed_hosts": lambda s: tuple(p.strip() for p in s.split(",") if p.strip()),
    "max_body_size": _go_parse_uint,
    "max_uploads": _go_parse_uint,
    "header_timeout": _parse_duration_setting,
    "client_timeout": _parse_duration_setting,
    "body_timeout": _parse_duration_setting,
    "min_upload_rate": _go_parse_uint,
    "max_connections": _go_parse_uint,
    "max_connections_per_client": _go_parse_uint,
    "max_images": _go_parse_uint,
    "max_image_bytes": _go_parse_uint,
    "max_image_pixels": _go_parse_uint,
    "max_audio_bytes": _go_parse_uint,
    "max_audio_seconds": _go_parse_uint,
    "registry_hosts": lambda s: tuple(p.strip() for p in s.split(",") if p.strip()),
    "pull_stall_timeout": _parse_duration_setting,
    "responses_max": _go_parse_uint,
    "responses_max_age": _parse_duration_setting,
    "responses_max_bytes": _go_parse_uint,
    "kv_cache_max_bytes": _go_parse_uint,
    "rpc_servers": _parse_rpc_servers,
}
_BOOL_FIELDS = frozenset({
    "flash_attention", "noprune", "nohistory", "sched_spread", "igpu_enable", "vulkan",
    "go_template", "debug_log_requests", "no_cloud", "auth", "allow_no_auth", "log_prompts",
    "serve_registry", "require_gpu", "spare_worker",
})  # fmt: skip


class Settings(BaseSettings):
    """Every ``OLLAMA_*`` setting pollama honours, with Ollama's defaults.

    Build it once (``Settings()`` reads ``os.environ``; :func:`load_settings` takes any
    mapping) and pass it down; it is frozen. Keyword arguments override the environment:
    ``Settings(num_parallel=4)``.
    """

    model_config = SettingsConfigDict(frozen=True, extra="ignore", validate_default=False)

    host: HostAddress = _env(
        "OLLAMA_HOST", HostAddress(), "IP Address for the ollama server (default 127.0.0.1:11434)"
    )
    origins: tuple[str, ...] = _env(
        "OLLAMA_ORIGINS", (), "A comma separated list of allowed origins"
    )
    models: Path = _env("OLLAMA_MODELS", None, "The path to the models directory")
    keep_alive: float = _env(
        "OLLAMA_KEEP_ALIVE",
        300.0,
        'The duration that models stay loaded in memory (default "5m")',
    )
    num_parallel: int = _env("OLLAMA_NUM_PARALLEL", 1, "Maximum number of parallel requests")
    max_loaded_models: int = _env(
        "OLLAMA_MAX_LOADED_MODELS", 0, "Maximum number of loaded models per GPU"
    )
    max_queue: int = _env("OLLAMA_MAX_QUEUE", 512, "Maximum number of queued requests")
    context_length: int = _env(
        "OLLAMA_CONTEXT_LENGTH",
        0,
        "Context length to use unless otherwise specified "
        f"(default: {DEFAULT_NUM_CTX}, capped by the model's trained context)",
    )
    log_level: int = _env(
        "OLLAMA_DEBUG", 0, "Show additional debug information (e.g. OLLAMA_DEBUG=1)"
    )
    flash_attention: bool | None = _env("OLLAMA_FLASH_ATTENTION", None, "Enabled flash attention")
    kv_cache_type: str = _env(
        "OLLAMA_KV_CACHE_TYPE", "", "Quantization type for the K/V cache (default: f16)"
    )
    noprune: bool = _env("OLLAMA_NOPRUNE", False, "Do not prune model blobs on startup")
    load_timeout: float = _env(
        "OLLAMA_LOAD_TIMEOUT",
        300.0,
        'How long to allow model loads to stall before giving up (default "5m")',
    )
    nohistory: bool = _env("OLLAMA_NOHISTORY", False, "Do not preserve readline history")
    gpu_overhead: int = _env(
        "OLLAMA_GPU_OVERHEAD", 0, "Reserve a portion of VRAM per GPU (bytes)"
    )
    sched_spread: bool = _env(
        "OLLAMA_SCHED_SPREAD", False, "Always schedule model across all GPUs"
    )
    llm_library: str = _env(
        "OLLAMA_LLM_LIBRARY", "", "Set LLM library to bypass autodetection"
    )
    igpu_enable: bool | None = _env("OLLAMA_IGPU_ENABLE", None, "Enable integrated GPUs")
    vulkan: bool = _env("OLLAMA_VULKAN", True, "Enable Vulkan support")
    go_template: bool = _env(
        "OLLAMA_GO_TEMPLATE", True, "Enable Modelfile TEMPLATE based rendering when available"
    )
    debug_log_requests: bool = _env(
        "OLLAMA_DEBUG_LOG_REQUESTS",
        False,
        "Log inference request bodies and replay curl commands to a temp directory",
    )
    max_transfer_streams: int = _env(
        "OLLAMA_MAX_TRANSFER_STREAMS",
        4,
        "Maximum parallel transfer streams for safetensors model pulls/pushes (default 4)",
    )
    no_cloud: bool = _env(
        "OLLAMA_NO_CLOUD",
        False,
        "Disable Ollama cloud features (remote inference and web search)",
    )
    remotes: tuple[str, ...] = _env(
        "OLLAMA_REMOTES",
        ("ollama.com",),
        'Allowed hosts for remote models (default "ollama.com")',
    )
    editor: str = _env(
        "OLLAMA_EDITOR", "", "Path to editor for interactive prompt editing (Ctrl+G)"
    )
    auth: bool = _env(
        "OLLAMA_AUTH", False, "Sign client requests to the server with the local identity key"
    )
    api_key: str | None = _env(
        "OLLAMA_API_KEY", None, "API key clients send as 'Authorization: Bearer <key>'", repr=False
    )
    experiment: tuple[str, ...] = _env(
        "OLLAMA_EXPERIMENT", (), "A comma separated list of experimental features to enable"
    )
    # -- pollama's own: exposing the server safely, and operating it ---------------------
    keys_file: Path | None = _env(
        "POLLAMA_KEYS_FILE", None,
        "API keys file (hashes only; default ~/.ollama/api_keys.json); see 'pollama keys'",
    )
    server_api_key: str | None = _env(
        "POLLAMA_API_KEY", None,
        "A key the server accepts, given only by the environment and stored nowhere "
        "(containers; 'pollama keys' manages the keys file)",
        repr=False,
    )
    allow_no_auth: bool = _env(
        "POLLAMA_ALLOW_NO_AUTH", False,
        "Serve on a non-loopback address without API keys (only on a network you trust)",
    )
    allowed_hosts: tuple[str, ...] = _env(
        "POLLAMA_ALLOWED_HOSTS", (),
        "Extra Host header names to answer, comma separated ('*.example.com'; '*' = any)",
    )
    max_body_size: int = _env(
        "POLLAMA_MAX_BODY_SIZE", 64 << 20, "Largest request body in bytes, blob uploads aside",
    )
    max_uploads: int = _env("POLLAMA_MAX_UPLOADS", 4, "Maximum concurrent blob uploads")
    # Slow clients (server/limits.py): each deadline bounds how long one connection can be
    # held by a client that sends too slowly; 0 turns that deadline off.
    header_timeout: float = _env(
        "POLLAMA_HEADER_TIMEOUT", 5.0,
        'Time allowed for a request line and headers to arrive (default "5s")',
    )
    client_timeout: float = _env(
        "POLLAMA_CLIENT_TIMEOUT", 30.0,
        'Longest pause allowed between two chunks of a request body (default "30s")',
    )
    body_timeout: float = _env(
        "POLLAMA_BODY_TIMEOUT", 60.0,
        'Time allowed for a whole request body to arrive (default "60s"); blob uploads get '
        "more, see POLLAMA_MIN_UPLOAD_RATE",
    )
    min_upload_rate: int = _env(
        "POLLAMA_MIN_UPLOAD_RATE", 256 << 10,
        "Bytes per second a blob upload must average once POLLAMA_BODY_TIMEOUT is spent "
        "(default 262144; 0 = no total deadline for uploads)",
    )
    max_connections: int = _env(
        "POLLAMA_MAX_CONNECTIONS", 1024, "Maximum open connections; more get 503",
    )
    max_connections_per_client: int = _env(
        "POLLAMA_MAX_CONNECTIONS_PER_CLIENT", 64,
        "Maximum open connections from one client address (a global IPv6 address counts "
        "by its /64); more are refused with 503 at once (0 = no cap)",
    )
    # Image input (inference/images.py): every image is checked against these before decoding.
    max_images: int = _env(
        "POLLAMA_MAX_IMAGES", 16, "Maximum images in one request (0 refuses images)",
    )
    max_image_bytes: int = _env(
        "POLLAMA_MAX_IMAGE_BYTES", 20 << 20, "Largest image file in bytes, after base64 decoding",
    )
    max_image_pixels: int = _env(
        "POLLAMA_MAX_IMAGE_PIXELS", 50_000_000,
        "Largest image in pixels (width x height); larger ones are refused before decoding",
    )
    # Audio input (inference/audio.py): the same checks, and a duration read from the headers,
    # because llama.cpp allocates the whole decoded clip (16 kHz float samples) up front.
    max_audio_bytes: int = _env(
        "POLLAMA_MAX_AUDIO_BYTES", 25 << 20,
        "Largest audio file (WAV or MP3) in bytes, after base64 decoding; also bounds a "
        "/v1/audio/transcriptions upload",
    )
    max_audio_seconds: int = _env(
        "POLLAMA_MAX_AUDIO_SECONDS", 600,
        "Most seconds of audio in one request, all clips together, read from the files' "
        "headers before anything decodes them (0 refuses audio)",
    )
    # Stored responses of /v1/responses (store/responses.py): kept under the home, bounded.
    responses_max: int = _env(
        "POLLAMA_RESPONSES_MAX", 10_000,
        "Most stored /v1/responses responses (store: true) kept for previous_response_id "
        "and GET /v1/responses/{id}; the oldest go first (0 stores none)",
    )
    responses_max_age: float = _env(
        "POLLAMA_RESPONSES_MAX_AGE", 30 * 24 * 3600.0,
        'How long a stored response is kept (default "720h", 30 days, as OpenAI)',
    )
    responses_max_bytes: int = _env(
        "POLLAMA_RESPONSES_MAX_BYTES", 1 << 30,
        "Most bytes of stored responses in all, compressed (default 1 GiB); the oldest go "
        "first",
    )
    # The prompt cache across unloads (runner/kvstate.py, store/kvcache.py), under the home.
    kv_cache_max_bytes: int = _env(
        "POLLAMA_KV_CACHE_MAX_BYTES", 2 << 30,
        "Most bytes of KV cache kept on disk (~/.ollama/kvcache) when a model unloads, so a "
        "conversation's next turn after an unload or a restart skips its history (default "
        "2 GiB; least recently used first out; 0 keeps nothing)",
    )
    spare_worker: bool = _env(
        "POLLAMA_SPARE_WORKER", True,
        "Keep one model runner process started ahead of the next load (its imports done: "
        "about 0.2 s off every load, for ~40 MB of memory while it waits)",
    )
    access_log: str = _env(
        "POLLAMA_ACCESS_LOG", "-",
        "Where JSON access-log lines go: '-' stderr (default), a file path, or 'off'",
    )
    log_prompts: bool = _env(
        "POLLAMA_LOG_PROMPTS", False, "Include prompts and outputs in the access log",
    )
    require_gpu: bool = _env(
        "POLLAMA_REQUIRE_GPU", False,
        "Fail a model load that would put no layer on a GPU (CPU-only build, no GPU found, "
        "or the model does not fit) instead of running it on the CPU with a warning",
    )
    rpc_servers: tuple[str, ...] = _env(
        "OLLAMA_RPC_SERVERS", (),
        "llama.cpp RPC servers (`pollama rpc`) to split models over, comma separated "
        "host:port list",
    )
    registry_hosts: tuple[str, ...] = _env(
        "POLLAMA_REGISTRY_HOSTS",
        ("registry.ollama.ai", "ollama.com", "hf.co", "huggingface.co", "modelscope.cn"),
        "Registry hosts pull/push may reach, comma separated ('reg.lan:5000', "
        "'*.example.com', '*'); only hosts listed by name may have private addresses, and "
        "--insecure only allows plain http to a listed host",
    )
    pull_stall_timeout: float = _env(
        "POLLAMA_PULL_STALL_TIMEOUT", 30.0,
        'Retry a download part that receives no bytes for this long (default "30s")',
    )
    serve_registry: bool = _env(
        "POLLAMA_SERVE_REGISTRY", False,
        "Serve this store's models to other machines over the registry protocol (/v2/)",
    )
    user_home: Path = _env(
        "HOME", None, "The user's home directory; ~/.ollama holds keys, history and models"
    )
    config: Path | None = _env(
        "POLLAMA_CONFIG", None,
        "The configuration file (default ~/.ollama/pollama.toml, else "
        "/etc/pollama/pollama.toml); the environment wins over it",
    )
    presets: Mapping[str, ModelPreset] = Field(
        default_factory=dict,
        description="Per-model presets, by model name as the file writes it ([models.\"name\"])",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments first, then the environment read with Ollama's rules, then
        ``pollama.toml`` (:mod:`pollama.config.file`); no dotenv or secret files."""
        environ = _ENVIRON_OVERRIDE.get()
        environ = os.environ if environ is None else environ
        return (
            init_settings,
            _OllamaEnvSource(settings_cls, environ),
            _ConfigFileSource(settings_cls, environ),
        )

    @model_validator(mode="before")
    @classmethod
    def _parse_strings(cls, data: Any) -> Any:
        """Turn raw strings into values with Go's parsers; invalid ones keep the default."""
        if not isinstance(data, Mapping):
            return data
        values = dict(data)
        for name, value in data.items():
            if not isinstance(value, str) or name not in cls.model_fields:
                continue
            parsed: Any
            if name in _BOOL_FIELDS:
                parsed = _env_bool(value)
            elif name in _STRING_PARSERS:
                parsed = _STRING_PARSERS[name](value)
            else:
                continue
            if parsed is None:
                log.warning(
                    "invalid environment variable, using default: key=%s value=%s",
                    _env_name(cls.model_fields[name]) or name,
                    value,
                )
                del values[name]
            else:
                values[name] = parsed
        if values.get("user_home") in (None, ""):
            values["user_home"] = Path.home()
        if values.get("models") in (None, ""):
            values["models"] = Path(values["user_home"]) / ".ollama" / "models"
        return values

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_forever(cls, value: float) -> float:
        return FOREVER_SECONDS if value < 0 else value

    @field_validator("load_timeout", "pull_stall_timeout")
    @classmethod
    def _load_timeout_forever(cls, value: float) -> float:
        return FOREVER_SECONDS if value <= 0 else value

    # -- derived values --------------------------------------------------------------------

    @property
    def home(self) -> Path:
        """``~/.ollama``: the identity key pair, REPL history and ``server.json`` live here,
        whatever ``OLLAMA_MODELS`` says."""
        return self.user_home / ".ollama"

    @property
    def api_keys_path(self) -> Path:
        """The API keys file: ``POLLAMA_KEYS_FILE``, else ``~/.ollama/api_keys.json``."""
        return self.keys_file if self.keys_file is not None else self.home / "api_keys.json"

    @property
    def responses_path(self) -> Path:
        """``~/.ollama/responses.sqlite3``, the stored responses of ``/v1/responses``."""
        return self.home / "responses.sqlite3"

    @property
    def kv_cache_path(self) -> Path:
        """``~/.ollama/kvcache``, the prompt cache kept across unloads."""
        return self.home / "kvcache"

    @property
    def history_path(self) -> Path:
        """``~/.ollama/history``, the REPL history file."""
        return self.home / "history"

    @property
    def debug(self) -> bool:
        """Whether debug logging (or more) is on."""
        return self.log_level <= -4

    @property
    def python_log_level(self) -> int:
        """``log_level`` (a Go slog level) as a ``logging`` level: INFO 20, DEBUG 10, TRACE 5,
        WARN 30, ERROR 40."""
        if self.log_level <= -8:
            return 5
        return max(1, logging.INFO + self.log_level * 5 // 2)

    def allowed_origins(self) -> list[str]:
        """``OLLAMA_ORIGINS`` plus Ollama's built-in origins, in Go ``AllowedOrigins`` order."""
        origins = list(self.origins)
        for origin in ("localhost", "127.0.0.1", "0.0.0.0"):
            origins += [
                f"http://{origin}",
                f"https://{origin}",
                f"http://{origin}:*",
                f"https://{origin}:*",
            ]
        origins += ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]
        return origins


def _env_name(field: FieldInfo) -> str | None:
    extra = field.json_schema_extra
    if isinstance(extra, dict):
        name = extra.get("env")
        return name if isinstance(name, str) else None
    return None


def _read_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The raw, Var-stripped string of every set variable, keyed by field name."""
    values: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        env_name = _env_name(field)
        if env_name is None or env_name not in environ:
            continue
        raw = environ[env_name]
        value = raw if env_name == "HOME" else _go_var(raw)
        if value:
            values[name] = value
    return values


class _OllamaEnvSource(PydanticBaseSettingsSource):
    """Reads each field's variable from a mapping with Ollama's stripping rules."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._read().get(field_name), field_name, False

    def _read(self) -> dict[str, str]:
        return _read_environment(self._environ)

    def __call__(self) -> dict[str, Any]:
        return dict(self._read())


def _file_names() -> dict[str, str]:
    """Each key a file may use (the variable's name and the field's) -> the field."""
    names: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        env_name = _env_name(field)
        if env_name is not None:
            names[env_name] = name
            names[name] = name
    return names


_UINT_PARSERS = frozenset(k for k, v in _STRING_PARSERS.items() if v is _go_parse_uint)
_DURATION_PARSERS = frozenset(
    k for k, v in _STRING_PARSERS.items() if v is _parse_duration_setting
)


def _file_value_problem(name: str, text: str) -> str | None:
    """Why a file's value cannot be ``name``'s, or None. Stricter than the environment's
    rules (where a bad value logs and keeps the default): a file is edited on purpose, so a
    mistake in it is reported and, on a reload, keeps the previous configuration."""
    text = text.strip()
    if name in _BOOL_FIELDS:
        return None if go_parse_bool(text) is not None else f"takes true or false, not {text!r}"
    parser = _STRING_PARSERS.get(name)
    if parser is None or parser(text) is not None:
        return None
    if name in _UINT_PARSERS:
        return f"takes a whole number of 0 or more, not {text!r}"
    if name in _DURATION_PARSERS:
        return f"takes a duration ('5m', '1h30m') or whole seconds, not {text!r}"
    return f"invalid value {text!r}"


def config_path(environ: Mapping[str, str]) -> Path | None:
    """The configuration file this environment points at (``POLLAMA_CONFIG``, else the
    user's, else the system's), or None. Raises :class:`ConfigFileError` when
    ``POLLAMA_CONFIG`` names no file."""
    return find_config(environ, Path(_go_var(environ.get("HOME", "")) or Path.home()))


def read_config_file(environ: Mapping[str, str]) -> ConfigFile:
    """The configuration file this environment points at, read and checked (an empty
    :class:`ConfigFile` when there is none). Raises :class:`ConfigFileError`; logs each of
    the file's warnings."""
    path = config_path(environ)
    if path is None:
        return ConfigFile()
    checks = {name: partial(_file_value_problem, name) for name in Settings.model_fields}
    config = read_config(Settings, path, _file_names(), checks)
    for warning in config.warnings:
        log.warning("%s", warning)
    return config


class _ConfigFileSource(PydanticBaseSettingsSource):
    """``pollama.toml``'s settings, below the environment's; its presets; where it is."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        preread = _CONFIG_OVERRIDE.get()
        self._config = preread if preread is not None else read_config_file(environ)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        config = self._config
        if config.path is None:
            return {}
        return {**config.values, "presets": dict(config.presets), "config": config.path}


# Set only while load_settings() builds one Settings from a caller's mapping instead of
# os.environ (pydantic-settings builds its sources in a classmethod, so the mapping cannot
# travel on the instance). It never outlives that call.
_ENVIRON_OVERRIDE: ContextVar[Mapping[str, str] | None] = ContextVar(
    "pollama_settings_environ", default=None
)
# Likewise a configuration file already read (a reload checks the file before it builds the
# settings from it, so that a bad file changes nothing).
_CONFIG_OVERRIDE: ContextVar[ConfigFile | None] = ContextVar("pollama_config_file", default=None)


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    config_file: ConfigFile | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from ``env`` (default ``os.environ``), the configuration file
    it points at (or ``config_file``, already read) and keyword overrides.

    Only ``env`` is read: variables in ``os.environ`` are ignored when a mapping is given,
    which is what tests want. Raises :class:`ConfigFileError` for a file that cannot be used.
    """
    token = _ENVIRON_OVERRIDE.set(env)
    file_token = _CONFIG_OVERRIDE.set(config_file)
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_OVERRIDE.reset(file_token)
        _ENVIRON_OVERRIDE.reset(token)


def describe_env(names: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(variable, description) for each named variable (default :data:`SERVE_ENV_VARS`),
    from the field descriptions; names pollama does not know are left out."""
    names = SERVE_ENV_VARS if names is None else names
    by_env = {_env_name(field): field.description or "" for field in Settings.model_fields.values()}
    return [(name, by_env[name]) for name in names if name in by_env]


def env_help(names: Iterable[str] | None = None) -> str:
    """The ``Environment Variables:`` block Ollama appends to a command's help
    (``      %-27s   %s`` per variable)."""
    lines = ["", "Environment Variables:"]
    lines += [f"      {name:<27}   {description}" for name, description in describe_env(names)]
    return "\n".join(lines) + "\n"
