"""Request audio: WAV, MP3 and FLAC clips, checked from their headers before anything decodes.

Audio travels in the same ``images`` fields as images (Ollama's choice: ``/api/chat``
``messages[].images``, OpenAI ``input_audio`` parts, ``/v1/audio/transcriptions``), and
``inference.images`` sends each medium whose first bytes are audio here instead of to Pillow.

Why the server reads the headers at all: the worker hands the file to llama.cpp's
``mtmd_helper_bitmap_init_from_buf``, which asks miniaudio how long the clip is, allocates
that many 16 kHz float samples up front, and decodes that far. The length is whatever the
file claims: a WAV's data-chunk size, an MP3's Xing/Info frame count (or, without one, every
frame miniaudio finds), a FLAC's STREAMINFO sample count. A 100-byte file can claim four
billion frames (gigabytes allocated, the worker killed); a long real clip makes the worker
decode, and the encoder read, hours of audio. So each clip is checked, cheapest first:

1. the format, from the magic bytes llama.cpp itself tests (``is_audio_file``): WAV (RIFF
   with a WAVE form), MP3 (an ID3v2 tag or an MPEG audio frame sync), FLAC (``fLaC``);
2. the header, parsed the way miniaudio's decoders read it (``vendor/miniaudio``):

   * WAV: the chunks are walked to ``fmt `` and ``data``; only encodings ``dr_wav`` decodes
     with no side channel for the length are taken (PCM 8/16/24/32-bit, IEEE float
     32/64-bit, A-law and mu-law 8-bit, plain or ``WAVE_FORMAT_EXTENSIBLE``), within
     ``dr_wav``'s limits (at most 384 kHz, 1 to 256 channels). The length is the data size
     the header declares over the frame size, as ``dr_wav`` computes it;
   * MP3: the leading ID3v2 tag is skipped and a trailing ID3v1 and APEv2 tag stripped, as
     ``dr_mp3`` does; what remains must be MPEG Layer III frames back to back, of one
     version and sample rate (what minimp3 keeps in sync with), none free-format, then at
     most a cut-off last frame or zero padding. The length is the frames' samples, or the
     Xing/Info header's frame count when that claims more (``dr_mp3`` trusts it);
   * FLAC: the STREAMINFO block's sample count (which ``dr_flac`` reports as the length,
     and nothing past it is decoded), which must be given;

3. the length in seconds against ``POLLAMA_MAX_AUDIO_SECONDS``, all of a request's clips
   together (:class:`AudioBudget`); both numbers are in the message;
4. a WAV's declared data must all be present (a truncated file is refused, not guessed at).

What must stay true: nothing here decodes a sample (the worker does, once); every loop moves
forward through the bytes, so a check costs at most one pass over the file; the length this
module computes is never less than the one miniaudio will allocate for the same bytes.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass, field
from typing import Any

from pollama.errors import InvalidAudio

__all__ = [
    "AUDIO_FORMATS",
    "INPUT_AUDIO_FORMATS",
    "AudioBudget",
    "ValidatedAudio",
    "audio_from_input",
    "head_bytes",
    "is_audio",
    "sniff_audio",
    "validate_audio",
]

AUDIO_FORMATS = "WAV, MP3 or FLAC"
"""The audio formats a request may carry, as error messages name them."""

INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac")
"""The values of an OpenAI ``input_audio`` part's ``format`` that are accepted."""

_WAV_ENCODINGS: dict[int, tuple[str, tuple[int, ...]]] = {
    0x0001: ("PCM", (8, 16, 24, 32)),
    0x0003: ("IEEE float", (32, 64)),
    0x0006: ("A-law", (8,)),
    0x0007: ("mu-law", (8,)),
}
_WAV_EXTENSIBLE = 0xFFFE
_WAV_MAX_RATE = 384_000  # dr_wav's MA_DR_WAV_MAX_SAMPLE_RATE
_WAV_MAX_CHANNELS = 256  # dr_wav's MA_DR_WAV_MAX_CHANNELS
_WAV_STREAMED = 0xFFFFFFFF  # a data size left unknown by a streaming writer: "to the end"

