# Two commands on a fresh machine with Python 3.11 and make:
#   make run    installs uv and .venv if missing, trains the keyboard task on embedded data
#   make test   runs the test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION := 0.13.9
UV ?= $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
PY := .venv/bin/python
RUN_DIR ?= runs/keyboard-$(shell date +%Y%m%d-%H%M%S)
RUN_FLAGS ?=

.PHONY: help install run test bench frontier clean
help:
	@echo "make run    train the default task (keyboard) with DP-FedAvg; writes $(dir $(RUN_DIR))<name>/"
	@echo "make test   run the tests"
	@echo "make bench  seconds per round: our DP-FedAvg vs TFF stock vs central Keras (not part of the tests)"
	@echo "make frontier  keyboard top-1 against ε (1,2,4,8,inf x 3 seeds) and the central ceiling (hours; see README)"

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

# uv from PATH, or a private copy in .tools/ when there is none.
$(if $(filter .tools/bin/uv,$(UV)),.venv/.synced: .tools/bin/uv)
.venv/.synced: pyproject.toml uv.lock
	$(UV) sync --frozen
	@touch $@

install: .venv/.synced

run: install
	$(PY) scripts/train.py --flagfile=configs/keyboard.cfg --output_dir=$(RUN_DIR) $(RUN_FLAGS)

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

bench: install
	@mkdir -p bench
	$(PY) scripts/bench.py --workload=all --output=bench/bench-$(shell date +%Y%m%d-%H%M%S).json $(BENCH_FLAGS)

# make frontier (keyboard), or e.g. make frontier FRONTIER_CONFIG=medical-eps1 (or traffic-records)
FRONTIER_CONFIG ?= keyboard
FRONTIER_EPS_KEYBOARD := --epsilons=1,2,4,8,inf
FRONTIER_EPS_OTHER := --epsilons=0.5,1,2,4,8,inf
FRONTIER_FLAGS ?= $(if $(filter keyboard,$(FRONTIER_CONFIG)),$(FRONTIER_EPS_KEYBOARD),$(FRONTIER_EPS_OTHER)) --seeds=0,1,2
frontier: install
	$(PY) scripts/frontier.py --flagfile=configs/$(FRONTIER_CONFIG).cfg --output_dir=runs/frontier-$(FRONTIER_CONFIG) $(FRONTIER_FLAGS)

clean:
	rm -rf .venv .tools .pytest_cache
