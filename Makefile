# Two commands do all set-up on a fresh machine:  make demo  and  make test.
# Both create or update the local virtualenv first, as exactly requirements.lock (written by uv:
# make lock), so every machine, every CI run and every month builds the same environment.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
UV := $(BIN)/uv
UV_VERSION := $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' $(LOCK))
# torch's CPU wheel: this machine's wheel folder when it has one, else the PyTorch CPU index.
TORCH_CPU := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)

# Ray on one machine, quiet and on loopback; DeepSpeed's JIT-built C++ op is cached across runs.
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/spice-ray/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-fast test-drills lock lock-drift clean

venv: $(STAMP)

# pip bootstraps the lock's uv; uv then makes the virtualenv exactly the lock (removing anything
# else, hashes checked) and installs the project itself editable, with no resolution and no build
# isolation (setuptools comes from the lock too).
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(UV) pip sync --quiet --python $(BIN)/python $(TORCH_CPU) $(LOCK)
	$(UV) pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation -e .
	touch $@

# Re-resolve pyproject.toml into requirements.lock and cluster/requirements.lock, keeping every
# locked version that still fits (scripts/lock.sh --upgrade-package NAME to move one).
lock:
	test -x $(UV) || $(MAKE) venv
	scripts/lock.sh

# What newer releases would change, without touching the locks (not part of make test).
lock-drift: venv
	scripts/lock_drift.sh

demo: venv
	$(BIN)/spice-ray demo

# make test: everything but the drills (about 14 min on 2 cores); CI runs both (about 32 min).
test: venv
	$(BIN)/pytest -m "not drill"

test-fast: venv
	$(BIN)/pytest tests/unit -m "not slow"

# the server drills: S3 (SeaweedFS) runs, ray job submit to a second head, two Ray nodes, the GPU suite's CPU dry run
test-drills: venv
	$(BIN)/pytest -m drill

clean:
	rm -rf $(VENV) runs .pytest_cache
