"""RPC servers that were down when the server started, picked up when they come back.

The device inventory is taken once at start (``runner/devices.py``); an ``OLLAMA_RPC_SERVERS``
entry that did not answer then is left out of it. Without this watcher it would stay out
until a restart. Every :data:`RETRY_SECONDS` the missing ones (of the current settings, so a
reload that adds one is followed too) get a TCP connect, and those that accept one are asked
for their devices by a subprocess (llama.cpp aborts on a server it cannot reach, so never in
this process); their devices join the scheduler's inventory and the metrics.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI

from pollama.runner.devices import probe_rpc_server
from pollama.runner.rpc import unreachable

__all__ = ["RETRY_SECONDS", "watch_rpc_servers"]

log = logging.getLogger(__name__)

RETRY_SECONDS = 15.0


async def find_returned_servers(app: FastAPI) -> list[str]:
    """Ask each configured RPC server missing from the inventory once; add the devices of
    those that answer. Returns the endpoints added."""
    scheduler = app.state.scheduler
    known = {device.endpoint for device in scheduler.devices() if device.endpoint}
    missing = [e for e in app.state.settings.rpc_servers if e not in known]
    added = []
    for endpoint in missing:
        if await asyncio.to_thread(unreachable, [endpoint]):
            continue
        devices, problem = await asyncio.to_thread(probe_rpc_server, endpoint)
        if problem or not devices:
            log.info("RPC server %s answers but gave no devices: %s", endpoint, problem)
            continue
        scheduler.add_devices(devices)
        app.state.devices = list(scheduler.devices())
        added.append(endpoint)
        log.info("RPC server %s is back: %s", endpoint, ", ".join(d.name for d in devices))
    return added


async def watch_rpc_servers(app: FastAPI) -> None:
    """Run :func:`find_returned_servers` every :data:`RETRY_SECONDS` until cancelled."""
    while True:
        await asyncio.sleep(RETRY_SECONDS)
        try:
            await find_returned_servers(app)
        except Exception:  # noqa: BLE001 - logged; the next round tries again
            log.exception("looking for RPC servers failed")
