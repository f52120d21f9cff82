# distinfer: `make demo` sets everything up and runs the built-in example; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup models demo test clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

models: setup
	$(BIN)/distinfer models build-tiny

demo: models
	$(BIN)/distinfer run configs/local-tiny.yaml --local

test: models
	$(BIN)/python -m pytest

clean-outputs:
	rm -rf outputs/*/ analysis/*/
