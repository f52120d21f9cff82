# distinfer: `make demo` sets everything up and runs the built-in example; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps models demo analysis test container clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-cluster.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-cluster.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

models: setup
	$(BIN)/distinfer models build-tiny

demo: models
	$(BIN)/distinfer run configs/local-tiny.yaml --local
	$(BIN)/distinfer analyze outputs/local-tiny
	@echo "report: analysis/local-tiny/report.html"

# Tables, plots and a report for every experiment under outputs/.
analysis: setup
	@ls -d outputs/*/ >/dev/null 2>&1 || { echo "no experiments under outputs/ (run make demo first)"; exit 1; }
	$(BIN)/distinfer analyze outputs/*/

# Debian packages the tests use: shellcheck, and Slurm + munge for the real local cluster
# (scripts/local-slurm.sh installs those itself if missing). Needs root, as the Slurm daemons do.
system-deps:
	@command -v shellcheck >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck; }

test: models system-deps
	$(BIN)/python -m pytest

# The Apptainer image for GPU clusters; apptainer is not installable on the development machine.
container:
	@command -v apptainer >/dev/null || { echo "apptainer not found: build on a machine that has it (e.g. the cluster's login node)"; exit 1; }
	apptainer build distinfer.sif containers/distinfer.def

clean-outputs:
	rm -rf outputs/*/ analysis/*/
