# reptile_gen — every target installs what it needs into .venv first.
# CPU machines get the CPU torch wheel (pinned, so pip never pulls a multi-GB CUDA build).
# GPU machines: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu126 EXTRAS=dev,data,slurm,sweep,vision

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,data,slurm,sweep
STAMP := $(VENV)/.installed
ARGS ?=
# the main job that `make train` runs: Reptile on `ls -l` lines, then the LSTM baseline for
# the same wall-clock (conf/experiment/listing.yaml); the pydoc prose job: TRAIN_JOB=experiment=text_quick
TRAIN_JOB ?= experiment=listing

.DEFAULT_GOAL := help
.PHONY: help install train test test-full bench bench-full lint format clean slurm-up slurm-down

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package (torch pinned, CPU wheel by default)

train: $(STAMP) ## run the main job (a text model of ls -l lines vs the LSTM, <10 min on 2 cores with install); Hydra overrides via ARGS="..."
	$(PY) -m reptile_gen.train $(TRAIN_JOB) $(ARGS)

test: $(STAMP) slurm-up ## the CI suite (fast; slow tests excluded); as root first starts a local Slurm cluster (slurm-up; apt-installs slurm-wlm, munge), stop it with `make slurm-down`
	$(PY) -m pytest -q $(ARGS)
	@echo "the local Slurm test cluster (if started) keeps running: make slurm-down stops it"

test-full: $(STAMP) slurm-up ## every test, slow ones included (starts the Slurm cluster as `make test` does)
	$(PY) -m pytest -q -m "" $(ARGS)
	@echo "the local Slurm test cluster (if started) keeps running: make slurm-down stops it"

bench: $(STAMP) ## every benchmark workload, quick mode (~15 min), JSON in benchmarks/results/
	$(PY) -m benchmarks.run $(ARGS)

bench-full: $(STAMP) ## every benchmark workload in full (more repeats, whole sequences: hours)
	$(PY) -m benchmarks.run --full $(ARGS)

# The Slurm tests need a cluster: as root this installs slurm-wlm and munge (apt; it says so
# before, SLURM_CLUSTER_INSTALL=0 skips the install) and starts a one-node cluster on
# localhost; otherwise it says why and the Slurm tests skip. `make slurm-down` stops it.
slurm-up: ## start the one-node Slurm cluster of the tests (root; apt-installs slurm-wlm, munge; SLURM_CLUSTER_INSTALL=0: never)
	bash scripts/slurm_cluster.sh start --if-possible

slurm-down: ## stop the Slurm cluster that `make test` / `make slurm-up` started
	bash scripts/slurm_cluster.sh stop

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check reptile_gen tests benchmarks
	$(VENV)/bin/ruff format --check reptile_gen tests benchmarks

format: $(STAMP) ## ruff autofix and format
	$(VENV)/bin/ruff check --fix reptile_gen tests benchmarks
	$(VENV)/bin/ruff format reptile_gen tests benchmarks

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf outputs/* .pytest_cache .ruff_cache benchmarks/results build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
