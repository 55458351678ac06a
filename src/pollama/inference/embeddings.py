"""The embedding service: resolve the model, schedule its runner, embed, shape the vectors.

Every embedding endpoint (``/api/embed``, ``/api/embeddings``, ``/v1/embeddings``) calls
this one path, as every generation endpoint calls ``inference/service.py``, and it goes the
same way: checks that need no model come first (:meth:`EmbeddingService.prepare`), then the
runner is held through ``scheduler.use`` (keep-alive, the queue bound, eviction, memory),
then the worker embeds (``runner/embedder.py``) and the vectors are finished here, once for
every protocol (``inference/vectors.py``: normalized, shortened, checked).

What must stay true:

* an embedding request and a generation request for the same model load it with the same
  ``LoadSpec`` (``InferenceService.placement``), so they share one runner instead of
  reloading it in turns;
* embedding models (a GGUF pooling type: the ``embedding`` capability) load with
  ``LoadSpec.embedding`` and ``num_parallel`` 1, as Ollama loads them
  (docs/ollama-behaviour.md#embeddings);
* any model may be asked, as in Ollama (no capability check): a generation model answers
  with last-token pooling (``runner/llama.py`` ``EmbeddingContext``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pollama.errors import ContextOverflow, InvalidRequest, ModelNotFound
from pollama.gguf import POOLING_RANK, GGUFInfo
from pollama.inference.bounds import TokenFloor
from pollama.inference.embed_request import EmbeddingJob, embedding_inputs
from pollama.names import ModelName
from pollama.runner.base import LoadSpec, RunnerInfo
from pollama.runner.embedder import Naming
from pollama.scheduler import ModelRef
from pollama.store import LocalModel
from pollama.store.describe import model_gguf

if TYPE_CHECKING:
    from pollama.inference.service import InferenceService
    from pollama.inference.vectors import Vector

__all__ = [
    "EmbeddingJob",
    "EmbedResponse",
    "EmbeddingService",
    "PreparedEmbed",
    "bounded_inputs",
    "embedding_inputs",
    "legacy_raw",
]

log = logging.getLogger(__name__)


@dataclass
class EmbedResponse:
    """The finished vectors (float32 arrays, in input order) and Ollama's counts."""

    model: str
    vectors: list[Vector]
    prompt_eval_count: int = 0
    total_duration: int = 0  # nanoseconds
    load_duration: int = 0

    def float64_lists(self) -> list[list[float]]:
        from pollama.inference import vectors

        return [vectors.to_float64_list(v) for v in self.vectors]

    def base64_strings(self) -> list[str]:
        from pollama.inference import vectors

        return [vectors.to_base64(v) for v in self.vectors]


@dataclass
class PreparedEmbed:
    """A request that passed every check that needs no loaded model."""

    request: EmbeddingJob
    model: LocalModel
    spec: LoadSpec
    ref: ModelRef
    keep_alive: float | None
    normalize: bool


def legacy_raw(info: GGUFInfo) -> bool:
    """Whether Ollama's legacy ``/api/embeddings`` returns this model's vectors unnormalized
    (``legacyEmbeddingsWereRaw``: the runner's raw output, kept for the old BERT and
    nomic-bert paths that did not normalize); every other model gets normalized vectors."""
    arch = info.architecture or ""
    if info.pooling_type is None:
        return False
    normalize = info.kv.get(f"{arch}.normalize_embeddings")
    if arch == "bert":
        if info.kv.get("tokenizer.ggml.model", "bert") != "bert":
            return True
        return normalize is False
    if arch in ("nomic-bert", "nomic-bert-moe"):
        return normalize is not True
    return False