# MPEG audio, Layer III: sample rates by version bits (0: MPEG-2.5, 2: MPEG-2, 3: MPEG-1)
# and bitrates (kbit/s) by MPEG-1 or not; index 0 is free format, which is refused.
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_L3_KBPS_V1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_L3_KBPS_V2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)


def is_audio(head: bytes) -> bool:
    """Whether a file starts like audio, by llama.cpp's own test (``is_audio_file`` in
    ``mtmd-helper.cpp``), so that the server and the worker agree on what is audio. JPEG's
    ``FF D8`` is not an MPEG sync; WebP is RIFF but not WAVE."""
    return (
        (head[:4] == b"RIFF" and head[8:12] == b"WAVE")
        or head[:3] == b"ID3"
        or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
        or head[:4] == b"fLaC"
    )


def head_bytes(text: str) -> bytes:
    """The first 12 bytes a base64 string decodes to (fewer, or none, if it is short or not
    base64): enough to tell audio from an image before the whole string is decoded."""
    head = text[:40].replace("\r", "").replace("\n", "")[:16]
    try:
        return binascii.a2b_base64(head[: len(head) - len(head) % 4])
    except ValueError:  # binascii.Error, or non-ASCII text
        return b""


def sniff_audio(data: bytes) -> str | None:
    """``WAV``, ``MP3`` or ``FLAC`` from the magic bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if is_audio(data):
        return "MP3"
    return None


@dataclass(frozen=True)
class ValidatedAudio:
    """An audio clip whose header passed every check.

    ``data`` is the file exactly as sent (base64-decoded); ``format`` is ``WAV``, ``MP3`` or
    ``FLAC``; ``seconds`` the length the header claims (what the worker's decoder will
    allocate for); ``index`` its 1-based position among the request's audio clips.
    """

    index: int
    format: str
    seconds: float
    data: bytes = field(repr=False)


class AudioBudget:
    """The seconds of audio one request may still carry (``POLLAMA_MAX_AUDIO_SECONDS`` for
    all its clips together), charged clip by clip in request order."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.used = 0.0

    def charge(self, seconds: float, index: int) -> None:
        """Count a clip of ``seconds``, or refuse it when the request would go over."""
        total = self.used + seconds
        if total > self.max_seconds:
            limit = f"the limit of {self.max_seconds:g} seconds (POLLAMA_MAX_AUDIO_SECONDS)"
            if self.used == 0:
                raise InvalidAudio(
                    f"audio {index} is {seconds:.1f} seconds long, more than {limit}", index
                )
            raise InvalidAudio(
                f"audio {index} ({seconds:.1f} seconds) makes the request's audio "
                f"{total:.1f} seconds long, more than {limit}",
                index,
            )
        self.used = total


def validate_audio(data: bytes, index: int, budget: AudioBudget) -> ValidatedAudio:
    """One decoded audio file, checked in the order of the module docstring."""
    fmt = sniff_audio(data)
    if fmt == "WAV":
        seconds, missing = _wav_length(data, index)
    elif fmt == "MP3":
        seconds, missing = _mp3_length(data, index), 0
    elif fmt == "FLAC":
        seconds, missing = _flac_length(data, index), 0
    else:
        raise InvalidAudio(f"audio {index} is not a valid {AUDIO_FORMATS} file", index)
    budget.charge(seconds, index)
    if missing:
        raise _invalid(
            index, fmt, f"file is truncated: its data chunk is {missing} bytes short of the "
            "size its header declares"
        )
    return ValidatedAudio(index, fmt, seconds, data)


def _invalid(index: int, fmt: str, why: str) -> InvalidAudio:
    return InvalidAudio(f"audio {index} is not a valid {AUDIO_FORMATS} file: {fmt} {why}", index)


# -- WAV ---------------------------------------------------------------------------------------


