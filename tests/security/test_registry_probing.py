"""``/api/pull`` cannot be used to probe the server's network (issue point 8a).

With ``insecure: true`` a manage key used to make the server connect to any loopback or
private host, and the error (connection refused, a registry's 404, a timeout) told open
ports from closed ones. Now ``insecure`` only allows plain http to a host the settings
list, and every refused host gets one answer, given before any connection is tried.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from pollama.keys import KeyStore, Scope
from registry_helpers import Fault, FaultProxy, Reply


@pytest.fixture
def open_port() -> Iterator[FaultProxy]:
    """A loopback port that accepts connections and answers like a registry (404)."""
    proxy = FaultProxy(upstream=None)
    proxy.add(Fault(path="/", action="reply", method=None, times=None, reply=Reply(404)))
    yield proxy
    proxy.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("listed", [None, "*"], ids=["default hosts", "any host"])
def test_refused_hosts_get_one_answer_whatever_the_port(
    make_client: Callable[..., TestClient],
    keys: KeyStore,
    open_port: FaultProxy,
    listed: str | None,
) -> None:
    secret, _ = keys.create("ops", Scope.MANAGE)
    client = make_client(**({"POLLAMA_REGISTRY_HOSTS": listed} if listed else {}))
    port = open_port.netloc.split(":")[1]
    hosts = [
        f"127.0.0.1:{port}",  # open, and answers
        f"127.0.0.1:{_closed_port()}",  # closed
        f"localhost:{port}",
        "10.255.255.1:5000",  # private, nothing there (a connect would time out)
        "169.254.169.254",  # cloud metadata
    ]
    answers = set()
    for host in hosts:
        for stream in (True, False):
            response = client.post(
                "/api/pull",
                json={"model": f"{host}/library/x", "insecure": True, "stream": stream},
                headers={"Authorization": f"Bearer {secret}"},
            )
            answers.add((response.status_code, response.text.replace(host, "HOST")))
    assert answers == {(400, (
        '{"error":"registry host \\"HOST\\" is not allowed: add it to POLLAMA_REGISTRY_HOSTS on '
        'the server (--insecure only lets a listed host be reached over http)"}'
    ))}  # fmt: skip
    assert open_port.requests == []  # nothing was ever sent to the open port


def test_a_listed_host_is_reached_with_insecure(
    make_client: Callable[..., TestClient], open_port: FaultProxy
) -> None:
    """What the CLI's ``pull --insecure`` needs: the user lists their registry."""
    client = make_client(POLLAMA_REGISTRY_HOSTS=open_port.netloc)
    body = {"model": f"{open_port.netloc}/library/x", "insecure": True, "stream": False}
    response = client.post("/api/pull", json=body)
    assert response.json() == {"error": "pull model manifest: file does not exist"}
    assert open_port.paths() == ["/v2/library/x/manifests/latest"]
