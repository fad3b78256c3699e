# Tuneship: the two commands are `make demo` and `make test`; both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.8
# A local wheel directory (the CPU torch wheel on our build machines) is used when present.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
export TUNESHIP_HOME ?= $(CURDIR)/.tuneship
export GX_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Byte-compile at install: where PYTHONDONTWRITEBYTECODE is set (as on our CI machines) every
# process would otherwise recompile torch/transformers/peft from source (peft import: 13 s -> 6 s).
export UV_COMPILE_BYTECODE := 1

.PHONY: install chromium promtool demo test bench up down status lock lint clean

$(VENV)/.installed: requirements.txt requirements-nodeps.txt serving/triton/requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip install --quiet --python $(PY) $(FIND_LINKS) -r requirements.txt
	$(UV) pip install --quiet --python $(PY) --no-deps --require-hashes -r requirements-nodeps.txt
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	$(PY) -m tuneship.tritonserver install
	@touch $@

# The browser tests drive Debian's chromium through Playwright (no browser download):
# installed with apt-get when missing and run as root, else a warning (the demo needs no browser).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "WARNING: chromium is missing and apt-get cannot run here: run 'apt-get install -y chromium'" \
	    "as root, or the browser tests (tests/browser) fail" >&2; fi; }

# Debian's package prometheus (recommends left out: no exporters): its promtool checks the
# autoscaling adapter's PromQL, the alert and recording rules and the Grafana queries, and its
# server is the embedded default's Prometheus. Installed with apt-get when missing and run as
# root, else a warning.
promtool:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else echo "WARNING: promtool is missing and apt-get cannot run here: run 'apt-get install -y prometheus'" \
	    "as root, or the autoscaling contract, Prometheus rules and Grafana dashboard tests fail and" \
	    "the embedded default runs without its Prometheus" >&2; fi; }

install: $(VENV)/.installed chromium promtool

demo: install
	$(PY) -m tuneship.demo

# The pre-commit hooks first (ruff, task/suite/recipe files, task tokenizers): CI checks what a
# commit checks. Then every test.
test: install
	$(VENV)/bin/pre-commit run --all-files --show-diff-on-failure
	@bash .ci/pytest.sh

# NVIDIA AIPerf (bench/served.py's client) in its own locked environment: its dependencies
# (dash, kaleido, pandas, kopf...) stay out of the main one. Lock: see bench/requirements-aiperf.in.
AIPERF_VENV := .venv-aiperf
$(AIPERF_VENV)/.installed: bench/requirements-aiperf.txt | $(VENV)/.installed
	@test -x $(AIPERF_VENV)/bin/python || $(PYTHON) -m venv $(AIPERF_VENV)
	$(UV) pip install --quiet --python $(AIPERF_VENV)/bin/python -r bench/requirements-aiperf.txt
	@touch $@

# Evidently (bench/drift.py's baseline) in its own locked environment: pandas, scikit-learn,
# nltk... stay out of the main one. Lock: bench/requirements-evidently.in.
EVIDENTLY_VENV := .venv-evidently
$(EVIDENTLY_VENV)/.installed: bench/requirements-evidently.txt | $(VENV)/.installed
	@test -x $(EVIDENTLY_VENV)/bin/python || $(PYTHON) -m venv $(EVIDENTLY_VENV)
	$(UV) pip install --quiet --python $(EVIDENTLY_VENV)/bin/python -r bench/requirements-evidently.txt
	@touch $@

# Benchmarks against baselines measured in the same run (not part of `make test`).
bench: install $(AIPERF_VENV)/.installed $(EVIDENTLY_VENV)/.installed
	$(PY) -m bench

up: install
	$(PY) -m tuneship.demo --up

down:
	@test -x $(PY) && $(PY) -m tuneship.services down || true

status:
	$(PY) -m tuneship.services status

# Regenerate the pins (transitive ones included) after editing requirements.in.
lock:
	$(UV) pip compile --quiet --python-version 3.11 $(FIND_LINKS) requirements.in -o requirements.txt
	$(UV) pip compile --quiet --python-version 3.11 --no-header serving/triton/requirements.in -o serving/triton/requirements.txt
	$(UV) pip compile --quiet --python-version 3.11 --no-header bench/requirements-aiperf.in -o bench/requirements-aiperf.txt
	$(UV) pip compile --quiet --python-version 3.11 --no-header bench/requirements-evidently.in -o bench/requirements-evidently.txt

lint: install
	$(VENV)/bin/ruff check dags plugins include serving tests

clean: down
	rm -rf $(TUNESHIP_HOME)
