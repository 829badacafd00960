# One command each: `make train` (the default job) and `make test` (the whole suite).
# Both create .venv and install recjax into it on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install train test lint clean gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "recjax needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

train: install
	$(BIN)/recjax train --config configs/experiments/dlrm_synthetic.yaml $(ARGS)

# one pytest worker per core (pytest-xdist), each test file on one worker (module fixtures run once);
# the 25 slowest tests are listed at the end, so the suite's time can be watched
test: install
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=25 $(ARGS)

# On a GPU host (no network, no venv: the host's jax/flax/optax; WHEELS = carried packages).
GPU_OUT ?= gpu_check
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m recjax.cli bench gpu-check --out $(GPU_OUT) $(if $(WHEELS),--wheels $(WHEELS)) $(ARGS)

lint: install
	$(BIN)/ruff check recjax tests launch

clean:
	rm -rf runs .pytest_cache
