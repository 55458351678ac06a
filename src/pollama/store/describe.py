"""What ``/api/tags``, ``/api/show``, ``/api/ps`` and the capability checks say about a
stored model, in the store's terms (the server fills its wire shapes from them).

Derived, never stored: details come from the config blob (falling back to the GGUF
header), capabilities from the GGUF keys and the template
(docs/ollama-behaviour.md#capabilities), the Modelfile from the layers
(docs/ollama-behaviour.md#show). Every function here reads; none writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pollama.errors import GGUFError
from pollama.format import go_value
from pollama.gguf import GGUFInfo
from pollama.modelfile import render_modelfile
from pollama.store.gguf_cache import gguf_info
from pollama.store.models import LocalModel
from pollama.store.projector import can_hear, can_see
from pollama.template import Template, jinja_capabilities, template_capabilities


def model_gguf(model: LocalModel) -> GGUFInfo | None:
    """The GGUF header of the model's weights, or None for a model without weights."""
    path = model.model_path()
    if path is None or not path.is_file():
        return None
    return gguf_info(path, display_name=model.name.display_shortest())


def projector_gguf(model: LocalModel) -> GGUFInfo | None:
    """The GGUF header of the model's projector, or None for a model without one. Only the
    first projector layer counts: it is the one llama.cpp is given (and Ollama shows)."""
    paths = model.projector_paths()
    if not paths or not paths[0].is_file():
        return None
    return gguf_info(paths[0], display_name=f"{model.name.display_shortest()} (projector)")


def _senses(model: LocalModel, info: GGUFInfo) -> list[str]:
    """``vision`` and ``audio`` (docs/ollama-behaviour.md#capabilities): vision blocks or
    audio blocks in the model's own GGUF, or a projector with an image or audio encoder.
    A projector that cannot be read claims nothing: it could not be loaded either."""
    arch = info.architecture
    see = info.has_vision
    hear = arch is not None and f"{arch}.audio.block_count" in info.kv
    try:
        projector = projector_gguf(model)
    except GGUFError:
        projector = None
    if projector is not None:
        see = see or can_see(projector)
        hear = hear or can_hear(projector)
    return [cap for cap, on in (("vision", see), ("audio", hear)) if on]


@dataclass(frozen=True)
class ConfigDetails:
    """What the config blob records about a model's weights, in the fields (and the order)
    of Ollama's ``details`` object, which ``/api/tags``, ``/api/show`` and ``/api/ps`` show."""

    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


def details(model: LocalModel) -> ConfigDetails:
    config = model.config()
    families = config.get("model_families")
    return ConfigDetails(
        parent_model="",
        format=str(config.get("model_format") or ""),
        family=str(config.get("model_family") or ""),
        families=list(families) if isinstance(families, list) else None,
        parameter_size=str(config.get("model_type") or ""),
        quantization_level=str(config.get("file_type") or ""),
    )


def capabilities(model: LocalModel) -> list[str]:
    """Ollama's capability list, in its order: completion/embedding, tools, insert, …"""
    caps: list[str] = []
    try:
        info = model_gguf(model)
    except GGUFError:
        info = None
    config_caps = model.config().get("capabilities")
    if info is not None:
        if info.ranks:
            caps.append("rerank")  # a cross-encoder: pairs in, scores out, no embeddings
        else:
            caps.append("embedding" if info.pooling_type is not None else "completion")
        caps += _senses(model, info)
        if info.pooling_type is None and info.fim_tokens is not None:
            caps.append("insert")  # the vocabulary's fill-in-the-middle tokens
    template_text = model.template()
    if template_text is not None:
        try:
            caps += sorted(template_capabilities(Template.parse(template_text)))
        except GGUFError:
            pass
        except Exception:  # a stored template that no longer parses gives no capabilities
            pass
    elif info is not None and info.chat_template:
        caps += sorted(jinja_capabilities(info.chat_template))
    if model.config().get("model_family") in ("gptoss", "gpt-oss"):
        caps.append("thinking")
    if isinstance(config_caps, list):
        caps += [c for c in config_caps if isinstance(c, str)]
    return _ordered(caps)


_CAP_ORDER = [
    "completion", "embedding", "rerank", "tools", "insert", "vision", "thinking", "audio", "image"
]


def _ordered(caps: list[str]) -> list[str]:
    unique = list(dict.fromkeys(caps))
    return sorted(unique, key=lambda c: _CAP_ORDER.index(c) if c in _CAP_ORDER else 99)


def parameters_text(params: dict[str, Any]) -> str:
    """``%-30s %#v`` lines, one per value (list values expanded), as Ollama prints them."""
    lines = []
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {go_value(item)}")
    return "\n".join(lines)


def modelfile(model: LocalModel, *, system: str | None, params: dict[str, Any]) -> str:
    """The Modelfile that would build ``model`` again (``/api/show``'s ``modelfile``), with
    ``system`` and ``params`` in place of the stored ones."""
    model_path, draft_path = model.model_path(), model.draft_path()
    config = model.config()
    return render_modelfile(
        str(model_path) if model_path else model.name.display_shortest(),
        name=model.name.display_shortest(),
        adapters=[str(p) for p in model.adapter_paths()],
        draft=str(draft_path) if draft_path else None,
        projectors=[str(p) for p in model.projector_paths()],
        template=model.template(),
        system=system,
        parameters=params,
        license=model.licenses(),
        messages=[
            {"role": str(m.get("role", "")), "content": str(m.get("content", ""))}
            for m in model.messages()
        ],
        requires=config.get("requires") or None,
        renderer=config.get("renderer") or None,
        parser=config.get("parser") or None,
    )


__all__ = ["ConfigDetails", "capabilities", "details", "model_gguf", "modelfile",
           "parameters_text", "projector_gguf"]
