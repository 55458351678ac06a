"""The CLI's HTTP client (``pollama.client.Client``) builds a verifying TLS context only for
an https host: loading the CA bundle costs tens of milliseconds at every command, and over
plain http no TLS is ever spoken (the client follows no redirects)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pollama.client import Client


@pytest.fixture
def verifying(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ``verify`` of every TLS context httpx builds for a client."""
    from httpx._transports import default

    seen: list[Any] = []
    real = default.create_ssl_context

    def counting(verify: Any = True, **kwargs: Any) -> Any:
        seen.append(verify)
        return real(verify=verify, **kwargs)

    monkeypatch.setattr(default, "create_ssl_context", counting)
    return seen


def test_a_plain_http_host_loads_no_certificates(verifying: list[Any]) -> None:
    with Client("http://127.0.0.1:11434") as client:
        assert client._http.follow_redirects is False
    assert verifying and not any(verifying)


def test_an_https_host_verifies(verifying: list[Any]) -> None:
    with Client("https://models.example.com") as client:
        assert isinstance(client._http, httpx.Client)
    assert verifying == [True]
