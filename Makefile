# One task runner for developers and CI. `make demo` runs the main job, `make test` the
# whole suite (lint, types, generated-code check, tests, TLC model checking and trace
# validation); .ci/run calls `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TYPECHECK_ROOT := build/typecheck

.PHONY: venv demo demo-edge test test-deps lint typecheck pytest pytest-all tlc tlc-models gen-protos check-generated bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/hello/run.py
	$(PY) examples/etl/run.py

# A cloud and an edge process, the link between them cut and restored, a DAG whose
# tasks run on cloud, edge and device (examples/edge/run.py; about 10 s).
demo-edge: $(STAMP)
	$(PY) examples/edge/run.py

# pytest (the TLC trace tests among the rest), then TLC's models. Both at once took as
# long before, with three tests failing under the load; with the models at SCHED_IDLE
# beside pytest (`chrt --idle 0`) the suite took 12m26s against 12m16s in order, on a
# quiet machine (2026-12-06): pytest leaves too little idle CPU for it to pay.
test: lint typecheck pytest-all tlc-models

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow the editable install's import hook, so it checks a tree of
# symlinks laid out as the installed `tideflow` package; tests/ and bench/ are checked
# against the same tree.
typecheck: $(STAMP)
	rm -rf $(TYPECHECK_ROOT) && mkdir -p $(TYPECHECK_ROOT)/tideflow
	ln -s $(CURDIR)/proto/tideflow/__init__.py $(CURDIR)/proto/tideflow/py.typed $(TYPECHECK_ROOT)/tideflow/
	ln -s $(CURDIR)/proto/tideflow/api $(TYPECHECK_ROOT)/tideflow/api
	ln -s $(CURDIR)/server $(TYPECHECK_ROOT)/tideflow/server
	ln -s $(CURDIR)/history $(TYPECHECK_ROOT)/tideflow/history
	ln -s $(CURDIR)/worker_sdk $(TYPECHECK_ROOT)/tideflow/worker_sdk
	ln -s $(CURDIR)/cli $(TYPECHECK_ROOT)/tideflow/cli
	cd $(TYPECHECK_ROOT) && MYPYPATH=. $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p tideflow
	$(VENV)/bin/mypy --config-file pyproject.toml tla/*.py
	MYPYPATH=$(TYPECHECK_ROOT) $(VENV)/bin/mypy --config-file pyproject.toml \
		tests/*.py tests/procs/*.py bench/*.py
	MYPYPATH=$(TYPECHECK_ROOT) $(VENV)/bin/mypy --config-file pyproject.toml examples/edge/*.py

# What the tests need beyond the venv: Debian's chromium, which the browser tests of
# the web UI (tests/test_web_ui.py) drive through Playwright (no browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test-deps: $(STAMP)
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

# Tests marked `tla` run TLC on traces of real runs; `make tlc` runs them. Every test
# owns its server, port and database. Four xdist workers on two cores: the suite waits
# on processes, leases and timers more than it computes (three took 12m45s here, four
# 10m20s). tests/conftest.py puts the long tests (LONG_POLES) first and caps every
# server at 8 PostgreSQL connections (four workers' multi-node tests share the
# database's 100); --dist loadgroup hands tests out one at a time in that order, and a
# group (the 3-node chaos suite's runs of one isolation) goes to one worker, one run
# after another.
pytest: $(STAMP) test-deps
	$(VENV)/bin/pytest -m "not tla" -n 4 --dist loadgroup

pytest-all: $(STAMP) test-deps
	$(VENV)/bin/pytest -n 4 --dist loadgroup --durations=25

tlc-models: $(STAMP)
	$(PY) tla/run_tlc.py

# The TLA+ stage: every model and mutant of tla/manifest.csv, then trace validation.
tlc: $(STAMP)
	$(PY) tla/run_tlc.py
	$(VENV)/bin/pytest -m tla -n 2

gen-protos: $(STAMP)
	$(PY) proto/generate.py

check-generated: $(STAMP)
	$(VENV)/bin/pytest tests/test_generated_code.py

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf build $(VENV) .mypy_cache .ruff_cache .pytest_cache
