"""Audio input, fast: ``inference.audio`` header checks, the multipart reader, and the routes
in process (fake runner, tiny models whose projector headers say what they can hear).

The WAV, MP3 and FLAC files are built byte by byte from their specifications; the "lying"
ones claim far more audio than they hold, which is what would make the worker's decoder
allocate without bound (``docs/security.md#images``; the real decoder is exercised in
``tests/test_e2e_audio.py``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from fake_runner import FakeRunnerFactory
from ggufgen import write_projector_header, write_tiny_model
from imagegen import b64, encoded
from inprocess import BASE, create_models, openai_client
from pollama.config import load_settings
from pollama.errors import InvalidAudio, InvalidImage, InvalidRequest
from pollama.inference.audio import (
    AudioBudget,
    audio_from_input,
    head_bytes,
    is_audio,
    validate_audio,
)
from pollama.inference.images import ImageLimits, ValidatedImage, validate_images
from pollama.protocol.openai import ChatCompletionRequest, TranscriptionRequest
from pollama.server.app import create_app
from pollama.server.multipart import parse_form
from tiny_projector import wav_bytes

LIMITS = ImageLimits(max_images=4, max_bytes=1 << 20, max_pixels=50_000_000,
                     max_audio_bytes=2 << 20, max_audio_seconds=600)
TONE = wav_bytes(1.0, 440)  # one second, 16 kHz mono 16-bit


def refused(data: bytes, budget: float = 600) -> str:
    with pytest.raises(InvalidAudio) as info:
        validate_audio(data, 1, AudioBudget(budget))
    assert isinstance(info.value, InvalidImage | InvalidRequest)  # a 400 on every protocol
    assert info.value.index == 1
    return str(info.value)


# -- WAV ---------------------------------------------------------------------------------------


def wav(tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16,
        samples: bytes = bytes(3200), declared: int | None = None, extra: bytes = b"",
        sub_format: int | None = None) -> bytes:
    """A WAV file: ``extra`` chunks go between ``fmt `` and ``data``; ``declared`` is the
    data size the header claims (the real size when None); ``sub_format`` makes the fmt
    chunk a WAVE_FORMAT_EXTENSIBLE one."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    if sub_format is not None:
        fmt = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * block, block, bits)
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", sub_format) + bytes(14)
    size = len(samples) if declared is None else declared
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra
            + b"data" + struct.pack("<I", size) + samples)
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(("tag", "bits", "sub"), [
    (1, 8, None), (1, 16, None), (1, 24, None), (1, 32, None), (3, 32, None), (3, 64, None),
    (6, 8, None), (7, 8, None), (1, 16, 1), (3, 32, 3),
])
def test_wav_encodings_miniaudio_decodes_are_measured(tag: int, bits: int, sub: int | None
                                                      ) -> None:
    channels, rate = 2, 8000
    data = wav(tag, channels, rate, bits, bytes(channels * bits // 8 * rate // 2), sub_format=sub)
    clip = validate_audio(data, 3, AudioBudget(600))
    assert (clip.index, clip.format, clip.seconds, clip.data) == (3, "WAV", 0.5, data)
    assert "data" not in repr(clip)  # a clip's bytes never end up in a log line


def test_a_real_tone_is_measured_from_its_header() -> None:
    assert validate_audio(TONE, 1, AudioBudget(600)).seconds == 1.0


def test_a_wav_claiming_more_than_the_cap_is_refused_with_both_numbers() -> None:
    lying = wav(samples=bytes(100), declared=0x7FFFFFF0)  # 100 bytes claiming 67108 s
    assert refused(lying) == (
        "audio 1 is 67108.9 seconds long, more than the limit of 600 seconds "
        "(POLLAMA_MAX_AUDIO_SECONDS)")
    assert "601.0 seconds" in refused(wav(rate=1000, samples=bytes(2 * 601_000)))


def test_a_truncated_wav_is_refused_after_its_length_is_checked() -> None:
    assert refused(TONE[:-100]).endswith(
        "WAV file is truncated: its data chunk is 100 bytes short of the size its header "
        "declares")
    assert "truncated inside its fmt chunk" in refused(TONE[:30])
    assert "WAV file has no fmt chunk" in refused(TONE[:12])
    assert "WAV file has no data chunk" in refused(TONE[:36])


@pytest.mark.parametrize(("data", "message"), [
    (wav(tag=2), "encoding that is not accepted (format tag 0x0002)"),
    (wav(tag=0x55), "format tag 0x0055"),
    (wav(sub_format=0x11), "format tag 0x0011"),
    (wav(bits=12), "12-bit PCM WAV; PCM WAV may have 8 or 16 or 24 or 32 bits per sample"),
    (wav(tag=3, bits=16), "16-bit IEEE float WAV"),
    (wav(tag=6, bits=16), "16-bit A-law WAV"),
    (wav(channels=0), "out of range (0 channels"),
    (wav(rate=0), "0 Hz"),
    (wav(rate=400_000), "400000 Hz"),
    (wav(samples=b""), "audio 1 has no audio samples"),
    (b"RIFF\x10\x00\x00\x00WAVEdata\x04\x00\x00\x00abcd", "data chunk comes before its fmt"),
    (b"RIFF\x04\x00\x00\x00WAVE" + b"fmt \x08\x00\x00\x00" + bytes(8), "fmt chunk is too short"),
])
def test_wavs_that_miniaudio_would_misread_are_refused(data: bytes, message: str) -> None:
    assert message in refused(data)


def test_wav_chunks_are_walked_with_their_padding() -> None:
    odd = b"LIST" + struct.pack("<I", 3) + b"abc" + b"\x00"  # an odd size, padded to even
    assert validate_audio(wav(extra=odd), 1, AudioBudget(600)).seconds == 0.1


def test_a_streamed_wav_runs_to_the_end_of_the_file() -> None:
    assert validate_audio(wav(declared=0xFFFFFFFF), 1, AudioBudget(600)).seconds == 0.1


# -- MP3 ---------------------------------------------------------------------------------------


def frame(head: bytes = b"\xff\xfb\x90\x64", payload: bytes = b"") -> bytes:
    """One MPEG audio frame of silence (zero side information decodes to nothing), sized
    from its header: MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, stereo is 417 bytes."""
    b1, b2 = head[1], head[2]
    version = (b1 >> 3) & 3
    rates = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
    rate = rates[version][(b2 >> 2) & 3]
    v1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
    v2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
    kbps = (v1 if version == 3 else v2)[b2 >> 4]
    length = (144_000 if version == 3 else 72_000) * kbps // rate + ((b2 >> 1) & 1)
    body = head + payload
    return body + bytes(length - len(body))


MP3 = frame() * 100  # 100 frames of 1152 samples at 44.1 kHz


def id3(size: int, footer: bool = False) -> bytes:
    syncsafe = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x04\x00" + (b"\x10" if footer else b"\x00") + syncsafe + bytes(size) + (
        bytes(10) if footer else b"")


def test_mp3_length_is_the_sum_of_its_frames() -> None:
    clip = validate_audio(MP3, 2, AudioBudget(600))
    assert (clip.format, clip.index) == ("MP3", 2)
    assert clip.seconds == pytest.approx(100 * 1152 / 44100)


@pytest.mark.parametrize("data", [
    id3(300) + MP3, id3(300, footer=True) + MP3, MP3 + b"TAG" + bytes(125),
    # dr_mp3 reads an APEv2 footer's size from its bytes 24-27, and so do we
    MP3 + bytes(40) + b"APETAGEX" + bytes(16) + struct.pack("<I", 40) + bytes(4),
    MP3 + bytes(1000),  # zero padding after the last frame
    MP3 + frame()[:200],  # a cut-off last frame (counted: it can only overestimate)
])
def test_mp3_tags_and_tails_are_skipped_as_dr_mp3_skips_them(data: bytes) -> None:
    seconds = validate_audio(data, 1, AudioBudget(600)).seconds
    assert 100 * 1152 / 44100 <= seconds <= 101 * 1152 / 44100


@pytest.mark.parametrize(("head", "samples", "rate"), [
    (b"\xff\xf3\x90\x64", 576, 22050),  # MPEG-2
    (b"\xff\xe3\x90\x64", 576, 11025),  # MPEG-2.5
    (b"\xff\xfa\x90\x64", 1152, 44100),  # MPEG-1 with CRC
    (b"\xff\xfb\x92\xc4", 1152, 44100),  # padded, mono
])
def test_every_layer_iii_version_is_measured(head: bytes, samples: int, rate: int) -> None:
    data = frame(head) * 10
    assert validate_audio(data, 1, AudioBudget(600)).seconds == pytest.approx(10 * samples / rate)


def xing(frames: int) -> bytes:
    """A first frame with a Xing header claiming ``frames`` frames (after 32 bytes of
    stereo MPEG-1 side information), which ``dr_mp3`` takes as the stream's length."""
    return frame(payload=bytes(32) + b"Xing" + b"\x00\x00\x00\x01" + struct.pack(">I", frames))


def test_a_xing_header_claiming_more_is_what_counts() -> None:
    assert refused(xing(10_000_000) + MP3).startswith(
        "audio 1 is 261224.5 seconds long, more than the limit of 600 seconds")
    honest = validate_audio(xing(100) + MP3, 1, AudioBudget(600)).seconds
    assert honest == pytest.approx(101 * 1152 / 44100)  # the frames themselves (101) win


@pytest.mark.parametrize(("data", "message"), [
    (MP3[:5000] + b"not an MPEG frame" * 4 + MP3, "bytes at offset 5004 are not an MPEG Layer III"),
    (MP3 + frame(b"\xff\xfb\x94\x64"), "offset 41700"),  # another sample rate mid-stream
    (frame(b"\xff\xfd\x90\x64"), "no MPEG Layer III frame where its audio starts (offset 0)"),
    (b"\xff\xfb\x00\x64" + bytes(400), "free-format"),  # bitrate index 0
    (id3(30) + b"fLaC" + bytes(100), "offset 40"),  # FLAC behind an ID3 tag: not MP3
    (b"ID3\x04\x00\x00\x00\x00\x7f\x7f" + bytes(10), "ID3 tag claims 16393 bytes"),
])
def test_mp3_streams_the_walk_cannot_follow_are_refused(data: bytes, message: str) -> None:
    assert message in refused(data)


# -- FLAC --------------------------------------------------------------------------------------


def flac(rate: int = 16000, total: int = 16000, first_type: int = 0) -> bytes:
    info = (rate << 44) | (0 << 41) | (15 << 36) | total  # mono, 16-bit
    streaminfo = bytes(10) + info.to_bytes(8, "big") + bytes(16)
    return b"fLaC" + bytes([0x80 | first_type]) + (34).to_bytes(3, "big") + streaminfo


def test_flac_length_is_its_streaminfo_sample_count() -> None:
    assert validate_audio(flac(total=48000), 1, AudioBudget(600)).seconds == 3.0
    assert "more than the limit" in refused(flac(total=16000 * 601))
    assert "does not say how many samples it has" in refused(flac(total=0))
    assert "does not start with a STREAMINFO block" in refused(flac(first_type=4))
    assert "sample rate of 0" in refused(flac(rate=0))


# -- a request's media -------------------------------------------------------------------------


def test_the_duration_cap_is_for_the_whole_request() -> None:
    budget = AudioBudget(2.5)
    validate_audio(TONE, 1, budget)
    validate_audio(TONE, 2, budget)
    with pytest.raises(InvalidAudio) as info:
        validate_audio(TONE, 3, budget)
    assert str(info.value) == (
        "audio 3 (1.0 seconds) makes the request's audio 3.0 seconds long, more than the "
        "limit of 2.5 seconds (POLLAMA_MAX_AUDIO_SECONDS)")


def test_images_and_audio_are_numbered_apart_and_kept_in_order() -> None:
    png = encoded("PNG")
    media = validate_images([b64(png), b64(TONE), b64(png), b64(MP3)], LIMITS)
    assert [(type(m).__name__, m.index) for m in media] == [
        ("ValidatedImage", 1), ("ValidatedAudio", 1), ("ValidatedImage", 2), ("ValidatedAudio", 2)]
    assert media[1].data == TONE and isinstance(media[0], ValidatedImage)
    with pytest.raises(InvalidAudio, match="^audio 2 is not a valid WAV, MP3 or FLAC file"):
        validate_images([b64(TONE), b64(png), b64(TONE[:-10])], LIMITS)


def test_audio_has_its_own_byte_cap_checked_before_decoding() -> None:
    limits = ImageLimits(4, max_bytes=1000, max_pixels=1 << 20, max_audio_bytes=40_000)
    assert validate_images([b64(TONE)], limits)[0].index == 1  # 32 KB: over the image cap
    with pytest.raises(InvalidAudio) as info:
        validate_images([b64(wav_bytes(2.0, 440))], limits)
    assert str(info.value) == (
        "audio 1: 64044 bytes is more than the limit of 40000 (POLLAMA_MAX_AUDIO_BYTES)")


def test_bad_audio_base64_is_named_as_audio() -> None:
    text = b64(TONE)
    with pytest.raises(InvalidAudio, match=r"^audio 1 is not valid base64 \(.*send the audio "):
        validate_images([text[:100] + "!" + text[101:]], LIMITS)


@pytest.mark.parametrize(("data", "audio"), [
    (TONE, True), (MP3, True), (id3(10), True), (flac(), True), (frame(b"\xff\xe3\x90\x64"), True),
    (encoded("PNG"), False), (encoded("JPEG"), False), (encoded("GIF"), False),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(20), False),  # RIFF, but an image
])
def test_server_and_worker_agree_on_what_is_audio(data: bytes, audio: bool) -> None:
    from pollama.runner.media import is_audio_file

    assert is_audio(head_bytes(b64(data))) is audio
    assert is_audio_file(data) is audio


