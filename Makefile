# Quickstart: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
# torch is installed first, pinned, so pip never resolves a multi-GB CUDA build on a CPU machine.
# Another build: any pip requirement, e.g.  make test TORCH_SPEC="torch==2.13.0+cu128"  or  make test TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.descend-installed
DOCS_STAMP := $(VENV)/.descend-docs-installed
INTEGRATIONS_STAMP := $(VENV)/.descend-integrations-installed

.PHONY: install demo test test-slow docs bench clean

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
	$(BIN)/ruff check src tests benchmarks examples docs/hooks.py docs/layout.py
	$(BIN)/python -m pytest -q -m "not slow" -n 2

# the slow suite also runs descend inside Lightning and HF Trainer: the `integrations` extra, installed with the
# torch already in the environment pinned as a constraint, so that nothing upgrades it
$(INTEGRATIONS_STAMP): $(STAMP)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,integrations]"
	touch $(INTEGRATIONS_STAMP)

test-slow: $(INTEGRATIONS_STAMP)
	$(BIN)/python -m pytest -q -m slow

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,docs]"
	touch $(DOCS_STAMP)

# the site, built strictly (a broken internal link, a page missing from the nav or a docstring the API pages
# cannot render fails the build) into site/; docs/hooks.py generates the CLI reference and the performance tables
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: install
	$(BIN)/python benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) build dist site .pytest_cache .ruff_cache
