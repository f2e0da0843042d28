# Quickstart: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
# torch is installed first, pinned, so pip never resolves a multi-GB CUDA build on a CPU machine.
# Override for another build, e.g.  make test TORCH_SPEC="torch==2.13.0+cu128"  or  TORCH_SPEC=torch make test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.descend-installed

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/descend compare

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow" -n 2

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