def test_limits_come_from_the_environment() -> None:
    settings = load_settings({"POLLAMA_MAX_AUDIO_BYTES": "1000",
                              "POLLAMA_MAX_AUDIO_SECONDS": "30"})
    limits = ImageLimits.from_settings(settings)
    assert (limits.max_audio_bytes, limits.max_audio_seconds) == (1000, 30)
    defaults = load_settings({})
    assert (defaults.max_audio_bytes, defaults.max_audio_seconds) == (25 << 20, 600)


# -- OpenAI input_audio parts ------------------------------------------------------------------


def chat_with(part: dict[str, Any]) -> list[dict[str, Any]]:
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Listen."}, part]}]}
    return ChatCompletionRequest.model_validate(body).to_inference().messages


def test_input_audio_parts_become_their_own_messages_with_the_clip_in_images() -> None:
    data = b64(TONE)
    messages = chat_with({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
    assert messages == [{"role": "user", "content": "Listen."},
                        {"role": "user", "content": "", "images": [data]}]
    mp3 = chat_with({"type": "input_audio", "input_audio": {"data": b64(MP3), "format": "MP3"}})
    assert mp3[1]["images"] == [b64(MP3)]


@pytest.mark.parametrize(("part", "message"), [
    ({"data": b64(TONE), "format": "ogg"}, "input_audio format must be \"wav\", \"mp3\", "
                                           "\"flac\", not 'ogg'"),
    ({"data": b64(TONE)}, "not None"),
    ({"data": b64(TONE), "format": "mp3"}, 'input_audio format is "mp3" but its data is a WAV'),
    ({"data": b64(encoded("PNG")), "format": "wav"}, "input_audio data is not a WAV, MP3"),
    ({"data": "!!!!", "format": "wav"}, "input_audio data is not a WAV, MP3"),
    ({"format": "wav"}, 'input_audio must be an object with a base64 "data" string'),
    ("wav", 'input_audio must be an object'),
])
def test_bad_input_audio_parts_are_400s(part: Any, message: str) -> None:
    with pytest.raises(InvalidAudio) as info:
        audio_from_input(part)
    assert message in str(info.value)
    with pytest.raises(InvalidAudio):
        chat_with({"type": "input_audio", "input_audio": part})


def test_audio_in_an_image_url_is_refused() -> None:
    url = f"data:image/png;base64,{b64(TONE)}"
    with pytest.raises(InvalidImage, match="image_url data is audio: send audio as an input_audio"):
        chat_with({"type": "image_url", "image_url": {"url": url}})


# -- multipart forms ---------------------------------------------------------------------------


def encoded_form(data: dict[str, str], files: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """A form exactly as httpx (and so the openai SDK) encodes it."""
    request = httpx.Request("POST", "http://x/", data=data, files=files)
    return request.read(), request.headers["content-type"]


def test_a_form_as_the_sdk_sends_it_is_read_exactly() -> None:
    body, content_type = encoded_form(
        {"model": "m", "prompt": "Grüße"}, {"file": ("a.wav", TONE, "audio/wav")})
    form = parse_form(body, content_type)
    assert form["file"].data == TONE and form["file"].filename == "a.wav"
    assert (form["model"].text, form["prompt"].text, form["model"].filename) == ("m", "Grüße", None)


def test_a_preamble_and_an_epilogue_are_ignored_and_the_first_field_wins() -> None:
    body = (b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\none"
            b"\r\n--XyZ  \r\nContent-Disposition: form-data; name=\"a\"\r\n\r\ntwo"
            b"\r\n--XyZ--\r\nepilogue")
    assert parse_form(body, 'multipart/form-data; boundary="XyZ"')["a"].text == "one"


@pytest.mark.parametrize(("body", "content_type", "message"), [
    (b"x", "application/json", "takes a multipart/form-data body, not 'application/json'"),
    (b"x", "multipart/form-data", "has no valid boundary"),
    (b"--b\r\n\r\n", "multipart/form-data; boundary=b", "has no parts"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--b\r\n", "multipart/form-data;"
     " boundary=b", "does not end with the closing boundary"),
    (b"--b junk\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--b--", "multipart/"
     "form-data; boundary=b", "a boundary line has text after it"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n1\r\n--b--", "multipart/form-data; "
     "boundary=b", "no end to its headers"),
    (b"--b\r\nContent-Disposition: attachment; name=a\r\n\r\n1\r\n--b--", "multipart/"
     "form-data; boundary=b", "is not \"Content-Disposition: form-data\""),
    (b"--b\r\nContent-Disposition: form-data\r\n\r\n1\r\n--b--", "multipart/form-data; "
     "boundary=b", "a part has no field name"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n\r\n" * 65 + b"--b--",
     "multipart/form-data; boundary=b", "more than 64 parts"),
])
def test_malformed_forms_are_400s(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_form(body, content_type)
    assert message in str(info.value)


def test_transcription_requests_become_one_chat_turn() -> None:
    data = b64(TONE)
    req = TranscriptionRequest(model="m", file=data, language="French", prompt="A lecture.",
                               temperature=0.3).to_inference()
    assert req.kind == "chat" and req.options == {"temperature": 0.3}
    system, user = req.messages
    assert system["content"].endswith("The audio is in French. Context: A lecture.")
    assert user == {"role": "user", "content": "What exact words are spoken in this audio?",
                    "images": [data]}
    assert TranscriptionRequest(model="m", file=data).to_inference().options == {
        "temperature": 0.0}
    extra = TranscriptionRequest.model_validate(
        {"model": "m", "file": data, "num_predict": "10", "stop": '["."]', "user": "x"})
    assert extra.to_inference().options == {"temperature": 0.0, "num_predict": 10, "stop": ["."]}


# -- the routes, in process --------------------------------------------------------------------


@pytest.fixture
def api(isolated_env: Path, tmp_path: Path) -> Iterator[tuple[TestClient, FakeRunnerFactory]]:
    """The app with a fake runner and four tiny models: ``plain`` (text only), ``seer``
    (a vision projector), ``hearer`` (an audio-only projector), ``both``."""
    factory = FakeRunnerFactory(script=["It", " hums."])
    settings = load_settings({"POLLAMA_MAX_AUDIO_BYTES": "100000"})
    with TestClient(create_app(settings, runner_factory=factory), base_url=BASE) as client:
        tiny = write_tiny_model(tmp_path / "tiny.gguf", context_length=4096)
        create_models(client, tiny, {"plain": {}})
        for name, vision, audio in (("seer", True, False), ("hearer", False, True),
                                    ("both", True, True)):
            projector = write_projector_header(tmp_path / f"{name}.gguf", width=64,
                                               vision=vision, audio=audio)
            digests = {}
            for path in (tiny, projector):
                raw = path.read_bytes()
                digest = "sha256:" + hashlib.sha256(raw).hexdigest()
                assert client.post(f"/api/blobs/{digest}", content=raw).status_code in (200, 201)
                digests[path.name] = digest
            r = client.post("/api/create", json={"model": name, "files": digests,
                                                 "stream": False})
            assert r.status_code == 200, r.text
        yield client, factory


def sent_media(factory: FakeRunnerFactory) -> list[tuple[bytes, ...]]:
    return [call[1].media for runner in factory.runners for call in runner.calls
            if call[0] == "completion"]


def native_chat(client: TestClient, model: str, media: list[bytes]) -> httpx.Response:
    return client.post("/api/chat", json={"model": model, "stream": False, "messages": [
        {"role": "user", "content": "What is it?", "images": [b64(m) for m in media]}]})


def test_capabilities_and_audio_to_each_kind_of_model(
        api: tuple[TestClient, FakeRunnerFactory]) -> None:
    client, factory = api
    caps = {m: client.post("/api/show", json={"model": m}).json()["capabilities"]
            for m in ("plain", "seer", "hearer", "both")}
    assert "audio" in caps["hearer"] and "vision" not in caps["hearer"]
    assert "audio" in caps["both"] and "vision" in caps["both"]
    assert "audio" not in caps["seer"] and "audio" not in caps["plain"]
    for model in ("plain", "seer"):
        refused = native_chat(client, model, [TONE])
        assert refused.status_code == 400
        assert refused.json()["error"] == (
            f'"{model}" does not support audio: it has no audio capability')
    images = native_chat(client, "hearer", [encoded("PNG")])
    assert images.status_code == 400
    assert "does not support images" in images.json()["error"]
    assert native_chat(client, "hearer", [TONE]).status_code == 200
    assert native_chat(client, "both", [encoded("PNG"), MP3]).status_code == 200
    assert sent_media(factory) == [(TONE,), (encoded("PNG"), MP3)]


def test_bad_audio_is_refused_before_any_model_loads(
        api: tuple[TestClient, FakeRunnerFactory]) -> None:
    client, factory = api
    lying = native_chat(client, "hearer", [wav(samples=bytes(100), declared=0x7FFFFFF0)])
    assert lying.status_code == 400
    assert "67108.9 seconds long, more than the limit of 600 seconds" in lying.json()["error"]
    garbage = native_chat(client, "plain", [b"RIFF\x00\x00\x00\x00WAVEgarbage!"])
    assert garbage.status_code == 400  # its own 400, whatever model it was sent to
    assert garbage.json()["error"].startswith("audio 1 is not a valid WAV, MP3 or FLAC file")
    assert factory.loads() == 0


def test_openai_input_audio_reaches_the_runner(
        api: tuple[TestClient, FakeRunnerFactory]) -> None:
    client, factory = api
    oai = openai_client(client)
    reply = oai.chat.completions.create(model="hearer", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "input_audio", "input_audio": {"data": b64(TONE), "format": "wav"}}]}])
    assert reply.choices[0].message.content == "It hums."
    assert sent_media(factory) == [(TONE,)]
    with pytest.raises(openai.BadRequestError, match="input_audio format must be"):
        oai.chat.completions.create(model="hearer", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": b64(TONE), "format": "aac"}}]}])


def test_transcriptions_through_the_sdk(api: tuple[TestClient, FakeRunnerFactory]) -> None:
    client, factory = api
    oai = openai_client(client)
    result = oai.audio.transcriptions.create(model="hearer", file=("a.wav", TONE))
    assert result.text == "It hums."
    text = oai.audio.transcriptions.create(model="hearer", file=("a.wav", TONE),
                                           response_format="text")
    assert text == "It hums."
    request = factory.live()[0].calls[-1][1]
    assert request.media == (TONE,) and request.options.temperature == 0


def post_form(client: TestClient, data: dict[str, str], files: dict[str, Any] | None = None,
              ) -> httpx.Response:
    """A multipart form (``(None, value)`` parts keep it multipart without a file)."""
    fields = {name: (None, value) for name, value in data.items()}
    return client.post("/v1/audio/transcriptions", files={**fields, **(files or {})})


@pytest.mark.parametrize(("data", "files", "status", "message"), [
    ({"model": "hearer"}, None, 400, "file is required"),
    ({"model": "hearer", "file": "not a file"}, None, 400, "file is not a WAV, MP3 or FLAC"),
    ({"model": "hearer"}, {"file": ("a.wav", b"")}, 400, "audio file is empty"),
    ({}, {"file": ("a.wav", TONE)}, 400, "model is required"),
    ({"model": "nobody"}, {"file": ("a.wav", TONE)}, 404, "model 'nobody' not found"),
    ({"model": "hearer", "response_format": "srt"}, {"file": ("a.wav", TONE)}, 400,
     "response_format 'srt' is not supported: use 'json' or 'text'"),
    ({"model": "hearer", "temperature": "warm"}, {"file": ("a.wav", TONE)}, 400, "temperature"),
    ({"model": "hearer"}, {"file": ("a.png", encoded("PNG"))}, 400,
     "file is not a WAV, MP3 or FLAC file"),
    ({"model": "plain"}, {"file": ("a.wav", TONE)}, 400, "does not support audio"),
    ({"model": "hearer"}, {"file": ("a.wav", TONE[:-50])}, 400, "WAV file is truncated"),
])
def test_transcription_errors(api: tuple[TestClient, FakeRunnerFactory], data: dict[str, str],
                              files: dict[str, Any] | None, status: int, message: str) -> None:
    client, _ = api
    response = post_form(client, data, files)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_a_transcription_upload_is_bounded_by_the_audio_cap(
        api: tuple[TestClient, FakeRunnerFactory]) -> None:
    client, factory = api
    big = wav_bytes(6.0, 440)  # 192 KB, over the 100000-byte cap and its margin
    response = post_form(client, {"model": "hearer"}, {"file": ("a.wav", big)})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "the upload is larger than the audio file limit of 100000 bytes "
        "(POLLAMA_MAX_AUDIO_BYTES)")
    chunked = client.post("/v1/audio/transcriptions", content=iter([big[:50_000]] * 4),
                          headers={"content-type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 400 and "larger than" in chunked.text
    within = post_form(client, {"model": "hearer"}, {"file": ("a.wav", wav_bytes(2.0, 440))})
    assert within.status_code == 200, within.text
    assert factory.loads() == 1
