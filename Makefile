# Every target bootstraps .venv on first use, so a fresh checkout needs only `make test` / `make emulate`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEVICES ?= 8
LATENCY ?= 5ms
BANDWIDTH ?= 300mbps
MODEL ?=
DTYPE ?=
# WINDOW: sliding window in blocks (>= 2; the paper's default 2), or none = all weights resident
WINDOW ?= 2
ALLREDUCE ?= star
CLOCK ?= virtual

.PHONY: venv deps test emulate reproduce results-readme figures bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# System packages of the tests (.ci/apt-packages.txt: chromium for the web page test); installs only missing ones
APT_PACKAGES := $(shell sed -e 's/\#.*//' .ci/apt-packages.txt)
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

test: $(STAMP)
	$(BIN)/python -m pytest tests

emulate: $(STAMP)
	$(BIN)/python -m emulator emulate --devices $(DEVICES) --latency $(LATENCY) --bandwidth $(BANDWIDTH) \
		$(if $(WINDOW),--window $(WINDOW),) --allreduce $(ALLREDUCE) --clock $(CLOCK) $(if $(MODEL),--model $(MODEL),) \
		$(if $(DTYPE),--dtype $(DTYPE),)

# Every experiment of configs/experiments/ (one YAML per figure or table of the paper, plus the new ones),
# one after another, then the figures: results/<experiment>.jsonl and results/figures/*.png. It prints its
# estimate first (each YAML's estimate_s, measured on the project's 2-core machine), a line per point, and
# the durations. Refuses a tree with uncommitted changes outside results/ (ALLOW_DIRTY=1 runs anyway and
# records git_dirty) and a second reproduce while one runs. EXPERIMENT=table1 (or ONLY=table1,fig5_scaling)
# runs some; SMOKE=1 the tiny variants (seconds, results to .cache/smoke-results/). Then
# `make results-readme` regenerates results/README.md's numbers. Needs ~40 GB of free disk for the models
# (.cache/models, least recently used evicted: TPI_EMU_CACHE_GB, TPI_EMU_DISK_RESERVE_GB).
ONLY ?=
EXPERIMENT ?=
SMOKE ?=
ALLOW_DIRTY ?=
reproduce: $(STAMP)
	$(BIN)/python -m emulator reproduce $(if $(EXPERIMENT),--only $(EXPERIMENT),$(if $(ONLY),--only $(ONLY),)) \
		$(if $(SMOKE),--smoke,) $(if $(ALLOW_DIRTY),--allow-dirty,)

# results/README.md's numbers (the <!-- generated:NAME --> blocks) from the committed results/*.jsonl
results-readme: $(STAMP)
	$(BIN)/python -m emulator readme

# Figures only, from the committed results/ (seconds)
figures: $(STAMP)
	$(BIN)/python -m emulator plot --all

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
