"""scripts/engine-build.sh: which engine build `make install` picks (README.md#gpu).

The script runs with a PATH of fakes only (nvcc, nvidia-smi printing a compute capability,
uname, glslc, pkg-config), so the answer never depends on the machine running the tests (this
one has a real nvcc and no GPU). ``install`` is exercised against a fake venv whose pip records
its arguments instead of building.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import cpu_has_amx

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "engine-build.sh"
BASH = shutil.which("bash") or "/bin/bash"
# Real tools the script (and the fake pip: touch) calls; linked into the fake PATH beside the fakes.
REAL_TOOLS = ("sed", "head", "cat", "nproc", "touch")


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def _bin(tmp_path: Path, os_name: str = "Linux", machine: str = "x86_64") -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake(bin_dir, "uname", f'case "$1" in -s) echo {os_name};; -m) echo {machine};; esac')
    for tool in REAL_TOOLS:
        real = shutil.which(tool)
        if real and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(real)
    return bin_dir


def _run(bin_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": str(bin_dir), "POLLAMA_TOOL_DIRS": "", "HOME": str(bin_dir.parent)}
    environ.update(env)
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True,
                          env=environ, cwd=ROOT, timeout=60)


def _detect(bin_dir: Path, **env: str) -> dict[str, str]:
    result = _run(bin_dir, "detect", **env)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def _nvidia(bin_dir: Path, caps: str = "9.0") -> None:
    _fake(bin_dir, "nvcc", "echo 'Cuda compilation tools, release 13.0'")
    _fake(bin_dir, "nvidia-smi", f"printf '{caps}\\n'")


def test_plain_machine_builds_for_the_cpu(tmp_path: Path) -> None:
    assert _detect(_bin(tmp_path)) == {"kind": "cpu", "cmake_args": "-DGGML_RPC=ON"}


def test_nvcc_and_driver_build_cuda_for_the_gpu_alone(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    _nvidia(bin_dir)
    assert _detect(bin_dir) == {
        "kind": "cuda", "cmake_args": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_RPC=ON"}


def test_several_gpus_give_each_architecture_once(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    _nvidia(bin_dir, caps="8.6\\n9.0\\n8.6")
    assert _detect(bin_dir)["cmake_args"] == (
        "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86;90 -DGGML_RPC=ON")


def test_nvcc_without_a_driver_stays_on_the_cpu_and_says_why(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    _fake(bin_dir, "nvcc", "true")
    result = _run(bin_dir, "detect")
    assert "kind=cpu" in result.stdout
    assert "POLLAMA_BUILD=cuda" in result.stderr


def test_forced_cuda_without_nvidia_smi_keeps_llama_cpp_default_architectures(
        tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    _fake(bin_dir, "nvcc", "true")
    assert _detect(bin_dir, POLLAMA_BUILD="cuda") == {
        "kind": "cuda", "cmake_args": "-DGGML_CUDA=on -DGGML_RPC=ON"}


def test_nvcc_off_path_is_found_in_the_toolkit_folder_and_named_to_cmake(
        tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    cuda_bin = tmp_path / "cuda" / "bin"
    cuda_bin.mkdir(parents=True)
    _nvidia(cuda_bin)
    os.remove(cuda_bin / "nvidia-smi")
    _fake(bin_dir, "nvidia-smi", "echo 8.9")
    found = _detect(bin_dir, POLLAMA_TOOL_DIRS=str(cuda_bin))
    assert found["kind"] == "cuda"
    assert found["cmake_args"] == (
        f"-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER={cuda_bin}/nvcc -DCMAKE_CUDA_ARCHITECTURES=89"
        " -DGGML_RPC=ON")


def test_apple_silicon_builds_metal(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path, os_name="Darwin", machine="arm64")
    assert _detect(bin_dir) == {"kind": "metal", "cmake_args": "-DGGML_METAL=on -DGGML_RPC=ON"}


def test_intel_mac_is_not_apple_silicon(tmp_path: Path) -> None:
    assert _detect(_bin(tmp_path, os_name="Darwin", machine="x86_64"))["kind"] == "cpu"


@pytest.mark.parametrize("sdk", ["env", "pkg-config"])
def test_vulkan_needs_glslc_and_the_sdk(tmp_path: Path, sdk: str) -> None:
    bin_dir = _bin(tmp_path)
    _fake(bin_dir, "glslc", "true")
    assert _detect(bin_dir)["kind"] == "cpu"  # glslc alone: no headers, no loader
    if sdk == "env":
        found = _detect(bin_dir, VULKAN_SDK=str(tmp_path))
    else:
        _fake(bin_dir, "pkg-config", '[ "$1 $2" = "--exists vulkan" ]')
        found = _detect(bin_dir)
    assert found == {"kind": "vulkan", "cmake_args": "-DGGML_VULKAN=on -DGGML_RPC=ON"}


@pytest.mark.parametrize("kind", ["cpu", "cuda", "metal", "vulkan"])
def test_pollama_build_overrides_detection(tmp_path: Path, kind: str) -> None:
    bin_dir = _bin(tmp_path)
    _nvidia(bin_dir)
    assert _detect(bin_dir, POLLAMA_BUILD=kind)["kind"] == kind


def test_cuda_wins_over_vulkan_and_user_cmake_args_come_last(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    _nvidia(bin_dir)
    _fake(bin_dir, "glslc", "true")
    found = _detect(bin_dir, VULKAN_SDK="/sdk", CMAKE_ARGS="-DGGML_CUDA_FA_ALL_QUANTS=on")
    assert found == {"kind": "cuda", "cmake_args": (
        "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_RPC=ON -DGGML_CUDA_FA_ALL_QUANTS=on")}


# --- GCC's AMX intrinsic (scripts/gcc-amx-tilecfg.h) -------------------------------------------

AMX_HEADER = ROOT / "scripts" / "gcc-amx-tilecfg.h"
AMX_FIX = f"-DCMAKE_CXX_FLAGS=-include{AMX_HEADER}"


def _machine(bin_dir: Path, flags: str, compiler: str) -> dict[str, str]:
    """A cpuinfo with ``flags`` and a c++ that predefines what ``compiler`` does."""
    cpuinfo = bin_dir.parent / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu {flags}\nbogomips\t: 4000\n")
    macros = {"gcc": "#define __GNUC__ 12", "clang": "#define __GNUC__ 4\n#define __clang__ 1"}
    _fake(bin_dir, "c++", f"printf '{macros[compiler]}\\n'")
    return {"POLLAMA_CPUINFO": str(cpuinfo)}


@pytest.mark.parametrize("flags", ["avx512f amx_tile amx_int8", "avx512f amx_int8 amx_tile"])
def test_gcc_on_a_cpu_with_amx_gets_the_tile_config_mended(tmp_path: Path, flags: str) -> None:
    bin_dir = _bin(tmp_path)
    found = _detect(bin_dir, **_machine(bin_dir, flags, "gcc"))
    assert found == {"kind": "cpu", "cmake_args": f"-DGGML_RPC=ON {AMX_FIX}"}
    assert AMX_HEADER.is_file() and " " not in str(AMX_HEADER)


@pytest.mark.parametrize(("flags", "compiler", "machine"), [
    ("avx512f amx_tile", "clang", "x86_64"),   # clang's intrinsics are right
    ("avx512f avx512_vnni", "gcc", "x86_64"),  # no AMX: the kernels are not built
    ("avx512f amx_tilex", "gcc", "x86_64"),    # a flag that only starts like it
    ("asimd amx_tile", "gcc", "aarch64"),
])
def test_no_mend_where_the_amx_kernels_are_not_built_by_gcc(
    tmp_path: Path, flags: str, compiler: str, machine: str,
) -> None:
    bin_dir = _bin(tmp_path, machine=machine)
    assert _detect(bin_dir, **_machine(bin_dir, flags, compiler))["cmake_args"] == "-DGGML_RPC=ON"


def test_users_amx_flags_get_the_mend_and_their_cmake_args_still_come_last(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    env = _machine(bin_dir, "avx512f", "gcc")
    found = _detect(bin_dir, CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_INT8=ON", **env)
    assert found["cmake_args"] == f"-DGGML_RPC=ON {AMX_FIX} -DGGML_NATIVE=OFF -DGGML_AMX_INT8=ON"


def test_the_mended_intrinsic_loads_a_whole_tile_config(tmp_path: Path) -> None:
    """Where this machine has AMX and GCC: a tile config filled field by field, as
    ggml-cpu/amx/mmq.cpp fills it, over a stack left full of 0xff, is loaded by ldtilecfg
    (GCC's own intrinsic let -O3 drop the fields' stores: a general protection fault)."""
    gxx = shutil.which("g++")
    if gxx is None or not cpu_has_amx():
        pytest.skip("needs g++ and a CPU with AMX")
    probe = tmp_path / "probe.cpp"
    probe.write_text(AMX_PROBE)
    binary = tmp_path / "probe"
    command = [gxx, "-O3", "-march=native", f"-include{AMX_HEADER}", str(probe), "-o", str(binary)]
    subprocess.run(command, check=True, timeout=120)
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30)
    assert (ran.returncode, ran.stdout) == (0, "loaded\n")


AMX_PROBE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

struct tile_config_t {
    uint8_t palette_id = 0;
    uint8_t start_row = 0;
    uint8_t reserved_0[14] = {0};
    uint16_t colsb[16] = {0};
    uint8_t rows[16] = {0};
};

__attribute__((noinline)) void dirty_the_stack() {
    volatile unsigned char junk[4096];
    for (int i = 0; i < 4096; i++) junk[i] = 0xff;
}

__attribute__((noinline)) void load() {
    alignas(64) tile_config_t tc = {};
    tc.palette_id = 1;
    tc.rows[0] = 8;  tc.colsb[0] = 64;
    tc.rows[2] = 16; tc.colsb[2] = 32;
    tc.rows[7] = 16; tc.colsb[7] = 64;
    _tile_loadconfig(&tc);
}

int main() {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) {
        puts("no permission");
        return 2;
    }
    dirty_the_stack();
    load();
    _tile_release();
    puts("loaded");
    return 0;
}
"""


