# Two entry points for a fresh machine: `make demo` and `make test`. Each builds its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra requirement installed before the package, e.g. TORCH_SPEC=torch==2.13.0 for a specific wheel (CI does).
TORCH_SPEC ?=

.PHONY: demo test lint bench mutate clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)")
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m train configs/demo.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(BIN)/.installed
	$(BIN)/python bench/optimizer_step_cpu.py

# Mutation testing of the core modules (hours on 2 cores; not in CI): kill rates and survivors for docs/testing.md.
mutate: $(BIN)/.installed
	$(BIN)/python tools/mutate.py --jobs 2

clean:
	rm -rf $(VENV) .pytest_cache
