"""The inference service: resolve the model, schedule a runner, build the prompt, stream.

Every protocol front-end calls this one path (docs/architecture.md#one-inference-path). It is
written in two steps so that a front-end can answer a bad request with a real status code before
it starts streaming: :meth:`InferenceService.prepare` does every check that needs no model
loaded, then :meth:`stream` (or :meth:`load` / :meth:`unload` for an empty prompt) does the
work.

Output is split here, once for every protocol (``inference.parsers``): thinking between the
template's thinking tags, tool calls after its tool-call tag, content for the rest. The rules
follow Ollama's ``ChatHandler``:

* a model whose template can think thinks unless ``think`` is false (``think`` absent means
  true); ``think`` on a model that cannot is refused (dropped for Anthropic's endpoint);
* ``format`` (None, ``"json"``, a schema) is checked before loading and handed to the worker,
  which constrains sampling. For a thinking model it applies in two phases
  (docs/ollama-behaviour.md#structured-output): the reasoning is generated freely, and once the
  answer starts generation restarts constrained with the reasoning as a prefill. Unlike Ollama, the
  prefill is the raw text the model wrote through its closing tag (an exact continuation, whatever
  the template), the restart also happens when the model skips thinking (so the constraint always
  holds), the first phase's tokens count in ``eval_count`` and in ``num_predict``;
* a forced tool call (``tool_choice`` required or a named function) prefills the template's
  tool-call tag and constrains the call's JSON to the tools' schemas.

Token logprobs travel with the chunk they came in: its events carry them whatever the
parsers made of its text, and a chunk whose text they hold back still sends its entries on
an otherwise empty event (as Ollama does). The chunk that starts a two-phase answer is
generated again under the constraint, so its entries are dropped with its text. The final
event names the stop string that ended the response (``stop_sequence``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any

from pollama.config import ModelPreset, Settings
from pollama.errors import (
    CapabilityMissing,
    ContextOverflow,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    RpcServerUnavailable,
)
from pollama.format import human_bytes
from pollama.gguf import GGUFInfo
from pollama.inference.audio import ValidatedAudio
from pollama.inference.bounds import TokenFloor
from pollama.inference.images import (
    ImageLimits,
    ValidatedMedium,
    check_count,
    request_images,
    validate_images,
)
from pollama.inference.parsers import (
    OutputParser,
    ThinkingParser,
    ToolCallParser,
    thinking_tags_for,
    tool_call_tag_for,
    tool_names,
)
from pollama.inference.phases import GenerationRun, OutputPlan, generate
from pollama.inference.presets import NO_PRESET, preset_for
from pollama.inference.prompt import (
    PromptResult,
    PromptTemplate,
    build_chat_prompt,
    build_generate_prompt,
    check_raw_mode,
    context_overflow,
    default_stop_words,
    prompt_template_for,
)
from pollama.inference.structured import normalize_format, tool_call_schema
from pollama.inference.types import (
    InferenceEvent,
    InferenceRequest,
    ToolCall,
    Truncation,
)
from pollama.names import ModelName
from pollama.options import (
    DEFAULT_NUM_CTX,
    DEFAULT_OPTIONS,
    coerce_options,
    merge_options,
)
from pollama.runner.base import DeviceInfo, LoadSpec, Logprob, usable_cpus
from pollama.runner.rpc import unreachable
from pollama.scheduler import Lease, ModelRef, Scheduler, parse_keep_alive
from pollama.scheduler.memory import system_memory
from pollama.scheduler.placement import Offload, plan_offload, usable_devices
from pollama.store import LocalModel, Store
from pollama.store.describe import capabilities, details, model_gguf
from pollama.telemetry import NULL_TELEMETRY, Telemetry, observe_events

log = logging.getLogger(__name__)

THINK_LEVELS = ("high", "medium", "low", "max")
# A model whose own GGUF holds vision (or audio) blocks has the vision (audio) capability
# (Ollama's new engine runs those), but llama.cpp sees and hears only through a separate
# projector GGUF: its media are refused rather than dropped (README, "Images").
_NO_PROJECTOR = (
    '"{model}" has {sense} weights inside its model file but no projector layer, and '
    "llama.cpp can only {verb} through a separate projector GGUF: create the model with the "
    "projector as a second FROM line, or send the request without {media}"
)
# What one image costs in the window when fitting a chat before the worker said (Ollama's).
_IMAGE_TOKENS_DEFAULT = 768


def thinks(think: bool | str | None) -> bool:
    """Ollama's ``ThinkValue.Bool``: true, or a level."""
    return think is True or think in THINK_LEVELS


