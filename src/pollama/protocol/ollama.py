"""Pydantic models of Ollama's native API (``/api/*``), in the field order of its docs.

Requests ignore unknown fields, as Ollama does. Responses are dumped with
``exclude_none`` where Ollama's Go structs say ``omitempty``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from pollama.errors import InvalidRequest
from pollama.inference.embed_request import EmbeddingJob, embedding_inputs
from pollama.inference.types import InferenceRequest
from pollama.store.create import CreateProgress, CreateSpec


class OllamaModel(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, protected_namespaces=())


class Message(OllamaModel):
    role: str
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @field_validator("role")
    @classmethod
    def _lowercase_role(cls, value: str) -> str:
        return value.lower()


class CreateRequest(OllamaModel):
    model: str = ""
    name: str = ""  # deprecated spelling of ``model``
    stream: bool | None = None
    quantize: str | None = None
    quantization: str | None = None  # deprecated spelling of ``quantize``
    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    draft_files: dict[str, str] | None = None  # Modelfile DRAFT: an uploaded GGUF
    draft: str | None = None  # beyond Ollama: DRAFT naming a local model
    draft_quantize: str | None = None  # ollama create --draft-quantize
    template: str | None = None
    license: str | list[str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Message] | None = None
    renderer: str | None = None
    parser: str | None = None
    requires: str | None = None

    def to_spec(self) -> CreateSpec:
        """The store's terms: ``model`` (or ``name``), ``from``, ``quantize`` (or
        ``quantization``, trimmed) and ``draft_quantize`` (trimmed), a license string as a
        one-item list, messages as stored (unset fields left out)."""
        license_ = [self.license] if isinstance(self.license, str) else (self.license or [])
        return CreateSpec(
            name=self.model or self.name,
            base=self.from_ or "",
            files=dict(self.files or {}),
            adapters=dict(self.adapters or {}),
            draft_files=dict(self.draft_files or {}),
            draft=(self.draft or "").strip(),
            quantize=(self.quantize or self.quantization or "").strip(),
            draft_quantize=(self.draft_quantize or "").strip(),
            template=self.template or "",
            system=self.system or "",
            license=tuple(license_),
            parameters=dict(self.parameters or {}),
            messages=tuple(m.model_dump(exclude_none=True) for m in self.messages or ()),
            renderer=self.renderer or "",
            parser=self.parser or "",
            requires=self.requires or "",
        )


class ProgressResponse(OllamaModel):
    """A create's progress line (Go ``api.ProgressResponse``; zero values are kept, only
    unset ones left out)."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None

    @classmethod
    def of(cls, step: CreateProgress) -> ProgressResponse:
        return cls(
            status=step.status, digest=step.digest, total=step.total, completed=step.completed
        )


class ModelRequest(OllamaModel):
    """``/api/show`` and ``/api/delete``: ``model`` with the deprecated ``name`` fallback."""

    model: str = ""
    name: str = ""
    verbose: bool = False
    system: str | None = None
    template: str | None = None
    options: dict[str, Any] | None = None

    @property
    def target(self) -> str:
        return self.model or self.name


class CopyRequest(OllamaModel):
    source: str = ""
    destination: str = ""


