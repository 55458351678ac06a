"""nginx in front of pollama nodes, for the balancer test and benchmark: the shipped site
file (``deploy/nginx/pollama.conf``) with its example node addresses and its listen port
replaced, inside a minimal ``nginx.conf`` whose paths are all in one folder (no system
service, no root-owned paths)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "deploy" / "nginx" / "pollama.conf"
NGINX = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
EXAMPLES = ("127.0.0.1:11435", "127.0.0.1:11436")  # the node lines the site file ships with

WRAPPER = """\
worker_processes 1;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/pollama.conf;
}}
"""


def write_nginx_config(folder: Path, upstreams: Sequence[str], port: int) -> list[str]:
    """Write ``nginx.conf`` and ``pollama.conf`` into ``folder`` for ``upstreams`` (one or
    two nodes) and a listener on 127.0.0.1:``port``; return the command that runs nginx in
    the foreground with them."""
    site = SITE.read_text()
    for example, real in zip(EXAMPLES, upstreams, strict=False):
        assert site.count(f"server {example} ") == 1, f"{SITE} no longer lists {example}"
        site = site.replace(f"server {example} ", f"server {real} ")
    for example in EXAMPLES[len(upstreams):]:  # one node: drop the other example line
        site = "\n".join(line for line in site.splitlines() if f"server {example} " not in line)
    assert site.count("listen 11434;") == 1, f"{SITE} no longer listens on 11434"
    (folder / "pollama.conf").write_text(site.replace("listen 11434;", f"listen 127.0.0.1:{port};"))
    user = "user root;" if os.geteuid() == 0 else ""  # the temp folders are 0700
    (folder / "nginx.conf").write_text(WRAPPER.format(user=user, d=folder))
    return [NGINX or "nginx", "-p", str(folder), "-c", str(folder / "nginx.conf"),
            "-g", f"daemon off; pid {folder}/nginx.pid; error_log stderr;"]  # fmt: skip
