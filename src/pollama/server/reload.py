"""Reloading the configuration without a restart: ``SIGHUP``, or ``pollama.toml`` changed.

What a reload applies, from the next request on: API keys (the keys file, its path,
``POLLAMA_ALLOW_NO_AUTH``), allowed hosts and origins, the request limits (body size,
uploads, body timeouts, queue, images, audio), the defaults of the next model load
(context, parallel slots, keep-alive, flash attention, KV cache type, loaded-model cap),
the log level and the per-model presets. Requests under way and models already loaded keep
what they started with. What needs a restart (the address, the models directory, the
connection limits, the access log…) is logged as such, and not applied.

What must stay true: a file with an error changes nothing: the old configuration stays,
and the log says the file, the line and the problem. The environment is the one the server
started with (a process's environment cannot change from outside), so it still wins over
the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import Coroutine, Mapping

from fastapi import FastAPI

from pollama.config import (
    ConfigFileError,
    Settings,
    config_path,
    load_settings,
    read_config_file,
)
from pollama.inference.presets import unmatched_presets
from pollama.server.security import AccessPolicy

__all__ = ["POLL_SECONDS", "RESTART_ONLY", "ConfigReloader"]

log = logging.getLogger(__name__)

RESTART_ONLY = frozenset({
    "host", "models", "user_home", "config", "header_timeout", "max_connections",
    "max_connections_per_client", "access_log", "log_prompts", "noprune", "kv_cache_max_bytes",
    "load_timeout", "responses_max", "responses_max_age", "responses_max_bytes", "llm_library",
    "vulkan", "serve_registry", "server_api_key", "spare_worker",
})  # fmt: skip
"""Settings read once, when the server starts: a reload logs that they changed."""

POLL_SECONDS = 2.0
"""How often the file is checked for a change (its size, time and inode)."""

_Fingerprint = tuple[str, int, int, int] | None


class ConfigReloader:
    """Re-reads the configuration into a running app (``app.state``'s settings, scheduler,
    inference service, access policy and limits)."""

    def __init__(self, app: FastAPI, environ: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.environ = dict(os.environ if environ is None else environ)
        self._seen = self._fingerprint()
        self._tasks: set[asyncio.Task[None]] = set()  # the watcher and pinned loads

    def start(self) -> None:
        """At the app's start: reload on ``SIGHUP``, watch the file, warn about presets for
        models that are not installed, load the pinned ones."""
        self.install_signal()
        self._spawn(self.watch(), "pollama-config-watch")
        self._after_load()

    def stop(self) -> None:
        """At the app's end: stop watching and stop pinned loads still under way."""
        for task in self._tasks:
            task.cancel()

    def _spawn(self, coro: Coroutine[object, object, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _after_load(self) -> None:
        warn_unmatched_presets(self.app)
        for name in pinned_installed(self.app):
            self._spawn(_preload(self.app, name), f"pollama-preload-{name}")

    @property
    def settings(self) -> Settings:
        settings = self.app.state.settings
        assert isinstance(settings, Settings)
        return settings

    def _fingerprint(self) -> _Fingerprint:
        try:
            path = config_path(self.environ)
            if path is None:
                return None
            st = path.stat()
        except (ConfigFileError, OSError):
            return ("missing", 0, 0, 0)
        return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Read the file and apply it; False (and the old configuration kept) on an error."""
        self._seen = self._fingerprint()
        try:
            config = read_config_file(self.environ)
            new = load_settings(self.environ, config_file=config)
        except (ConfigFileError, ValueError) as exc:
            log.error("configuration not reloaded (%s), keeping the previous one: %s", reason, exc)
            return False
        old = self.settings
        changed = [f for f in Settings.model_fields if getattr(old, f) != getattr(new, f)]
        later = [f for f in changed if f in RESTART_ONLY]
        if later:
            log.warning("configuration: %s changed; it takes effect at the next restart",
                        ", ".join(later))  # fmt: skip
            new = new.model_copy(update={f: getattr(old, f) for f in later})
        self.apply(new)
        applied = [f for f in changed if f not in RESTART_ONLY]
        log.info("configuration reloaded (%s) from %s: %s", reason, new.config or "(no file)",
                 ", ".join(applied) or "nothing changed")  # fmt: skip
        self._after_load()
        return True

    def apply(self, new: Settings) -> None:
        """Put ``new`` everywhere the running app reads settings from."""
        state = self.app.state
        state.settings = new
        state.inference.settings = new
        state.scheduler.reconfigure(new)
        state.body_limits.update(new)
        policy: AccessPolicy = state.access_policy
        keys = policy.keys if policy.keys.path == new.api_keys_path else None
        fresh = AccessPolicy.from_settings(new, keys)
        for item in dataclasses.fields(policy):
            setattr(policy, item.name, getattr(fresh, item.name))
        logging.getLogger().setLevel(new.python_log_level)

    def check_file(self) -> None:
        """Reload when the file changed since it was last read (or appeared, or went)."""
        if self._fingerprint() != self._seen:
            self.reload("file changed")

    async def watch(self) -> None:
        """Check the file every :data:`POLL_SECONDS` until cancelled (the app's lifespan)."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            self.check_file()

    def install_signal(self) -> bool:
        """Reload on ``SIGHUP`` (where the platform has it and this is the main thread)."""
        hup = getattr(signal, "SIGHUP", None)
        if hup is None:
            return False
        try:
            asyncio.get_running_loop().add_signal_handler(hup, self.reload)
        except (RuntimeError, ValueError, NotImplementedError):
            return False  # not the main thread (tests' in-process servers)
        return True


def warn_unmatched_presets(app: FastAPI) -> None:
    """Log each preset that names no installed model (a typo would otherwise go unseen)."""
    settings: Settings = app.state.settings
    if not settings.presets:
        return
    installed = [model.name for model in app.state.store.list()]
    for name in unmatched_presets(settings.presets, installed):
        log.warning('configuration: preset models."%s" names no installed model', name)


def pinned_installed(app: FastAPI) -> list[str]:
    """The presets that pin an installed model (a pinned model is meant to be ready before
    its first request: it loads at start, and after a reload that pins it)."""
    settings: Settings = app.state.settings
    pinned = {name: preset for name, preset in settings.presets.items() if preset.pinned}
    if not pinned:
        return []
    missing = set(unmatched_presets(pinned, [model.name for model in app.state.store.list()]))
    return [name for name in pinned if name not in missing]


async def _preload(app: FastAPI, name: str) -> None:
    """Load one pinned model; a failure is logged, never fatal (the others still serve)."""
    try:
        await app.state.inference.preload(name)
        log.info("pinned model %s loaded", name)
    except Exception as exc:  # noqa: BLE001 - logged; the server goes on without it
        log.error("pinned model %s could not be loaded: %s", name, exc)
