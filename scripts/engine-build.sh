#!/usr/bin/env bash
# Which llama.cpp build pollama's engine (llama-cpp-python) gets on this machine, and (re)build
# it when the installed one is of another kind. Run by `make install`, outside pollama's venv.
#
#   scripts/engine-build.sh detect         prints kind=<cpu|cuda|metal|vulkan> and
#                                          cmake_args=<what llama-cpp-python's CMAKE_ARGS gets>
#   scripts/engine-build.sh install VENV   installs or rebuilds llama-cpp-python in VENV for that
#                                          kind; quiet when the installed engine is already it
#
# The kind: POLLAMA_BUILD=cpu|cuda|metal|vulkan when set; else CUDA when nvcc and the NVIDIA
# driver (nvidia-smi) are found, Metal on Apple silicon, Vulkan when glslc and the Vulkan SDK
# are found, the CPU otherwise. nvcc alone is not enough: a CUDA toolkit without a driver (a
# container image, a CI machine) would build an engine that cannot load, so it builds for the
# CPU and says how to force CUDA (POLLAMA_BUILD=cuda, e.g. to build for another machine).
#
# The kind and its CMake arguments are recorded in VENV/.engine-build. A different record (a
# new POLLAMA_BUILD, a machine that newly has the driver) rebuilds from source with pip's cache
# off, because pip's wheel cache is keyed by version, not by CMAKE_ARGS, and would hand back the
# wheel of another kind (or one built without RPC). Without a record, an installed engine whose
# libraries match the kind (no libggml-cuda/-vulkan/-metal for the CPU) and that has libggml-rpc
# is kept and the record written: no rebuild.
set -euo pipefail

KINDS="cpu cuda metal vulkan"
# Folders searched after PATH for nvcc and nvidia-smi (the usual toolkit and driver places
# that are often off PATH). Tests set it empty to see only their fake PATH.
TOOL_DIRS="${POLLAMA_TOOL_DIRS-/usr/local/cuda/bin /usr/local/nvidia/bin}"

note() { echo "engine-build: $*" >&2; }

# GCC's AMX tile-config intrinsic is wrong (scripts/gcc-amx-tilecfg.h says how): an engine
# built with it on a CPU with AMX crashes at its first decode. This header, forced into every
# C++ file, mends it. Its absolute path goes into the CMake arguments and so into the record:
# a checkout moved elsewhere rebuilds on such a machine.
HERE="${BASH_SOURCE[0]%/*}"
[[ "$HERE" == "${BASH_SOURCE[0]}" ]] && HERE=.
AMX_FIX="$(cd "$HERE" && pwd)/gcc-amx-tilecfg.h"

# compiles_amx_with_gcc: llama.cpp's AMX kernels will be built, by GCC. They are built by
# -march=native on a CPU whose flags have amx_tile (POLLAMA_CPUINFO: another cpuinfo, for the
# tests), or when the user's CMAKE_ARGS turn them on; the C++ compiler is $CXX or c++.
compiles_amx_with_gcc() {
    local source="${POLLAMA_CPUINFO:-/proc/cpuinfo}" cpuinfo="" macros
    [[ "$(uname -m)" == x86_64 ]] || return 1
    [[ -r "$source" ]] && cpuinfo="$(<"$source")"
    [[ "$cpuinfo" =~ [[:space:]]amx_tile([[:space:]]|$) || "${CMAKE_ARGS:-}" == *GGML_AMX* ]] ||
        return 1
    macros="$("${CXX:-c++}" -dM -E -x c++ /dev/null 2>/dev/null)" || return 1
    [[ "$macros" == *" __GNUC__ "* && "$macros" != *" __clang__ "* ]]
}

# find_tool NAME: the path of NAME on PATH or in TOOL_DIRS, or nothing.
find_tool() {
    local found dir
    if found="$(command -v "$1" 2>/dev/null)"; then
        echo "$found"
        return
    fi
    for dir in $TOOL_DIRS; do
        if [[ -x "$dir/$1" ]]; then
            echo "$dir/$1"
            return
        fi
    done
}

