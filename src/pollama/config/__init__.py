"""Settings: the ``OLLAMA_*``/``POLLAMA_*`` environment, the ``pollama.toml`` file under it,
and the per-model presets that file holds.

* :mod:`pollama.config.settings`: the :class:`Settings` model and Ollama's parsing rules;
* :mod:`pollama.config.file`: finding, reading and checking ``pollama.toml``;
* :mod:`pollama.config.presets`: the per-model presets (``[models."name"]`` tables);
* :mod:`pollama.config.report`: ``pollama serve --print-config`` (each value and its source).
"""

from pollama.config.file import ConfigFile, ConfigFileError
from pollama.config.presets import ModelPreset
from pollama.config.settings import (
    CLIENT_ENV_VARS,
    DEFAULT_PORT,
    FOREVER_SECONDS,
    RUN_ENV_VARS,
    SERVE_ENV_VARS,
    HostAddress,
    Settings,
    config_path,
    describe_env,
    env_help,
    load_settings,
    parse_host,
    read_config_file,
)

__all__ = [
    "CLIENT_ENV_VARS",
    "DEFAULT_PORT",
    "FOREVER_SECONDS",
    "RUN_ENV_VARS",
    "SERVE_ENV_VARS",
    "ConfigFile",
    "ConfigFileError",
    "HostAddress",
    "ModelPreset",
    "Settings",
    "config_path",
    "describe_env",
    "env_help",
    "load_settings",
    "parse_host",
    "read_config_file",
]