def bounded_inputs(
    inputs: list[str], info: RunnerInfo, *, truncate: bool, naming: Naming | None = None
) -> list[str]:
    """The inputs as the worker may take them: one far longer than the context is cut
    (``truncate``, keeping more than the tokens truncation keeps) or refused naming both
    counts, before the worker spends memory on all of it (``inference/bounds.py``).
    ``naming`` says how the error names an input (``input 3``, ``document 3``)."""
    floor = TokenFloor(info.max_token_bytes)
    naming = naming or Naming()
    bounded = []
    for i, text in enumerate(inputs):
        least = floor.of(text)
        if least > info.n_ctx:
            if not truncate:
                raise ContextOverflow(
                    f"the input length exceeds the context length: "
                    f"{naming.name(i, len(inputs))} has at least "
                    f"{least} tokens, the context holds {info.n_ctx}"
                )
            text = floor.cut(text, info.n_ctx)
        bounded.append(text)
    return bounded


class EmbeddingService:
    """Embeddings over the inference service's store, scheduler and telemetry."""

    def __init__(self, inference: InferenceService) -> None:
        self.inference = inference
        self.store = inference.store
        self.scheduler = inference.scheduler
        self.telemetry = inference.telemetry

    def prepare(self, req: EmbeddingJob) -> PreparedEmbed:
        if req.dimensions is not None and req.dimensions < 0:
            raise InvalidRequest(f"dimensions must be a positive integer, not {req.dimensions}")
        model = self._resolve(req)
        info = model_gguf(model)
        if info is None:
            raise InvalidRequest(f"model '{req.model}' has no weights to run")
        if info.pooling_type == POOLING_RANK:
            raise InvalidRequest(
                f"model '{req.model}' is a reranker (a cross-encoder): it scores "
                "query-document pairs through /api/rerank and has no embeddings"
            )
        placement = self.inference.placement(model, info, req.options)
        return PreparedEmbed(
            request=req,
            model=model,
            spec=placement.spec,
            ref=placement.ref,
            keep_alive=placement.keep_alive_for(req.keep_alive),
            normalize=req.endpoint == "embed" or not legacy_raw(info),
        )

    def _resolve(self, req: EmbeddingJob) -> LocalModel:
        """The model, with Ollama's wording for each endpoint
        (docs/ollama-behaviour.md#error-messages)."""
        if req.endpoint == "embeddings":
            if not req.model:
                raise InvalidRequest("model is required")
            found = self.store.find(ModelName.parse(req.model))
            if found is None:
                raise ModelNotFound(f'model "{req.model}" not found, try pulling it first')
            return found
        found = self.store.find(ModelName.parse(req.model)) if req.model else None
        if found is None:
            raise ModelNotFound(f"model '{req.model}' not found")
        return found

    async def embed(self, p: PreparedEmbed) -> EmbedResponse:
        """The request's vectors (none for a load-only request: it loads, or with
        ``keep_alive`` 0 unloads, the model)."""
        req = p.request
        started = time.monotonic_ns()
        if not req.inputs and p.keep_alive == 0:
            await self.scheduler.expire(p.ref.key)
            return EmbedResponse(req.model, [])
        gen = self.telemetry.generation(p.ref.name) if req.inputs else None
        try:
            async with self.scheduler.use(p.ref, p.spec, p.keep_alive) as lease:
                load_duration = time.monotonic_ns() - started
                if not req.inputs:
                    return EmbedResponse(req.model, [])  # Ollama reports no durations here
                inputs = bounded_inputs(req.inputs, lease.info, truncate=req.truncate)
                result = await lease.runner.embed(inputs, truncate=req.truncate)
            from pollama.inference import vectors  # numpy: only once something is embedded

            dims = req.dimensions or None
            finished = [
                vectors.finish(vectors.from_bytes(raw), dimensions=dims, normalize=p.normalize)
                for raw in result.vectors
            ]
        except BaseException as exc:
            if gen is not None:
                gen.failed(exc if isinstance(exc, Exception) else None)
            raise
        count = sum(result.token_counts)
        if gen is not None:
            gen.finished(prompt_tokens=count, cached_tokens=0, generated_tokens=0, reason="embed")
        return EmbedResponse(
            req.model,
            finished,
            prompt_eval_count=count,
            total_duration=time.monotonic_ns() - started,
            load_duration=load_duration,
        )
