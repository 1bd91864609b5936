# Every target bootstraps .venv on first use, so a fresh checkout needs only `make test` / `make emulate`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEVICES ?= 8
LATENCY ?= 5ms
BANDWIDTH ?= 300mbps
MODEL ?=
# WINDOW: sliding window in blocks (>= 2; the paper's default 2), or none = all weights resident
WINDOW ?= 2
ALLREDUCE ?= star
CLOCK ?= virtual

.PHONY: venv test emulate reproduce figures bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

emulate: $(STAMP)
	$(BIN)/python -m emulator emulate --devices $(DEVICES) --latency $(LATENCY) --bandwidth $(BANDWIDTH) \
		$(if $(WINDOW),--window $(WINDOW),) --allreduce $(ALLREDUCE) --clock $(CLOCK) $(if $(MODEL),--model $(MODEL),)

reproduce: $(STAMP)
	$(BIN)/python -m emulator reproduce

figures: $(STAMP)
	$(BIN)/python -m emulator plot --all

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
