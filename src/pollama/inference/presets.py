"""Which preset of ``pollama.toml`` a model gets (:mod:`pollama.config.presets`).

A preset's name is matched the way a request's model name is: ``smollm2`` is
``smollm2:latest`` is ``registry.ollama.ai/library/smollm2:latest``. Settings are read at
each request, so a reloaded file applies to the next load without a restart.
"""

from __future__ import annotations

from collections.abc import Mapping

from pollama.config import ModelPreset, Settings
from pollama.names import ModelName

__all__ = ["NO_PRESET", "preset_for", "unmatched_presets"]

NO_PRESET = ModelPreset()


def _canonical(name: str) -> str | None:
    parsed = ModelName.try_parse(name)
    return None if parsed is None else str(parsed)


def preset_for(settings: Settings, name: ModelName) -> ModelPreset:
    """The preset written for ``name``, else an empty one."""
    wanted = str(name)
    for written, preset in settings.presets.items():
        if _canonical(written) == wanted:
            return preset
    return NO_PRESET


def unmatched_presets(presets: Mapping[str, ModelPreset], installed: list[ModelName]) -> list[str]:
    """The presets that name no installed model (or no valid name at all), for a warning:
    a typo in a preset would otherwise go unnoticed until that model is slow."""
    names = {str(name) for name in installed}
    return [written for written in presets if _canonical(written) not in names]
