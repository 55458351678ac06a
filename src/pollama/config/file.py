"""``pollama.toml``: every ``OLLAMA_*``/``POLLAMA_*`` setting in a file, and per-model presets.

Where it is, first found wins: ``POLLAMA_CONFIG`` (which must then exist), else
``~/.ollama/pollama.toml``, else ``/etc/pollama/pollama.toml`` (the service's). A setting is
written under its variable's name (``OLLAMA_NUM_PARALLEL = 4``) or its short name
(``num_parallel = 4``), with TOML's types (``true``, ``4``, ``"5m"``, ``["a", "b"]``);
``[models."<name>"]`` tables are presets (:mod:`pollama.config.presets`).

What must stay true:

* the environment wins over the file, the file over the defaults
  (:meth:`pollama.config.settings.Settings.settings_customise_sources`);
* a value the file gets wrong is an error naming the file, the line and what to write
  (:class:`ConfigFileError`), never a silent default, so a reload keeps the old
  configuration instead of half-applying a new one; a key the file does not know is a
  warning naming it (a newer file on an older server keeps working);
* the file is read as TOML through pydantic-settings' own TOML source;
* a file others may write is refused (anyone who could would choose the server's origins,
  keys file and limits), and an API key in a file others may read is ignored with a warning.
"""

from __future__ import annotations

import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, TomlConfigSettingsSource

from pollama.config.presets import ModelPreset, PresetProblem, parse_preset
from pollama.errors import PollamaError

__all__ = ["SYSTEM_CONFIG", "ConfigFile", "ConfigFileError", "find_config", "read_config"]

SYSTEM_CONFIG = Path("/etc/pollama/pollama.toml")
"""The service's file, read when neither ``POLLAMA_CONFIG`` nor the user's file is there."""

CONFIG_ENV = "POLLAMA_CONFIG"
PRESETS_TABLE = "models"
# Settings a file cannot hold: where the file itself is, and whose home it is.
_NOT_IN_FILE = frozenset({"HOME", CONFIG_ENV, "user_home", "config_path", "presets"})
_SECRETS = frozenset({"api_key", "server_api_key"})


class ConfigFileError(PollamaError):
    """The configuration file cannot be used as written; the message names the file, the
    line where it can and the problem."""


@dataclass(frozen=True)
class ConfigFile:
    """What a file says: ``values`` by field name, in the environment's string form (one
    parser for both), ``presets`` by model name as written, and ``warnings`` to log."""

    path: Path | None = None
    values: Mapping[str, str] = field(default_factory=dict)
    presets: Mapping[str, ModelPreset] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def find_config(environ: Mapping[str, str], home: Path) -> Path | None:
    """The file to read, or None when there is none (``POLLAMA_CONFIG`` naming a missing
    file is an error: a typo must not silently run the defaults)."""
    named = environ.get(CONFIG_ENV, "").strip().strip("\"'")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigFileError(f"{CONFIG_ENV} names {path}, which is not a file")
        return path
    for path in (home / ".ollama" / "pollama.toml", SYSTEM_CONFIG):
        if path.is_file():
            return path
    return None


def _line_of(text: str, key: str, table: str | None = None) -> int | None:
    """The 1-based line where ``key`` is set (inside ``[models."table"]`` when given)."""
    lines = text.splitlines()
    start = 0
    if table is not None:
        header = re.compile(r"^\s*\[\s*" + re.escape(PRESETS_TABLE) + r"\s*\.\s*[\"']?"
                            + re.escape(table) + r"[\"']?\s*\]")  # fmt: skip
        start = next((i for i, line in enumerate(lines) if header.match(line)), 0)
    pattern = re.compile(r"^\s*[\"']?" + re.escape(key) + r"[\"']?\s*=")
    for number in range(start, len(lines)):
        if pattern.match(lines[number]):
            return number + 1
    return None


def _where(path: Path, line: int | None) -> str:
    return f"{path} line {line}" if line else str(path)


def _as_env_string(value: Any) -> str | None:
    """A TOML value in the form the variable would have in the environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    return None


def _check_permissions(path: Path) -> bool:
    """Refuse a file others may write; return whether others may read it."""
    mode = path.stat().st_mode
    if mode & stat.S_IWOTH:
        raise ConfigFileError(
            f"{path} may be written by any user, who could then choose this server's keys "
            f"and origins: run 'chmod o-w {path}'"
        )
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))


def _read_toml(settings_cls: type[BaseSettings], path: Path) -> tuple[dict[str, Any], str]:
    """The file's tables (pydantic-settings' TOML source) and its text (for line numbers)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = TomlConfigSettingsSource(settings_cls, toml_file=path).toml_data
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line N, column M)"
        raise ConfigFileError(f"{path}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot be read ({exc})") from None
    return dict(data), text


def read_config(
    settings_cls: type[BaseSettings],
    path: Path,
    names: Mapping[str, str],
    check: Mapping[str, Any],
) -> ConfigFile:
    """Read and check ``path``. ``names`` maps each accepted key (variable and short name)
    to its field; ``check(field, text)`` returns an error message for a value the field
    cannot take, or None. Raises :class:`ConfigFileError`."""
    others_read = _check_permissions(path)
    data, text = _read_toml(settings_cls, path)
    values: dict[str, str] = {}
    warnings: list[str] = []
    presets_table = data.pop(PRESETS_TABLE, {})
    for key, raw in data.items():
        name = names.get(key)
        if name is None or key in _NOT_IN_FILE:
            warnings.append(f"{_where(path, _line_of(text, key))}: unknown setting {key!r}, "
                            "ignored (see 'pollama serve --help' for the settings)")  # fmt: skip
            continue
        if name in _SECRETS and others_read:
            where = _where(path, _line_of(text, key))
            warnings.append(f"{where}: {key} ignored: others may read this file "
                            f"(chmod 600 {path}, or use 'pollama keys')")
            continue
        value = _as_env_string(raw)
        problem = check[name](value) if value is not None else "takes a string, number or list"
        if problem is not None:
            raise ConfigFileError(f"{_where(path, _line_of(text, key))}: {key}: {problem}")
        values[name] = value  # type: ignore[assignment]
    presets = _read_presets(path, text, presets_table, warnings)
    return ConfigFile(path, values, presets, tuple(warnings))


def _read_presets(
    path: Path, text: str, table: Any, warnings: list[str]
) -> dict[str, ModelPreset]:
    if not isinstance(table, dict):
        raise ConfigFileError(f"{_where(path, _line_of(text, PRESETS_TABLE))}: "
                              f'{PRESETS_TABLE} holds tables: [models."smollm2:135m"]')  # fmt: skip
    presets: dict[str, ModelPreset] = {}
    for model, body in table.items():
        if not isinstance(body, dict):
            raise ConfigFileError(f'{path}: models."{model}" must be a table of settings')
        try:
            preset, unknown = parse_preset(body)
        except PresetProblem as exc:
            line = _line_of(text, exc.key, table=model)
            raise ConfigFileError(f'{_where(path, line)}: models."{model}": {exc}') from None
        for key in unknown:
            where = _where(path, _line_of(text, key, table=model))
            warnings.append(f'{where}: models."{model}": unknown preset setting {key!r}, ignored')
        presets[model] = preset
    return presets

