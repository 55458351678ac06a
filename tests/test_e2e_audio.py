"""End to end: audio reaches the model through its audio projector, on every route.

The model is the real SmolLM2-135M with a tiny random-weight Whisper-style projector
(Ultravox's type, written at test time by ``tiny_projector.py``): 50 embedding rows per 30
seconds of audio (one chunk for the short tones here), 576 wide. The model knows nothing of
these sounds, but greedy decoding makes what it says a function of them: two different tones
give different answers, the same tone the same answer. The model is created as users do it
(a Modelfile with two FROM lines) through a real ``pollama serve``, and asked through the
official clients and plain HTTP. llama.cpp's own decoder (miniaudio, in the worker) reads
every file sent here; the server refuses the bad ones before it ever sees them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from conftest import RunningServer, create_with_projector, start_server, stop_server
from imagegen import b64, encoded
from tiny_projector import (
    AUDIO_TOKENS_PER_CHUNK,
    wav_bytes,
    write_audio_projector,
    write_vision_projector,
)

pytestmark = pytest.mark.slow

MODEL = "hearer"
GREEDY = {"temperature": 0, "num_predict": 10}
LOW = wav_bytes(1.0, 440)
HIGH = wav_bytes(1.0, 1000)
# A one-second tone is under two of the chunk's 50 rows (the rest encode the silence mtmd
# pads the chunk with); a transcription's long system prompt needs more of the chunk to
# differ before the greedy answer does.
LONG_LOW = wav_bytes(20.0, 440)
LONG_HIGH = wav_bytes(20.0, 1000)
# Five frames of MPEG-1 Layer III silence (zero side information), 128 kbit/s, 44.1 kHz.
MP3 = (b"\xff\xfb\x90\x64" + bytes(413)) * 5


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with ``hearer`` (the default model and an audio projector), ``seer`` (a
    vision projector) and ``plain`` (the default model alone)."""
    from pollama.default_model import default_modelfile

    home = tmp_path_factory.mktemp("audio-home")
    running = start_server(home, {"OLLAMA_NUM_PARALLEL": "2"})
    try:
        for name, write in (("hearer", write_audio_projector), ("seer", write_vision_projector)):
            create_with_projector(running, name, write(home / f"{name}-mmproj.gguf"))
        (home / "plain.Modelfile").write_text(default_modelfile())
        running.cli("create", "plain", "-f", str(home / "plain.Modelfile"), check=True)
        yield running
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
def oai(srv: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=300,
                       max_retries=0) as client:
        yield client


def _chat(http: httpx.Client, media: list[bytes], model: str = MODEL) -> httpx.Response:
    return http.post("/api/chat", json={"model": model, "stream": False, "options": GREEDY,
                                        "messages": [{"role": "user", "content": "What is it?",
                                                      "images": [b64(m) for m in media]}]})


def _ask_openai(oai: openai.OpenAI, part: dict[str, Any], question: bool = True
                ) -> tuple[str, int]:
    """Greedy answer and prompt tokens of ``part`` (its own message), then a question."""
    content = [part, {"type": "text", "text": "What do you hear?"}] if question else [part]
    reply = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=10, messages=[
        {"role": "user", "content": content}])
    assert reply.usage is not None
    return str(reply.choices[0].message.content), reply.usage.prompt_tokens


