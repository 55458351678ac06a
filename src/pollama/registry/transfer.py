"""What downloads and uploads share: their tunables, the part plan, the retry rules.

Part sizing is Ollama's (``server/download.go``, ``server/upload.go``): ``total / 16``
clamped to [100 MB, 1000 MB], so a blob under 1.6 GB has at most 16 parts and one under
100 MB a single part. A part serializes as Ollama's part files do
(``{"N","Offset","Size","Completed"}`` plus a newline), which is what lets either program
resume the other's download.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from pollama.registry.errors import RegistryError

__all__ = ["Part", "TransferOptions", "describe", "retryable"]


@dataclass
class TransferOptions:
    """Tunables of downloads and uploads; the defaults are Ollama's."""

    stall_timeout: float = 30.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    max_stalls: int = 20
    max_parts: int = 16
    min_part_size: int = 100_000_000
    max_part_size: int = 1_000_000_000
    checkpoint_interval: float = 2.0
    progress_interval: float = 0.06
    ramp_interval: float = 0.25
    """A download starts with one connection and, every this many seconds while it moves
    fewer than :attr:`fast_link` bytes a second, doubles them up to ``max_parts``; 0 opens
    ``max_parts`` at once, as Ollama does."""
    fast_link: int = 128_000_000
    """Bytes a second at which a download opens no more connections: a link this fast is
    not what limits it (the disk and the sha256 are), and more parts in flight would only
    leave more of the file to hash after the last byte arrives."""
    splice: bool = True
    """Move a plain-HTTP body from the socket to the file in the kernel where the platform
    can (:mod:`pollama.registry.spliced`); False reads every body into Python's buffers."""

    @property
    def idle_timeout(self) -> float | None:
        """``stall_timeout`` as a wait's timeout: None (wait for ever) when it is infinite."""
        return None if self.stall_timeout == float("inf") else self.stall_timeout

    def backoff(self, tries: int) -> float:
        """``base * 2^(tries-1)`` capped, jittered 0.5-1.5x against thundering herds."""
        delay = min(self.backoff_base * 2.0 ** (tries - 1), self.backoff_max)
        return float(delay * (0.5 + random.random()))

    def plan(self, total: int) -> list[tuple[int, int]]:
        """(offset, size) of each part: ``total / max_parts`` clamped to the size bounds."""
        size = min(max(total // self.max_parts, self.min_part_size), self.max_part_size)
        return [(offset, min(size, total - offset)) for offset in range(0, total, size)]


@dataclass
class Part:
    n: int
    offset: int
    size: int
    completed: int = 0

    @property
    def start(self) -> int:
        return self.offset + self.completed

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def done(self) -> bool:
        return self.completed >= self.size

    def to_json(self, completed: int) -> bytes:
        doc = {"N": self.n, "Offset": self.offset, "Size": self.size, "Completed": completed}
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def retryable(exc: RegistryError) -> bool:
    """Whether a registry error may go away on a retry (no answer, 408, 429, 5xx)."""
    return exc.status_code in (0, 408, 429) or exc.status_code >= 500


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
