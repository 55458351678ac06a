#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp sources vendored in the pinned
# llama-cpp-python sdist, so the benchmark compares pollama with the very kernels it runs.
# Idempotent: the download, the extraction and the cmake build are each skipped when done.
# Output: bench/.build/llama-server (a symlink to the built binary). Needs cmake, gcc/g++, pip.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$BENCH_DIR")"
BUILD_ROOT="$BENCH_DIR/.build"
JOBS="${JOBS:-2}"

VERSION="$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -1)"
if [[ -z "$VERSION" ]]; then
    echo "could not read the llama-cpp-python==X pin from $ROOT/pyproject.toml" >&2
    exit 1
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

# The C++ flags the engine's CPU build gets (GCC's AMX intrinsic mended, scripts/engine-build.sh),
# so that llama-server runs the same kernels and does not crash where pollama's engine would not;
# a build tree of its own when there are any.
CXX_FLAGS="$(POLLAMA_BUILD=cpu "$ROOT/scripts/engine-build.sh" detect 2>/dev/null |
    sed -n 's/^cmake_args=.*-DCMAKE_CXX_FLAGS=\([^ ]*\).*/\1/p')"

SDIST_DIR="$BUILD_ROOT/sdist"
SRC_DIR="$BUILD_ROOT/llama_cpp_python-$VERSION"
CMAKE_DIR="$BUILD_ROOT/llama-server-$VERSION${CXX_FLAGS:+-mended}"
mkdir -p "$SDIST_DIR"

SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    echo "== downloading llama-cpp-python $VERSION sdist"
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi

if [[ ! -f "$SRC_DIR/vendor/llama.cpp/CMakeLists.txt" ]]; then
    echo "== extracting $SDIST"
    tar -xzf "$SDIST" -C "$BUILD_ROOT"
fi
LLAMA_SRC="$SRC_DIR/vendor/llama.cpp"

if [[ ! -f "$CMAKE_DIR/CMakeCache.txt" ]]; then
    echo "== configuring (Release, GGML_NATIVE=ON, LLAMA_CURL=OFF)"
    cmake -S "$LLAMA_SRC" -B "$CMAKE_DIR" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF \
        ${CXX_FLAGS:+"-DCMAKE_CXX_FLAGS=$CXX_FLAGS"}
fi

echo "== building llama-server (-j$JOBS)"
cmake --build "$CMAKE_DIR" --target llama-server -j "$JOBS"

BIN="$CMAKE_DIR/bin/llama-server"
if [[ ! -x "$BIN" ]]; then
    echo "build finished but $BIN is missing" >&2
    exit 1
fi
ln -sfn "$BIN" "$BUILD_ROOT/llama-server"
echo "$VERSION" > "$BUILD_ROOT/llama-server.version"
echo "== done: $BUILD_ROOT/llama-server (llama.cpp from llama-cpp-python $VERSION)"
