"""The rerank API's wire shapes: the request every rerank route reads and the bodies it writes.

One request model for the three shapes clients send (all answered at ``/api/rerank``,
``/v1/rerank`` and ``/rerank``):

* Jina, Cohere and llama-server: ``{model, query, documents, top_n?, return_documents?}``,
  answered ``{model, object, method, results: [{index, relevance_score, document?}],
  usage}``; a document may be a string or Cohere's ``{"text": ...}``;
* Hugging Face TEI: ``{query, texts, return_text?}``, answered with TEI's bare list
  ``[{index, score, text?}]``, as llama-server answers it.

Results are sorted by score, highest first; equal scores keep the documents' order.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from pollama.errors import InvalidRequest
from pollama.inference.rerank import RerankJob, RerankResult

__all__ = ["RerankRequest", "rerank_body"]


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str = ""
    query: Any = None
    documents: Any = None
    texts: Any = None  # TEI's name for the documents
    top_n: StrictInt | None = None
    return_documents: StrictBool = False
    return_text: StrictBool = False  # TEI's name for return_documents
    truncate: StrictBool | None = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None

    @property
    def tei(self) -> bool:
        """Asked in TEI's shape (``texts``), so answered in it."""
        return self.documents is None and self.texts is not None

    def to_job(self) -> RerankJob:
        if not isinstance(self.query, str):
            raise InvalidRequest("query must be a string: the text to rank the documents against")
        if self.top_n is not None and self.top_n < 1:
            raise InvalidRequest(f"top_n must be at least 1, not {self.top_n}")
        return RerankJob(
            model=self.model,
            query=self.query,
            documents=_documents(self.texts if self.tei else self.documents),
            truncate=self.truncate is not False,
            keep_alive=self.keep_alive,
            options=self.options or {},
        )


def _documents(value: Any) -> list[str]:
    """The documents as texts: a list of strings or of Cohere's ``{"text": ...}`` objects."""
    if value is None:
        raise InvalidRequest("documents is required: a list of texts to rank")
    if not isinstance(value, list):
        raise InvalidRequest("documents must be a list of strings")
    texts = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise InvalidRequest(
                f"document {i} must be a string (or an object with a \"text\" string)"
            )
        texts.append(item)
    return texts


def rerank_body(req: RerankRequest, job: RerankJob, result: RerankResult, *, native: bool) -> Any:
    """The response: TEI's list, or the Jina/Cohere/llama-server object (with Ollama's
    durations on ``/api/rerank``, ``native``)."""
    order = sorted(range(len(result.scores)), key=lambda i: -result.scores[i])
    order = order[: req.top_n] if req.top_n is not None else order
    if req.tei:
        tei: list[dict[str, Any]] = []
        for i in order:
            item: dict[str, Any] = {"index": i, "score": result.scores[i]}
            if req.return_text:
                item["text"] = job.documents[i]
            tei.append(item)
        return tei
    results: list[dict[str, Any]] = []
    for i in order:
        entry: dict[str, Any] = {"index": i, "relevance_score": result.scores[i]}
        if req.return_documents:
            entry["document"] = {"text": job.documents[i]}
        results.append(entry)
    body: dict[str, Any] = {
        "model": result.model,
        "object": "list",
        "method": result.method,
        "results": results,
        "usage": {"prompt_tokens": result.total_tokens, "total_tokens": result.total_tokens},
    }
    if native:
        body.update(
            total_duration=result.total_duration,
            load_duration=result.load_duration,
            prompt_eval_count=result.total_tokens,
        )
    return body
