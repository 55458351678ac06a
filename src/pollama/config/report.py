"""``pollama serve --print-config``: each setting's effective value and where it came from.

Operators ask "why is it using 8 parallel slots?"; the answer is one of three places, in
this order: the environment, the configuration file (with its path), the default. Secrets
are never printed, only whether they are set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pollama.config.settings import (
    SERVE_ENV_VARS,
    Settings,
    _env_name,
    _read_environment,
    load_settings,
    read_config_file,
)
from pollama.format import go_duration_from_seconds

__all__ = ["ConfigRow", "config_rows", "format_config"]

_SECRET_FIELDS = frozenset({"api_key", "server_api_key"})
_DURATION_FIELDS = frozenset({
    "keep_alive", "load_timeout", "header_timeout", "client_timeout", "body_timeout",
    "pull_stall_timeout", "responses_max_age",
})  # fmt: skip


@dataclass(frozen=True)
class ConfigRow:
    """One setting: its variable, its value as text and its source."""

    variable: str
    value: str
    source: str


def _render(name: str, value: Any) -> str:
    if name in _SECRET_FIELDS:
        return "(set)" if value else "(not set)"
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if name in _DURATION_FIELDS and isinstance(value, float):
        return "forever" if math.isinf(value) else go_duration_from_seconds(value)
    if isinstance(value, tuple):
        return ",".join(value) if value else "(none)"
    return str(value) or "(empty)"


def config_rows(environ: Mapping[str, str]) -> tuple[list[ConfigRow], Settings]:
    """The rows, in ``pollama serve --help`` order then the rest, and the settings they
    describe. Raises :class:`~pollama.config.file.ConfigFileError` as loading does."""
    config = read_config_file(environ)
    settings = load_settings(environ, config_file=config)
    from_env = _read_environment(environ)
    where = f"file {config.path}" if config.path else "file"
    rows = []
    fields = Settings.model_fields
    by_env = {_env_name(field): name for name, field in fields.items()}
    order = [v for v in SERVE_ENV_VARS if v in by_env]
    order += sorted(v for v in by_env if v is not None and v not in order and v != "HOME")
    for variable in order:
        name = by_env[variable]
        if name in from_env:
            source = "environment"
        elif name in config.values:
            source = where
        elif name == "config" and config.path is not None:
            source = "found (~/.ollama/pollama.toml, then /etc/pollama/pollama.toml)"
        else:
            source = "default"
        rows.append(ConfigRow(variable, _render(name, getattr(settings, name)), source))
    return rows, settings


def format_config(rows: list[ConfigRow], settings: Settings) -> str:
    """The table, then one line per preset."""
    width = max(len(row.variable) for row in rows)
    value_width = min(max(len(row.value) for row in rows), 48)
    lines = [f"{'SETTING':<{width}}  {'VALUE':<{value_width}}  SOURCE"]
    lines += [f"{r.variable:<{width}}  {r.value:<{value_width}}  {r.source}" for r in rows]
    if settings.presets:
        lines += ["", f"Presets (from {settings.config}):"]
        lines += [f'  models."{name}": {preset.describe() or "(empty)"}'
                  for name, preset in settings.presets.items()]  # fmt: skip
    return "\n".join(lines) + "\n"