def check_think(think: Any) -> bool | str | None:
    """A ``think`` value as Ollama decodes it (``InvalidRequest`` with its message if bad)."""
    if think is None or isinstance(think, bool):
        return think
    if isinstance(think, str) and think in THINK_LEVELS:
        return think
    if isinstance(think, str):
        raise InvalidRequest(
            f"invalid think value: {json.dumps(think)} "
            '(must be "high", "medium", "low", "max", true, or false)'
        )
    raise InvalidRequest(
        'think must be a boolean or string ("high", "medium", "low", "max", true, or false)'
    )


@dataclass(frozen=True)
class Placement:
    """Where a request runs: its options merged over the model's parameters, the spec the
    model loads with, and the scheduler's reference to the model loaded that way."""

    options: dict[str, Any]
    spec: LoadSpec
    ref: ModelRef
    keep_alive: float | None = None  # the model's preset's, for requests that set none

    def keep_alive_for(self, requested: Any) -> float | None:
        """A request's ``keep_alive``, else its model's preset's (else None: the runner's
        or the server's)."""
        parsed = parse_keep_alive(requested)
        return self.keep_alive if parsed is None else parsed


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
    think: bool | str | None = None  # after the capability rules (absent → true if it can)
    format: str | dict[str, Any] | None = None  # normalized (``structured.normalize_format``)
    tools: list[dict[str, Any]] | None = None  # None when ``tool_choice`` is "none"
    images: tuple[ValidatedMedium, ...] = ()  # every request image and audio clip, checked

    @property
    def is_empty(self) -> bool:
        """An empty prompt or message list only loads (or unloads) the model
        (docs/ollama-behaviour.md#load-and-unload-requests)."""
        if self.request.kind == "chat":
            return not self.request.messages
        return not self.request.prompt and not self.request.suffix


@dataclass(frozen=True)
class RenderedPrompt:
    """A request's prompt as rendered for its model, and the images it references."""

    prompt: str
    image_count: int


