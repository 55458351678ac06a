"""What ``/api/tags``, ``/api/show`` and the capability checks say about a stored model.

Derived, never stored: details come from the config blob (falling back to the GGUF
header), capabilities from the GGUF keys and the template (spec §10.4), the Modelfile from
the layers (spec §10.3). Every function here reads; none writes.
"""

from __future__ import annotations

from typing import Any

from pollama.errors import GGUFError
from pollama.format import go_value, rfc3339_local
from pollama.gguf import GGUFInfo
from pollama.modelfile import render_modelfile
from pollama.protocol.ollama import ListModel, Message, ModelDetails, ShowResponse, TensorInfo
from pollama.store.gguf_cache import gguf_info
from pollama.store.manifests import MEDIA_ADAPTER, MEDIA_MODEL, MEDIA_PROJECTOR
from pollama.store.models import LocalModel
from pollama.template import Template, jinja_capabilities, template_capabilities


def model_gguf(model: LocalModel) -> GGUFInfo | None:
    """The GGUF header of the model's weights, or None for a model without weights."""
    path = model.model_path()
    if path is None or not path.is_file():
        return None
    return gguf_info(path, display_name=model.name.display_shortest())


def details(model: LocalModel) -> ModelDetails:
    config = model.config()
    families = config.get("model_families")
    return ModelDetails(
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
        caps.append("embedding" if info.pooling_type is not None else "completion")
        if info.has_vision or model.layers_of(MEDIA_PROJECTOR):
            caps.append("vision")
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


_CAP_ORDER = ["completion", "embedding", "tools", "insert", "vision", "thinking", "audio", "image"]


def _ordered(caps: list[str]) -> list[str]:
    unique = list(dict.fromkeys(caps))
    return sorted(unique, key=lambda c: _CAP_ORDER.index(c) if c in _CAP_ORDER else 99)


def list_entry(model: LocalModel) -> ListModel:
    short = model.name.display_shortest()
    return ListModel(
        name=short,
        model=short,
        modified_at=rfc3339_local(model.mtime_ns),
        size=model.size,
        digest=model.digest,
        details=details(model),
    )


def parameters_text(params: dict[str, Any]) -> str:
    """``%-30s %#v`` lines, one per value (list values expanded), as Ollama prints them."""
    lines = []
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {go_value(item)}")
    return "\n".join(lines)


def show(
    model: LocalModel,
    *,
    verbose: bool = False,
    system: str | None = None,
    options: dict[str, Any] | None = None,
) -> ShowResponse:
    """The ``/api/show`` body; ``system`` and ``options`` override what the model stores."""
    info = model_gguf(model)
    params = dict(model.params())
    params.update(options or {})
    licenses = model.licenses()
    template_text = model.template()
    system_text = system if system is not None else model.system()
    messages = model.messages()
    config = model.config()
    model_path = model.model_path()
    modelfile = render_modelfile(
        str(model_path) if model_path else model.name.display_shortest(),
        name=model.name.display_shortest(),
        adapters=[str(p) for p in model.adapter_paths()],
        projectors=[str(p) for p in model.projector_paths()],
        template=template_text,
        system=system_text,
        parameters=params,
        license=licenses,
        messages=[
            {"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in messages
        ],
        requires=config.get("requires") or None,
        renderer=config.get("renderer") or None,
        parser=config.get("parser") or None,
    )
    model_info: dict[str, Any] = info.model_info(verbose=verbose) if info else {}
    tensors = (
        [TensorInfo(name=t.name, type=t.type_name, shape=list(t.shape)) for t in info.tensors]
        if info and verbose
        else None
    )
    if template_text is None and info is not None and info.chat_template:
        template_text = info.chat_template
    return ShowResponse(
        license="\n".join(licenses) if licenses else None,
        modelfile=modelfile,
        parameters=parameters_text(params) if params else None,
        template=template_text,
        system=system_text,
        renderer=config.get("renderer") or None,
        parser=config.get("parser") or None,
        details=details(model),
        messages=[Message.model_validate(m) for m in messages] or None,
        requires=config.get("requires") or None,
        model_info=model_info,
        tensors=tensors,
        capabilities=capabilities(model),
        modified_at=rfc3339_local(model.mtime_ns),
    )


__all__ = ["MEDIA_ADAPTER", "MEDIA_MODEL", "capabilities", "details", "list_entry", "show"]