def _audio_part(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def test_show_claims_audio(http: httpx.Client) -> None:
    caps = {name: http.post("/api/show", json={"model": name}).json()["capabilities"]
            for name in (MODEL, "seer", "plain")}
    assert "audio" in caps[MODEL] and "vision" not in caps[MODEL]
    assert "audio" not in caps["seer"] and "audio" not in caps["plain"]


def test_openai_chat_hears_the_sound_and_counts_its_tokens(oai: openai.OpenAI) -> None:
    low, _ = _ask_openai(oai, _audio_part(LOW))
    high, _ = _ask_openai(oai, _audio_part(HIGH))
    again, _ = _ask_openai(oai, _audio_part(LOW))
    assert low != high
    assert low == again
    # The clip alone against an empty text part in its place: its 50 rows and nothing else.
    _, low_tokens = _ask_openai(oai, _audio_part(LOW), question=False)
    _, high_tokens = _ask_openai(oai, _audio_part(HIGH), question=False)
    _, text_tokens = _ask_openai(oai, {"type": "text", "text": ""}, question=False)
    assert low_tokens == high_tokens == text_tokens + AUDIO_TOKENS_PER_CHUNK


def test_mp3_and_other_sample_rates_are_decoded_by_the_worker(oai: openai.OpenAI) -> None:
    _, text_tokens = _ask_openai(oai, {"type": "text", "text": ""}, question=False)
    _, mp3_tokens = _ask_openai(oai, _audio_part(MP3, "mp3"), question=False)
    slow = wav_bytes(0.5, 440, sample_rate=8000)
    _, slow_tokens = _ask_openai(oai, _audio_part(slow), question=False)
    assert mp3_tokens == slow_tokens == text_tokens + AUDIO_TOKENS_PER_CHUNK


def test_native_chat_takes_a_wav_in_images(http: httpx.Client) -> None:
    low, high = _chat(http, [LOW]), _chat(http, [HIGH])
    assert low.status_code == high.status_code == 200, low.text
    assert low.json()["message"]["content"] != high.json()["message"]["content"]
    text_only, two = _chat(http, []), _chat(http, [LOW, HIGH])
    assert low.json()["prompt_eval_count"] == (
        text_only.json()["prompt_eval_count"] + AUDIO_TOKENS_PER_CHUNK)
    assert two.json()["prompt_eval_count"] == (
        text_only.json()["prompt_eval_count"] + 2 * AUDIO_TOKENS_PER_CHUNK)


def test_transcriptions_through_the_sdk(oai: openai.OpenAI) -> None:
    def transcribe(data: bytes, **extra: Any) -> Any:
        return oai.audio.transcriptions.create(
            model=MODEL, file=("tone.wav", data, "audio/wav"), extra_body={"num_predict": 10},
            **extra)

    low, high = transcribe(LONG_LOW), transcribe(LONG_HIGH)
    assert isinstance(low.text, str) and low.text
    assert low.text != high.text
    assert transcribe(LONG_LOW).text == low.text  # temperature 0 unless the form says otherwise
    plain = transcribe(LONG_LOW, response_format="text")
    assert isinstance(plain, str) and plain == low.text
    assert transcribe(LOW, language="English", prompt="A tuning fork.").text


def _error(response: httpx.Response) -> str:
    body = response.json()
    error = body["error"]
    return str(error["message"] if isinstance(error, dict) else error)


def test_audio_to_models_that_cannot_hear_is_refused(http: httpx.Client) -> None:
    for model in ("seer", "plain"):
        refused = _chat(http, [LOW], model)
        assert refused.status_code == 400
        assert "does not support audio" in _error(refused)
    image = _chat(http, [encoded("PNG")])
    assert image.status_code == 400
    assert "does not support images" in _error(image)


def test_bad_audio_is_a_400_that_names_it(http: httpx.Client, oai: openai.OpenAI) -> None:
    truncated = _chat(http, [LOW[: len(LOW) // 2]])
    assert truncated.status_code == 400
    assert _error(truncated).startswith("audio 1 is not a valid WAV, MP3 or FLAC file: WAV file "
                                        "is truncated")
    garbage = _chat(http, [b"RIFF\x00\x00\x00\x00WAVE" + b"garbage!" * 20])
    assert garbage.status_code == 400 and _error(garbage).startswith("audio 1 ")
    lying = bytearray(LOW[:44])
    struct.pack_into("<I", lying, 40, 0x7FFFFFF0)  # the data chunk claims 67108.9 seconds
    long = _chat(http, [bytes(lying)])
    assert long.status_code == 400
    assert "67108.9 seconds" in _error(long) and "limit of 600 seconds" in _error(long)
    with pytest.raises(openai.BadRequestError, match="input_audio format"):
        _ask_openai(oai, _audio_part(LOW, "ogg"))
    assert _chat(http, [LOW]).status_code == 200  # the worker is still there


def test_transcription_errors(srv: RunningServer, oai: openai.OpenAI) -> None:
    with httpx.Client(base_url=f"{srv.url}/v1", timeout=60) as http:
        no_file = http.post("/audio/transcriptions", files={"model": (None, MODEL)})
        assert no_file.status_code == 400 and "file is required" in _error(no_file)
        missing = http.post("/audio/transcriptions", files={
            "model": (None, "nobody"), "file": ("a.wav", LOW)})
        assert missing.status_code == 404
    with pytest.raises(openai.BadRequestError, match="response_format 'srt' is not supported"):
        oai.audio.transcriptions.create(model=MODEL, file=("a.wav", LOW), response_format="srt")
    with pytest.raises(openai.BadRequestError, match="does not support audio"):
        oai.audio.transcriptions.create(model="seer", file=("a.wav", LOW))
    with pytest.raises(openai.BadRequestError, match="file is not a WAV, MP3 or FLAC file"):
        oai.audio.transcriptions.create(model=MODEL, file=("a.png", encoded("PNG")))
