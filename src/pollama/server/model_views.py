"""The bodies that describe models: ``/api/tags`` entries, ``/api/show``, ``/api/ps`` rows.

Ollama's wire models (``protocol.ollama``) filled from what the store describes
(``store.describe``) and what the scheduler has loaded; the store itself builds no HTTP
shape. Store reads touch the disk: callers run :func:`list_entry` and :func:`show_response`
in a thread.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pollama.format import rfc3339_local
from pollama.protocol.ollama import (
    ListModel,
    Message,
    ModelDetails,
    ProcessModel,
    ShowResponse,
    ShowTensorInfo,
)
from pollama.scheduler import LoadedModel
from pollama.store.describe import (
    capabilities,
    details,
    model_gguf,
    modelfile,
    parameters_text,
    projector_gguf,
)
from pollama.store.models import LocalModel

__all__ = ["list_entry", "process_model", "show_response"]


def _details(model: LocalModel) -> ModelDetails:
    return ModelDetails(**asdict(details(model)))


def list_entry(model: LocalModel) -> ListModel:
    """One ``/api/tags`` entry; ``capabilities`` as ``/api/show`` gives them (Ollama 2026),
    from the cached GGUF header and the stored template."""
    short = model.name.display_shortest()
    return ListModel(
        name=short,
        model=short,
        modified_at=rfc3339_local(model.mtime_ns),
        size=model.size,
        digest=model.digest,
        details=_details(model),
        capabilities=capabilities(model),
    )


def show_response(
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
    config = model.config()
    text = modelfile(model, system=system_text, params=params)
    model_info: dict[str, Any] = info.model_info(verbose=verbose) if info else {}
    # Ollama's projector_info: all of the first projector's metadata, arrays as model_info's.
    projector = projector_gguf(model)
    projector_info = projector.shown_kv(verbose) if projector else None
    tensors = (
        [ShowTensorInfo(name=t.name, type=t.type_name, shape=list(t.shape)) for t in info.tensors]
        if info and verbose
        else None
    )
    if template_text is None and info is not None and info.chat_template:
        template_text = info.chat_template
    return ShowResponse(
        license="\n".join(licenses) if licenses else None,
        modelfile=text,
        parameters=parameters_text(params) if params else None,
        template=template_text,
        system=system_text,
        renderer=config.get("renderer") or None,
        parser=config.get("parser") or None,
        details=_details(model),
        messages=[Message.model_validate(m) for m in model.messages()] or None,
        requires=config.get("requires") or None,
        model_info=model_info,
        projector_info=projector_info,
        tensors=tensors,
        capabilities=capabilities(model),
        modified_at=rfc3339_local(model.mtime_ns),
    )


def process_model(loaded: LoadedModel) -> ProcessModel:
    """One ``/api/ps`` row (Go's ``api.ProcessModelResponse``)."""
    return ProcessModel(
        name=loaded.name,
        model=loaded.model,
        size=loaded.size,
        digest=loaded.digest,
        details=ModelDetails.model_validate(dict(loaded.details)),
        expires_at=rfc3339_local(loaded.expires_at),
        size_vram=loaded.size_vram,
        context_length=loaded.context_length,
        devices={name: int(size) for name, size in loaded.device_bytes.items() if size > 0},
    )
