#!/usr/bin/env bash
# Download, for the GPU machine's Python (3.12, x86-64 manylinux), the wheels of the packages
# pollama needs that its image lacks (/work/.library/device/KINDS.md lists what it has). That
# machine reaches no package index, so bench/gpu_check.sh installs these with --no-index.
#
# Versions are those of this checkout's .venv, where the CPU tests ran, so the GPU check runs the
# same library code; without a .venv, pip's newest. typing-extensions is carried although the
# image has it: pydantic-core needs a recent one and the image's version is not known here.
#
# Output: .whl/*.whl (ignored), the total printed. Idempotent: pip skips what is there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
# The device tool carries 64 MiB in all; the engine sources (~5 MB) travel beside these.
LIMIT_BYTES=$((40 * 1024 * 1024))

PACKAGES=(
    annotated-types cffi cryptography diskcache fastapi gguf llguidance opentelemetry-api
    prompt-toolkit pycparser pydantic pydantic-core pydantic-settings python-dotenv rapidfuzz
    starlette typing-extensions typing-inspection uvicorn wcwidth
)

PY=python3
[[ -x "$ROOT/.venv/bin/python" ]] && PY="$ROOT/.venv/bin/python"

specs=()
for name in "${PACKAGES[@]}"; do
    version="$("$PY" -c 'import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass' "$name")"
    specs+=("$name${version:+==$version}")
done

mkdir -p "$DEST"
# One wheel per package (two versions of one would stop the install there): drop stale ones.
for spec in "${specs[@]}"; do
    name="${spec%%==*}"
    stem="${name//-/_}"
    for old in "$DEST/$stem"-*.whl; do
        [[ -e "$old" ]] || continue
        [[ "$spec" == *==* && "$(basename "$old")" == "$stem-${spec#*==}-"* ]] || rm -f "$old"
    done
done

echo "== downloading ${#specs[@]} wheels for CPython 3.12 x86-64 into $DEST"
# The platform list is the device README's: pip matches manylinux_2_N exactly.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_35_x86_64 -d "$DEST" "${specs[@]}"

TOTAL="$(cat "$DEST"/*.whl | wc -c)"
echo "== $(find "$DEST" -name '*.whl' | wc -l) wheels, $TOTAL bytes in $DEST"
if ((TOTAL > LIMIT_BYTES)); then
    echo "the wheels are over $LIMIT_BYTES bytes: too much for the device tool's carry" >&2
    exit 1
fi
