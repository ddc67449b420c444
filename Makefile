# Set-up and the two everyday commands. `make demo` and `make test` create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
# Optional index for torch alone, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu; empty: pip's own settings.
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned. On the project's machines pip's find-links resolve it to a local CPU wheel; PyPI's
	# Linux wheel is the CUDA build, so elsewhere set TORCH_INDEX for the CPU one.
	$(BIN)/python -m pip install --quiet$(if $(TORCH_INDEX), --index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/harness run +sweep=demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check harness engines hydra_plugins tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
