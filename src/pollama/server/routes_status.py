"""``GET /api/status``: Ollama 2026's server status, with the compute devices pollama sees.

Ollama answers ``{"cloud": {"disabled", "source"}}``. pollama has no cloud features, so
``disabled`` is always true (``source`` says whether ``OLLAMA_NO_CLOUD`` asked for it too);
it adds the device inventory llama.cpp reported when the server started
(``runner/devices.py``, ``app.state.inventory``): each device's name, description, kind,
total and free memory in bytes, and the build's backends, so that "a GPU build that found no
GPU" shows here as plainly as in the server log.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pollama.config import Settings
from pollama.runner.devices import DeviceInventory

router = APIRouter()


def status_body(settings: Settings, inventory: DeviceInventory) -> dict[str, Any]:
    """The body of ``/api/status`` (a device's ``accelerator`` says whether layers can go
    there; ``error`` is why the inventory is empty, "" when it is not)."""
    inv = inventory.to_json()
    devices = [{**asdict(d), "accelerator": d.accelerator} for d in inventory.devices]
    return {
        "cloud": {"disabled": True, "source": "env" if settings.no_cloud else "none"},
        "devices": devices,
        "build": inv["build"],
        "error": inv["error"],
    }


@router.api_route("/api/status", methods=["GET", "HEAD"])
async def status(request: Request) -> Response:
    inventory: DeviceInventory = request.app.state.inventory
    return JSONResponse(status_body(request.app.state.settings, inventory))
