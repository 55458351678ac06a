"""Two real ``pollama serve`` nodes behind a real nginx running ``deploy/nginx/pollama.conf``
(docs/multi-node.md#check-the-setup): one key file on both nodes, the model pulled by one node
from the other over the registry protocol, streaming passed through token by token, a
conversation kept on one node (and its prompt cache), and a node killed in the middle of a
stream: the client gets an error within a bound and the other node serves what follows.

Which node served a request is read from the nodes' own access logs (each node writes its
own file), found by the ``X-Request-Id`` the test sends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    MODEL,
    RunningServer,
    create_default_model,
    free_port,
    start_server,
    stop_server,
)
from nginx_site import NGINX, write_nginx_config
from pollama.keys import KeyStore, Scope

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)"),
]


@dataclass
class Cluster:
    url: str  # nginx
    nodes: dict[str, RunningServer]  # "a" (the origin of the model), "b" (pulled it from a)
    admin: str  # a key of scope "all", in the one key file both nodes have
    lan_name: str  # the name b pulled the model by
    sessions: dict[str, str]  # node -> a session id nginx sends to it

    def headers(self, session: str | None = None, key: str | None = None) -> dict[str, str]:
        out = {"Authorization": f"Bearer {key or self.admin}", "X-Request-Id": uuid.uuid4().hex}
        if session is not None:
            out["X-Session-Id"] = session
        return out

    def served_by(self, request_id: str, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        """The node whose access log has ``request_id``, and its line (a streamed response's
        line is written after its last byte, so wait a little for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for name, node in self.nodes.items():
                for line in access_lines(node):
                    if line.get("request_id") == request_id:
                        return name, line
            if time.monotonic() > deadline:
                raise AssertionError(f"no node logged request {request_id}")
            time.sleep(0.05)


def access_lines(node: RunningServer) -> list[dict[str, Any]]:
    path = Path(node.env["POLLAMA_ACCESS_LOG"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def descendants(pid: int) -> list[int]:
    """The processes started under ``pid`` (its model runners), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def start_nginx(folder: Path, upstreams: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """nginx as this test's own process, with the shipped site file, its two example node
    addresses and its listen port replaced by the test's."""
    folder.mkdir()
    port = free_port()
    command = write_nginx_config(folder, upstreams, port)
    with open(folder / "nginx.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError((folder / "nginx.log").read_text()) from None
            time.sleep(0.05)


def start_nodes(root: Path) -> tuple[dict[str, RunningServer], str, str]:
    """Node a with the default model, node b which pulls it from a over the LAN registry;
    one key file, made on a and copied to b. Returns the nodes, the admin key, b's name."""
    homes = {n: root / n for n in "ab"}
    keys = KeyStore(homes["a"] / ".ollama" / "api_keys.json")
    admin, _ = keys.create("admin", Scope.ALL)
    lan, _ = keys.create("lan", Scope.INFERENCE)  # what b shows a: reading is enough
    (homes["b"] / ".ollama").mkdir(parents=True)
    shutil.copy(keys.path, homes["b"] / ".ollama" / "api_keys.json")
    common = {"POLLAMA_SERVE_REGISTRY": "1", "OLLAMA_API_KEY": admin}
    nodes: dict[str, RunningServer] = {}
    try:
        nodes["a"] = start_server(
            homes["a"], {**common, "POLLAMA_ACCESS_LOG": str(homes["a"] / "access.log")}
        )
        create_default_model(nodes["a"], homes["a"])
        peer = nodes["a"].host  # 127.0.0.1:PORT
        docker = homes["b"] / ".docker"
        docker.mkdir()
        (docker / "config.json").write_text(json.dumps({"auths": {peer: {"registrytoken": lan}}}))
        nodes["b"] = start_server(homes["b"], {
            **common, "POLLAMA_ACCESS_LOG": str(homes["b"] / "access.log"),
            "POLLAMA_REGISTRY_HOSTS": peer,
        })  # fmt: skip
        lan_name = f"{peer}/library/{MODEL}"
        nodes["b"].cli("pull", "--insecure", lan_name, check=True)
        nodes["b"].cli("cp", lan_name, MODEL, check=True)
    except BaseException:
        for node in nodes.values():
            stop_server(node)
        raise
    return nodes, admin, lan_name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("balancer")
    nodes, admin, lan_name = start_nodes(root)
    runners = []
    try:
        nginx, url = start_nginx(root / "nginx", [n.host for n in nodes.values()])
        try:
            found = Cluster(url, nodes, admin, lan_name, {})
            with httpx.Client(base_url=url, timeout=30) as http:
                for i in range(64):
                    session = f"session-{i}"
                    headers = found.headers(session)
                    assert http.get("/api/version", headers=headers).status_code == 200
                    node, _ = found.served_by(headers["X-Request-Id"])
                    found.sessions.setdefault(node, session)
                    if len(found.sessions) == 2:
                        break
            yield found
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
    finally:
        for node in nodes.values():
            runners += descendants(node.process.pid)
            stop_server(node)
        for pid in runners:  # those of a node that did not stop in time
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        yield client


def test_both_nodes_serve_behind_the_balancer(cluster: Cluster) -> None:
    assert set(cluster.sessions) == {"a", "b"}  # sessions spread over both nodes


def test_one_key_file_works_on_every_node_and_a_wrong_key_is_refused(
    cluster: Cluster, http: httpx.Client
) -> None:
    for node, session in cluster.sessions.items():
        good = cluster.headers(session)
        tags = http.get("/api/tags", headers=good)
        assert tags.status_code == 200, tags.text
        assert MODEL in [m["name"] for m in tags.json()["models"]]
        assert cluster.served_by(good["X-Request-Id"])[0] == node
        assert tags.headers["x-request-id"] == good["X-Request-Id"]  # passed through, echoed
        bad = cluster.headers(session, key="sk-not-a-key")
        refused = http.post("/api/generate", headers=bad, json={"model": MODEL, "prompt": "hi"})
        assert refused.status_code == 401
        served, line = cluster.served_by(bad["X-Request-Id"])
        assert (served, line["refused"]) == (node, "key")
        no_key = {k: v for k, v in good.items() if k != "Authorization"}
        assert http.get("/api/tags", headers=no_key).status_code == 401
    assert http.get("/healthz").status_code == 200  # open, for health checks


def test_a_model_pulled_from_the_other_node_generates_there(
    cluster: Cluster, http: httpx.Client
) -> None:
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {cluster.admin}"}) as api:
        digests = [
            {m["name"]: m["digest"] for m in api.get(f"{n.url}/api/tags").json()["models"]}
            for n in (a, b)
        ]
    assert digests[1][cluster.lan_name] == digests[1][MODEL] == digests[0][MODEL]
    pulls = [line for line in access_lines(a) if line["path"].startswith("/v2/library/")]
    assert pulls and {line["key"] for line in pulls} == {"lan"}  # b showed a its key
    assert any("/blobs/" in line["path"] and line["status"] in (200, 206) for line in pulls)
    headers = cluster.headers(cluster.sessions["b"])
    body = {"model": MODEL, "prompt": "Say hello.", "stream": False,
            "options": {"num_predict": 8, "temperature": 0}}  # fmt: skip
    reply = http.post("/api/generate", headers=headers, json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["eval_count"] > 0
    assert cluster.served_by(headers["X-Request-Id"])[0] == "b"


def test_streaming_passes_through_token_by_token(cluster: Cluster, http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Write a long story about a lighthouse keeper.",
            "options": {"num_predict": 160, "temperature": 0}}  # fmt: skip
    arrivals: list[float] = []
    with http.stream("POST", "/api/generate", headers=cluster.headers(), json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        for line in resp.iter_lines():
            if line:
                arrivals.append(time.monotonic())
                last = json.loads(line)
    assert last["done"] and last["eval_count"] >= 16
    # Buffered, every line would arrive at once, at the end; passed through, the lines
    # arrive over the generation's own duration.
    tokens_span = arrivals[-2] - arrivals[0]
    generation = last["eval_duration"] / 1e9
    # the worker sends a stream's text at most every 100 ms (runner/worker.py FRAME_INTERVAL):
    # on a fast machine a line carries a few tokens, so fewer lines than tokens
    assert len(arrivals) >= 8
    assert tokens_span >= 0.5 * generation * (len(arrivals) - 2) / last["eval_count"], (
        tokens_span, generation,
    )


def chat_turn(cluster: Cluster, http: httpx.Client, session: str | None,
              messages: list[dict[str, str]]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """One non-streamed chat turn through nginx: (the node, the reply, its access-log line)."""
    headers = cluster.headers(session)
    body = {"model": MODEL, "messages": messages, "stream": False,
            "options": {"num_predict": 12, "temperature": 0}}  # fmt: skip
    reply = http.post("/api/chat", headers=headers, json=body)
    assert reply.status_code == 200, reply.text
    node, line = cluster.served_by(headers["X-Request-Id"])
    messages.append(reply.json()["message"])
    return node, reply.json(), line


def test_a_conversation_stays_on_one_node_and_hits_its_prompt_cache(
    cluster: Cluster, http: httpx.Client
) -> None:
    system = "You are a helpful assistant who answers in one short sentence. " * 8
    for node, session in cluster.sessions.items():
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": "Name a colour."}]  # fmt: skip
        turns = []
        for question in ("Name a fruit.", "Name an animal.", None):
            turns.append(chat_turn(cluster, http, session, messages))
            if question:
                messages.append({"role": "user", "content": question})
        assert [served for served, _, _ in turns] == [node] * 3
        # Each turn found the previous turn's prompt in the node's cache (prompt_eval_count
        # counts the cached prefix too, as Ollama's does: the access log tells them apart).
        for (_, _, before), (_, _, line) in zip(turns, turns[1:], strict=False):
            assert line["cached_tokens"] >= 0.9 * before["prompt_tokens"], (before, line)
    # Without a session id, one key sticks to one node too.
    messages = [{"role": "user", "content": "Name a number."}]
    served = {chat_turn(cluster, http, None, messages)[0] for _ in range(3)}
    assert len(served) == 1


def test_a_node_killed_mid_stream_errors_the_stream_and_the_other_node_takes_over(
    cluster: Cluster, http: httpx.Client
) -> None:
    victim, session = "b", cluster.sessions["b"]
    other = "a"
    body = {"model": MODEL, "prompt": "Write a long story about a lighthouse keeper.",
            "options": {"num_predict": 2000}}  # fmt: skip
    lines, killed = 0, 0.0
    started = time.monotonic()
    with pytest.raises(httpx.TransportError):  # RemoteProtocolError: incomplete chunked read
        with httpx.stream("POST", f"{cluster.url}/api/generate", json=body,
                          headers=cluster.headers(session), timeout=15) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                lines += 1
                if lines == 2:
                    runners = descendants(cluster.nodes[victim].process.pid)
                    os.kill(cluster.nodes[victim].process.pid, signal.SIGKILL)
                    killed = time.monotonic()
                assert not json.loads(line).get("done"), "finished before the kill"
    error_at = time.monotonic()
    assert lines >= 2 and error_at - killed < 10  # an error, never a hang
    assert time.monotonic() - started < 60
    # The session's next request (and any other) is served by the other node.
    for _ in range(3):
        headers = cluster.headers(session)
        reply = http.post("/api/generate", headers=headers, json={
            "model": MODEL, "prompt": "Hi.", "stream": False, "options": {"num_predict": 4},
        })  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert cluster.served_by(headers["X-Request-Id"])[0] == other
    assert http.get("/api/tags", headers=cluster.headers(session)).status_code == 200
    # The dead node's model runner noticed and went too (it was in its own session).
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in runners) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in runners if Path(f"/proc/{pid}").exists()]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert runners and not survivors
    print(f"stream error {killed - started:.2f} s after the start, "
          f"{error_at - killed:.2f} s after the kill")