# cuda_archs NVIDIA_SMI: the GPUs' compute capabilities as CMake wants them ("9.0" -> "90";
# several distinct GPUs -> "86;90"), or nothing when nvidia-smi cannot say.
cuda_archs() {
    local line cap archs=""
    while IFS= read -r line; do
        cap="${line//[[:space:]]/}"
        [[ "$cap" =~ ^[0-9]+\.[0-9]+$ ]] || continue
        cap="${cap/./}"
        [[ ";$archs;" == *";$cap;"* ]] || archs="${archs:+$archs;}$cap"
    done < <("$1" --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true)
    echo "$archs"
}

has_vulkan_sdk() {
    [[ -n "$(find_tool glslc)" ]] || return 1
    [[ -n "${VULKAN_SDK:-}" ]] && return 0
    command -v pkg-config >/dev/null 2>&1 && pkg-config --exists vulkan
}

# Sets KIND and CMAKE (the CMake arguments for llama-cpp-python).
detect() {
    local nvcc nvsmi archs os arch
    nvcc="$(find_tool nvcc)"
    nvsmi="$(find_tool nvidia-smi)"
    os="$(uname -s)"
    arch="$(uname -m)"
    KIND="${POLLAMA_BUILD:-}"
    if [[ -n "$KIND" ]]; then
        if [[ " $KINDS " != *" $KIND "* ]]; then
            note "POLLAMA_BUILD=$KIND is not one of: $KINDS"
            exit 2
        fi
    elif [[ -n "$nvcc" && -n "$nvsmi" ]]; then
        KIND=cuda
    elif [[ "$os" == Darwin && "$arch" == arm64 ]]; then
        KIND=metal
    elif has_vulkan_sdk; then
        KIND=vulkan
    else
        KIND=cpu
        [[ -n "$nvcc" ]] && REASON="nvcc ($nvcc) but no NVIDIA driver (nvidia-smi) found: \
building for the CPU; POLLAMA_BUILD=cuda builds for CUDA anyway"
    fi
    CMAKE=""
    case "$KIND" in
        cuda)
            CMAKE="-DGGML_CUDA=on"
            # nvcc off PATH: CMake would not find it by itself.
            if [[ -n "$nvcc" && "$nvcc" != "$(command -v nvcc 2>/dev/null || true)" ]]; then
                CMAKE="$CMAKE -DCMAKE_CUDA_COMPILER=$nvcc"
            fi
            # This machine's GPUs alone: a build for every architecture llama.cpp supports
            # takes several times longer. Without nvidia-smi, llama.cpp's default list.
            archs=""
            [[ -n "$nvsmi" ]] && archs="$(cuda_archs "$nvsmi")"
            [[ -n "$archs" ]] && CMAKE="$CMAKE -DCMAKE_CUDA_ARCHITECTURES=$archs"
            ;;
        metal) CMAKE="-DGGML_METAL=on" ;;
        vulkan) CMAKE="-DGGML_VULKAN=on" ;;
        cpu) ;;
    esac
    # Every kind gets llama.cpp's RPC backend (libggml-rpc): `pollama rpc` serves this
    # machine's devices with it, and OLLAMA_RPC_SERVERS adds remote ones (README.md#rpc).
    CMAKE="${CMAKE:+$CMAKE }-DGGML_RPC=ON"
    if compiles_amx_with_gcc; then
        if [[ "$AMX_FIX" =~ [[:space:]] ]]; then
            note "cannot mend GCC's AMX intrinsic from a path with spaces ($AMX_FIX): the \
engine may crash at its first decode; move the checkout or set CXX=clang++"
        else
            CMAKE="$CMAKE -DCMAKE_CXX_FLAGS=-include$AMX_FIX"
        fi
    fi
    # The user's own CMAKE_ARGS (a BLAS, another backend) go last, so they win, and into the
    # record, so changing them rebuilds too.
    if [[ -n "${CMAKE_ARGS:-}" ]]; then
        CMAKE="${CMAKE:+$CMAKE }$CMAKE_ARGS"
    fi
}