class InferenceService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        scheduler: Scheduler,
        telemetry: Telemetry = NULL_TELEMETRY,
        devices: Callable[[], Sequence[DeviceInfo]] | None = None,
    ) -> None:
        """``devices`` reports the compute devices layers may be offloaded to (by default the
        scheduler's inventory; an empty one keeps every model on the CPU)."""
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self.telemetry = telemetry
        self.devices = devices or scheduler.devices
        self._image_pool: ThreadPoolExecutor | None = None  # made by the first image request

    # -- checks ------------------------------------------------------------------------

    async def prepare(self, req: InferenceRequest) -> Prepared:
        check_think(req.think)  # a decode error in Ollama: before the model is looked up
        model = self._resolve(req)
        info = model_gguf(model)
        if info is None:
            raise InvalidRequest(f"model '{req.model}' has no weights to run")
        # Every protocol's images, checked here and only here, before the vision check: a
        # bomb or a damaged file is its own 400 whatever model it was sent to.
        images = await self._validate_images(req)
        think, tools = self._check_capabilities(req, model, images)
        fmt = normalize_format(req.format)
        placement = self.placement(model, info, req.options)
        return Prepared(
            request=req,
            model=model,
            info=info,
            options=placement.options,
            spec=placement.spec,
            ref=placement.ref,
            keep_alive=placement.keep_alive_for(req.keep_alive),
            think=think,
            format=fmt,
            tools=tools,
            images=tuple(images),
        )

    def close(self) -> None:
        """Let the image threads end (the app's shutdown); a later image request makes new
        ones."""
        if self._image_pool is not None:
            self._image_pool.shutdown(wait=False, cancel_futures=True)
            self._image_pool = None

    async def _validate_images(self, req: InferenceRequest) -> list[ValidatedMedium]:
        """The request's images and audio through ``inference.images``, off the event loop.

        Decoding is CPU-bound (about half a second for 50 megapixels; an audio header walk
        is one pass over the file), so it runs in this service's own pool of two threads:
        concurrent media requests queue there instead of stalling the server or multiplying
        memory (each decode holds one image at a time).
        """
        sent = request_images(req)
        if not sent:
            return []
        limits = ImageLimits.from_settings(self.settings)
        check_count(len(sent), limits)  # before queueing any work
        if self._image_pool is None:
            self._image_pool = ThreadPoolExecutor(2, thread_name_prefix="pollama-images")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._image_pool, validate_images, sent, limits)

    def _resolve(self, req: InferenceRequest) -> LocalModel:
        if not req.model:
            if req.kind == "chat":
                raise InvalidRequest("model is required")
            raise ModelNotFound("model '' not found")
        model = self.store.find(ModelName.parse(req.model))
        if model is None:
            raise ModelNotFound(f"model '{req.model}' not found")
        return model

    def _check_capabilities(
        self, req: InferenceRequest, model: LocalModel, images: Sequence[ValidatedMedium] = ()
    ) -> tuple[bool | str | None, list[dict[str, Any]] | None]:
        """Refuse what the model cannot do; returns the effective ``think`` and ``tools``."""
        caps = capabilities(model)
        full = str(model.name)
        if "completion" not in caps:
            raise CapabilityMissing(f'"{req.model}" does not support {req.kind}')
        _check_senses(req.model, model, caps, images)
        think = req.think
        if "thinking" in caps:
            if think is None:
                think = True
        elif thinks(think):
            if not req.relax_thinking:
                raise CapabilityMissing(f'"{req.model}" does not support thinking')
            think = None
        tools = req.tools or None
        if req.tool_choice == "none":
            tools = None
        if tools:
            if "tools" not in caps:
                raise CapabilityMissing(f"{full} does not support tools")
            names = tool_names(tools)
            if req.tool_name is not None and req.tool_name not in names:
                raise InvalidRequest(
                    f"tool_choice names the function {json.dumps(req.tool_name)}, "
                    "which is not in tools"
                )
        elif req.tool_choice == "required":
            raise InvalidRequest("tool_choice requires a call but the request has no tools")
        # Checked here too so that the error comes before the model loads.
        check_raw_mode(req.raw, template=req.template, system=req.system, context=bool(req.context))
        return think, tools

    def placement(
        self, model: LocalModel, info: GGUFInfo, request_options: dict[str, Any] | None
    ) -> Placement:
        """Where a request for ``model`` runs (:class:`Placement`). ``inference.embeddings``
        uses it too, so that embedding and generation requests for one model share its runner
        (an embedding model, with a pooling type, loads alone: one sequence)."""
        coerced, warnings = coerce_options(request_options or {})
        for warning in warnings:
            log.warning("%s", warning)
        preset = preset_for(self.settings, model.name)
        options = merge_options(model.params(), preset.options(), coerced)
        spec, offload = self._load_spec(model, info, options, preset)
        ref = ModelRef(
            key=spec.model_path,
            name=model.name.display_shortest(),
            digest=model.digest,
            size=model.size,
            details=dataclasses.asdict(details(model)),
            estimate_bytes=offload.host_bytes,
            device_bytes=dict(offload.device_bytes),
            pinned=preset.pinned,
        )
        return Placement(options=options, spec=spec, ref=ref, keep_alive=preset.keep_alive)

    def _load_spec(
        self,
        model: LocalModel,
        info: GGUFInfo,
        options: dict[str, Any],
        preset: ModelPreset = NO_PRESET,
    ) -> tuple[LoadSpec, Offload]:
        """The spec a model loads with, and where its layers go (:meth:`_offload`). An
        embedding model (its GGUF has a pooling type) loads alone: one sequence. Load
        options that would only make llama.cpp allocate or spawn without use are clamped
        here, once for every route (README, "Limits"):
        ``num_batch`` to the context (a batch bigger than a sequence can never fill) and
        ``num_thread`` to the CPUs present. ``repeat_last_n`` is clamped where the sampler
        is built (``runner/engine.py``). A params layer is stored as pulled, unchecked, so a
        0 there may reach ``num_batch``: it means the table's default, as it always has.
        The model's preset (``pollama.toml``) sets its slots, flash attention and KV cache
        type over the server-wide settings."""
        num_ctx = (
            int(options.get("num_ctx") or 0) or self.settings.context_length or DEFAULT_NUM_CTX
        )
        if info.context_length:
            num_ctx = min(num_ctx, int(info.context_length))
        num_ctx = max(num_ctx, 4)
        model_path = model.model_path()
        assert model_path is not None
        spec = LoadSpec(
            model_path=str(model_path),
            num_ctx=num_ctx,
            num_parallel=max(preset.num_parallel or self.settings.num_parallel, 1),
            num_batch=min(int(options.get("num_batch") or DEFAULT_OPTIONS["num_batch"]), num_ctx),
            num_thread=min(int(options.get("num_thread") or 0), usable_cpus()),
            flash_attention=(
                self.settings.flash_attention
                if preset.flash_attention is None
                else preset.flash_attention
            ),
            kv_cache_type=preset.kv_cache_type or self.settings.kv_cache_type or "f16",
            use_mmap=options.get("use_mmap"),
            adapters=tuple(str(p) for p in model.adapter_paths()),
            projectors=tuple(str(p) for p in model.projector_paths()),
            draft_path=str(model.draft_path() or ""),
        )
        if info.pooling_type is not None:
            spec = dataclasses.replace(spec, embedding=True, num_parallel=1, draft_path="")
        offload = self._offload(info, spec, options, preset.tensor_split)
        return offload.apply(spec), offload

    def _offload(
        self,
        info: GGUFInfo,
        spec: LoadSpec,
        options: dict[str, Any],
        split: tuple[float, ...] = (),
    ) -> Offload:
        """Where the layers of a model loaded as ``spec`` go (``scheduler/placement.py``), from
        ``num_gpu``, ``main_gpu``, the preset's ``tensor_split`` and the devices. With
        ``num_gpu`` automatic, a runner already loaded with the same spec but its placement
        keeps its layers (Ollama's -1 matches any loaded runner): the devices' free memory,
        counted without it, must not reload it. The RPC servers are checked here, before a
        load (:meth:`_rpc_devices`)."""
        num_gpu = options.get("num_gpu")
        main_gpu = options.get("main_gpu")
        loaded = self.scheduler.loaded_spec(spec.model_path)
        plan = partial(
            plan_offload,
            info,
            spec,
            main_gpu=main_gpu,
            overhead=self.settings.gpu_overhead,
            spread=self.settings.sched_spread,
            igpu=bool(self.settings.igpu_enable),
            split=split,
        )
        if (num_gpu is None or num_gpu < 0) and loaded is not None:
            placed = dataclasses.replace(
                loaded, gpu_layers=spec.gpu_layers, main_gpu=spec.main_gpu, tensor_split=(),
                rpc_servers=spec.rpc_servers,
            )  # fmt: skip
            if placed == spec and main_gpu in (None, loaded.main_gpu):
                own = set(loaded.rpc_servers)  # no network check: its worker holds them
                devices = [d for d in self.devices() if not d.endpoint or d.endpoint in own]
                kept = plan(devices, num_gpu=loaded.gpu_layers)
                return dataclasses.replace(
                    kept,
                    gpu_layers=loaded.gpu_layers,
                    main_gpu=loaded.main_gpu,
                    tensor_split=loaded.tensor_split,
                    rpc_servers=loaded.rpc_servers,
                    reason="the loaded runner's placement, kept",
                )
        devices, down = self._rpc_devices(loaded)
        offload = plan(devices, num_gpu=num_gpu)
        if down:
            self._without_servers(spec, offload, down)
        log.debug("placement of %s: %s", spec.model_path, offload.reason)
        return offload

    def _rpc_devices(self, loaded: LoadSpec | None) -> tuple[list[DeviceInfo], list[str]]:
        """The devices a new load may plan on, and the RPC servers (``OLLAMA_RPC_SERVERS``)
        that are down. Servers another loaded model holds are left out (one client at a
        time, ``runner/rpc.py``); the others, the model's own runner's included (the load
        replaces it), take a TCP connect each (a second at most; instant on loopback)."""
        devices, down, busy = usable_devices(
            self.devices(),
            self.scheduler.device_usage(),
            loaded.rpc_servers if loaded is not None else (),
            unreachable,
        )
        if busy:
            log.info("RPC server %s is held by another loaded model", ", ".join(busy))
        return devices, down

    def _without_servers(self, spec: LoadSpec, offload: Offload, down: list[str]) -> None:
        """Say that ``down`` are left out, or refuse the load when the host cannot hold
        what the plan leaves it (the model does not fit without them)."""
        names = ", ".join(down)
        available = system_memory().available
        if offload.host_bytes > available:
            raise RpcServerUnavailable(
                f"RPC server {names} is unreachable (connection failed), and "
                f"{os.path.basename(spec.model_path)} needs {human_bytes(offload.host_bytes)} "
                f"on this machine without it ({human_bytes(available)} available)"
            )
        log.warning("RPC server %s is unreachable: loading without it (%s)", names, offload.reason)

    # -- work ----------------------------------------------------------------------------

    async def load(self, p: Prepared) -> None:
        async with self.scheduler.use(p.ref, p.spec, p.keep_alive):
            pass

    async def preload(self, name: str) -> None:
        """Load ``name`` with its preset and no request (a pinned preset, at start or on a
        reload): generation and embedding models alike."""
        model = self.store.get(ModelName.parse(name))
        info = model_gguf(model)
        if info is None:
            raise InvalidRequest(f"model '{name}' has no weights to run")
        p = self.placement(model, info, None)
        async with self.scheduler.use(p.ref, p.spec, p.keep_alive):
            pass

    async def unload(self, p: Prepared) -> None:
        await self.scheduler.expire(p.ref.key)

    async def _build_prompt(self, p: Prepared, lease: Lease) -> tuple[PromptTemplate, PromptResult]:
        """Render the request's prompt for the loaded model, truncating a chat to fit.

        The context is the one the worker made (``lease.info.n_ctx``, which the model's own
        limits may have made smaller than the request's ``num_ctx``). A text whose token
        floor (``inference/bounds.py``) is already over it is counted by that floor and
        never sent to the worker, so a prompt of any size costs the worker nothing."""
        req = p.request
        runner = lease.runner
        num_ctx = lease.info.n_ctx
        floor = TokenFloor(lease.info.max_token_bytes)

        async def count_tokens(text: str) -> int:
            least = floor.of(text)
            if least > num_ctx:
                return least
            return len(await runner.tokenize(text))

        _refuse_surely_too_long(req, floor, num_ctx)
        image_tokens = 0
        if p.images:
            image_tokens = lease.info.image_tokens or _IMAGE_TOKENS_DEFAULT

        template = prompt_template_for(
            p.model, p.info, go_template_enabled=self.settings.go_template
        )
        if req.kind == "chat":
            result = await build_chat_prompt(
                template,
                req.messages,
                system_default=p.model.system(),
                model_messages=p.model.messages(),
                tools=p.tools,
                think=p.think,
                num_ctx=num_ctx,
                count_tokens=count_tokens,
                truncate=req.truncate,
                image_tokens=image_tokens,
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
                think=p.think,
                num_ctx=num_ctx,
                count_tokens=count_tokens,
                truncate=req.truncate,
                model_name=str(p.model.name),
                image_tokens=image_tokens,
            )
        return template, result

    async def render(self, p: Prepared) -> RenderedPrompt:
        """The prompt the request would generate from, built as for a real request
        (truncation and thinking level included), without generating: Ollama's
        ``_debug_render_only``. Like Ollama's, it holds the model's runner (loading it if
        needed): fitting a chat to the window counts tokens with the model's vocabulary."""
        async with self.scheduler.use(p.ref, p.spec, p.keep_alive) as lease:
            _template, result = await self._build_prompt(p, lease)
        return RenderedPrompt(prompt=result.prompt, image_count=len(result.images))

    async def count_tokens(self, p: Prepared) -> int:
        """How many tokens the request's prompt has for this model (loads it if needed)."""
        async with self.scheduler.use(p.ref, p.spec, p.keep_alive) as lease:
            _template, result = await self._build_prompt(p, lease)
            return result.prompt_tokens or len(await lease.runner.tokenize(result.prompt))

    def _output_plan(self, p: Prepared, template: PromptTemplate, prompt: str) -> OutputPlan:
        """How this response's output is parsed and constrained (see the module docstring)."""
        req = p.request
        forced = bool(p.tools) and req.tool_choice == "required"
        thinking = None
        tags = thinking_tags_for(template)
        if tags is not None and thinks(p.think) and not forced:
            thinking = ThinkingParser(*tags)
            if prompt.strip().endswith(tags[0]):
                thinking.add(tags[0])  # the template prefilled the opening tag
        tools = None
        tag = ""
        if p.tools and req.kind == "chat":
            tag = tool_call_tag_for(template)
            tools = ToolCallParser(tag, tool_names(p.tools))
        fmt = p.format
        prefill = ""
        if forced and tools is not None:
            fmt = tool_call_schema(p.tools or [], req.tool_name)
            if tag not in ("{", "["):
                prefill = tag + ("\n" if tag.startswith("<") else "")
                tools.prime()
        two_phase = fmt is not None and thinking is not None
        return OutputPlan(OutputParser(thinking, tools), fmt, two_phase, prefill)

    def stream(self, p: Prepared) -> AsyncIterator[InferenceEvent]:
        """The request's events, reported to telemetry (one measurement for every protocol)."""
        req = p.request
        prompt = req.prompt if req.kind == "generate" else json.dumps(req.messages)
        return observe_events(self.telemetry, p.ref.name, self._stream(p), prompt=prompt)

    async def _stream(self, p: Prepared) -> AsyncIterator[InferenceEvent]:
        """Hold the model's runner, build the prompt and generate (``inference/phases.py``)."""
        started = time.monotonic_ns()
        async with self.scheduler.use(p.ref, p.spec, p.keep_alive) as lease:
            # Ollama's load_duration: the time to get a ready runner (> 0 even when loaded).
            load_duration = time.monotonic_ns() - started
            template, result = await self._build_prompt(p, lease)
            plan = self._output_plan(p, template, result.prompt)
            req = p.request
            generation = GenerationRun(
                runner=lease.runner,
                plan=plan,
                options=_with_stop_words(p, template),
                return_tokens=req.kind == "generate" and not req.raw,
                logprobs=req.logprobs,
                top_logprobs=req.top_logprobs if req.logprobs else 0,
                started=started,
                load_duration=load_duration,
                truncation=_truncation(result, lease.info.n_ctx),
                prompt_tokens=result.prompt_tokens,
                media=_media(p, result),
                shift=req.shift,
            )
            async with aclosing(generate(generation, result.prompt + plan.prefill)) as events:
                async for event in events:
                    yield event


