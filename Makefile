# Two commands on a fresh machine with Python 3.11 and make:
#   make run    installs uv and .venv if missing, trains the keyboard task on embedded data
#   make test   runs the test suite (make browser first installs Debian's chromium when missing, as root)
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION := 0.13.9
UV ?= $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
PY := .venv/bin/python
RUN_DIR ?= runs/keyboard-$(shell date +%Y%m%d-%H%M%S)
RUN_FLAGS ?=

.PHONY: help install browser run test bench frontier tensorboard clean
help:
	@echo "make run    train the default task (keyboard) with DP-FedAvg; writes $(dir $(RUN_DIR))<name>/"
	@echo "make test   run the tests (needs headless chromium: make browser installs it)"
	@echo "make tensorboard RUN=runs/<name>  TensorBoard on a run's operator/tensorboard/ events (http://127.0.0.1:6006)"
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

# The HTML privacy report's test renders it in headless Chromium (Debian's chromium package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "error: the tests need chromium; install it with: sudo apt-get install -y chromium (Debian) or run make browser as root" >&2; \
	    exit 1; \
	  fi; }

test: install browser
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

# make tensorboard RUN=runs/keyboard-... (the newest run under runs/ without RUN); operator-only values: kept on
# 127.0.0.1 (forward the port over ssh to look from elsewhere)
RUN ?= $(shell ls -td runs/*/operator/tensorboard 2>/dev/null | head -1 | xargs -r dirname | xargs -r dirname)
TB_PORT ?= 6006
tensorboard: install
	@test -n "$(RUN)" -a -d "$(RUN)/operator/tensorboard" || { echo "error: RUN=$(RUN) holds no operator/tensorboard/; give RUN=<a run directory>" >&2; exit 2; }
	.venv/bin/tensorboard --logdir "$(RUN)/operator/tensorboard" --host 127.0.0.1 --port $(TB_PORT)

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
