"""Decode speed of the worker with the real default model: one stream and four at once,
flash attention off and on, against a minimal low-level loop measured in the same run.

    .venv/bin/python tests/bench_worker.py [--tokens 256] [--rounds 2]

Not collected by pytest. Numbers vary by ±5 % on quiet shared machines, and collapse when
anything else runs (the OpenMP threads spin at barriers): compare within one run, and read
the best of several short rounds as the speed of an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from pollama.runner.worker import _tune_threads  # noqa: E402
from test_worker import CHAT, WorkerClient, smol_spec  # noqa: E402

PLAIN = """
import sys, time
import llama_cpp.llama_cpp as lc
from pollama.default_model import default_gguf_path
fa, n = int(sys.argv[1]), int(sys.argv[2])
cb = lc.llama_log_callback(lambda *a: None); lc.llama_log_set(cb, None)
lc.llama_backend_init()
mp = lc.llama_model_default_params()
model = lc.llama_model_load_from_file(str(default_gguf_path()).encode(), mp)
vocab = lc.llama_model_get_vocab(model)
cp = lc.llama_context_default_params()
cp.n_ctx, cp.n_seq_max, cp.n_batch, cp.n_ubatch = 2048 * 4, 4, 512, 512
cp.n_threads = cp.n_threads_batch = len(__import__("os").sched_getaffinity(0))
cp.flash_attn_type, cp.kv_unified = fa, False
ctx = lc.llama_init_from_model(model, cp)
text = sys.argv[3].encode()
buf = (lc.llama_token * 512)()
k = lc.llama_tokenize(vocab, text, len(text), buf, 512, True, True)
batch = lc.llama_batch_init(512, 0, 1)
for i in range(k):
    batch.token[i], batch.pos[i], batch.n_seq_id[i] = buf[i], i, 1
    batch.seq_id[i][0], batch.logits[i] = 0, i == k - 1
batch.n_tokens = k
lc.llama_decode(ctx, batch)
chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
tok, pos = lc.llama_sampler_sample(chain, ctx, k - 1), k
t0 = time.perf_counter()
for _ in range(n - 1):
    batch.token[0], batch.pos[0], batch.logits[0], batch.n_tokens = tok, pos, 1, 1
    lc.llama_decode(ctx, batch)
    tok, pos = lc.llama_sampler_sample(chain, ctx, 0), pos + 1
print((n - 1) / (time.perf_counter() - t0))
"""

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain how a bicycle works, in detail.",
    "Describe a busy market in a large city.",
    "Write a letter to a friend about your holidays.",
]


def plain_loop(fa: int, tokens: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PLAIN, str(fa), str(tokens), CHAT.format(PROMPTS[0])],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def one_stream(client: WorkerClient, tokens: int, **options: object) -> float:
    req = client.start(CHAT.format(PROMPTS[0]), num_predict=tokens, **options)
    _, done = client.finish(req)
    return (done["eval_count"] - 1) / (done["eval_duration_ns"] / 1e9)


def four_streams(client: WorkerClient, tokens: int, **options: object) -> float:
    """Aggregate tokens per second, wall clock from the first token on."""
    reqs = [client.start(CHAT.format(p), num_predict=tokens, **options) for p in PROMPTS]
    first = client.next(reqs[0])
    assert first["type"] == "chunk", first
    t0 = time.perf_counter()
    total = 0
    for req in reqs:
        _, done = client.finish(req)
        total += done["eval_count"]
    return (total - 1) / (time.perf_counter() - t0)


def main() -> None:
    _tune_threads()  # the plain loop runs with the worker's OpenMP settings too
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n = args.tokens
    sampled = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 1}
    for fa in (False, True):
        client = WorkerClient(smol_spec(num_ctx=2048, num_parallel=4, flash_attention=fa))
        try:
            client.complete(CHAT.format("hi"), num_predict=8)  # warm caches
            rows = {"plain loop, greedy": [], "worker 1 stream greedy": []}
            rows |= {"worker 1 stream sampled": [], "worker 4 streams greedy": []}
            rows |= {"worker 4 streams sampled": []}
            for _ in range(args.rounds):
                rows["plain loop, greedy"].append(plain_loop(int(fa), n))
                rows["worker 1 stream greedy"].append(one_stream(client, n, temperature=0))
                rows["worker 1 stream sampled"].append(one_stream(client, n, **sampled))
                rows["worker 4 streams greedy"].append(four_streams(client, n, temperature=0))
                rows["worker 4 streams sampled"].append(four_streams(client, n, **sampled))
        finally:
            client.close()
        print(f"flash attention {'on' if fa else 'off'}:")
        for name, values in rows.items():
            best, median = max(values), statistics.median(values)
            print(f"  {name:28s} best {best:6.1f}  median {median:6.1f} tok/s")


if __name__ == "__main__":
    main()
