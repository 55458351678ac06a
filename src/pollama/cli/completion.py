"""``pollama completion bash|zsh|fish``: the shell's completion script, and model names.

Click's own completion does the work: the script calls ``pollama`` back with the words typed
so far (``_POLLAMA_COMPLETE=bash_complete``), and click answers with the commands, options
and values that fit. Two things are added:

* The model arguments (``run``, ``show``, ``rm``, ``cp``'s source, ``push``, and ``stop``'s
  running models; :data:`MODEL_ARGUMENTS`) complete names. They come from the server the
  command would talk to (``/api/tags``, ``/api/ps`` for ``stop``) with a short timeout, since
  that is where ``pollama run NAME`` looks: ``OLLAMA_HOST`` may be another machine. When no
  server answers and the host is this machine, they come from the local store, through the
  store's own listing of manifest names (the CLI's one read of the store, a named exception
  to "the CLI talks HTTP only", docs/architecture.md#layers): the server ``pollama run``
  would start reads that same folder. A TAB never starts a server.
* Bash splits words at ``:`` (``COMP_WORDBREAKS``), and every model name has one, so click's
  words would be ``smollm2 : 1``. Our bash script also passes the line itself
  (``COMP_LINE``, ``COMP_POINT``), from which the words are taken, and the answers drop what
  bash holds as earlier words, up to the last ``:`` (bash-completion's
  ``__ltrim_colon_completions``). Without those variables it is click's protocol unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from click.shell_completion import (
    BashComplete,
    CompletionItem,
    add_completion_class,
    get_completion_class,
    split_arg_string,
)

PROG_NAME = "pollama"
COMPLETE_VAR = "_POLLAMA_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
_TIMEOUT_S = 1.0

# command -> (its argument that names a model, where names come from: every model or the
# running ones)
MODEL_ARGUMENTS: dict[str, tuple[str, str]] = {
    "run": ("model", "tags"),
    "show": ("model", "tags"),
    "rm": ("models", "tags"),
    "cp": ("source", "tags"),
    "push": ("model", "tags"),
    "stop": ("model", "running"),
}

# click's bash script (click/shell_completion.py), which also passes COMP_LINE, COMP_POINT
# and COMP_WORDBREAKS.
_SOURCE_BASH = """\
%(complete_func)s() {
    local IFS=$'\\n'
    local response

    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD \
COMP_LINE="$COMP_LINE" COMP_POINT=$COMP_POINT COMP_WORDBREAKS="$COMP_WORDBREAKS" \
%(complete_var)s=bash_complete $1)

    for completion in $response; do
        IFS=',' read type value <<< "$completion"

        if [[ $type == 'dir' ]]; then
            COMPREPLY=()
            compopt -o dirnames
        elif [[ $type == 'file' ]]; then
            COMPREPLY=()
            compopt -o default
        elif [[ $type == 'plain' ]]; then
            COMPREPLY+=($value)
        fi
    done

    return 0
}

%(complete_func)s_setup() {
    complete -o nosort -F %(complete_func)s %(prog_name)s
}

%(complete_func)s_setup;
"""


class BashCompletion(BashComplete):
    """Click's bash completion, with words taken from the line (model names hold ``:``)."""

    source_template = _SOURCE_BASH

    def get_completion_args(self) -> tuple[list[str], str]:
        line, point = os.environ.get("COMP_LINE"), os.environ.get("COMP_POINT", "")
        if line is None or not point.isdigit():
            return super().get_completion_args()
        before = line[: int(point)]
        words = split_arg_string(before)
        incomplete = words.pop() if words and before[-1:] not in ("", " ", "\t") else ""
        return words[1:], incomplete

    def complete(self) -> str:
        args, incomplete = self.get_completion_args()
        breaks_at_colon = ":" in os.environ.get("COMP_WORDBREAKS", "")
        cut = incomplete.rfind(":") + 1 if breaks_at_colon else 0
        out = []
        for item in self.get_completions(args, incomplete):
            value = str(item.value)
            if cut and item.type == "plain" and value.startswith(incomplete[:cut]):
                value = value[cut:]
            out.append(f"{item.type},{value}")
        return "\n".join(out)


add_completion_class(BashCompletion, "bash")


def local_model_names(models_dir: Path) -> list[str]:
    """The names of the models in the local store, as ``pollama list`` shows them."""
    from pollama.store.manifests import ManifestStore

    return [name.display_shortest() for name in ManifestStore(models_dir).iter_names()]


def model_names(source: str) -> list[str]:
    """The model names to offer: the server's (``source`` "tags" or "running"), else, for
    "tags" on this machine, the local store's. Empty when neither can be read."""
    import httpx

    from pollama.client import Client
    from pollama.config import load_settings
    from pollama.errors import PollamaError

    try:
        settings = load_settings()
    except PollamaError:
        return []
    try:
        with Client(settings.host.url, timeout=_TIMEOUT_S, api_key=settings.api_key or None
                    ) as api:
            models = api.ps() if source == "running" else api.list()
        return [str(m.get("name", "")) for m in models]
    except (PollamaError, httpx.HTTPError, ValueError, KeyError, TypeError):
        pass
    if source == "running" or not settings.host.is_local:
        return []
    try:
        return local_model_names(settings.models)
    except (PollamaError, OSError):
        return []


class ModelNameType(click.ParamType):
    """A model name: taken as given (the server checks it), completed from :func:`model_names`."""

    name = "model"

    def __init__(self, source: str) -> None:
        self.source = source

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        return click.STRING.convert(value, param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[CompletionItem]:
        return [CompletionItem(n) for n in model_names(self.source) if n.startswith(incomplete)]


def complete_model_arguments(name: str, command: click.Command) -> None:
    """Give command ``name``'s model argument (:data:`MODEL_ARGUMENTS`) model-name
    completion; the commands' modules stay unaware of completion."""
    spec = MODEL_ARGUMENTS.get(name)
    if spec is None:
        return
    argument, source = spec
    for param in command.params:
        if isinstance(param, click.Argument) and param.name == argument:
            param.type = ModelNameType(source)


@click.command(epilog="""\b
Load it in each new shell:
  bash   eval "$(pollama completion bash)"    in ~/.bashrc
  zsh    eval "$(pollama completion zsh)"     in ~/.zshrc, after compinit
  fish   pollama completion fish > ~/.config/fish/completions/pollama.fish""")
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the shell completion script for bash, zsh or fish."""
    completer = get_completion_class(shell)
    if completer is None:  # the three are click's own, and registered
        raise click.UsageError(f"no completion for {shell}")
    root = click.get_current_context().find_root().command
    click.echo(completer(root, {}, PROG_NAME, COMPLETE_VAR).source(), nl=False)
