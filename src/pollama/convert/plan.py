"""Which converter plans a folder: the architectures pollama knows, and the plan of one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from pollama.convert import bert, llama
from pollama.convert.source import HFFolder
from pollama.convert.writer import ConvertPlan
from pollama.errors import ConversionError

__all__ = ["KNOWN_ARCHITECTURES", "plan_conversion"]

_PLANNERS: dict[str, Callable[[HFFolder, dict, str], ConvertPlan]] = {
    **{name: bert.plan_bert for name in bert.ARCHITECTURES},
    **{name: llama.plan_llama for name in llama.ARCHITECTURES},
}
KNOWN_ARCHITECTURES = tuple(_PLANNERS)


def plan_conversion(files: Mapping[str, Path]) -> ConvertPlan:
    """Read and check a Hugging Face folder (``{name: path}``); every ``ConversionError``
    comes from here, before anything is written."""
    folder = HFFolder(files)
    config = folder.config()
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise ConversionError(
            "'config.json' names no architecture (its \"architectures\" list); pollama "
            f"converts {', '.join(KNOWN_ARCHITECTURES)}"
        )
    architecture = architectures[0]
    planner = _PLANNERS.get(architecture) if isinstance(architecture, str) else None
    if planner is None:
        raise ConversionError(
            f"unsupported architecture {architecture!r}: pollama converts "
            f"{', '.join(KNOWN_ARCHITECTURES)}"
        )
    return planner(folder, config, architecture)
