# Two commands do everything on a fresh machine:
#   make repro   set up, then run the pipeline on the tiny default spec (dvc repro, one stage per core at once)
#   make test    set up, then run the default test suite
# Set-up is idempotent: the venv is rebuilt only when pyproject.toml changes.

VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTHON ?= python3.11

.PHONY: setup repro test test-slow lint docs tesseract git-ready

setup: $(STAMP) tesseract git-ready

# torch is pinned in the same install: an unpinned one (accelerate asks for torch) pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

tesseract:
	@command -v tesseract >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq tesseract-ocr; }

# dvc needs a git repository with a commit (dvc exp) and an identity to commit experiments.
git-ready:
	@git rev-parse --git-dir >/dev/null 2>&1 || { git init -q && git add -A && git -c user.name=flowopd -c user.email=flowopd@localhost commit -qm "initial"; }
	@git config user.email >/dev/null || git config user.email flowopd@localhost
	@git config user.name >/dev/null || git config user.name flowopd

# `pipeline run` is `dvc repro` with independent stages side by side (JOBS, default one per core); its stage
# commands call `python`: the venv's, whatever the caller's PATH says. Plain `dvc repro` gives the same artifacts.
JOBS ?=
repro: setup
	$(BIN)/flowopd pipeline write
	$(BIN)/flowopd pipeline run $(if $(JOBS),-j $(JOBS))

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

test-slow: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -m slow

lint: setup docs
	$(BIN)/ruff check flowopd stages tests benchmarks

# The docs site (docs/, mkdocs.yml): --strict turns a broken link or anchor into an error.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