def test_unknown_pollama_build_is_an_error_naming_the_kinds(tmp_path: Path) -> None:
    result = _run(_bin(tmp_path), "detect", POLLAMA_BUILD="rocm")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "POLLAMA_BUILD=rocm" in result.stderr
    assert "cpu cuda metal vulkan" in result.stderr


# --- install: the record in the venv decides whether to rebuild ------------------------------


def _venv(tmp_path: Path, libs: tuple[str, ...]) -> tuple[Path, Path]:
    """A fake venv with an engine made of ``libs``; its pip logs its arguments and CMAKE_ARGS."""
    venv = tmp_path / "venv"
    libdir = venv / "lib" / "python3.12" / "site-packages" / "llama_cpp" / "lib"
    libdir.mkdir(parents=True)
    for lib in libs:
        (libdir / lib).write_bytes(b"")
    (venv / "bin").mkdir()
    log = tmp_path / "pip.log"
    # The fake build "produces" the libraries of the kind asked for, as the real one would.
    _fake(venv / "bin", "pip", f"""echo "CMAKE_ARGS=$CMAKE_ARGS $*" >> {log}
touch {libdir}/libmtmd.so
case "$CMAKE_ARGS" in *GGML_RPC=ON*) touch {libdir}/libggml-rpc.so;; esac
case "$CMAKE_ARGS" in *GGML_CUDA=on*) touch {libdir}/libggml-cuda.so;; esac""")
    return venv, log


