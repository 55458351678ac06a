"""A plain llama-cpp-python low-level decode loop: the engine's own speed from Python.

This is the reference a pollama worker should match: one context with ``n_seq_max = N``,
one batched prefill of N prompts, then one ``llama_decode`` per step carrying the next token
of every stream, sampled per stream with a ``llama_sampler`` chain (greedy, or top-k + temp +
dist). EOS is ignored so that every stream generates exactly ``--n-predict`` tokens.

It imports ``llama_cpp`` directly: it is a benchmark, not the product. Run it as a script
(``run_bench.py`` starts one process per measurement so runs do not share state); it prints
one JSON object per stream count.

Usage::

    python bench/plain_loop.py --model M.gguf --streams 1 2 4 8 --flash-attn off
    python bench/plain_loop.py --streams 1 --threadpool --poll 50   # attach a ggml pool
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc

DEFAULT_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a mysterious map "
    "washed up on the shore. Describe the keeper, the island, the weather and the journey."
)
GGML_MAX_N_THREADS = 512
GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level in ggml.h
FLASH_ATTN = {
    "auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO,  # llama.cpp's default: on where the backend has it
    "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


@dataclass
class PlainResult:
    streams: int
    flash_attn: str  # auto | on | off
    threads: int
    n_predict: int
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    per_stream_tok_s: float
    aggregate_tok_s: float
    wall_tok_s: float
    step_ms_median: float
    step_ms_p90: float
    step_ms_max: float
    sample_ms_per_token: float
    threadpool: bool
    poll: int


class _ThreadpoolParams(ctypes.Structure):
    """``struct ggml_threadpool_params`` from ggml.h (vendored llama.cpp of the pinned sdist)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def _attach_threadpool(ctx: Any, n_threads: int, poll: int) -> Any:
    """Give the context a persistent ggml thread pool (llama-server does; the C API does not).

    llama-cpp-python 0.3.36 does not bind ``llama_attach_threadpool``; the symbols are in the
    shipped libraries, so bind them here with ctypes.
    """
    libdir = Path(lc.__file__).parent / "lib"
    base = ctypes.CDLL(str(libdir / "libggml-base.so"))
    cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"))
    llama = ctypes.CDLL(str(libdir / "libllama.so"))
    base.ggml_threadpool_params_default.restype = _ThreadpoolParams
    base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
    cpu.ggml_threadpool_new.restype = ctypes.c_void_p
    cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadpoolParams)]
    llama.llama_attach_threadpool.restype = None
    llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    params = base.ggml_threadpool_params_default(n_threads)
    params.poll = poll
    pool = cpu.ggml_threadpool_new(ctypes.byref(params))
    if not pool:
        raise RuntimeError("ggml_threadpool_new failed")
    llama.llama_attach_threadpool(ctx, pool, pool)
    return pool


def _tokenize(vocab: Any, text: str) -> list[int]:
    raw = text.encode()
    buf = (lc.llama_token * (len(raw) + 16))()
    # special tokens parsed, as llama-server's /completion and pollama's raw prompts do
    n = lc.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, True)
    if n < 0:
        raise RuntimeError("tokenize failed")
    return list(buf[:n])


def _make_sampler(top_k: int, seed: int) -> Any:
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if top_k > 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(top_k))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(0.8))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
    else:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    return chain


