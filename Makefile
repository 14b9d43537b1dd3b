# Two commands: `make run` starts the whole stack, `make test` runs the whole suite. Both create .venv first.
# Needs: make, Python 3.11+ with venv (Debian/Ubuntu: apt install make python3-venv). Optional: a C++ compiler and
# cmake (apt install g++ cmake), for the `llm` extra: llama.cpp, built from source once, runs a real small model.
#
# Every install comes from uv.lock (exact versions, with hashes), through a pinned uv in .uv/. `make lock` refreshes
# the lock to the newest versions pyproject.toml allows; `uv sync --locked` refuses a lock that disagrees with it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV := .uv/bin/uv
SYNC := $(UV) sync --locked --python $(PYTHON)
# llama.cpp without the build machine's CPU tuning (-march=native): the AVX2 level, no AVX-512 or AMX kernels.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: run test test-fast bench lock clean

$(UV): scripts/uv-requirements.txt
	@$(PYTHON) -m venv .uv || { rm -rf .uv; \
	    echo "'$(PYTHON) -m venv' failed: install Python 3.11+ with its venv module (apt install python3-venv)"; \
	    exit 1; }
	.uv/bin/pip install --quiet --require-hashes -r scripts/uv-requirements.txt

$(STAMP): pyproject.toml uv.lock $(UV)
	@if $(BIN)/python -c 'import llama_cpp' 2>/dev/null; then \
	    CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(SYNC) --extra test --extra llm; \
	elif command -v cmake >/dev/null && { command -v c++ || command -v g++ || command -v clang++; } >/dev/null; then \
	    echo "llama.cpp: one-time build of the llm extra started; about 10-15 min on 2 cores (then cached)"; \
	    CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(SYNC) --extra test --extra llm || { \
	    echo "llama.cpp: the build failed (see above); the llama.cpp engine is skipped, the fixed emulator serves"; \
	    $(SYNC) --extra test; }; \
	else \
	    echo "llama.cpp: no C++ compiler and cmake, so the llama.cpp engine is skipped; the fixed emulator serves"; \
	    $(SYNC) --extra test; \
	fi
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/shimmy-gateway up

# Everything, as CI runs it (.ci/run): the unit tests, then the integration tests against real stacks.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# The pure unit tests: nothing marked `stack` (stacks, Envoy, the emulator as a process, a model). Measured on an
# idle 2-core machine (2026-12-03): 54 to 58 s of pytest, 65 s with ruff and make's checks.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not stack and not slow" tests/unit

bench: $(STAMP)
	$(SYNC) --inexact --extra bench
	$(BIN)/python -m bench

# The newest versions pyproject.toml allows, written to uv.lock (commit it); one package: uv lock --upgrade-package X
lock: $(UV)
	$(UV) lock --upgrade

clean:
	rm -rf $(VENV) .uv build *.egg-info
