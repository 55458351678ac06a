"""The worker protocol: newline-delimited JSON over a socket pair.

The server starts ``python -m pollama.runner.worker --fd N --spec JSON`` with one end of a
``socket.socketpair()`` passed as fd N. The worker loads the model, then sends ``ready`` (or
``fatal`` and exits). After that the server sends operations, each with an ``id`` it chose,
and the worker answers with messages carrying the same ``id``:

server → worker
    {"op": "media", "id": 1, "data": "<base64>", "more": false}
                                           one image or audio clip of completion 1, in
                                           order, each before that completion; a big one
                                           in pieces, all but its last with "more": true
    {"op": "completion", "id": 1,
     "request": {prompt, tokens, add_special, options, return_tokens, format,
                 logprobs, top_logprobs, shift}}
    {"op": "cancel", "id": 1}              stop that completion within one decode step
                                           (or that embedding job at its next pass)
    {"op": "embed", "id": 4, "inputs": ["...", ...], "truncate": true,
     "query": "...", "label": "document", "offset": 0}
                                           query (optional): a cross-encoder scores each
                                           input paired with it; label and offset: how
                                           errors name the inputs ("document 3")
    {"op": "tokenize", "id": 2, "text": "...", "add_special": true}
    {"op": "detokenize", "id": 3, "tokens": [...]}
    {"op": "shutdown"}

worker → server
    {"type": "ready", "info": {RunnerInfo fields}}
    {"type": "fatal", "message": "..."}    loading failed; the worker exits
    {"id": 1, "type": "chunk", "text": "...", "logprobs": [...]}
                                           logprobs only when asked and there are some:
                                           {token, logprob, bytes, top_logprobs: [...]}
    {"id": 1, "type": "done", CompletionChunk fields except text and logprobs}
                                           (stop_sequence: the stop string that ended it;
                                           context_shifted: tokens a context shift dropped;
                                           draft_tokens, draft_accepted: drafted tokens and
                                           those kept, speculative decoding)
    {"id": 2, "type": "result", "tokens": [...]} / {"id": 3, "type": "result", "text": "..."}
    {"id": 4, "type": "result", "vectors": ["<base64 of little-endian float32>", ...],
     "token_counts": [...]}                  one vector per input, in order, not normalized
                                           (with a query: the classifier's scores)
    {"id": 1, "type": "error", "kind": "invalid" | "internal", "message": "..."}

What must stay true: every completion ends with exactly one ``done`` or ``error`` message
(a cancelled one too, with ``done_reason`` ""), every embed with one ``result`` or ``error``
(a cancelled one with nothing: its requester is gone), and the worker never writes anything
else to the socket. A closed socket means the worker died: every open request fails.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from typing import Any

from pollama.runner.base import (
    CompletionChunk,
    CompletionRequest,
    EmbeddingResult,
    Logprob,
    RunnerInfo,
    SamplingOptions,
)

MAX_LINE = 64 << 20


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("protocol message is not an object")
    return value


def request_to_json(request: CompletionRequest) -> dict[str, Any]:
    return {
        "prompt": request.prompt,
        "tokens": request.tokens,
        "add_special": request.add_special,
        "options": request.options.to_json(),
        "return_tokens": request.return_tokens,
        "format": request.format,
        "logprobs": request.logprobs,
        "top_logprobs": request.top_logprobs,
        "shift": request.shift,
    }


MEDIA_PIECE = 8 << 20
"""Bytes of a medium per ``media`` message, so a line stays far within :data:`MAX_LINE`
whatever the image size limit is set to."""


def media_messages(req_id: int, request: CompletionRequest) -> list[dict[str, Any]]:
    """The ``media`` messages that go before a completion, in order."""
    messages = []
    for data in request.media:
        for at in range(0, max(len(data), 1), MEDIA_PIECE):
            piece = base64.b64encode(data[at : at + MEDIA_PIECE]).decode("ascii")
            more = at + MEDIA_PIECE < len(data)
            messages.append({"op": "media", "id": req_id, "data": piece, "more": more})
    return messages


def request_from_json(data: dict[str, Any], media: tuple[bytes, ...] = ()) -> CompletionRequest:
    options = dict(data.get("options") or {})
    options["stop"] = tuple(options.get("stop") or ())
    return CompletionRequest(
        media=media,
        prompt=str(data.get("prompt") or ""),
        tokens=list(data["tokens"]) if data.get("tokens") is not None else None,
        add_special=bool(data.get("add_special", True)),
        options=SamplingOptions(**options),
        return_tokens=bool(data.get("return_tokens", False)),
        format=data.get("format"),
        logprobs=bool(data.get("logprobs", False)),
        top_logprobs=int(data.get("top_logprobs") or 0),
        shift=bool(data.get("shift", True)),
    )


def chunk_to_json(chunk: CompletionChunk) -> dict[str, Any]:
    """A text chunk's fields (``text``, and ``logprobs`` when it has entries)."""
    data: dict[str, Any] = {"text": chunk.text}
    if chunk.logprobs:
        data["logprobs"] = [entry.to_json() for entry in chunk.logprobs]
    return data


def chunk_from_json(data: dict[str, Any]) -> CompletionChunk:
    """Raises ``KeyError``/``TypeError``/``ValueError`` on malformed logprobs."""
    entries = data.get("logprobs")
    return CompletionChunk(
        text=str(data.get("text") or ""),
        logprobs=[Logprob.from_json(e) for e in entries] if entries else None,
    )


def done_to_json(chunk: CompletionChunk) -> dict[str, Any]:
    data = asdict(chunk)
    for key in ("text", "done", "logprobs"):
        data.pop(key)
    return data


def done_from_json(data: dict[str, Any]) -> CompletionChunk:
    fields = {k: data[k] for k in CompletionChunk.__dataclass_fields__ if k in data}
    for key in ("text", "done", "logprobs"):
        fields.pop(key, None)
    return CompletionChunk(done=True, **fields)


def info_from_json(data: dict[str, Any]) -> RunnerInfo:
    """A ``ready`` message's info; a field the worker left out takes its default (a missing
    required one is a ``TypeError``)."""
    return RunnerInfo(**{k: data[k] for k in RunnerInfo.__dataclass_fields__ if k in data})


def embedding_result_to_json(result: EmbeddingResult) -> dict[str, Any]:
    return {
        "vectors": [base64.b64encode(v).decode("ascii") for v in result.vectors],
        "token_counts": list(result.token_counts),
    }


def embedding_result_from_json(data: dict[str, Any]) -> EmbeddingResult:
    """Raises ``ValueError`` (or ``KeyError``/``TypeError``) on a malformed result."""
    vectors = [base64.b64decode(v, validate=True) for v in data["vectors"]]
    counts = [int(n) for n in data["token_counts"]]
    if len(vectors) != len(counts) or any(len(v) % 4 for v in vectors):
        raise ValueError("malformed embedding result")
    return EmbeddingResult(vectors=vectors, token_counts=counts)
