"""llama.cpp's own answer to a prompt with images: the reference the M-RoPE tests compare with.

Run as a script (``python tests/mrope_reference.py MODEL PROJECTOR PROMPT N IMAGE...``) in a
process of its own, as only workers load llama.cpp: it tokenizes ``PROMPT`` (each ``[img-N]``
becomes mtmd's media marker for image file N) with ``mtmd_tokenize``, evaluates every chunk
with ``mtmd_helper_eval_chunks`` (llama.cpp's helper: its text positions, its image rows'
M-RoPE positions, and the text after an image at the image's start + ``n_pos``), then decodes
``N`` greedy tokens at the positions that follow, and prints ``{"text": ...}`` as JSON. No
pollama engine code is involved, so an answer the server gives equal to this one was decoded
at the positions llama.cpp itself uses. A ``[cut]`` in ``PROMPT`` splits it into parts
evaluated one after the other (as a cached prefix and the rest), each part's text tokenized
on its own.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys

import numpy as np

CUT = "[cut]"
"""Splits a prompt into parts evaluated one after the other, as a cached prefix and the
rest are (each part's text at the positions that follow the previous part's)."""


def main(argv: list[str]) -> None:
    from pollama.runner.bindings import lc, load_mtmd
    from pollama.runner.llama import Batch, Context, ContextParams, Model

    model_path, projector_path, prompt, n_predict, *images = argv
    mt = load_mtmd()
    model = Model(model_path)
    ctx = Context(model, ContextParams(n_ctx=1024, n_batch=512, n_ubatch=512))
    params = mt.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    mctx = mt.mtmd_init_from_file(projector_path.encode(), model.ptr, params)
    assert mctx and mt.mtmd_decode_use_mrope(mctx)
    marker = mt.mtmd_default_marker().decode()
    bitmaps = [mt.mtmd_helper_bitmap_init_from_file(mctx, path.encode(), False) for path in images]
    n_past = lc.llama_pos(0)
    parts = prompt.split(CUT)
    for i, part in enumerate(parts):
        order = [int(n) for n in re.findall(r"\[img-(\d+)\]", part)]
        text = re.sub(r"\[img-\d+\]", marker, part).encode()
        chunks = mt.mtmd_input_chunks_init()
        array = (mt.mtmd_bitmap_p_ctypes * len(order))(*(bitmaps[n] for n in order))
        raw = mt.mtmd_input_text(text, len(text), i == 0, True)
        assert mt.mtmd_tokenize(mctx, chunks, ctypes.byref(raw), array, len(order)) == 0
        last = i == len(parts) - 1
        rc = mt.mtmd_helper_eval_chunks(
            mctx, ctx.ptr, chunks, n_past.value, 0, 512, last, ctypes.byref(n_past)
        )
        assert rc == 0, rc
    pieces = b""
    logprobs: list[list[float]] = []
    batch = Batch(1)
    logits = ctx.logits(-1).astype(np.float64)
    for _ in range(int(n_predict)):
        token = int(np.argmax(logits))
        shifted = logits - logits.max()
        measured = shifted - np.log(np.exp(shifted).sum())
        logprobs.append(sorted(measured.tolist(), reverse=True)[:3])
        if model.is_eog(token):
            break
        pieces += model.token_to_piece(token)
        batch.clear()
        batch.add(token, n_past.value, 0, True)
        n_past.value += 1
        assert ctx.decode(batch) == 0
        logits = ctx.logits(0).astype(np.float64)
    print(json.dumps({"text": pieces.decode("utf-8", errors="replace"), "logprobs": logprobs}))
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
