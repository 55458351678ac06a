"""Embedding and rerank speed: pollama against llama-server on the same GGUF, same threads.

Models: all-MiniLM-L6-v2 converted by ``pollama create`` from its Hugging Face folder
(``tests/models.py`` caches it), and a cross-encoder made from its weights with a random
classification head (``tests/hfgen.cross_encoder_folder``: the speed of a real BERT
cross-encoder of that size, whatever its scores). llama-server runs the GGUF files that
pollama wrote (``--embedding``, and ``--reranking`` for the cross-encoder), with the same
threads.

Measured, client-side wall time from sending a request to its whole answer:

* **embed, one call**: 64 short texts (8 to 30 words) in one ``/api/embed`` call, and in
  one ``/v1/embeddings`` call to llama-server; texts per second;
* **embed, 64 calls**: the same texts as 64 calls one after another (pollama);
* **rerank**: one query and 32 documents in one ``/api/rerank`` call, and in one ``/rerank``
  call to llama-server; seconds.

Repeats are interleaved (the order of the configurations rotates), each after waiting for
a quiet machine and measured again when other processes used more than ``--max-foreign`` of
the CPUs meanwhile; the table shows medians. Writes ``bench/results/<date>-retrieval.md``.

    .venv/bin/python bench/retrieval_bench.py               # ~2 minutes on a quiet machine
    .venv/bin/python bench/retrieval_bench.py --repeats 1 --out /tmp/retrieval.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import _procs
import httpx
from _report import publish
from run_bench import LOGS, ROOT, Pollama, git_commit, llama_server_bin
from structured_bench import cpu_model

WORDS = ("model vector search index query document ranking neural network training data "
         "language token embedding retrieval answer question river mountain city market "
         "bread music garden engine library window summer energy system").split()
QUERY = "How do neural networks learn to rank documents for a search query?"


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "."
            for _ in range(n)]


def _post(client: httpx.Client, url: str, body: dict[str, Any]) -> Any:
    r = client.post(url, json=body)
    r.raise_for_status()
    return r.json()


class Configs:
    """Each measured configuration: a name and a callable that does one measurement's work."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[str, Callable[[], None]]] = {}

    def add(self, name: str, unit: str, work: Callable[[], None]) -> None:
        self.items[name] = (unit, work)


@contextmanager
def llama_server(model: Path, threads: int, mode: str) -> Iterator[str]:
    """llama-server in embedding (``--embedding``) or rerank (``--reranking``) mode, its
    batch as large as pollama's embedding batch (a bidirectional model needs a whole input
    in one ubatch) and 16 slots, so a request's inputs share passes."""
    port = _procs.free_port()
    cmd = [str(llama_server_bin()), "-m", str(model), "-t", str(threads), "-tb", str(threads),
           f"--{mode}", "-np", "16", "-c", "4096", "-b", "2048", "-ub", "2048",
           "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    with _procs.Server("llama-server", cmd, os.environ, LOGS / f"retrieval-{port}.log",
                       ROOT) as srv:
        base = f"http://127.0.0.1:{port}"
        srv.wait_ready(f"{base}/health", timeout=120)
        yield base


def model_gguf(home: Path, name: str) -> Path:
    """The GGUF that ``pollama create`` wrote for ``name`` (the store's model layer)."""
    from pollama.names import ModelName
    from pollama.store import Store
    from pollama.store.manifests import MEDIA_MODEL

    store = Store(home / "models")
    model = store.get(ModelName.parse(name))
    layer = next(layer for layer in model.layers if layer.media_type == MEDIA_MODEL)
    return Path(store.blobs.path(layer.digest))


