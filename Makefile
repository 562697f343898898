# Set-up and entry points. `make demo`: install into .venv and run the embedded default;
# `make test`: install into .venv and run the tests. Both are idempotent.

PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
# PyTorch first and pinned, so the package's `torch>=2.5` never pulls another build (on a
# machine without a local CPU wheel: make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu")
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DATASET ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.sigmoid-sc-installed
SNAKEMAKE := $(BIN)/snakemake

.PHONY: demo test install report lint dry-run branch

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when pyproject.toml changes (the package itself is editable).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(TORCH_PIP_ARGS) '$(TORCH)'
	$(BIN)/python -m pip install -e '.[workflow,test]'
	touch $@

demo: $(STAMP)
	$(SNAKEMAKE) --cores $(CORES)
	$(SNAKEMAKE) --cores 1 --report results/report.html

# pytest exits 5 when it collected no tests: said plainly, and a failure like any other.
test: $(STAMP)
	$(BIN)/pytest || { status=$$?; [ $$status -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$status; }

report: $(STAMP)
	$(SNAKEMAKE) --cores 1 --report results/report.html

dry-run: $(STAMP)
	$(SNAKEMAKE) --dry-run --quiet rules

lint: $(STAMP)
	$(SNAKEMAKE) --lint
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

# Rerun one dataset's branch from prepare on (make branch DATASET=pbmc68k), then refresh the
# cross-dataset tables and figures: only that dataset's jobs and the aggregates run.
branch: $(STAMP)
	@test -n "$(DATASET)" || { echo "usage: make branch DATASET=<name in config.yaml datasets>" >&2; exit 2; }
	$(SNAKEMAKE) --cores $(CORES) --forcerun results/$(DATASET)/prepared.h5ad -- results/$(DATASET)/metrics.csv
	$(SNAKEMAKE) --cores $(CORES)