class Engine:
    """A loaded model; one context per measurement (sized for the stream count)."""

    def __init__(self, model_path: Path) -> None:
        lc.llama_log_set(_silent_log, ctypes.c_void_p())
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"could not load {model_path}")
        self.vocab = lc.llama_model_get_vocab(self.model)

    def run(
        self,
        streams: int,
        *,
        flash_attn: str,
        threads: int = 2,
        n_predict: int = 128,
        n_ctx_per_seq: int = 4096,
        prompt: str = DEFAULT_PROMPT,
        prompts: list[str] | None = None,
        top_k: int = 0,
        threadpool: bool = False,
        poll: int = 50,
    ) -> PlainResult:
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx_per_seq * streams
        cparams.n_batch = 2048
        cparams.n_ubatch = 512
        cparams.n_seq_max = streams
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = FLASH_ATTN[flash_attn]
        cparams.kv_unified = False
        cparams.no_perf = True
        ctx = lc.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise RuntimeError("could not create the context")
        if threadpool:
            _attach_threadpool(ctx, threads, poll)
        mem = lc.llama_get_memory(ctx)
        batch = lc.llama_batch_init(max(2048, streams), 0, 1)
        samplers = [_make_sampler(top_k, 1234 + i) for i in range(streams)]
        try:
            self._warm_up(ctx, batch)
            lc.llama_memory_clear(mem, True)
            texts = prompts or [f"Story {i + 1}. {prompt}" for i in range(streams)]
            prompt_ids = [_tokenize(self.vocab, text) for text in texts[:streams]]
            t0 = time.perf_counter()
            logits_idx = self._prefill(ctx, batch, prompt_ids)
            t1 = time.perf_counter()
            positions = [len(p) for p in prompt_ids]
            step_times: list[float] = []
            sample_s = 0.0
            for _ in range(n_predict):
                s0 = time.perf_counter()
                tokens = [
                    lc.llama_sampler_sample(samplers[i], ctx, logits_idx[i]) for i in range(streams)
                ]
                sample_s += time.perf_counter() - s0
                batch.n_tokens = streams
                for i, tok in enumerate(tokens):
                    _set(batch, i, tok, positions[i], i, True)
                    positions[i] += 1
                d0 = time.perf_counter()
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                step_times.append(time.perf_counter() - d0)
                logits_idx = list(range(streams))
            t2 = time.perf_counter()
        finally:
            for s in samplers:
                lc.llama_sampler_free(s)
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        decode_s = t2 - t1
        step_times.sort()
        return PlainResult(
            streams=streams,
            flash_attn=flash_attn,
            threads=threads,
            n_predict=n_predict,
            prompt_tokens=sum(len(p) for p in prompt_ids),
            prefill_s=round(t1 - t0, 4),
            decode_s=round(decode_s, 4),
            per_stream_tok_s=round(n_predict / decode_s, 2),
            aggregate_tok_s=round(n_predict * streams / decode_s, 2),
            wall_tok_s=round(n_predict * streams / (t2 - t0), 2),
            step_ms_median=round(step_times[len(step_times) // 2] * 1000, 3),
            step_ms_p90=round(step_times[int(len(step_times) * 0.9)] * 1000, 3),
            step_ms_max=round(step_times[-1] * 1000, 3),
            sample_ms_per_token=round(sample_s * 1000 / (n_predict * streams), 4),
            threadpool=threadpool,
            poll=poll if threadpool else 0,
        )

    def _warm_up(self, ctx: Any, batch: Any) -> None:
        """One small decode: first-touch page faults and graph allocation, as llama-server does."""
        bos = lc.llama_vocab_bos(self.vocab)
        batch.n_tokens = 1
        _set(batch, 0, bos if bos >= 0 else 0, 0, 0, True)
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("warm-up decode failed")

    def _prefill(self, ctx: Any, batch: Any, prompts: list[list[int]]) -> list[int]:
        """Decode all prompts in ``n_batch`` chunks; return each stream's logits index."""
        pending = [(s, pos, tok) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        last = {s: len(p) - 1 for s, p in enumerate(prompts)}
        logits_idx = [0] * len(prompts)
        chunk = 2048
        for start in range(0, len(pending), chunk):
            part = pending[start : start + chunk]
            batch.n_tokens = len(part)
            for j, (s, pos, tok) in enumerate(part):
                is_last = pos == last[s]
                _set(batch, j, tok, pos, s, is_last)
                if is_last:
                    logits_idx[s] = j
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("prefill decode failed")
        return logits_idx


def _set(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


@lc.llama_log_callback
def _silent_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode(errors="replace"))


def _default_model() -> Path:
    src = Path(__file__).resolve().parent.parent / "src"
    sys.path.insert(0, str(src))
    from pollama.default_model import default_gguf_path

    return default_gguf_path()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF file (default: pollama's default model)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--flash-attn", choices=list(FLASH_ATTN), default="off")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--n-ctx-per-seq", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=0, help="0 = greedy; else top-k, temp 0.8, dist")
    ap.add_argument("--threadpool", action="store_true", help="attach a persistent ggml pool")
    ap.add_argument("--poll", type=int, default=50, help="pool polling level (with --threadpool)")
    ap.add_argument("--prompts", type=Path,
                    help="a JSON list of whole prompts, one per stream (special tokens parsed)")
    args = ap.parse_args(argv)
    prompts = json.loads(args.prompts.read_text()) if args.prompts else None
    model = args.model or _default_model()
    engine = Engine(model)
    for n in args.streams:
        result = engine.run(
            n,
            flash_attn=args.flash_attn,
            threads=args.threads,
            n_predict=args.n_predict,
            n_ctx_per_seq=args.n_ctx_per_seq,
            top_k=args.top_k,
            prompts=prompts,
            threadpool=args.threadpool,
            poll=args.poll,
        )
        print(json.dumps(asdict(result)), flush=True)
    os._exit(0)  # skip ctypes teardown of the model at exit; nothing to flush


if __name__ == "__main__":
    raise SystemExit(main())