def _check_senses(
    name: str, model: LocalModel, caps: Sequence[str], media: Sequence[ValidatedMedium]
) -> None:
    """Refuse images to a model that cannot see and audio to one that cannot hear (each
    kind by its own capability, so images to an audio-only model are still "does not
    support images"), and either to a model without the projector llama.cpp needs."""
    hears = any(isinstance(medium, ValidatedAudio) for medium in media)
    sees = any(not isinstance(medium, ValidatedAudio) for medium in media)
    if sees and "vision" not in caps:
        raise CapabilityMissing(f'"{name}" does not support images: it has no vision capability')
    if hears and "audio" not in caps:
        raise CapabilityMissing(f'"{name}" does not support audio: it has no audio capability')
    if media and not model.projector_paths():
        sense, verb, kind = ("vision", "see", "images") if sees else ("audio", "hear", "audio")
        raise CapabilityMissing(
            _NO_PROJECTOR.format(model=name, sense=sense, verb=verb, media=kind)
        )


def _media(p: Prepared, result: PromptResult) -> tuple[bytes, ...]:
    """The files of the images the prompt references, in ``[img-N]`` order: those of the
    messages that truncation kept. The prompt holds the request's own base64 strings, so
    each is matched to its validated file by identity (never decoded twice)."""
    if not result.images:
        return ()
    sent_images = request_images(p.request)
    files = {id(sent): image.data for sent, image in zip(sent_images, p.images, strict=True)}
    return tuple(files[id(sent)] for sent in result.images)


