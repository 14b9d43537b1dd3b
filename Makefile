# Two commands: `make run` starts the whole stack, `make test` runs the whole suite. Both create .venv first.
# Needs: make, Python 3.11+ with venv (Debian/Ubuntu: apt install make python3-venv). Optional: a C++ compiler and
# cmake (apt install g++ cmake), for the `llm` extra: llama.cpp, built from source once, runs a real small model.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	    echo "'$(PYTHON) -m venv' failed: install Python 3.11+ with its venv module (apt install python3-venv)"; \
	    exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@if $(BIN)/python -c 'import llama_cpp' 2>/dev/null; then \
	    $(BIN)/pip install --quiet -e '.[test,llm]'; \
	elif command -v cmake >/dev/null && { command -v c++ || command -v g++ || command -v clang++; } >/dev/null; then \
	    echo "llama.cpp: one-time build of the llm extra started; about 10-15 min on 2 cores (then cached)"; \
	    $(BIN)/pip install --quiet -e '.[test,llm]' || \
	    echo "llama.cpp: the build failed (see above); the llama.cpp engine is skipped, the fixed emulator serves"; \
	else \
	    echo "llama.cpp: no C++ compiler and cmake, so the llama.cpp engine is skipped; the fixed emulator serves"; \
	fi
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/shimmy-gateway up

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info