# installed_kind LIBDIR: the kind of the engine whose libraries are in LIBDIR.
installed_kind() {
    local kind
    for kind in cuda vulkan metal; do
        if compgen -G "$1/libggml-$kind.*" >/dev/null; then
            echo "$kind"
            return
        fi
    done
    echo cpu
}

lib_dir() {
    compgen -G "$1/lib/python*/site-packages/llama_cpp/lib" | head -1 || true
}

install() {
    local venv="$1" record want libdir version
    record="$venv/.engine-build"
    want="$KIND${CMAKE:+ $CMAKE}"
    libdir="$(lib_dir "$venv")"
    # Up to date: the same record, and the engine with libmtmd (images, audio) and the RPC
    # backend is there.
    if [[ -n "$libdir" && -f "$record" && "$(cat "$record")" == "$want" ]] &&
        has_libs "$libdir"; then
        return
    fi
    [[ -n "${REASON:-}" ]] && note "$REASON"
    # No record yet (a venv made before this script): keep an engine that is already this
    # kind rather than spend minutes rebuilding it.
    if [[ -n "$libdir" && ! -f "$record" && -z "${CMAKE_ARGS:-}" ]] &&
        engine_is "$venv" "$KIND"; then
        note "the installed engine is the $KIND kind; recorded in $record"
        echo "$want" >"$record"
        return
    fi
    version="$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml | head -1)"
    [[ -n "$version" ]] || { note "no llama-cpp-python==X pin in pyproject.toml"; exit 1; }
    # Never from pip's wheel cache, not even for the CPU: a cached wheel of this version may be
    # a plain `pip install` one, without the RPC backend.
    note "building llama-cpp-python $version for $KIND (CMAKE_ARGS='$CMAKE'); \
the CPU takes ~5 min on 2 cores, CUDA much longer (README.md#gpu)"
    pip_engine "$venv" "$version" --no-cache-dir
    if ! engine_is "$venv" "$KIND"; then
        note "the build finished without libmtmd, libggml-rpc or the $KIND backend in $venv"
        exit 1
    fi
    echo "$want" >"$record"
}

# pip_engine VENV VERSION [PIP_OPTION]: (re)install llama-cpp-python with this kind's CMake
# arguments, on all cores unless CMAKE_BUILD_PARALLEL_LEVEL says otherwise.
pip_engine() {
    local jobs
    jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
    # shellcheck disable=SC2086  # $3 is one option or nothing
    CMAKE_ARGS="$CMAKE" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
        "$1/bin/pip" install --no-deps --force-reinstall $3 "llama-cpp-python==$2"
}

# has_libs LIBDIR: libmtmd is there, and libggml-rpc too unless the user's CMAKE_ARGS turn
# GGML_RPC off (they come last, so they win).
has_libs() {
    compgen -G "$1/libmtmd.*" >/dev/null || return 1
    [[ "$CMAKE" == *-DGGML_RPC=[Oo][Ff][Ff]* ]] || compgen -G "$1/libggml-rpc.*" >/dev/null
}

# engine_is VENV KIND: the installed engine has libmtmd and libggml-rpc and is of KIND. On macOS
# llama-cpp-python always builds Metal in, so any kind is taken there once built.
engine_is() {
    local libdir
    libdir="$(lib_dir "$1")"
    [[ -n "$libdir" ]] && has_libs "$libdir" || return 1
    [[ "$(uname -s)" == Darwin || "$(installed_kind "$libdir")" == "$2" ]]
}

REASON=""
case "${1:-}" in
    detect)
        detect
        [[ -n "$REASON" ]] && note "$REASON"
        echo "kind=$KIND"
        echo "cmake_args=$CMAKE"
        ;;
    install)
        [[ -n "${2:-}" ]] || { note "usage: $0 install VENV"; exit 2; }
        detect
        install "$2"
        ;;
    *)
        note "usage: $0 detect | install VENV"
        exit 2
        ;;
esac