class ModelDetails(OllamaModel):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListModel(OllamaModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails
    capabilities: list[str] | None = None


class ListResponse(OllamaModel):
    models: list[ListModel]


class ShowTensorInfo(OllamaModel):
    name: str
    type: str
    shape: list[int]


class ShowResponse(OllamaModel):
    license: str | None = None
    modelfile: str
    parameters: str | None = None
    template: str | None = None
    system: str | None = None
    renderer: str | None = None
    parser: str | None = None
    details: ModelDetails
    messages: list[Message] | None = None
    requires: str | None = None
    model_info: dict[str, Any]
    projector_info: dict[str, Any] | None = None
    tensors: list[ShowTensorInfo] | None = None
    capabilities: list[str] | None = None
    modified_at: str


class VersionResponse(OllamaModel):
    """``/api/version``: the Ollama version whose behaviour is matched, and pollama's own."""

    version: str
    pollama_version: str


class GarbageItem(OllamaModel):
    path: str  # relative to the models directory
    size: int
    kind: str


class PurgeRequest(OllamaModel):
    """pollama's own ``/api/purge``: list (``dry_run``) or remove unneeded store files."""

    dry_run: bool = True
    # When removing, only these paths (from an earlier dry run) are removed, so the user
    # confirms exactly what goes.
    paths: list[str] | None = None


class PurgeResponse(OllamaModel):
    items: list[GarbageItem]
    total: int
    freed: int


class _InferenceBody(OllamaModel):
    """The fields ``/api/generate`` and ``/api/chat`` share, and their translation."""

    model: str = ""
    stream: bool | None = None
    format: Any = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    truncate: bool | None = None
    # Strict: a JSON boolean or null, as Go decodes ``*bool`` ("yes" would pass as true).
    shift: StrictBool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    debug_render_only: bool = Field(default=False, alias="_debug_render_only")

    def _common(self) -> dict[str, Any]:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise InvalidRequest("top_logprobs must be between 0 and 20")
        return {
            "model": self.model,
            "think": self.think,
            "format": self.format,
            "options": self.options or {},
            "keep_alive": self.keep_alive,
            "truncate": self.truncate is not False,
            "shift": self.shift is not False,
            "logprobs": bool(self.logprobs),
            "top_logprobs": self.top_logprobs or 0,
        }


class GenerateRequest(_InferenceBody):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None

    def to_inference(self) -> InferenceRequest:
        return InferenceRequest(
            kind="generate",
            prompt=self.prompt,
            suffix=self.suffix,
            system=self.system,
            template=self.template,
            context=self.context,
            raw=self.raw,
            images=self.images,
            **self._common(),
        )


class ChatRequest(_InferenceBody):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None

    def to_inference(self) -> InferenceRequest:
        return InferenceRequest(
            kind="chat",
            messages=[m.model_dump(exclude_none=True) for m in self.messages],
            images=[img for m in self.messages for img in (m.images or [])] or None,
            tools=self.tools,
            **self._common(),
        )


class TokenizeRequest(OllamaModel):
    """``POST /api/tokenize`` (pollama's, as asked in ollama#3582): ``content`` to tokens,
    with each token's text piece when ``with_pieces``."""

    model: str = ""
    content: str = ""
    add_special: bool = True
    with_pieces: bool = False
    keep_alive: Any = None
    options: dict[str, Any] | None = None


class DetokenizeRequest(OllamaModel):
    """``POST /api/detokenize``: tokens back to text. ``tokens`` is checked by the service
    (each an integer in the vocabulary), so its error names the first bad one."""

    model: str = ""
    tokens: list[Any] = Field(default_factory=list)
    keep_alive: Any = None
    options: dict[str, Any] | None = None


class ProcessModel(OllamaModel):
    """One ``/api/ps`` row (Go ``api.ProcessModelResponse``); every field is always sent."""

    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int
    # pollama's own: the runner's bytes on each device ("CPU", "CUDA0", "RPC0[host:port]"),
    # so a model split over machines shows where each part is; {} when not reported.
    devices: dict[str, int] = {}


class ProcessResponse(OllamaModel):
    models: list[ProcessModel]


class EmbedRequest(OllamaModel):
    """``POST /api/embed``. An absent or empty-string ``input`` only loads the model."""

    model: str = ""
    input: Any = None  # a string or a list of strings; checked by ``to_embedding``
    truncate: bool | None = None
    dimensions: int | None = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None

    def to_embedding(self) -> EmbeddingJob:
        inputs = [] if self.input is None or self.input == "" else embedding_inputs(self.input)
        return EmbeddingJob(
            model=self.model,
            inputs=inputs,
            truncate=self.truncate is not False,
            dimensions=self.dimensions,
            keep_alive=self.keep_alive,
            options=self.options or {},
        )


class EmbeddingsRequest(OllamaModel):
    """``POST /api/embeddings`` (legacy): one ``prompt``; an empty one only loads the model."""

    model: str = ""
    prompt: str = ""
    keep_alive: Any = None
    options: dict[str, Any] | None = None

    def to_embedding(self) -> EmbeddingJob:
        return EmbeddingJob(
            model=self.model,
            inputs=[self.prompt] if self.prompt else [],
            keep_alive=self.keep_alive,
            options=self.options or {},
            endpoint="embeddings",
        )
