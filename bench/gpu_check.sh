#!/usr/bin/env bash
# The prepared GPU check of issue 15, for ONE call of the device tool (an H200; no package
# index; 10 minutes a command): build the CUDA engine for this GPU alone from the carried
# sources, install pollama, make the stand-in Qwen2.5-Coder-0.5B, check offload through the real
# server (100% GPU, a num_gpu 8 split, an answer, a hidden GPU), and benchmark pollama against
# llama-server from the same build. Every phase is timed. README.md#gpu says how to run it.
#
# Needs, carried: .gpu/ (bench/pack_engine_sources.sh, bench/gguf_synth.py pack) and .whl/
# (bench/pack_wheels.sh). Writes to $OUT (the device tool's; else bench/.build/gpu-check):
# summary.md, results.json, console.log, logs.tar.gz - four files, as the tool returns 8 at most.
#
# Idempotent on a warm machine: the build tree, the unpacked sources and the model stay in
# $WORK (/tmp/pollama-gpu), so a second run right after a failed one rebuilds only what changed.
#
# Dry run without a GPU: POLLAMA_BUILD=cpu PYTHON=<a python with scikit-build-core and pollama's
# dependencies> SKIP_WHEELS=1 bench/gpu_check.sh - the same steps, the checks expecting the CPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/bench/.build/gpu-check}"
WORK="${WORK:-/tmp/pollama-gpu}"
PY="${PYTHON:-python3}"
SITE="$WORK/site"
LOGS="$WORK/logs"
PHASES="$WORK/phases.tsv"
mkdir -p "$OUT" "$WORK" "$LOGS" "$SITE"
: >"$PHASES"
exec > >(tee "$OUT/console.log") 2>&1

# phase NAME COMMAND...: run one phase, log its wall time; a failed phase ends the run (the
# later ones need it), after the results so far are packed into $OUT.
phase() {
    local name="$1" t0 rc=0
    shift
    echo "=== $name"
    t0="$EPOCHREALTIME"
    # set -e does not reach into a function run under ||: each phase checks its own steps.
    "$@" || rc=$?
    awk -v a="$t0" -v b="$EPOCHREALTIME" -v n="$name" -v rc="$rc" 'BEGIN {
        printf "%s\t%.1f%s\n", n, b - a, (rc == 0 ? "" : " (failed: " rc ")") }' >>"$PHASES"
    if [[ $rc != 0 ]]; then
        echo "=== $name failed ($rc)"
        finish
        exit "$rc"
    fi
}

finish() {
    cat "$PHASES"
    cp "$PHASES" "$LOGS/phases.tsv"
    tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs
}

env_report() {
    nvidia-smi || echo "no nvidia-smi"
    nvidia-smi --query-gpu=name,compute_cap,memory.total,memory.free,driver_version \
        --format=csv || true
    for nvcc in nvcc /usr/local/cuda/bin/nvcc; do
        command -v "$nvcc" && "$nvcc" --version && break
    done || true
    "$PY" --version
    cmake --version | head -1
    echo "cpus: $(nproc)"
    scripts/engine-build.sh detect | tee "$WORK/engine.env"
}

install_wheels() {
    # The README's recipe for carried wheels: no index, no dependency resolution.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
}

build_engine() {
    local cmake_args src
    cmake_args="$(sed -n 's/^cmake_args=//p' "$WORK/engine.env")"
    src="$WORK/src/$(tar -tJf .gpu/engine-src.tar.xz | head -1 | cut -d/ -f1)"
    if [[ ! -d "$src" ]]; then
        mkdir -p "$WORK/src"
        tar -xJf .gpu/engine-src.tar.xz -C "$WORK/src" || return 1
    fi
    # make install's flags (engine-build.sh), plus llama-server in the same CMake tree: the
    # benchmark's reference then runs the very libraries pollama loads, built once. No web UI
    # is built or downloaded (no network there).
    cmake_args="$cmake_args -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON"
    cmake_args="$cmake_args -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF"
    echo "CMAKE_ARGS=$cmake_args"
    # --no-build-isolation: scikit-build-core, cmake and ninja come from the image.
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir \
        --upgrade --target "$SITE" -C "build-dir=$WORK/build" "$src" >"$LOGS/build.log" 2>&1 ||
        { tail -60 "$LOGS/build.log"; return 1; }
    grep -E "CUDA Toolkit found|Including .* backend|CMAKE_CUDA_ARCHITECTURES|Using CUDA arch" \
        "$LOGS/build.log" | head -20 || true
    ls "$SITE/llama_cpp/lib"
    compgen -G "$SITE/llama_cpp/lib/libmtmd.*" >/dev/null || { echo "no libmtmd"; return 1; }
    if grep -q "GGML_CUDA=on" <<<"$cmake_args"; then
        compgen -G "$SITE/llama_cpp/lib/libggml-cuda.*" >/dev/null ||
            { echo "no libggml-cuda"; return 1; }
    fi
    ln -sfn "$(find "$WORK/build" -type f -name llama-server -perm -u+x | head -1)" \
        "$WORK/llama-server"
    "$WORK/llama-server" --version
}

install_pollama() {
    # Needs setuptools and wheel from the image; without them the checkout's src/ serves.
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --upgrade --target "$SITE" "$ROOT"; then
        echo "pip could not install pollama: using $ROOT/src through PYTHONPATH"
        export PYTHONPATH="$ROOT/src:$PYTHONPATH"
    fi
    "$PY" -c "import pollama, llama_cpp; print('pollama', pollama.__version__, \
'llama_cpp', llama_cpp.__version__, llama_cpp.__file__)"
}

make_model() {
    [[ -f "$WORK/standin.gguf" ]] || "$PY" bench/gguf_synth.py make .gpu "$WORK/standin.gguf"
}

checks() {
    local expect=cuda
    grep -q "^kind=cuda" "$WORK/engine.env" || expect=cpu
    # The checks' own failures are in summary.md; the run still counts as done.
    PYTHONUNBUFFERED=1 "$PY" bench/gpu_check.py --model "$WORK/standin.gguf" \
        --llama-server "$WORK/llama-server" --out "$OUT" --logs "$LOGS" --expect "$expect" \
        --phases "$PHASES" ${GPU_CHECK_ARGS:-} || echo "=== some checks failed"
}

# pip --target installs are seen through PYTHONPATH, ahead of the image's own packages.
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
phase env env_report
if [[ "${SKIP_WHEELS:-0}" != 1 ]]; then phase wheels install_wheels; fi
phase engine build_engine
phase pollama install_pollama
phase model make_model
phase checks checks
finish
