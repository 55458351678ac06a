"""llama.Model's vocabulary walk for ``max_token_bytes``, done on a thread during the load."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pollama.default_model import default_gguf_path

if TYPE_CHECKING:
    from pollama.runner.llama import Model


def _model() -> Model:
    """The default model (importing ``llama`` loads llama.cpp's libraries,
    hence here and not at the top, as in ``test_llama_logsink.py``)."""
    from pollama.runner import llama

    llama.backend_init()
    return llama.Model(str(default_gguf_path()))


def test_the_walk_on_a_thread_gives_the_answer_of_the_walk_in_line() -> None:
    inline, ahead = _model(), _model()
    try:
        ahead.start_max_token_bytes()
        ahead.start_max_token_bytes()  # a second start keeps the first walk
        expected = inline.max_token_bytes()
        assert expected > 1
        assert ahead.max_token_bytes() == expected
    finally:
        inline.close()
        ahead.close()


def test_close_waits_for_the_walk_before_freeing_the_vocabulary() -> None:
    model = _model()
    model.start_max_token_bytes()
    walk = model._longest_piece
    model.close()  # at once: the walk has barely begun
    assert walk is not None and walk.done() and walk.exception() is None
    assert model.ptr is None
