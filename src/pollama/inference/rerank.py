"""Reranking: score documents against a query, whatever route asked (``/api/rerank``,
``/v1/rerank``, ``/rerank``).

Two methods, chosen by the model, and the response says which (``method``):

* **cross-encoder** (a GGUF whose pooling type is rank, e.g. a converted
  ``*ForSequenceClassification``): the model reads each (query, document) pair and its
  classifier's first output is the score, as llama-server's ``/rerank`` returns it (a logit:
  any real number, higher is more relevant);
* **cosine** (an embedding model): the query and each document are embedded and the score
  is the cosine of their vectors (-1 to 1).

A generation model cannot rerank: the error says which installed models can.

It goes the embeddings' way (``inference/embeddings.py``): checks that need no model first,
the runner held through ``scheduler.use``, the worker's embedding loop batching the
documents (``runner/embedder.py``), so a document's score does not depend on the others in
its batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pollama.errors import ContextOverflow, InvalidRequest, ModelNotFound
from pollama.inference.bounds import TokenFloor
from pollama.inference.embeddings import bounded_inputs
from pollama.names import ModelName
from pollama.runner.base import LoadSpec, RunnerInfo
from pollama.runner.embedder import Naming
from pollama.scheduler import ModelRef
from pollama.store.describe import capabilities, model_gguf

if TYPE_CHECKING:
    from pollama.inference.service import InferenceService

__all__ = ["MAX_DOCUMENTS", "PreparedRerank", "RerankJob", "RerankResult", "RerankService"]

MAX_DOCUMENTS = 4096
"""Documents in one request. Each costs a forward pass; Cohere's API advises at most 1,000."""
_NAMES_LISTED = 10  # installed models named in the "cannot rerank" error

Method = Literal["cross-encoder", "cosine"]


@dataclass
class RerankJob:
    """One rerank request, whatever route it came by (``protocol/rerank.py`` builds it)."""

    model: str
    query: str
    documents: list[str]
    truncate: bool = True
    keep_alive: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.query:
            raise InvalidRequest("query is empty: give the text to rank the documents against")
        if not self.documents:
            raise InvalidRequest("documents is empty: give at least one document to rank")
        if len(self.documents) > MAX_DOCUMENTS:
            raise InvalidRequest(
                f"too many documents: {len(self.documents)}, at most {MAX_DOCUMENTS} per "
                "request; split them over several requests"
            )


@dataclass
class RerankResult:
    """Each document's score, in the request's order, and the counts a response reports."""

    model: str
    method: Method
    scores: list[float]
    total_tokens: int
    total_duration: int = 0  # nanoseconds
    load_duration: int = 0


@dataclass
class PreparedRerank:
    request: RerankJob
    method: Method
    spec: LoadSpec
    ref: ModelRef
    keep_alive: float | None


class RerankService:
    """Reranking over the inference service's store, scheduler and telemetry."""

    def __init__(self, inference: InferenceService) -> None:
        self.inference = inference
        self.store = inference.store
        self.scheduler = inference.scheduler
        self.telemetry = inference.telemetry

    def prepare(self, req: RerankJob) -> PreparedRerank:
        found = self.store.find(ModelName.parse(req.model)) if req.model else None
        if found is None:
            raise ModelNotFound(f"model '{req.model}' not found")
        info = model_gguf(found)
        if info is None:
            raise InvalidRequest(f"model '{req.model}' has no weights to run")
        if info.pooling_type is None:
            raise InvalidRequest(
                f"model '{req.model}' cannot rerank: it is a generation model. A cross-encoder "
                "(capability 'rerank') scores the pairs itself; an embedding model (capability "
                f"'embedding') ranks by cosine. {self._rankers()}"
            )
        placement = self.inference.placement(found, info, req.options)
        return PreparedRerank(
            request=req,
            method="cross-encoder" if info.ranks else "cosine",
            spec=placement.spec,
            ref=placement.ref,
            keep_alive=placement.keep_alive_for(req.keep_alive),
        )

    def _rankers(self) -> str:
        names = []
        for model in self.store.list():
            caps = capabilities(model)
            if "rerank" in caps or "embedding" in caps:
                names.append(model.name.display_shortest())
            if len(names) == _NAMES_LISTED:
                break
        if not names:
            return "No installed model can: create one from a Hugging Face folder."
        return "Installed models that can: " + ", ".join(names) + "."

    async def rerank(self, p: PreparedRerank) -> RerankResult:
        req = p.request
        started = time.monotonic_ns()
        gen = self.telemetry.generation(p.ref.name)
        documents = Naming("document")
        try:
            async with self.scheduler.use(p.ref, p.spec, p.keep_alive) as lease:
                load_duration = time.monotonic_ns() - started
                docs = bounded_inputs(
                    req.documents, lease.info, truncate=req.truncate, naming=documents
                )
                runner = lease.runner
                if p.method == "cross-encoder":
                    _check_query(req.query, lease.info)
                    pairs = await runner.embed(
                        docs, req.truncate, query=req.query, label="document"
                    )
                    scores, tokens = _first_outputs(pairs.vectors), sum(pairs.token_counts)
                else:
                    query = bounded_inputs(
                        [req.query], lease.info, truncate=req.truncate, naming=Naming("query")
                    )
                    q = await runner.embed(query, req.truncate, label="query")
                    d = await runner.embed(docs, req.truncate, label="document")
                    scores = _cosines(q.vectors[0], d.vectors)
                    tokens = sum(q.token_counts) + sum(d.token_counts)
        except BaseException as exc:
            gen.failed(exc if isinstance(exc, Exception) else None)
            raise
        gen.finished(prompt_tokens=tokens, cached_tokens=0, generated_tokens=0, reason="rerank")
        return RerankResult(
            model=req.model,
            method=p.method,
            scores=scores,
            total_tokens=tokens,
            total_duration=time.monotonic_ns() - started,
            load_duration=load_duration,
        )


def _check_query(query: str, info: RunnerInfo) -> None:
    """Refuse, before the worker tokenizes it, a query whose token floor
    (``inference/bounds.py``) already fills the window: it goes with every document, and
    the worker would refuse it after tokenizing megabytes once per batch of documents."""
    least = TokenFloor(info.max_token_bytes).of(query)
    if least >= info.n_ctx:
        raise ContextOverflow(
            f"the query is too long: it has at least {least} tokens, and the context holds "
            f"{info.n_ctx}, which leaves no room for a document"
        )


def _first_outputs(raw: list[bytes]) -> list[float]:
    """A cross-encoder's score of each pair: its classifier's first output (llama-server's
    ``embd[0]``), checked finite."""
    from pollama.inference import vectors

    scores = []
    for item in raw:
        values = vectors.from_bytes(item)
        if len(values) == 0:
            raise InvalidRequest("the model has no classifier outputs to score with")
        scores.append(vectors.checked_float(values[0]))
    return scores


def _cosines(query: bytes, documents: list[bytes]) -> list[float]:
    from pollama.inference import vectors

    q = vectors.finish(vectors.from_bytes(query))
    return [
        vectors.checked_float(float(q @ vectors.finish(vectors.from_bytes(d))))
        for d in documents
    ]
