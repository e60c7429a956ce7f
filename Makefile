# Two commands do all set-up on a fresh machine:  make demo  and  make test.
# Both create or update the local virtualenv first: torch is pinned (constraints.txt) for every
# pip call, so no dependency can pull a multi-GB CUDA build; the rest comes from pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install --quiet --constraint constraints.txt

# Ray on one machine, quiet and on loopback; DeepSpeed's JIT-built C++ op is cached across runs.
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/spice-ray/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-fast test-drills clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/spice-ray demo

# make test: everything but the drills (about 8 min on 2 cores); CI runs both.
test: venv
	$(BIN)/pytest -m "not drill"

test-fast: venv
	$(BIN)/pytest tests/unit -m "not slow"

# the server drills: S3 (SeaweedFS) runs, ray job submit to a second head, the GPU suite's CPU dry run
test-drills: venv
	$(BIN)/pytest -m drill

clean:
	rm -rf $(VENV) runs .pytest_cache
