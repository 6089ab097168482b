# covseg — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= quick
DATA_SRC ?= ../shared/datasets
# Telemetry off for shell commands; the one definition is src/covseg/telemetry.py (keep these equal).
export GX_ANALYTICS_ENABLED := False
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
# UTF-8 mode: file and subprocess text is UTF-8 even where a library resets the C locale
export PYTHONUTF8 := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test venv lint data clean

$(BIN)/covseg: pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	@touch $@

venv: $(BIN)/covseg

data: venv
	$(BIN)/covseg data import --update $(DATA_SRC)

run: venv data
	$(BIN)/covseg run --profile $(PROFILE)

test: venv
	$(BIN)/ruff check src components pipelines tests bench tools
	$(BIN)/ruff format --check src components pipelines tests bench tools
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check src components pipelines tests bench tools
	$(BIN)/ruff format --check src components pipelines tests bench tools

clean:
	rm -rf artifacts mlflow.db mlartifacts .pytest_cache
