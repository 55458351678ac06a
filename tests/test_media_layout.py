"""Where a prompt's ``[img-N]`` references put the request's media (``runner/media.py``),
checked without a model: the order the worker hands text and media to llama.cpp's mtmd."""

from __future__ import annotations

import pytest

from pollama.errors import InvalidRequest
from pollama.runner.media import MAX_REFERENCES, Projector, is_audio_file, media_key
from tiny_projector import wav_bytes

layout = Projector._layout


def test_references_place_media_and_unreferenced_media_come_first() -> None:
    assert layout("[img-1] then [img-0]!", 2) == [1, " then ", 0, "!"]
    assert layout("no references", 2) == [0, 1, "no references"]
    assert layout("[img-1] only the second", 2) == [0, 1, " only the second"]
    assert layout("[img-0][img-0]", 1) == [0, 0]
    assert layout("[img-0] and [img] stays text", 1) == [0, " and [img] stays text"]


@pytest.mark.parametrize("prompt", ["[img-1]", "[img-12345678901234567890123]",
                                    "[img-" + "9" * 5000 + "]"])
def test_a_reference_to_missing_media_is_the_callers_error(prompt: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid image index"):
        layout(prompt, 1)


def test_a_medium_is_referenced_a_bounded_number_of_times() -> None:
    assert layout("[img-0]" * MAX_REFERENCES, 1) == [0] * MAX_REFERENCES
    with pytest.raises(InvalidRequest, match=f"more than {MAX_REFERENCES} times"):
        layout("[img-0]" * (MAX_REFERENCES + 1), 1)


def test_keys_are_negative_and_differ_by_content_and_part() -> None:
    keys = {media_key(content, part) for content in ("a" * 64, "b" * 64) for part in (0, 1)}
    assert len(keys) == 4 and all(key < 0 for key in keys)
    assert media_key("a" * 64, 0) == media_key("a" * 64, 0)


def test_audio_is_told_from_images_as_llama_cpp_does() -> None:
    from imagegen import encoded

    assert is_audio_file(wav_bytes(0.1, 440))
    for fmt in ("PNG", "JPEG", "WEBP", "GIF"):
        assert not is_audio_file(encoded(fmt)), fmt
