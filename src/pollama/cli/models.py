"""Model management commands: list, show, cp, rm, purge."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

import click

from pollama.cli.common import client, reports_errors
from pollama.cli.tables import table
from pollama.client import ResponseError
from pollama.format import human_bytes, human_number, human_time


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


@click.command("list")
@click.argument("prefix", required=False)
@reports_errors
def list_models(prefix: str | None) -> None:
    """List models."""
    api = client()
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    for m in api.list():
        name = str(m.get("name") or m.get("model"))
        if prefix and not name.lower().startswith(prefix.lower()):
            continue
        modified = _parse_time(str(m.get("modified_at", "")))
        rows.append(
            [
                name,
                str(m.get("digest", ""))[:12],
                human_bytes(int(m.get("size", 0))) if m.get("size") else "-",
                human_time(modified) if modified else "Never",
            ]
        )
    click.echo(table(rows))


def _two_lines(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [[line] for line in lines[:2]]
    if len(lines) > 2:
        rows.append(["..."])
    return rows


def _value(v: Any) -> str:
    if isinstance(v, list):
        head = " ".join(str(x) for x in v[:3])
        return f"[{head} ...+{len(v) - 3} more]" if len(v) > 3 else f"[{head}]"
    return str(v)


def _model_rows(info: dict[str, Any]) -> list[list[str]]:
    model_info = info.get("model_info") or {}
    details = info.get("details") or {}
    arch = str(model_info.get("general.architecture", ""))
    rows: list[list[str]] = []
    if arch:
        rows.append(["architecture", arch])
    params = details.get("parameter_size") or (
        human_number(int(model_info["general.parameter_count"]))
        if "general.parameter_count" in model_info
        else ""
    )
    if params:
        rows.append(["parameters", str(params)])
    for label, key in (
        ("context length", "context_length"),
        ("embedding length", "embedding_length"),
    ):
        if f"{arch}.{key}" in model_info:
            rows.append([label, str(model_info[f"{arch}.{key}"])])
    if details.get("quantization_level"):
        rows.append(["quantization", str(details["quantization_level"])])
    if info.get("requires"):
        rows.append(["requires", str(info["requires"])])
    return rows


def _projector_rows(projector: dict[str, Any]) -> list[list[str]]:
    """Ollama's ``Projector`` section: each row only when its key is there, the widths from
    the vision keys, else the audio ones (``<arch>.vision.embedding_length``…)."""
    arch = projector.get("general.architecture")
    rows: list[list[str]] = []
    if isinstance(arch, str) and arch:
        rows.append(["architecture", arch])
    count = projector.get("general.parameter_count")
    if isinstance(count, int | float) and not isinstance(count, bool):
        rows.append(["parameters", human_number(int(count))])
    widths = (("embedding length", "embedding_length"), ("dimensions", "projection_dim"))
    for label, suffix in widths:
        for modality in ("vision", "audio"):
            value = projector.get(f"{arch}.{modality}.{suffix}")
            if isinstance(value, int | float) and not isinstance(value, bool):
                rows.append([label, f"{value:g}" if isinstance(value, float) else str(value)])
                break
    return rows


def _verbose_sections(info: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    model_info = info.get("model_info") or {}
    sections: list[tuple[str, list[list[str]]]] = []
    if model_info:
        sections.append(("Metadata", [[k, _value(model_info[k])] for k in sorted(model_info)]))
    if info.get("tensors"):
        sections.append(
            ("Tensors", [[t["name"], t["type"], str(t["shape"])] for t in info["tensors"]])
        )
    return sections


def format_show(info: dict[str, Any], verbose: bool = False) -> str:
    """The formatted ``pollama show`` text (docs/ollama-behaviour.md#show-in-the-terminal)."""
    sections: list[tuple[str, list[list[str]]]] = [("Model", _model_rows(info))]
    if info.get("capabilities"):
        sections.append(("Capabilities", [[c] for c in info["capabilities"]]))
    if info.get("projector_info"):
        sections.append(("Projector", _projector_rows(info["projector_info"])))
    if info.get("parameters"):
        sections.append(
            (
                "Parameters",
                [
                    line.split(None, 1)
                    for line in str(info["parameters"]).splitlines()
                    if line.strip()
                ],
            )
        )
    if verbose:
        sections += _verbose_sections(info)
    if info.get("system"):
        sections.append(("System", _two_lines(str(info["system"]))))
    if info.get("license"):
        sections.append(("License", _two_lines(str(info["license"]))))
    out = []
    for title, body in sections:
        if not body:
            continue
        out.append(f"  {title}")
        out.append(table(body, indent="    "))
        out.append("")
    return "\n".join(out) + "\n"


@click.command()
@click.argument("model")
@click.option("--license", "license_", is_flag=True, help="Show license of a model")
@click.option("--modelfile", is_flag=True, help="Show Modelfile of a model")
@click.option("--parameters", is_flag=True, help="Show parameters of a model")
@click.option("--template", is_flag=True, help="Show template of a model")
@click.option("--system", is_flag=True, help="Show system message of a model")
@click.option("-v", "--verbose", is_flag=True, help="Show detailed model information")
@reports_errors
def show(
    model: str,
    license_: bool,
    modelfile: bool,
    parameters: bool,
    template: bool,
    system: bool,
    verbose: bool,
) -> None:
    """Show information for a model."""
    flags = [license_, modelfile, parameters, system, template]
    if sum(flags) > 1:
        raise click.UsageError(
            "only one of '--license', '--modelfile', '--parameters', '--system', or "
            "'--template' can be specified"
        )
    info = client().show(model, verbose=verbose)
    if license_:
        click.echo(info.get("license", ""))
    elif modelfile:
        click.echo(info.get("modelfile", ""))
    elif parameters:
        click.echo(info.get("parameters", ""))
    elif system:
        sys.stdout.write(info.get("system", ""))
    elif template:
        sys.stdout.write(info.get("template", ""))
    else:
        click.echo(format_show(info, verbose), nl=False)


@click.command()
@click.argument("source")
@click.argument("destination")
@reports_errors
def cp(source: str, destination: str) -> None:
    """Copy a model."""
    client().copy(source, destination)
    click.echo(f"copied '{source}' to '{destination}'")


@click.command()
@click.argument("models", nargs=-1, required=True)
@reports_errors
def rm(models: tuple[str, ...]) -> None:
    """Remove a model."""
    api = client()
    for name in models:
        try:
            for _ in api.generate({"model": name, "keep_alive": 0}):
                pass
        except ResponseError as exc:
            if exc.status_code not in (404, 405, -1):
                click.echo(f"Warning: unable to stop model '{name}'", err=True)
        api.delete(name)
        click.echo(f"deleted '{name}'")


@click.command()
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation")
@reports_errors
def purge(yes: bool) -> None:
    """Remove files no model needs: unused blobs, partial downloads, temp files."""
    api = client()
    found = api.purge(dry_run=True)
    items = found["items"]
    if not items:
        click.echo("nothing to purge")
        return
    click.echo(
        table(
            [["KIND", "SIZE", "PATH"]]
            + [[i["kind"], human_bytes(i["size"]), i["path"]] for i in items]
        )
    )
    click.echo(f"{len(items)} file(s), {human_bytes(found['total'])} in all")
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("refusing to purge without confirmation: pass --yes")
        click.confirm("Remove these files?", abort=True)
    done = api.purge(dry_run=False, paths=[i["path"] for i in items])
    click.echo(f"freed {human_bytes(done['freed'])}")