def test_installed_cpu_engine_is_recorded_without_a_rebuild(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    _fake(bin_dir, "nvcc", "true")  # this machine: a toolkit, no driver
    venv, log = _venv(
        tmp_path, ("libllama.so", "libggml-cpu.so", "libggml-rpc.so", "libmtmd.so"))
    result = _run(bin_dir, "install", str(venv))
    assert result.returncode == 0, result.stderr
    assert not log.exists()
    assert (venv / ".engine-build").read_text() == "cpu -DGGML_RPC=ON\n"
    again = _run(bin_dir, "install", str(venv))
    assert (again.returncode, again.stderr, again.stdout) == (0, "", "")


def test_a_new_gpu_driver_rebuilds_for_cuda_without_pips_cache(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    venv, log = _venv(tmp_path, ("libllama.so", "libggml-cpu.so", "libmtmd.so"))
    (venv / ".engine-build").write_text("cpu\n")
    _nvidia(bin_dir)
    result = _run(bin_dir, "install", str(venv))
    assert result.returncode == 0, result.stderr
    call = log.read_text()
    assert "CMAKE_ARGS=-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_RPC=ON " in call
    assert "--no-cache-dir" in call and "--force-reinstall" in call
    assert "llama-cpp-python==" in call
    assert (venv / ".engine-build").read_text() == (
        "cuda -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_RPC=ON\n")


def test_installed_cpu_engine_is_not_taken_for_a_cuda_one(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    _nvidia(bin_dir)
    venv, log = _venv(tmp_path, ("libllama.so", "libggml-cpu.so", "libmtmd.so"))
    assert _run(bin_dir, "install", str(venv)).returncode == 0
    assert "GGML_CUDA=on" in log.read_text()


def test_engine_without_libmtmd_is_rebuilt(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    venv, log = _venv(tmp_path, ("libllama.so", "libggml-cpu.so"))
    (venv / ".engine-build").write_text("cpu\n")
    assert _run(bin_dir, "install", str(venv)).returncode == 0
    assert "llama-cpp-python==" in log.read_text()
    assert (venv / ".engine-build").read_text() == "cpu -DGGML_RPC=ON\n"


def test_an_engine_without_rpc_is_rebuilt_from_source_not_pips_cache(tmp_path: Path) -> None:
    """A venv from before the RPC backend (record "cpu", no libggml-rpc): rebuilt, and never
    from pip's wheel cache, whose wheel of this version may be a plain build without RPC."""
    bin_dir = _bin(tmp_path)
    venv, log = _venv(tmp_path, ("libllama.so", "libggml-cpu.so", "libmtmd.so"))
    (venv / ".engine-build").write_text("cpu\n")
    result = _run(bin_dir, "install", str(venv))
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1
    assert calls[0].startswith("CMAKE_ARGS=-DGGML_RPC=ON ")
    assert "--no-cache-dir" in calls[0]
    assert (venv / ".engine-build").read_text() == "cpu -DGGML_RPC=ON\n"
    assert (_run(bin_dir, "install", str(venv)).returncode, len(log.read_text().splitlines())) == (
        0, 1)


def test_no_record_and_no_rpc_library_is_not_kept(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    venv, log = _venv(tmp_path, ("libllama.so", "libggml-cpu.so", "libmtmd.so"))
    assert _run(bin_dir, "install", str(venv)).returncode == 0
    assert "-DGGML_RPC=ON" in log.read_text()


def test_users_rpc_off_wins_and_needs_no_rpc_library(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path)
    venv, log = _venv(tmp_path, ("libllama.so", "libggml-cpu.so", "libmtmd.so"))
    want = "cpu -DGGML_RPC=ON -DGGML_RPC=OFF\n"
    (venv / ".engine-build").write_text(want)
    result = _run(bin_dir, "install", str(venv), CMAKE_ARGS="-DGGML_RPC=OFF")
    assert (result.returncode, result.stderr) == (0, "")
    assert not log.exists()
