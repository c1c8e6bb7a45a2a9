# Two entry points for a fresh machine: `make demo` and `make test`. Each builds its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra requirement installed before the package, e.g. TORCH_SPEC=torch==2.13.0 for a specific wheel (CI does).
TORCH_SPEC ?=
TORCHTITAN_VERSION ?= 0.3.0

# GPU evidence (docs/gpu_evidence.md). On the bare GPU machine there is no .venv and no pip: plain python3 from the
# checkout (PYTHONPATH=.). Here the .venv's python, once it exists.
EVIDENCE_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
OUT ?= evidence-out
BUDGET_S ?= 540
PARTS ?= checks,bench,runs
EVIDENCE_ARGS ?=

.PHONY: demo test lint bench mutate study clean gpu-evidence gpu-prepare results

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)")
	$(BIN)/pip install -q -e ".[dev]"
	# torchtitan for tests/test_torchtitan.py, without its pins (datasets<4.8 clashes with the dev environment's
	# datasets); what its optimizer, metrics and model modules import is in the dev extra (tyro, spmd_types).
	$(BIN)/pip install -q --no-deps "torchtitan==$(TORCHTITAN_VERSION)"
	touch $@

# The demo needs the trainer and the figures only: the library with its train and plot extras.
$(BIN)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)")
	$(BIN)/pip install -q -e ".[train,plot]"
	touch $@

demo: $(BIN)/.installed-demo
	$(BIN)/python -m train configs/demo.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(BIN)/.installed
	$(BIN)/python bench/optimizer_step_cpu.py

# Mutation testing of the core modules (hours on 2 cores; not in CI): kill rates and survivors for docs/testing.md.
# The CPU study (configs/cpu_study/study.yaml): about 20 minutes per pair of runs on 2 cores; runs already in
# results/cpu_study/ with the same config are skipped. Then results/cpu_study/ and docs/results.md are regenerated.
study: $(BIN)/.installed
	PYTHONPATH=. $(BIN)/python -m experiments.cpu_study

mutate: $(BIN)/.installed
	$(BIN)/python tools/mutate.py --jobs 2

# Checks, benchmarks and pending campaign runs inside BUDGET_S seconds; the bundle (<= 8 files) goes to OUT. Without
# CUDA this is the dry run (demo-size stand-ins, about a minute). More options: python -m experiments.gpu_evidence run --help.
gpu-evidence:
	PYTHONPATH=. $(EVIDENCE_PYTHON) -m experiments.gpu_evidence run --out "$(OUT)" --budget $(BUDGET_S) --parts $(PARTS) $(EVIDENCE_ARGS)

# Before a GPU window, here: the token files (compressed) and the commit record into .gpu/evidence/, size checked.
gpu-prepare:
	PYTHONPATH=. $(EVIDENCE_PYTHON) -m experiments.gpu_evidence prepare

# docs/results.md and the GPU table of docs/benchmarks.md from results/ (after `python -m experiments.gpu_evidence unpack`).
results:
	PYTHONPATH=. $(EVIDENCE_PYTHON) -m experiments.results_doc

clean:
	rm -rf $(VENV) .pytest_cache
