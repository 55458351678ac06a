"""llama.cpp keeps the log callback it is given: a ``LogSink`` dropped without ``close``
left it dangling, and the next model load in the process crashed (seen when a test module's
fixture dropped its sink and a later test loaded a model in the same pytest process)."""

from __future__ import annotations

import gc

from pollama.default_model import default_gguf_path


def test_a_closed_sink_leaves_llama_cpp_a_callback_that_lives() -> None:
    from pollama.runner import llama

    sink = llama.LogSink()
    llama.backend_init()
    model = llama.Model(str(default_gguf_path()))
    model.close()
    assert sink.report.layers > 0  # it heard the load
    sink.close()
    del sink
    gc.collect()
    model = llama.Model(str(default_gguf_path()))  # logs again, through the silent callback
    assert model.n_vocab == 49152
    model.close()
