#!/usr/bin/env bash
# Pack the part of the pinned llama-cpp-python sdist that a CUDA build of the engine needs
# (llama-cpp-python + libmtmd, and llama-server in the same build tree for the benchmark), so
# that it can travel to the GPU machine: that machine reaches no package index, and the whole
# sdist (77 MB) is more than the 64 MiB working tree the device tool carries.
#
# Kept: the llama-cpp-python package (pyproject, CMakeLists, llama_cpp/), and from the vendored
# llama.cpp its CMake files, ggml/ with the CPU and CUDA backends only (HIP and MUSA reuse the
# CUDA sources through their own folders, which are dropped), src/, include/, common/, vendor/,
# tools/mtmd, tools/server and tools/ui (llama-server links the UI library; no web assets are
# built or downloaded: see gpu_check.sh's CMake flags). Dropped: models/ (75 MB of test
# vocabularies), docs/, tests/, examples/, the other backends and tools.
#
# tools/CMakeLists.txt is replaced by one that adds only the server (and mtmd in a standalone
# llama.cpp build): in llama-cpp-python's build, its own CMakeLists.txt adds tools/mtmd after
# llama.cpp, so llama.cpp's tools/ must not add it a second time.
#
# Output: .gpu/engine-src.tar.xz (ignored), its size printed. Idempotent: rebuilt only when the
# sdist or this script is newer than the archive.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$BENCH_DIR")"
OUT_DIR="${POLLAMA_GPU_PACK:-$ROOT/.gpu}"
ARCHIVE="$OUT_DIR/engine-src.tar.xz"
# Fail well before the 64 MiB that the device tool carries in all (wheels and model beside it).
LIMIT_BYTES=$((20 * 1024 * 1024))

VERSION="$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -1)"
if [[ -z "$VERSION" ]]; then
    echo "could not read the llama-cpp-python==X pin from $ROOT/pyproject.toml" >&2
    exit 1
fi
NAME="llama_cpp_python-$VERSION"

# The same download place as bench/build_llama_server.sh, so the 77 MB come down once.
SDIST_DIR="$BENCH_DIR/.build/sdist"
SDIST="$SDIST_DIR/$NAME.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    PY="${PYTHON:-python3}"
    [[ -x "$ROOT/.venv/bin/python" ]] && PY="$ROOT/.venv/bin/python"
    echo "== downloading llama-cpp-python $VERSION sdist"
    mkdir -p "$SDIST_DIR"
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi

if [[ -f "$ARCHIVE" && "$ARCHIVE" -nt "$SDIST" && "$ARCHIVE" -nt "${BASH_SOURCE[0]}" ]]; then
    echo "== up to date: $ARCHIVE ($(stat -c %s "$ARCHIVE") bytes)"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Extract only the wanted top-level paths; the rest of the 77 MB is never written.
L="$NAME/vendor/llama.cpp"
echo "== extracting the needed parts of $SDIST"
tar -xzf "$SDIST" -C "$WORK" \
    "$NAME/pyproject.toml" "$NAME/CMakeLists.txt" "$NAME/README.md" "$NAME/LICENSE.md" \
    "$NAME/PKG-INFO" "$NAME/llama_cpp" \
    "$L/CMakeLists.txt" "$L/LICENSE" "$L/licenses" "$L/cmake" "$L/ggml" "$L/src" \
    "$L/include" "$L/common" "$L/vendor" "$L/tools/CMakeLists.txt" "$L/tools/mtmd" \
    "$L/tools/server" "$L/tools/ui" "$L/scripts/ui-assets.cmake"

SRC="$WORK/$L"
# Backends other than CPU and CUDA: ggml adds a backend's folder only when its GGML_<NAME>
# option is on, so their absence is harmless for a CPU or CUDA configure.
for dir in "$SRC"/ggml/src/ggml-*/; do
    case "$(basename "$dir")" in
        ggml-cpu | ggml-cuda) ;;
        *) rm -rf "$dir" ;;
    esac
done
# Tests and the UI's JavaScript tooling are not built.
rm -rf "$SRC/tools/server/tests" "$SRC/tools/server/bench" "$SRC/tools/ui/tests" \
    "$SRC/tools/ui/package-lock.json" "$SRC/tools/mtmd/tests" "$WORK/$NAME/llama_cpp/server"
# llama_cpp/server is llama-cpp-python's own OpenAI server (FastAPI); pollama never imports it.

cat >"$SRC/tools/CMakeLists.txt" <<'EOF'
# Trimmed by pollama's bench/pack_engine_sources.sh: only the tools the GPU check builds.
find_package(Threads REQUIRED)
llama_add_compile_flags()
if (LLAMA_BUILD_SERVER)
    add_subdirectory(ui)
    add_subdirectory(server)
endif()
# llama-cpp-python's CMakeLists.txt adds tools/mtmd itself after llama.cpp; a standalone
# llama.cpp build (LLAMA_STANDALONE) needs it here.
if (LLAMA_STANDALONE)
    add_subdirectory(mtmd)
endif()
EOF

mkdir -p "$OUT_DIR"
# xz -9: the archive is made once and unpacked once; size matters, time hardly.
tar -C "$WORK" -cf - "$NAME" | xz -9 -T0 >"$ARCHIVE.partial"
mv "$ARCHIVE.partial" "$ARCHIVE"
SIZE="$(stat -c %s "$ARCHIVE")"
echo "== packed $ARCHIVE: $SIZE bytes ($(du -sh "$WORK/$NAME" | cut -f1) unpacked)"
if ((SIZE > LIMIT_BYTES)); then
    echo "the archive is over $LIMIT_BYTES bytes: too much for the device tool's carry" >&2
    exit 1
fi
