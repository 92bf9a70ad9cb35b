# One entry point for a fresh machine: `make run` (install + pretrain on the embedded default)
# and `make test` (install + test suite). Both create .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin the CPU torch build; `make setup CONSTRAINTS=` skips it (bring your own torch).
GPU := $(shell command -v nvidia-smi 2>/dev/null)
CONSTRAINTS ?= $(if $(GPU),,constraints/cpu.txt)
comma := ,
# DeepSpeed JIT-compiles its ops once per machine; keep them in one project-owned place.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup run lint test speech docs clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard constraints/*.txt)
	@command -v g++ >/dev/null || { echo "g++ is needed for DeepSpeed's JIT ops: apt-get install -y g++"; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test,docs$(if $(GPU),$(comma)gpu)]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(PY) -c "import torch, deepspeed, submitit, hydra, webdataset, mlflow, av"
	touch $@

run: setup
	$(PY) launch/pretrain.py $(ARGS)

# espeak-ng speaks the digits of tools/make_av_digits.py (Debian's package; the tests need it)
speech:
	@command -v espeak-ng >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "install espeak-ng with your package manager"; exit 1; }; \
	  echo "installing espeak-ng"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null 2>&1 || { \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null; }; }

# The manual as a site (mkdocs-material) in .cache/site; --strict: a broken link or a page left
# out of the navigation fails
docs: setup
	$(VENV)/bin/mkdocs build --strict --quiet

# Lint, format and strict types on pemt/, before the tests
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Test files run side by side: a launch waits on processes, the scheduler and servers much of its
# time. One worker runs a whole file, so a module fixture (the Slurm cluster on fixed ports) starts
# once; files go out in conftest's order, slowest first, so no long file is left to run alone.
TEST_WORKERS ?= auto
test: lint speech
	$(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf outputs .cache