def _wav_length(data: bytes, index: int) -> tuple[float, int]:
    """(seconds the header declares, bytes of declared data missing from the file)."""
    frame_bytes = rate = 0
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt ":
            if body + size > len(data):
                raise _invalid(index, "WAV", "file is truncated inside its fmt chunk")
            frame_bytes, rate = _wav_format(data[body : body + size], index)
        elif chunk == b"data":
            if not frame_bytes:
                raise _invalid(index, "WAV", "data chunk comes before its fmt chunk")
            declared = len(data) - body if size == _WAV_STREAMED else size
            frames = declared // frame_bytes
            if frames == 0:
                raise InvalidAudio(f"audio {index} has no audio samples", index)
            return frames / rate, max(0, body + declared - len(data))
        pos = body + size + (size & 1)  # chunks are padded to an even size
    what = "data chunk" if frame_bytes else "fmt chunk"
    raise _invalid(index, "WAV", f"file has no {what} (is it truncated?)")


def _wav_format(fmt: bytes, index: int) -> tuple[int, int]:
    """(bytes per frame, sample rate) of a ``fmt `` chunk that ``dr_wav`` decodes."""
    if len(fmt) < 16:
        raise _invalid(index, "WAV", "fmt chunk is too short")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _WAV_EXTENSIBLE:
        if len(fmt) < 26:
            raise _invalid(index, "WAV", "extensible fmt chunk is too short")
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the sub-format GUID's first two bytes
    encoding = _WAV_ENCODINGS.get(tag)
    if encoding is None:
        raise InvalidAudio(
            f"audio {index} is a WAV file in an encoding that is not accepted (format tag "
            f"0x{tag:04x}); send PCM, float, A-law or mu-law WAV, MP3 or FLAC",
            index,
        )
    name, sizes = encoding
    if bits not in sizes:
        raise InvalidAudio(
            f"audio {index} is {bits}-bit {name} WAV; {name} WAV may have "
            + " or ".join(str(size) for size in sizes) + " bits per sample",
            index,
        )
    if not 1 <= channels <= _WAV_MAX_CHANNELS or not 1 <= rate <= _WAV_MAX_RATE or not block_align:
        raise _invalid(
            index, "WAV", f"header is out of range ({channels} channels, {rate} Hz, block "
            f"align {block_align}; at most {_WAV_MAX_CHANNELS} channels and {_WAV_MAX_RATE} Hz)"
        )
    return bits // 8 * channels, rate


# -- MP3 ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """One MPEG audio frame header: its size in bytes, samples and sample rate; ``sync`` is
    what minimp3 compares between frames (version, layer, sample rate)."""

    length: int
    samples: int
    rate: int
    sync: tuple[int, int]
    side_info: int  # bytes of Layer III side information after the header (and CRC)
    crc: bool


def _frame(data: bytes, pos: int) -> _Frame | None:
    """The Layer III frame header at ``pos``, or None if there is none there."""
    if pos + 4 > len(data) or data[pos] != 0xFF or data[pos + 1] & 0xE0 != 0xE0:
        return None
    b1, b2, b3 = data[pos + 1], data[pos + 2], data[pos + 3]
    version, layer, bitrate, rate_index = (b1 >> 3) & 3, (b1 >> 1) & 3, b2 >> 4, (b2 >> 2) & 3
    if version == 1 or layer != 1 or bitrate in (0, 15) or rate_index == 3:
        return None
    rate = _MPEG_RATES[version][rate_index]
    mono = b3 >> 6 == 3
    if version == 3:
        kbps, samples, per_byte = _L3_KBPS_V1[bitrate], 1152, 144_000
        side_info = 17 if mono else 32
    else:
        kbps, samples, per_byte = _L3_KBPS_V2[bitrate], 576, 72_000
        side_info = 9 if mono else 17
    length = per_byte * kbps // rate + ((b2 >> 1) & 1)
    return _Frame(length, samples, rate, (b1 & 0xFE, b2 & 0x0C), side_info, not b1 & 1)


def _mp3_bounds(data: bytes, index: int) -> tuple[int, int]:
    """Where ``dr_mp3`` looks for frames: after a leading ID3v2 tag, before a trailing ID3v1
    tag and an APEv2 tag (found and measured exactly as ``ma_dr_mp3_init_internal`` does)."""
    end = len(data)
    if end > 128 and data[end - 128 : end - 125] == b"TAG":
        end -= 128
    if end > 32 and data[end - 32 : end - 24] == b"APETAGEX":
        size = struct.unpack_from("<I", data, end - 8)[0]
        if 32 + size < end:
            end -= 32 + size
    start = 0
    if data[:3] == b"ID3":
        if len(data) < 10:
            raise _invalid(index, "MP3", "file is truncated inside its ID3 tag")
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7
        size |= data[9] & 0x7F
        start = 10 + size + (10 if data[5] & 0x10 else 0)
        if start > len(data):
            raise _invalid(index, "MP3", f"ID3 tag claims {start} bytes but the file has "
                           f"{len(data)}")  # fmt: skip
    return start, end


def _mp3_length(data: bytes, index: int) -> float:
    """Seconds of audio: every frame's samples, or the Xing/Info count if it claims more."""
    start, end = _mp3_bounds(data, index)
    first = _frame(data, start)
    if first is None or start >= end:
        raise _invalid(
            index, "MP3", f"file has no MPEG Layer III frame where its audio starts (offset "
            f"{start}); MPEG layer I/II and free-format streams are not accepted"
        )
    samples, pos = 0, start
    while pos < end:
        frame = _frame(data, pos)
        if frame is None or frame.sync != first.sync:
            if data[pos:end].strip(b"\x00") and end - pos >= 4:
                raise _invalid(index, "MP3", f"bytes at offset {pos} are not an MPEG Layer III "
                               "frame like the ones before them")  # fmt: skip
            break
        samples += frame.samples
        pos += frame.length  # a cut-off last frame still counts (it can only overestimate)
    return max(samples, _xing_frames(data, start, first) * first.samples) / first.rate


