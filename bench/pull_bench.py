"""Pull throughput from a loopback registry, against what the disk itself does.

A registry (Debian's ``docker-registry``, Go) runs on 127.0.0.1 with one model pushed to it:
the real default model (SmolLM2-135M Q4_1, 98 MB) when installed, else random bytes of
``--size`` MB. The script then measures, on the same machine in one run, interleaved (one of
each per round, ``--repeat`` rounds, medians):

* ``copy``: ``shutil.copyfile`` of the blob to the same filesystem, plus ``fsync`` (page cache
  warm), the ceiling for anything that writes the blob once;
* ``sha256``: hashing it, which a verified pull must also do;
* ``registry to /dev/null``: ``curl -o /dev/null`` of the blob's URL, what the registry itself
  serves on loopback (no write, no hash): the ceiling of any pull through it (when ``curl``
  is installed);
* ``pull`` with Ollama's part sizing (a blob of up to 100 MB is one part, a larger one
  parts of ``size / 16`` but at least 100 MB; pollama opens more connections only while
  the link is slower than ``fast_link``), and in 16 parts fetched all at once (Ollama's
  way: ``ramp_interval=0``), by :class:`pollama.registry.RegistryService` in-process;
* ``pull via serve``: ``POST /api/pull`` to a real ``pollama serve`` (progress stream and
  all; the model is deleted again between rounds, so each pull starts from an empty store).

Each pull goes into an empty store and is timed from the request to ``success`` (manifest,
download, verification, manifest write). The machine is shared: before each round the script
waits for others to use less than ``--max-foreign`` of the CPUs, and measures a round again
when they used more meanwhile (the registry and the server are this script's children, so
their CPU counts as ours). Prints a markdown table; ``--markdown`` writes it with the raw
runs (``bench/results/<date>-pull.md``), ``--json`` the raw runs alone.

Usage::

    .venv/bin/python bench/pull_bench.py
    .venv/bin/python bench/pull_bench.py --repeat 9 --markdown bench/results/2026-12-05-pull.md
    .venv/bin/python bench/pull_bench.py --size 512 --json bench/.build/pull.json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the registry and server helpers of the test suite

import _procs  # noqa: E402

from conftest import RunningServer, start_server, stop_server  # noqa: E402
from pollama.names import ModelName  # noqa: E402
from pollama.registry import RegistryService, TransferOptions  # noqa: E402
from pollama.store import Store  # noqa: E402
from pollama.store.manifests import CONFIG_MEDIA_TYPE, MEDIA_MODEL, Layer, Manifest  # noqa: E402
from registry_helpers import DockerRegistry  # noqa: E402

MB = 1_000_000
COPY = "copy + fsync"
CEILING = "registry to /dev/null (curl)"


def model_file(size_mb: int, tmp: Path, blob: Path | None = None) -> tuple[Path, str]:
    if blob is not None:
        return blob, blob.name
    try:
        from pollama.default_model import default_gguf_path

        path = default_gguf_path()
        return path, f"default model {path.name}"
    except Exception:  # noqa: BLE001 - not installed: random data will do
        path = tmp / "random.bin"
        with open(path, "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(MB))
        return path, f"{size_mb} MB of random bytes"


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def copy_once(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    dst.unlink()


def hash_once(src: Path) -> None:
    h = hashlib.sha256()
    with open(src, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)


async def drain(events: Any) -> None:
    async for _ in events:
        pass


def pull_in_process(name: ModelName, home: Path, opts: TransferOptions) -> float:
    store = Store(Path(tempfile.mkdtemp(dir=home)) / "models")
    store.ensure()
    svc = RegistryService(store, user_home=home, options=opts, allowed_hosts=(name.host,))
    seconds = timed(lambda: asyncio.run(drain(svc.pull(name, insecure=True))))
    shutil.rmtree(store.root)
    return seconds


def pull_via_serve(server: RunningServer, name: ModelName, http: httpx.Client) -> float:
    """``http``: one client for every round, made before any is timed (as a program that
    pulls keeps its client); making one costs ~40 ms of loading the CA bundle, which the
    first version of this benchmark counted in every pull."""
    def pull() -> None:
        body = {"model": str(name), "insecure": True}
        with http.stream("POST", f"{server.url}/api/pull", json=body, timeout=None) as r:
            last = ""
            for line in r.iter_lines():
                last = line
        if json.loads(last) != {"status": "success"}:
            raise RuntimeError(last)

    seconds = timed(pull)
    deleted = http.request("DELETE", f"{server.url}/api/delete", json={"model": str(name)})
    deleted.raise_for_status()
    return seconds


def curl_blob(url: str) -> None:
    """The blob from the registry into /dev/null, by curl (no Python, no disk)."""
    subprocess.run(["curl", "-sSf", "-o", "/dev/null", url], check=True)


def blob_url(registry: DockerRegistry, source: Path) -> str:
    h = hashlib.sha256()
    with open(source, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return f"{registry.url}/v2/library/bench/blobs/sha256:{h.hexdigest()}"


def publish(home: Path, registry: DockerRegistry, source: Path) -> ModelName:
    """Push the blob as ``library/bench:latest`` to the registry."""
    store = Store(home / "origin")
    store.ensure()
    model = store.blobs.put_file(source)
    config = store.blobs.put_bytes(b'{"model_format":"gguf"}\n')
    name = ModelName.parse(f"{registry.netloc}/library/bench:latest")
    store.manifests.write(
        name,
        Manifest(
            Layer(CONFIG_MEDIA_TYPE, config.digest, config.size),
            (Layer(MEDIA_MODEL, model.digest, model.size),),
        ),
    )
    svc = RegistryService(store, user_home=home, allowed_hosts=(name.host,))
    asyncio.run(drain(svc.push(name, insecure=True)))
    return name


def local_measures(
    registry: DockerRegistry, name: ModelName, home: Path, source: Path
) -> dict[str, Callable[[], float]]:
    """The references (copy, sha256, the registry into /dev/null) and the in-process pulls."""
    sixteen = max(1, source.stat().st_size // 16 + 1)
    at_once = TransferOptions(min_part_size=sixteen, ramp_interval=0)
    measures: dict[str, Callable[[], float]] = {
        COPY: lambda: timed(lambda: copy_once(source, home / "copy.bin")),
        "sha256": lambda: timed(lambda: hash_once(source)),
    }
    if shutil.which("curl"):
        url = blob_url(registry, source)
        measures[CEILING] = lambda: timed(lambda: curl_blob(url))
    parts = len(TransferOptions().plan(source.stat().st_size))
    default = f"pull, {parts} part{'s' if parts > 1 else ''}"
    measures[default] = lambda: pull_in_process(name, home, TransferOptions())
    measures["pull, 16 parts at once"] = lambda: pull_in_process(name, home, at_once)
    return measures


def quiet_round(
    measures: dict[str, Callable[[], float]], args: argparse.Namespace
) -> tuple[dict[str, float], float]:
    """One of each measure, measured again while others used more than ``--max-foreign``."""
    for attempt in range(1, args.attempts + 1):
        _procs.wait_quiet(args.max_foreign, patience=args.patience)
        before = _procs.cpu_snapshot()
        values = {label: fn() for label, fn in measures.items()}
        load = _procs.foreign_load(before, _procs.cpu_snapshot())
        if load <= args.max_foreign or attempt == args.attempts:
            return values, load
        print(f"  others used {load:.0%} of the CPUs meanwhile: measuring again", flush=True)
    raise AssertionError("unreachable")


def report(runs: dict[str, list[float]], loads: list[float], size: int, what: str) -> str:
    """The markdown: a line on what was measured, then the table (each median against the
    copy's, and against the registry's own rate into /dev/null where curl measured it)."""
    copy_s = statistics.median(runs[COPY])
    lines = [
        f"Blob: {what}, {size / MB:.1f} MB; {len(runs[COPY])} interleaved rounds, medians; "
        f"{os.cpu_count()} CPUs; others used {statistics.median(loads):.0%} of them (median).",
        "",
        "| measure | seconds | MB/s | vs copy | vs registry |",
        "|---|---:|---:|---:|---:|",
    ]
    ceiling_s = statistics.median(runs[CEILING]) if CEILING in runs else None
    for label, values in runs.items():
        seconds = statistics.median(values)
        of_ceiling = f"{ceiling_s / seconds:.2f}" if ceiling_s else "-"
        lines.append(
            f"| {label} | {seconds:.3f} | {size / MB / seconds:.0f} | {copy_s / seconds:.2f} "
            f"| {of_ceiling} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MB of random data if no model")
    parser.add_argument("--blob", type=Path, help="pull this file (default: the default model)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--json", type=Path, help="also write the raw runs here")
    parser.add_argument("--markdown", type=Path, help="also write the table and the raw runs")
    parser.add_argument("--no-serve", action="store_true", help="skip the pollama serve run")
    parser.add_argument("--max-foreign", type=float, default=0.10)
    parser.add_argument("--attempts", type=int, default=4, help="tries of a busy round")
    parser.add_argument("--patience", type=float, default=60.0, help="s to wait for quiet")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="pull-bench-"))
    registry = DockerRegistry(home / "registry")
    server: RunningServer | None = None
    http = httpx.Client(verify=False)  # plain http on loopback: no TLS to verify
    try:
        source, what = model_file(args.size, home, args.blob)
        size = source.stat().st_size
        name = publish(home, registry, source)
        hash_once(source)  # warm the page cache for the copy and hash references
        measures = local_measures(registry, name, home, source)
        if not args.no_serve:
            # A loopback registry is reached only when the server lists it (README, "Registries").
            (home / "serve").mkdir()
            server = start_server(home / "serve", {"POLLAMA_REGISTRY_HOSTS": name.host})
            running = server
            measures["pull via pollama serve (/api/pull)"] = lambda: pull_via_serve(
                running, name, http)
        for measure in measures.values():  # a first round, not counted: imports, connections
            measure()
        runs: dict[str, list[float]] = {label: [] for label in measures}
        loads = []
        for n in range(args.repeat):
            values, load = quiet_round(measures, args)
            loads.append(load)
            for label, seconds in values.items():
                runs[label].append(seconds)
            print(f"  round {n + 1}: " + ", ".join(f"{v:.3f}" for v in values.values()), flush=True)
    finally:
        http.close()
        if server is not None:
            stop_server(server)
        registry.stop()
    table = report(runs, loads, size, what)
    print("\n" + table)
    raw = {"blob": what, "bytes": size, "foreign_load": loads, "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        details = f"<details><summary>raw</summary>\n\n```json\n{json.dumps(raw, indent=1)}\n```\n"
        args.markdown.write_text(f"{table}\n{details}\n</details>\n")
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