def _with_stop_words(p: Prepared, template: PromptTemplate) -> dict[str, Any]:
    """The request's options, with the model's stop words when the request names none."""
    options = dict(p.options)
    if not options.get("stop"):
        options["stop"] = default_stop_words(p.model.params(), template)
    return options


def _truncation(result: PromptResult, num_ctx: int) -> Truncation | None:
    """What truncating the chat to fit dropped (logged), or None when nothing was."""
    if not result.truncated:
        return None
    log.warning(
        "chat truncated to fit num_ctx=%d: dropped %d oldest message(s)",
        num_ctx,
        result.messages_dropped,
    )
    return Truncation(result.messages_dropped, result.prompt_tokens, num_ctx)


def _refuse_surely_too_long(req: InferenceRequest, floor: TokenFloor, num_ctx: int) -> None:
    """Refuse, before any template renders it, a request whose text can never fit: a prompt,
    or the last message (truncation always keeps it), whose token floor is over the context,
    or a ``context`` of more tokens than the context holds. Both counts are in the message;
    the 30 MB prompt that once killed the worker costs a byte count here."""
    if req.context and len(req.context) > num_ctx:
        raise ContextOverflow(
            f"context has {len(req.context)} tokens but the context window (num_ctx) "
            f"is {num_ctx} tokens; start a new conversation or increase num_ctx"
        )
    texts = [req.prompt or "", req.suffix or ""]
    if req.messages:
        texts.append(str(req.messages[-1].get("content") or ""))
    least = sum(floor.of(text) for text in texts)  # all of them end up in the prompt
    if least > num_ctx:
        raise context_overflow(least, num_ctx, at_least=True)


async def collect(events: AsyncIterator[InferenceEvent]) -> InferenceEvent:
    """A whole response from its stream (``stream: false``): texts joined, calls and
    logprobs gathered.

    The result is the final event (metrics, done reason) with everything before folded in.
    """
    text: list[str] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[Logprob] = []
    last: InferenceEvent | None = None
    prompt_tokens = 0
    async for event in events:
        text.append(event.text)
        thinking.append(event.thinking)
        calls.extend(event.tool_calls)
        logprobs.extend(event.logprobs)
        prompt_tokens = prompt_tokens or event.prompt_tokens
        last = event
    if last is None:
        raise InternalError("the model runner ended the response without a final chunk")
    last.text, last.thinking, last.tool_calls = "".join(text), "".join(thinking), calls
    last.logprobs = logprobs
    last.prompt_tokens = prompt_tokens
    return last
