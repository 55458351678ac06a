"""Server-side ``create``: build a model's layers from uploaded blobs or an existing model.

This follows Ollama's ``CreateHandler``/``createModel`` (docs/ollama-behaviour.md#create) step
by step, including the progress statuses it streams, with two deliberate differences: the server
never opens a path named by the caller (only blobs already in the store, by digest), and a GGUF
is checked by our bounds-checked reader instead of being rewritten.

Nothing is visible under the new name until every layer is in place and the manifest has
been written atomically; a failure at any step leaves the store's manifests as they were.
The uploaded files are read and checked before the first progress line and before any write
(one model GGUF, at most one projector, whose output width fits the model: ``_check_parts``;
a draft model whose vocabulary is the model's: ``store/draft.py``), so a wrong set of files is
a plain 4xx that leaves the store untouched. A Hugging Face
safetensors folder among the files is converted to a GGUF first (``store/hf_import.py`` over
``pollama.convert``), every check of it also before the first progress line.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollama.convert import is_safetensors_upload

if TYPE_CHECKING:
    from pollama import convert
from pollama.errors import (
    BlobNotFound,
    ConversionError,
    InvalidRequest,
    ModelNotFound,
    TemplateError,
)
from pollama.format import human_number
from pollama.gguf import GGUFInfo
from pollama.names import ModelName
from pollama.options import validate_parameters
from pollama.store.blobs import StoredBlob, parse_digest
from pollama.store.draft import vocabulary_mismatch
from pollama.store.gguf_cache import gguf_info
from pollama.store.hf_import import check_gguf_upload, convert_to_blob, plan_import
from pollama.store.manifests import (
    CONFIG_MEDIA_TYPE,
    MEDIA_ADAPTER,
    MEDIA_DRAFT,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_PROMPT,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    Layer,
    Manifest,
    go_json,
)
from pollama.store.models import Store
from pollama.store.projector import input_width, is_projector, output_widths
from pollama.store.quantize import normalize_quantization, quantize_file
from pollama.template import Template, detect_named_template

_GGUF_MEDIA = (MEDIA_MODEL, MEDIA_PROJECTOR, MEDIA_ADAPTER, MEDIA_DRAFT)
_CONVERT_BAR = "0000000000000000001"
"""The ``digest`` of the conversion's progress (Ollama's quantization bar is all zeros)."""


@dataclass(frozen=True)
class CreateSpec:
    """What to build a model from, as an ``/api/create`` request says it (the server's
    ``CreateRequest.to_spec()``): ``base`` a local model's name, or ``files`` uploaded GGUF
    blobs or a Hugging Face folder's files (``{filename: digest}``), then the layers that
    override the base's. Empty values mean "not given" (keep the base's). The draft model
    of speculative decoding is ``draft_files`` (an uploaded GGUF) or ``draft`` (a local
    model's name, whose weights become the draft); ``quantize`` applies to the model's
    weights and ``draft_quantize`` to the draft's, each alone."""

    name: str
    base: str = ""
    files: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    draft_files: dict[str, str] = field(default_factory=dict)
    draft: str = ""
    quantize: str = ""
    draft_quantize: str = ""
    template: str = ""
    system: str = ""
    license: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: tuple[dict[str, Any], ...] = ()
    renderer: str = ""
    parser: str = ""
    requires: str = ""


@dataclass(frozen=True)
class CreateProgress:
    """One step of a create, as Ollama reports it (``api.ProgressResponse``): a status, and
    for a quantization the bytes done of the total (None: not part of this step)."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


@dataclass
class _Layer:
    """A layer being assembled, with the status line Ollama prints for it, and for an
    uploaded GGUF the header and the file name the request gave it."""

    layer: Layer
    status: str = ""
    info: GGUFInfo | None = None
    filename: str = ""

    @property
    def media_type(self) -> str:
        return self.layer.media_type


@dataclass
class _Config:
    model_format: str = ""
    model_family: str = ""
    model_families: list[str] = field(default_factory=list)
    model_type: str = ""
    file_type: str = ""
    renderer: str = ""
    parser: str = ""
    requires: str = ""

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "model_format": self.model_format,
            "model_family": self.model_family,
            "model_families": self.model_families or None,
            "model_type": self.model_type,
            "file_type": self.file_type,
        }
        for key in ("renderer", "parser", "requires"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        doc["architecture"] = "amd64"
        doc["os"] = "linux"
        return go_json(doc).encode() + b"\n"


def _valid_relative_path(path: str) -> bool:
    """Go's ``fs.ValidPath``: unrooted, slash-separated, no empty, ``.`` or ``..`` element."""
    if path == ".":
        return True
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def check_request(spec: CreateSpec) -> tuple[ModelName, CreateSpec]:
    """Everything that can be refused before streaming starts (so it gets a real 4xx); the
    name, and the spec with its parameters as they will be stored."""
    name = ModelName.parse(spec.name)
    for group in (spec.files, spec.adapters, spec.draft_files):
        for filename, digest in group.items():
            if not _valid_relative_path(filename):
                raise InvalidRequest("file path must be relative")
            parse_digest(digest)
    if len(spec.adapters) > 1:
        raise InvalidRequest("only one adapter is currently supported")
    if not spec.base and not spec.files:
        raise InvalidRequest("neither 'from' or 'files' was specified")
    _check_draft_request(spec)
    if spec.quantize:
        normalize_quantization(spec.quantize)
    if spec.template:
        _parse_template(spec.template)
    if spec.parameters:
        spec = dataclasses.replace(spec, parameters=validate_parameters(spec.parameters))
    return name, spec


def _check_draft_request(spec: CreateSpec) -> None:
    """The draft fields on their own: one draft model, given one way, and a
    ``draft_quantize`` only beside a new draft (Ollama's rule and message)."""
    if len(spec.draft_files) > 1:
        raise InvalidRequest("only one draft model is currently supported")
    if spec.draft_files and spec.draft:
        raise InvalidRequest(
            "a draft model is either uploaded ('draft_files') or a local model's name "
            "('draft'), not both"
        )
    if spec.draft:
        try:
            ModelName.parse(spec.draft)
        except InvalidRequest:
            raise InvalidRequest(f"invalid model name {spec.draft!r} in DRAFT") from None
    if spec.draft_quantize:
        if not spec.draft_files and not spec.draft:
            raise InvalidRequest("--draft-quantize requires a DRAFT model")
        normalize_quantization(spec.draft_quantize)
    if is_safetensors_upload(spec.draft_files):
        raise ConversionError(
            "DRAFT names safetensors files: pollama takes a draft model as one GGUF file "
            "(convert it with llama.cpp's convert_hf_to_gguf.py)"
        )


def _parse_template(text: str) -> None:
    try:
        Template.parse(text)
    except TemplateError as exc:
        raise TemplateError(f"template error: {exc}") from None


class ModelCreator:
    """One create operation; iterate :meth:`run` for its progress."""

    def __init__(self, store: Store, spec: CreateSpec) -> None:
        self.store = store
        self.name, self.spec = check_request(spec)
        self._scratch: list[str] = []  # blobs this create made and may not keep

    def run(self) -> Iterator[CreateProgress]:
        """Every check that reads the uploaded files comes before the first progress line
        and before anything is written, so a wrong file is a plain 4xx that leaves the
        store as it was. A GGUF this create converted and then did not use (the 16-bit
        model of a quantized import, or the model of a create that failed) is removed."""
        try:
            yield from self._steps()
        finally:
            if self._scratch:
                self.store.prune(self._scratch)

    def _steps(self) -> Iterator[CreateProgress]:
        store, spec = self.store, self.spec
        store.ensure()
        old = store.find(self.name)
        config = _Config(renderer=spec.renderer, parser=spec.parser, requires=spec.requires)
        plan = self._import_plan()
        files = [] if plan is not None else self._read_files(spec.files)
        adapters = self._read_files(spec.adapters, adapter=True)
        drafts = self._read_draft()
        if spec.base:
            layers = _with_projector(self._from_model(spec.base, config), files, spec.base)
        elif plan is not None:
            layers = yield from self._convert(plan)
        else:
            layers = _check_parts(files)
        for draft in drafts:  # before any write (after a conversion's, which is pruned)
            _check_draft(layers, draft)
        for _ in (*files, *adapters, *spec.draft_files):
            yield CreateProgress(status="parsing GGUF")
        if not spec.base:
            layers += self._detected_template(layers)
        layers += adapters
        if drafts:  # a new draft replaces the base model's
            layers = _without(layers, MEDIA_DRAFT) + drafts
        if spec.quantize:
            layers = yield from self._quantize(layers, spec.quantize, MEDIA_MODEL)
        if spec.draft_quantize:
            layers = yield from self._quantize(layers, spec.draft_quantize, MEDIA_DRAFT)
        self._fill_config(config, layers)
        layers = self._apply_overrides(layers)
        config_blob = store.blobs.put_bytes(config.to_bytes())
        for item in layers:
            if item.status:
                yield CreateProgress(status=item.status)
        yield CreateProgress(status="writing manifest")
        manifest = Manifest(
            config=Layer(CONFIG_MEDIA_TYPE, config_blob.digest, config_blob.size),
            layers=tuple(item.layer for item in layers),
        )
        with store.lock:
            target = store.manifests.resolve(self.name) or self.name
            store.manifests.write(target, manifest)
            if old is not None and not store.noprune:
                store.prune(old.stored.manifest.digests())
        yield CreateProgress(status="success")

    def _import_plan(self) -> convert.ConvertPlan | None:
        """The conversion of a Hugging Face folder among the files (None: GGUF files), all
        of its checks done (docs/ollama-behaviour.md#create)."""
        spec = self.spec
        if is_safetensors_upload(spec.adapters):
            raise ConversionError(
                "ADAPTER names safetensors files: pollama imports LoRA adapters as GGUF only "
                "(convert the adapter with llama.cpp's convert_lora_to_gguf.py)"
            )
        if not is_safetensors_upload(spec.files):
            check_gguf_upload(self.store, spec.files)
            return None
        if spec.base:
            raise InvalidRequest(
                f"FROM {spec.base} names a local model, so the other FROM lines may only add "
                "its multimodal projector, not a safetensors folder"
            )
        return plan_import(self.store, spec.files, quantize=bool(spec.quantize))

    def _convert(self, plan: convert.ConvertPlan) -> Iterator[CreateProgress]:
        """Ollama's ``converting model`` step, as a bar of the GGUF's bytes written."""
        total, shown = plan.output_bytes, 0
        yield CreateProgress("converting model", _CONVERT_BAR, total, 0)
        blob: StoredBlob | None = None
        for step in convert_to_blob(self.store, plan):
            if isinstance(step, StoredBlob):
                blob = step
            elif step[0] == total or step[0] - shown >= total // 100:
                shown = step[0]
                yield CreateProgress("converting model", _CONVERT_BAR, total, step[0])
        assert blob is not None
        if blob.created:
            self._scratch.append(blob.digest)
        path = self.store.blobs.path(blob.digest)
        info = gguf_info(path, display_name="the converted model")
        word = "creating new layer" if blob.created else "using existing layer"
        layer = Layer(MEDIA_MODEL, blob.digest, blob.size)
        return [_Layer(layer, f"{word} {blob.digest}", info, "model.safetensors")]

    def _from_model(self, ref: str, config: _Config) -> list[_Layer]:
        try:
            base_name = ModelName.parse(ref)
        except InvalidRequest:
            raise InvalidRequest(f"invalid model name {ref!r} in FROM") from None
        base = self.store.find(base_name)
        if base is None:
            raise ModelNotFound(
                f"model '{ref}' not found: FROM must name a local model, or the CLI must be "
                "given a path to a GGUF file"
            )
        base_config = base.config()
        for key in ("renderer", "parser", "requires"):
            if not getattr(config, key) and isinstance(base_config.get(key), str):
                setattr(config, key, base_config[key])
        shortest = base.name.display_shortest()
        layers = []
        for layer in base.layers:
            info = None
            if layer.media_type in _GGUF_MEDIA:
                info = gguf_info(self.store.blobs.path(layer.digest), display_name=shortest)
            new = Layer(layer.media_type, layer.digest, layer.size, shortest, layer.name)
            layers.append(_Layer(new, f"using existing layer {layer.digest}", info))
        return layers

    def _read_draft(self) -> list[_Layer]:
        """The new draft model's layer (none when the request names no draft): the uploaded
        GGUF, or the weights of the local model ``draft`` names, which must be a model's
        (llama.cpp loads a draft as a whole model), not an adapter's or a projector's."""
        spec = self.spec
        if spec.draft_files:
            found = self._read_files(spec.draft_files, draft=True)
        elif spec.draft:
            found = [self._draft_from_model(spec.draft)]
        else:
            return []
        for item in found:
            assert item.info is not None
            what = _not_a_model(item.info)
            if what:
                raise InvalidRequest(
                    f"DRAFT '{item.filename}' is {what}, not a model: a draft model is a "
                    "smaller model GGUF with the model's vocabulary"
                )
        return found

    def _draft_from_model(self, ref: str) -> _Layer:
        """``draft``: the weights layer of a local model, kept as the draft layer."""
        model = self.store.find(ModelName.parse(ref))
        if model is None:
            raise ModelNotFound(
                f"draft model '{ref}' not found: DRAFT must name a local model, or the CLI "
                "must be given a path to a GGUF file"
            )
        layer = model.model_layer
        if layer is None:
            raise InvalidRequest(f"DRAFT {ref} names a model without weights")
        shortest = model.name.display_shortest()
        info = gguf_info(self.store.blobs.path(layer.digest), display_name=shortest)
        new = Layer(MEDIA_DRAFT, layer.digest, layer.size, shortest)
        return _Layer(new, f"using existing layer {layer.digest}", info, ref)

    def _read_files(
        self, files: dict[str, str], *, adapter: bool = False, draft: bool = False
    ) -> list[_Layer]:
        """Each uploaded GGUF's header, classified by what the file is (model, projector,
        adapter), never by its position or name, so the FROM lines may come in any order;
        ``draft`` files are the draft layer whatever they are (``_read_draft`` checks)."""
        layers: list[_Layer] = []
        for filename in sorted(files):
            digest = parse_digest(files[filename])
            path = self.store.blobs.path(digest)
            if not path.is_file():
                raise BlobNotFound(
                    f"blob {digest} for file '{filename}' not found: upload it first with "
                    f"POST /api/blobs/{digest}"
                )
            info = gguf_info(path, display_name=filename)
            media = MEDIA_MODEL
            if adapter and info.general_type != "adapter" and is_projector(info):
                raise InvalidRequest(
                    f"ADAPTER '{filename}' is a multimodal projector, not a LoRA adapter: "
                    f"write it as a second FROM line: FROM ./{filename} (with the path you "
                    "gave ADAPTER)"
                )
            if draft:
                media = MEDIA_DRAFT
            elif adapter or info.general_type == "adapter":
                media = MEDIA_ADAPTER
            elif is_projector(info):
                media = MEDIA_PROJECTOR
            layer = Layer(media, digest, path.stat().st_size)
            layers.append(_Layer(layer, f"using existing layer {digest}", info, filename))
        # The model's weights first, as Ollama's manifests list them.
        return sorted(layers, key=lambda item: item.media_type != MEDIA_MODEL)

    def _detected_template(self, layers: list[_Layer]) -> list[_Layer]:
        """The named Go template (and its stop words) of a model GGUF whose Jinja chat
        template is a known one (docs/ollama-behaviour.md#create)."""
        found: list[_Layer] = []
        for item in layers:
            chat_template = item.info.chat_template if item.info else None
            if item.media_type != MEDIA_MODEL or not chat_template:
                continue
            named = detect_named_template(chat_template)
            if named is None:
                continue
            found.append(
                self._new_layer(
                    MEDIA_TEMPLATE,
                    named.template.encode(),
                    f"using autodetected template {named.name}",
                )
            )
            if named.parameters:
                found.append(self._new_layer(MEDIA_PARAMS, named.params_json()))
        return found

    def _quantize(
        self, layers: list[_Layer], type_name: str, media_type: str
    ) -> Iterator[CreateProgress]:
        """Quantize the layers of ``media_type`` (the model's weights, or the draft's: the
        two are asked for apart, ``quantize`` and ``draft_quantize``)."""
        target = normalize_quantization(type_name)
        kind = "draft model" if media_type == MEDIA_DRAFT else "model"
        out: list[_Layer] = []
        for item in layers:
            if item.layer.media_type != media_type or item.info is None:
                out.append(item)
                continue
            source = self.store.blobs.path(item.layer.digest)
            status = f"quantizing {item.info.file_type} {kind} to {target}"
            total = item.layer.size
            progress: list[CreateProgress] = []

            def report(
                done: int,
                _total: int,
                status: str = status,
                total: int = total,
                progress: list[CreateProgress] = progress,
            ) -> None:
                progress.append(
                    CreateProgress(
                        status=status,
                        digest="0000000000000000000",
                        total=total,
                        completed=min(done, total),
                    )
                )

            yield CreateProgress(
                status=status, digest="0000000000000000000", total=total, completed=0
            )
            with tempfile.TemporaryDirectory(dir=self.store.blobs.dir, prefix="tmp-") as tmp:
                dest = Path(tmp) / "quantized.gguf"
                quantize_file(
                    source, dest, target, on_progress=report, source_file_type=item.info.file_type
                )
                yield from progress
                yield CreateProgress(status="verifying conversion")
                info = gguf_info(dest, display_name="quantized model")
                blob = self.store.blobs.put_file(dest)
            status_word = "creating new layer" if blob.created else "using existing layer"
            out.append(
                _Layer(
                    Layer(item.layer.media_type, blob.digest, blob.size),
                    f"{status_word} {blob.digest}",
                    info,
                )
            )
        return out

    def _fill_config(self, config: _Config, layers: list[_Layer]) -> None:
        """Ollama's config fields from the model's weights; ``model_families`` also lists
        each projector's architecture after the model's (``["llama", "clip"]``, as Ollama's
        vision models have it: some clients look for "clip" there)."""
        for item in layers:
            if item.media_type != MEDIA_MODEL or item.info is None:
                continue
            info = item.info
            config.model_format = config.model_format or "gguf"
            config.model_family = config.model_family or (info.architecture or "")
            config.model_type = config.model_type or human_number(info.parameter_count)
            config.file_type = config.file_type or (info.file_type or "")
            config.model_families.append(info.architecture or "")
        for item in layers:
            if item.media_type == MEDIA_PROJECTOR and item.info and item.info.architecture:
                config.model_families.append(item.info.architecture)

    def _apply_overrides(self, layers: list[_Layer]) -> list[_Layer]:
        spec = self.spec
        if spec.template:
            layers = _without(layers, MEDIA_TEMPLATE, MEDIA_PROMPT)
            layers.append(self._new_layer(MEDIA_TEMPLATE, spec.template.encode()))
        if spec.system:
            layers = _without(layers, MEDIA_SYSTEM)
            layers.append(self._new_layer(MEDIA_SYSTEM, spec.system.encode()))
        for text in spec.license:
            if text:
                layers.append(self._new_layer(MEDIA_LICENSE, text.encode()))
        params = dict(spec.parameters)
        for item in layers:
            if item.layer.media_type == MEDIA_PARAMS:
                existing = json.loads(self.store.blobs.read_bytes(item.layer.digest))
                if isinstance(existing, dict):
                    for key, value in existing.items():
                        params.setdefault(key, value)
        if params:
            layers = _without(layers, MEDIA_PARAMS)
            layers.append(self._new_layer(MEDIA_PARAMS, _params_bytes(params)))
        if spec.messages:
            layers = _without(layers, MEDIA_MESSAGES)
            messages = list(spec.messages)
            layers.append(self._new_layer(MEDIA_MESSAGES, go_json(messages).encode() + b"\n"))
        return layers

    def _new_layer(self, media_type: str, data: bytes, status: str = "") -> _Layer:
        blob = self.store.blobs.put_bytes(data)
        if not status:
            word = "creating new layer" if blob.created else "using existing layer"
            status = f"{word} {blob.digest}"
        return _Layer(Layer(media_type, blob.digest, blob.size), status)


def _params_bytes(params: dict[str, Any]) -> bytes:
    """A params layer as Go encodes a map: keys sorted, compact, trailing newline."""
    return go_json({key: params[key] for key in sorted(params)}).encode() + b"\n"


def _without(layers: list[_Layer], *media_types: str) -> list[_Layer]:
    return [item for item in layers if item.layer.media_type not in media_types]


def _names(layers: list[_Layer]) -> str:
    return ", ".join(f"'{item.filename}'" for item in layers)


def _check_parts(files: list[_Layer]) -> list[_Layer]:
    """The uploaded files make one model: exactly one model GGUF, and at most one projector
    (llama.cpp loads one per model; Ollama would keep the others and use only the first),
    which must fit the model. The files, as the model's first layers."""
    models = [item for item in files if item.media_type == MEDIA_MODEL]
    projectors = [item for item in files if item.media_type == MEDIA_PROJECTOR]
    if not models:
        raise InvalidRequest(
            f"no model weights among the FROM files ({_names(files)}): FROM needs the "
            "model's own GGUF; a multimodal projector goes on a second FROM line beside it"
        )
    if len(models) > 1:
        raise InvalidRequest(
            f"more than one model GGUF among the FROM files ({_names(models)}): a model has "
            "one weights file (a second FROM line may name its multimodal projector)"
        )
    if len(projectors) > 1:
        raise InvalidRequest(
            f"more than one multimodal projector among the FROM files ({_names(projectors)}): "
            "llama.cpp loads one projector per model"
        )
    for projector in projectors:
        _check_fit(models[0], projector)
    return list(files)


def _with_projector(base: list[_Layer], files: list[_Layer], ref: str) -> list[_Layer]:
    """``FROM <local model>`` plus files: the files may only give the model a projector
    (replacing the one it has), checked against the model's own weights."""
    if not files:
        return base
    others = [item for item in files if item.media_type != MEDIA_PROJECTOR]
    if others:
        raise InvalidRequest(
            f"FROM {ref} names a local model, so the other FROM lines may only add its "
            f"multimodal projector, and {_names(others)} is not one"
        )
    if len(files) > 1:
        raise InvalidRequest(
            f"more than one multimodal projector among the FROM files ({_names(files)}): "
            "llama.cpp loads one projector per model"
        )
    model = next((item for item in base if item.media_type == MEDIA_MODEL), None)
    if model is not None:
        _check_fit(model, files[0])
    return _without(base, MEDIA_PROJECTOR) + files


def _not_a_model(info: GGUFInfo) -> str:
    """What a GGUF given as a draft model is instead of a model ('' for a model)."""
    if info.general_type == "adapter":
        return "a LoRA adapter"
    if is_projector(info):
        return "a multimodal projector"
    return ""


def _check_draft(layers: list[_Layer], draft: _Layer) -> None:
    """Refuse a draft llama.cpp would refuse beside the model at every load: the model's
    own weights, or a vocabulary that is not the model's (``store/draft.py``)."""
    model = next((item for item in layers if item.media_type == MEDIA_MODEL), None)
    if model is None or model.info is None or draft.info is None:
        return
    if model.layer.digest == draft.layer.digest:
        raise InvalidRequest(
            "the draft model is the model itself: a draft model is a smaller model with the "
            "same vocabulary"
        )
    mismatch = vocabulary_mismatch(model.info, draft.info)
    if mismatch:
        raise InvalidRequest(f"the draft model's vocabulary does not match the model: {mismatch}")


def _check_fit(model: _Layer, projector: _Layer) -> None:
    """Refuse a projector whose output width is not the model's input width: llama.cpp
    would refuse the pair at every load. Either width unknown: nothing is refused."""
    if model.info is None or projector.info is None:
        return
    wanted = input_width(model.info)
    if wanted is None:
        return
    for width in output_widths(projector.info).values():
        if width != wanted:
            model_name = f" ('{model.filename}')" if model.filename else ""
            raise InvalidRequest(
                f"the projector '{projector.filename}' outputs {width}-wide embeddings but "
                f"the model's embedding length is {wanted}{model_name}: a projector works "
                "only with the model it was made for"
            )
