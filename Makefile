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

# Every experiment of configs/experiments/ (one YAML per figure or table of the paper, plus the new ones),
# then the figures: results/<experiment>.jsonl and results/figures/*.png. About 80 minutes on the
# project's 2-core machine (each YAML's estimate_s; the run prints a line per point and the durations),
# half of it the 70B-shaped points. ONLY=table1,fig5_scaling runs some; SMOKE=1 the tiny variants (seconds, results
# to .cache/smoke-results/). Needs ~40 GB of free disk for the models (.cache/models, least recently used
# evicted: TPI_EMU_CACHE_GB, TPI_EMU_DISK_RESERVE_GB).
ONLY ?=
SMOKE ?=
reproduce: $(STAMP)
	$(BIN)/python -m emulator reproduce $(if $(ONLY),--only $(ONLY),) $(if $(SMOKE),--smoke,)

# Figures only, from the committed results/ (seconds)
figures: $(STAMP)
	$(BIN)/python -m emulator plot --all

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