def configs(stack: ExitStack, args: argparse.Namespace, home: Path) -> Configs:
    from hfgen import cross_encoder_folder

    cross = home / "cross-encoder"
    cross_encoder_folder(args.minilm, cross)
    client = stack.enter_context(httpx.Client(timeout=600))
    docs = texts(64, 1)
    passages = texts(32, 2)
    out = Configs()
    embedder = Pollama(args.minilm, args.threads, home / "embed")
    embedder.model_name = "all-minilm"
    _srv, base = stack.enter_context(embedder.serve(parallel=1, fa="off"))
    ranker = Pollama(cross, args.threads, home / "embed")
    ranker.model_name = "minilm-reranker"
    ranker._create(embedder._env(int(base.rsplit(":", 1)[1]), 1, "off"))  # the same server
    options = {"num_thread": args.threads}
    out.add("pollama embed, one call", "texts/s", lambda: _post(
        client, f"{base}/api/embed", {"model": "all-minilm", "input": docs, "options": options}))
    out.add("pollama embed, 64 calls", "texts/s", lambda: [_post(
        client, f"{base}/api/embed", {"model": "all-minilm", "input": d, "options": options})
        for d in docs])
    out.add("pollama rerank", "s", lambda: _post(
        client, f"{base}/api/rerank", {"model": "minilm-reranker", "query": QUERY,
                                       "documents": passages, "options": options}))
    if args.llama_server and llama_server_bin().exists():
        emb = stack.enter_context(llama_server(model_gguf(home / "embed", "all-minilm"),
                                               args.threads, "embedding"))
        out.add("llama-server embed, one call", "texts/s", lambda: _post(
            client, f"{emb}/v1/embeddings", {"input": docs}))
        rank = stack.enter_context(llama_server(model_gguf(home / "embed", "minilm-reranker"),
                                                args.threads, "reranking"))
        out.add("llama-server rerank", "s", lambda: _post(
            client, f"{rank}/rerank", {"query": QUERY, "documents": passages}))
    return out


def timed(work: Callable[[], None]) -> float:
    """Seconds ``work()`` takes, client side."""
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def run(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        found = configs(stack, args, home)
        names = list(found.items)
        for name in names:  # loads each model
            found.items[name][1]()
        for rep in range(args.repeats):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                seconds, foreign = _procs.quiet_measure(
                    lambda n=name: timed(found.items[n][1]), args)
                rows.append({"config": name, "unit": found.items[name][0], "repeat": rep,
                             "seconds": seconds, "foreign": foreign})
                print(f"  {rep} {name:32s} {seconds:7.3f} s (others {foreign:.0%})", flush=True)
    return rows


def _median(rows: list[dict[str, Any]], config: str) -> float | None:
    own = [r["seconds"] for r in rows if r["config"] == config]
    return statistics.median(own) if own else None


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    one = _median(rows, "pollama embed, one call")
    many = _median(rows, "pollama embed, 64 calls")
    peer = _median(rows, "llama-server embed, one call")
    rank = _median(rows, "pollama rerank")
    peer_rank = _median(rows, "llama-server rerank")

    def rate(seconds: float | None) -> str:
        return "—" if seconds is None else f"{64 / seconds:.1f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "—" if a is None or b is None else f"{a / b:.2f}"

    out = [
        f"# Embeddings and rerank ({meta['date']})",
        "",
        f"{meta['cpu']}, {meta['threads']} threads; commit {meta['commit']}. "
        f"`{meta['command']}`",
        "",
        "all-MiniLM-L6-v2 converted by `pollama create` (F16); the cross-encoder is its "
        "weights plus a one-label head. llama-server runs the same GGUF files (`--embedding`, "
        "`--reranking`, 16 slots, batch 2048). Client-side wall time, medians of "
        f"{meta['repeats']} interleaved repeats.",
        "",
        "| measurement | pollama | llama-server | pollama / llama-server |",
        "|---|--:|--:|--:|",
        f"| 64 texts, one call (texts/s) | {rate(one)} | {rate(peer)} | "
        f"{ratio(peer, one)} |",
        f"| 64 texts, 64 calls (texts/s) | {rate(many)} | — | — |",
        f"| rerank, 1 query × 32 documents (s) | {_s(rank)} | {_s(peer_rank)} | "
        f"{ratio(peer_rank, rank)} |",
        "",
        f"One call of 64 against 64 calls: **{ratio(many, one)}×** the throughput.",
        "",
        "Every measurement:",
        "",
        "| repeat | configuration | seconds | others' CPU |",
        "|--:|---|--:|--:|",
    ]
    out += [f"| {r['repeat']} | {r['config']} | {r['seconds']:.3f} | {r['foreign']:.0%} |"
            for r in rows]
    return "\n".join(out) + "\n"


def _s(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", type=Path, help="all-MiniLM-L6-v2 folder (default: cached)")
    _procs.add_quiet_options(ap, repeats=7)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "tests"))
    if args.minilm is None:
        from models import minilm_folder

        args.minilm = minilm_folder()
    date = dt.date.today().isoformat()
    meta = {"date": date, "cpu": cpu_model(), "threads": args.threads,
            "repeats": args.repeats, "commit": git_commit(),
            "command": shlex.join(["python", *sys.argv])}
    with tempfile.TemporaryDirectory(prefix="pollama-retrieval-") as home:
        rows = run(args, Path(home))
    return publish(render(meta, rows), args.out or ROOT / "bench" / "results"
                   / f"{date}-retrieval.md")


if __name__ == "__main__":
    raise SystemExit(main())
