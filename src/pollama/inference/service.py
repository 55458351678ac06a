"""The inference service: resolve the model, schedule a runner, build the prompt, stream.

Every protocol front-end calls this one path (DESIGN principle 1). It is written in two
steps so that a front-end can answer a bad request with a real status code before it starts
streaming: :meth:`InferenceService.prepare` does every check that needs no model loaded,
then :meth:`stream` (or :meth:`load` / :meth:`unload` for an empty prompt) does the work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from pollama.config import Settings
from pollama.errors import CapabilityMissing, InvalidRequest, ModelNotFound
from pollama.gguf import GGUFInfo
from pollama.inference.prompt import (
    PromptResult,
    PromptTemplate,
    build_chat_prompt,
    build_generate_prompt,
    default_stop_words,
    prompt_template_for,
)
from pollama.inference.types import InferenceEvent, InferenceRequest, Metrics, Truncation
from pollama.names import ModelName
from pollama.protocol.options import coerce_options, merge_options
from pollama.runner.base import CompletionRequest, LoadSpec, Runner, SamplingOptions
from pollama.scheduler import ModelRef, Scheduler, estimate_memory, parse_keep_alive
from pollama.store import LocalModel, Store
from pollama.store.describe import capabilities, details, model_gguf

log = logging.getLogger(__name__)

DEFAULT_NUM_CTX = 4096


@dataclass
class Prepared:
    """A request that passed every check that needs no loaded model."""

    request: InferenceRequest
    model: LocalModel
    info: GGUFInfo
    options: dict[str, Any]
    spec: LoadSpec
    ref: ModelRef
    keep_alive: float | None

    @property
    def is_empty(self) -> bool:
        """An empty prompt or message list only loads (or unloads) the model (spec §2.7)."""
        if self.request.kind == "chat":
            return not self.request.messages
        return not self.request.prompt and not self.request.suffix


class InferenceService:
    def __init__(self, settings: Settings, store: Store, scheduler: Scheduler) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler

    # -- checks ------------------------------------------------------------------------

    def prepare(self, req: InferenceRequest) -> Prepared:
        model = self._resolve(req)
        info = model_gguf(model)
        if info is None:
            raise InvalidRequest(f"model '{req.model}' has no weights to run")
        self._check_capabilities(req, model)
        request_options, warnings = coerce_options(req.options or {})
        for warning in warnings:
            log.warning("%s", warning)
        options = merge_options(model.params(), request_options)
        spec = self._load_spec(model, info, options)
        ref = ModelRef(
            key=spec.model_path,
            name=model.name.display_shortest(),
            digest=model.digest,
            size=model.size,
            details=details(model).model_dump(),
            estimate_bytes=estimate_memory(info, spec),
        )
        return Prepared(req, model, info, options, spec, ref, parse_keep_alive(req.keep_alive))

    def _resolve(self, req: InferenceRequest) -> LocalModel:
        if not req.model:
            if req.kind == "chat":
                raise InvalidRequest("model is required")
            raise ModelNotFound("model '' not found")
        model = self.store.find(ModelName.parse(req.model))
        if model is None:
            raise ModelNotFound(f"model '{req.model}' not found")
        return model

    def _check_capabilities(self, req: InferenceRequest, model: LocalModel) -> None:
        caps = capabilities(model)
        full = str(model.name)
        if "completion" not in caps:
            raise CapabilityMissing(f'"{req.model}" does not support {req.kind}')
        if req.images and "vision" not in caps:
            raise CapabilityMissing(
                f'"{req.model}" does not support images: it has no vision capability'
            )
        if req.tools:
            if "tools" not in caps:
                raise CapabilityMissing(f"{full} does not support tools")
            raise InvalidRequest("tool calling is not supported by this server yet")
        if req.think not in (None, False):
            if "thinking" not in caps:
                raise CapabilityMissing(f'"{req.model}" does not support thinking')
            raise InvalidRequest("thinking output is not supported by this server yet")
        if req.format not in (None, ""):
            raise InvalidRequest(
                "structured outputs ('format') are not supported by this server yet"
            )
        if req.raw and (req.template or req.system or req.context):
            raise InvalidRequest("raw mode does not support template, system, or context")

    def _load_spec(self, model: LocalModel, info: GGUFInfo, options: dict[str, Any]) -> LoadSpec:
        num_ctx = (
            int(options.get("num_ctx") or 0) or self.settings.context_length or DEFAULT_NUM_CTX
        )
        if info.context_length:
            num_ctx = min(num_ctx, int(info.context_length))
        model_path = model.model_path()
        assert model_path is not None
        return LoadSpec(
            model_path=str(model_path),
            num_ctx=max(num_ctx, 4),
            num_parallel=max(self.settings.num_parallel, 1),
            num_batch=int(options.get("num_batch") or 512),
            num_thread=int(options.get("num_thread") or 0),
            flash_attention=self.settings.flash_attention,
            kv_cache_type=self.settings.kv_cache_type or "f16",
            use_mmap=options.get("use_mmap"),
            adapters=tuple(str(p) for p in model.adapter_paths()),
        )

    # -- work ----------------------------------------------------------------------------

    async def load(self, p: Prepared) -> None:
        async with self.scheduler.use(p.ref, p.spec, p.keep_alive):
            pass

    async def unload(self, p: Prepared) -> None:
        await self.scheduler.expire(p.ref.key)

    async def _build_prompt(
        self, p: Prepared, runner: Runner
    ) -> tuple[PromptTemplate, PromptResult]:
        """Render the request's prompt for the loaded model, truncating a chat to fit."""
        req = p.request

        async def count_tokens(text: str) -> int:
            return len(await runner.tokenize(text))

        template = prompt_template_for(
            p.model, p.info, go_template_enabled=self.settings.go_template
        )
        if req.kind == "chat":
            result = await build_chat_prompt(
                template,
                req.messages,
                system_default=p.model.system(),
                model_messages=p.model.messages(),
                tools=req.tools,
                think=req.think,
                num_ctx=p.spec.num_ctx,
                count_tokens=count_tokens,
                truncate=req.truncate,
            )
        else:
            context_text = await runner.detokenize(req.context) if req.context else None
            result = await build_generate_prompt(
                template,
                prompt=req.prompt,
                system=req.system,
                system_default=p.model.system(),
                model_messages=p.model.messages(),
                suffix=req.suffix,
                raw=req.raw,
                context_text=context_text,
                template_override=req.template,
                images=req.images,
                think=req.think,
                num_ctx=p.spec.num_ctx,
                count_tokens=count_tokens,
                truncate=req.truncate,
                model_name=str(p.model.name),
            )
        return template, result

    async def count_tokens(self, p: Prepared) -> int:
        """How many tokens the request's prompt has for this model (loads it if needed)."""
        async with self.scheduler.use(p.ref, p.spec, p.keep_alive) as lease:
            _template, result = await self._build_prompt(p, lease.runner)
            return result.prompt_tokens or len(await lease.runner.tokenize(result.prompt))

    async def stream(self, p: Prepared) -> AsyncIterator[InferenceEvent]:
        started = time.monotonic_ns()
        req = p.request
        async with self.scheduler.use(p.ref, p.spec, p.keep_alive) as lease:
            # Ollama's load_duration: the time to get a ready runner (> 0 even when loaded).
            load_duration = time.monotonic_ns() - started
            runner = lease.runner

            template, result = await self._build_prompt(p, lease.runner)
            options = dict(p.options)
            if not options.get("stop"):
                options["stop"] = default_stop_words(p.model.params(), template)
            completion = CompletionRequest(
                prompt=result.prompt,
                options=SamplingOptions.from_options(options),
                return_tokens=req.kind == "generate" and not req.raw,
            )
            truncation = (
                Truncation(result.messages_dropped, result.prompt_tokens, p.spec.num_ctx)
                if result.truncated
                else None
            )
            if truncation:
                log.warning(
                    "chat truncated to fit num_ctx=%d: dropped %d oldest message(s)",
                    p.spec.num_ctx,
                    result.messages_dropped,
                )
            async with aclosing(runner.completion(completion)) as chunks:
                async for chunk in chunks:
                    if not chunk.done:
                        if chunk.text:
                            yield InferenceEvent(text=chunk.text)
                        continue
                    metrics = Metrics(
                        total_duration=time.monotonic_ns() - started,
                        load_duration=load_duration,
                        prompt_eval_count=chunk.prompt_eval_count,
                        prompt_eval_duration=chunk.prompt_eval_duration_ns,
                        eval_count=chunk.eval_count,
                        eval_duration=chunk.eval_duration_ns,
                        prompt_cached=chunk.prompt_cached,
                    )
                    yield InferenceEvent(
                        text=chunk.text,
                        done=True,
                        done_reason=chunk.done_reason,
                        metrics=metrics,
                        context=chunk.tokens,
                        truncation=truncation,
                    )
