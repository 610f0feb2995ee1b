# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=
BENCH_ARGS ?=
TABLES_ARGS ?=
GPU_CHECK_ARGS ?=
GPU_CHECK_OUT ?= benchmarks/.data/gpu-check.json

.PHONY: demo test bench bench-tables gpu-check install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files: reinstall when pyproject.toml or the constraints change.
$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[bench]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/batch-infer demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# Only the table-scale case (1k/10k/100k one-shard files); needs no Ray Data.
bench-tables: $(VENV)/.installed
	$(BIN)/python -m benchmarks.tables $(TABLES_ARGS)
	$(BIN)/python -m benchmarks.manifest_scale  # an unchanged tick over 200,000 and 1,000,000 committed files

# One GPU machine, under 8 minutes: pytest -m gpu, stream check, rows/s vs the machine's limit and Ray Data.
# Not part of `make test`. GPU_CHECK_ARGS=--quick is the CPU smoke run.
gpu-check: $(VENV)/.installed-test $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.gpu_check --output $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
