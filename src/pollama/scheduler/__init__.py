"""Which models are loaded, who may use them, and when they are unloaded
(docs/ollama-behaviour.md#the-scheduler).

The server builds one :class:`Scheduler` with a runner factory and hands it to the inference
service, which wraps each generation in ``async with scheduler.use(model, spec, keep_alive)``.
"""

from pollama.scheduler.clock import Clock
from pollama.scheduler.keepalive import (
    FOREVER_DELTA,
    expiry_datetime,
    normalize_keep_alive,
    parse_keep_alive,
)
from pollama.scheduler.memory import (
    MemoryInfo,
    MemoryProbe,
    compute_buffer_bytes,
    estimate_memory,
    insufficient_memory,
    kv_cache_bytes,
    system_memory,
)
from pollama.scheduler.scheduler import (
    DEFAULT_MAX_LOADED_MODELS,
    Lease,
    LoadedModel,
    ModelRef,
    Scheduler,
)

__all__ = [
    "DEFAULT_MAX_LOADED_MODELS",
    "FOREVER_DELTA",
    "Clock",
    "Lease",
    "LoadedModel",
    "MemoryInfo",
    "MemoryProbe",
    "ModelRef",
    "Scheduler",
    "compute_buffer_bytes",
    "estimate_memory",
    "expiry_datetime",
    "insufficient_memory",
    "kv_cache_bytes",
    "normalize_keep_alive",
    "parse_keep_alive",
    "system_memory",
]