def _xing_frames(data: bytes, start: int, first: _Frame) -> int:
    """The frame count of a Xing/Info header in the first frame (0 if there is none): the
    total ``dr_mp3`` reports, and allocates for, without looking at the frames."""
    at = start + 4 + (2 if first.crc else 0) + first.side_info
    if data[at : at + 4] not in (b"Xing", b"Info") or at + 12 > len(data):
        return 0
    if not data[at + 7] & 1:
        return 0
    return int(struct.unpack_from(">I", data, at + 8)[0])


# -- FLAC --------------------------------------------------------------------------------------


def _flac_length(data: bytes, index: int) -> float:
    """Seconds from the STREAMINFO block, which must come first and give the sample count."""
    if len(data) < 8 + 34 or data[4] & 0x7F != 0:
        raise _invalid(index, "FLAC", "file does not start with a STREAMINFO block")
    info = int.from_bytes(data[18:26], "big")  # rate 20 bits, channels 3, bits 5, samples 36
    rate, total = info >> 44, info & ((1 << 36) - 1)
    if not rate:
        raise _invalid(index, "FLAC", "STREAMINFO gives a sample rate of 0")
    if not total:
        raise InvalidAudio(
            f"audio {index} is a FLAC file that does not say how many samples it has "
            "(a streamed encoding); re-encode it, or send WAV or MP3",
            index,
        )
    return total / rate


# -- OpenAI input_audio parts ------------------------------------------------------------------


def audio_from_input(part: Any) -> str:
    """The base64 data of an OpenAI ``input_audio`` object (``{"data", "format"}``), after
    the checks that need no decoding: the format is one we take, and the data starts like
    that format (so an image cannot come in as audio). The whole file is checked with the
    request's other media, in ``InferenceService.prepare``."""
    if not isinstance(part, dict) or not isinstance(part.get("data"), str):
        raise InvalidAudio('input_audio must be an object with a base64 "data" string')
    declared = part.get("format")
    if not isinstance(declared, str) or declared.lower() not in INPUT_AUDIO_FORMATS:
        raise InvalidAudio(
            "input_audio format must be "
            + ", ".join(f'"{name}"' for name in INPUT_AUDIO_FORMATS)
            + f", not {declared!r}"
        )
    found = sniff_audio(head_bytes(part["data"]))
    if found is None:
        raise InvalidAudio(
            f"input_audio data is not a {AUDIO_FORMATS} file (send the file's bytes as "
            "standard base64, without a data: URL prefix)"
        )
    if found.lower() != declared.lower():
        raise InvalidAudio(f'input_audio format is "{declared}" but its data is a {found} file')
    return str(part["data"])
