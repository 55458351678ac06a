"""The domain error tree.

Every failure a caller can act on is one of these classes. They carry no HTTP knowledge:
``pollama.server.errors`` maps each class to a status code and body, in one table, for
each protocol. Code never classifies an error by matching its message text; it catches
the class.

    PollamaError
    ├── InvalidRequest            bad input the caller can fix (400)
    │   ├── InvalidModelName
    │   ├── InvalidDigest
    │   ├── DigestMismatch
    │   ├── ModelfileError        carries the 1-based line number
    │   ├── GGUFError             a file that is not a well-formed GGUF
    │   ├── ConversionError       a Hugging Face folder that cannot be converted to a GGUF
    │   ├── InvalidOption         a runtime/Modelfile parameter of the wrong name or type
    │   ├── TemplateError         a Go template that does not parse
    │   ├── UnsupportedQuantization
    │   ├── ContextOverflow       a prompt that cannot fit the context window
    │   ├── InvalidImage          an image that is not valid base64, too large, or undecodable
    │   │   └── InvalidAudio      an audio clip refused the same way, or for its length
    │   └── CapabilityMissing     the model cannot do what was asked (tools, vision…)
    ├── NotFound                  (404)
    │   ├── ModelNotFound
    │   └── BlobNotFound
    ├── AlreadyExists             (409) a write would overwrite something the caller owns
    ├── ServerBusy                (503) the pending queue is full
    ├── InsufficientMemory        (507→500) loading would not fit in free memory
    ├── AcceleratorUnavailable    (503) POLLAMA_REQUIRE_GPU and no layer could go to a GPU
    └── InternalError             (500) a bug or an environment failure, never the caller's fault
        └── RunnerCrashed         the model's worker process died
"""

from __future__ import annotations


class PollamaError(Exception):
    """Base of every error pollama raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidRequest(PollamaError):
    """The request is malformed or asks for something impossible; the caller can fix it."""


class InvalidModelName(InvalidRequest):
    """A model name that does not follow Ollama's grammar (see ``pollama.names``)."""


class InvalidDigest(InvalidRequest):
    """A digest that is not ``sha256:`` (or ``sha256-``) followed by 64 lowercase hex digits."""

    def __init__(self, message: str = "invalid digest format") -> None:
        super().__init__(message)


class DigestMismatch(InvalidRequest):
    """Uploaded or downloaded bytes whose sha256 differs from the digest they were sent under."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f'digest mismatch, expected "{expected}", got "{actual}"')
        self.expected = expected
        self.actual = actual


class ModelfileError(InvalidRequest):
    """A Modelfile that does not parse; ``line`` is 1-based (0 when not tied to a line)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(f"(line {line}): {message}" if line else message)
        self.line = line
        self.reason = message


class GGUFError(InvalidRequest):
    """A file that is not a well-formed GGUF; the message names the file and the problem."""


class ConversionError(InvalidRequest):
    """A Hugging Face model folder (``FROM`` a safetensors folder) that cannot be converted:
    an unknown architecture, pickled weights, a file that does not parse or lies about its
    size. The message names the file (``pollama.convert``)."""


class InvalidOption(InvalidRequest):
    """An option (request ``options`` or Modelfile ``PARAMETER``) with a bad name or value."""


class TemplateError(InvalidRequest):
    """A prompt template that does not parse or cannot be executed."""


class UnsupportedQuantization(InvalidRequest):
    """A quantization type we cannot produce, or a source file we cannot quantize."""


class ContextOverflow(InvalidRequest):
    """A prompt that does not fit the context window even after truncation."""


class InvalidImage(InvalidRequest):
    """A request image that is refused before any model sees it (``inference.images``).

    ``index`` is the image's 1-based position among the request's images (0 when the error
    is about the request as a whole, e.g. too many images); the message names it too.
    """

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class InvalidAudio(InvalidImage):
    """A request audio clip that is refused before any model hears it (``inference.audio``).

    Audio travels in the same ``images`` fields and is checked in the same pass, so it is an
    :class:`InvalidImage` to code that catches either; ``index`` is its 1-based position
    among the request's audio clips (0 for the request as a whole).
    """


class CapabilityMissing(InvalidRequest):
    """The model lacks a capability the request needs (tools, insert, vision, thinking…)."""


class NotFound(PollamaError):
    """The named thing does not exist."""


class ModelNotFound(NotFound):
    """No manifest exists for the model name."""


class BlobNotFound(NotFound):
    """No blob exists for the digest."""


class AlreadyExists(PollamaError):
    """The operation would replace something that already exists."""


class ServerBusy(PollamaError):
    """The scheduler's pending queue is full."""

    def __init__(
        self, message: str = "server busy, please try again.  maximum pending requests exceeded"
    ) -> None:
        super().__init__(message)


class InsufficientMemory(PollamaError):
    """Loading the model would need more memory than is free; says how much of each."""


class AcceleratorUnavailable(PollamaError):
    """``POLLAMA_REQUIRE_GPU`` is set and a model would run with no layer on a GPU; the
    message says why (a CPU-only build, no device found, or the model did not fit)."""


class RpcServerUnavailable(PollamaError):
    """An RPC server of ``OLLAMA_RPC_SERVERS`` does not answer and the model does not fit
    without it; the message names it (README.md#rpc)."""


class InternalError(PollamaError):
    """An unexpected failure on the server side (disk, subprocess, bug)."""


class RunnerCrashed(InternalError):
    """The worker process of a loaded model exited while requests were using it."""

    def __init__(self, detail: str = "") -> None:
        message = (
            "model runner has unexpectedly stopped, this may be due to resource limitations "
            "or an internal error, check pollama server logs for details"
        )
        super().__init__(f"{message}: {detail}" if detail else message)


def brief(message: str, limit: int = 300) -> str:
    """A library's message for a client: its lines joined, at most ``limit`` characters.
    Some libraries (llguidance) go on to dump their whole input, which may be megabytes of
    the request; the first few hundred characters say what went wrong."""
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"
