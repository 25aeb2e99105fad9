# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   # create .venv, install, run the main job on the embedded cohort
#   make test   # create .venv, install, run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo smoke test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a looser requirement can pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/raysynth pipeline --out runs/default

smoke: $(STAMP)
	$(BIN)/raysynth pipeline --preset smoke --out runs/smoke

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/pipeline_timing.py --preset smoke

clean:
	rm -rf runs .pytest_cache
