"""Pull throughput from a loopback registry, against what the disk itself does.

A registry (Debian's ``docker-registry``) runs on 127.0.0.1 with one model pushed to it: the
real default model (SmolLM2-135M Q4_1, 98 MB) when installed, else random bytes of
``--size`` MB. The script then measures, on the same machine in one run:

* ``copy``: ``shutil.copyfile`` of the blob to the same filesystem, plus ``fsync`` (page cache
  warm), the ceiling for anything that writes the blob once;
* ``sha256``: hashing it, which a verified pull must also do;
* ``pull`` in one part (Ollama's part sizing: blobs under 100 MB are one part) and in 16
  parts, by :class:`pollama.registry.RegistryService` in-process;
* ``pull via serve``: ``POST /api/pull`` to a real ``pollama serve`` (progress stream and all).

Each pull goes into an empty store and is timed from the request to ``success`` (manifest,
download, verification, manifest write). Prints a markdown table; ``--json`` writes the
numbers too.

Usage::

    .venv/bin/python bench/pull_bench.py
    .venv/bin/python bench/pull_bench.py --size 512 --repeat 3 --json bench/.build/pull.json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the registry and server helpers of the test suite

from conftest import start_server, stop_server  # noqa: E402
from pollama.names import ModelName  # noqa: E402
from pollama.registry import RegistryService, TransferOptions  # noqa: E402
from pollama.store import Store  # noqa: E402
from pollama.store.manifests import CONFIG_MEDIA_TYPE, MEDIA_MODEL, Layer, Manifest  # noqa: E402
from registry_helpers import DockerRegistry  # noqa: E402

MB = 1_000_000


def model_file(size_mb: int, tmp: Path) -> tuple[Path, str]:
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


def timed(fn: Any) -> float:
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


def pull_via_serve(name: ModelName, home: Path) -> float:
    server_home = Path(tempfile.mkdtemp(dir=home))
    # A loopback registry is reached only when the server lists it (README, "Registries").
    server = start_server(server_home, {"POLLAMA_REGISTRY_HOSTS": name.host})
    try:

        def pull() -> None:
            body = {"model": str(name), "insecure": True}
            with httpx.stream("POST", f"{server.url}/api/pull", json=body, timeout=None) as r:
                last = ""
                for line in r.iter_lines():
                    last = line
            if json.loads(last) != {"status": "success"}:
                raise RuntimeError(last)

        return timed(pull)
    finally:
        stop_server(server)
        shutil.rmtree(server_home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MB of random data if no model")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-serve", action="store_true", help="skip the pollama serve run")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="pull-bench-"))
    registry = DockerRegistry(home / "registry")
    try:
        source, what = model_file(args.size, home)
        size = source.stat().st_size
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
        asyncio.run(drain(RegistryService(store, user_home=home, allowed_hosts=(name.host,)).push(
            name, insecure=True
        )))
        hash_once(source)  # warm the page cache for the copy and hash references

        runs: dict[str, list[float]] = {
            "copy + fsync": [],
            "sha256": [],
            "pull, 1 part": [],
            "pull, 16 parts": [],
        }
        sixteen = TransferOptions(min_part_size=max(1, size // 16 + 1))
        for _ in range(args.repeat):
            runs["copy + fsync"].append(timed(lambda: copy_once(source, home / "copy.bin")))
            runs["sha256"].append(timed(lambda: hash_once(source)))
            runs["pull, 1 part"].append(pull_in_process(name, home, TransferOptions()))
            runs["pull, 16 parts"].append(pull_in_process(name, home, sixteen))
        if not args.no_serve:
            runs["pull via pollama serve (/api/pull)"] = [
                pull_via_serve(name, home) for _ in range(args.repeat)
            ]
    finally:
        registry.stop()

    copy_s = statistics.median(runs["copy + fsync"])
    rows = []
    print(
        f"\nBlob: {what}, {size / MB:.1f} MB; {args.repeat} runs each, median; "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| measure | seconds | MB/s | vs copy |")
    print("|---|---:|---:|---:|")
    for label, values in runs.items():
        seconds = statistics.median(values)
        rate = size / MB / seconds
        rows.append(
            {
                "measure": label,
                "seconds": seconds,
                "mb_per_s": rate,
                "vs_copy": copy_s / seconds,
                "runs": values,
            }
        )
        print(f"| {label} | {seconds:.3f} | {rate:.0f} | {copy_s / seconds:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"blob": what, "bytes": size, "rows": rows}, indent=2))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
