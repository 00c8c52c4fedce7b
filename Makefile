# The README names two commands: `make demo` and `make test`. Both set up everything they need
# from scratch: system ODBC packages, a pinned uv, and .venv from uv.lock.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .uv/bin/uv
VENV := .venv
# Airbyte's Dataverse source connector pins airbyte-cdk 0.80 (pydantic 1, Python <3.12), which
# conflicts with Airflow: it gets its own venv, locked in tests/thirdparty/airbyte/uv.lock, for
# tests/integration/test_third_party_airbyte.py.
VENV_AIRBYTE := .venv-airbyte
AIRBYTE_PROJECT := tests/thirdparty/airbyte
AIRBYTE_PYTHON ?= 3.11
DEMO_DIR ?= var/demo
DEMO_PORT ?= 8765
AIRFLOW_PORT ?= 8080
DEMO_ROWS ?= 5000
DEMO_ENV = DEMO_PORT=$(DEMO_PORT) AIRFLOW_PORT=$(AIRFLOW_PORT) DEMO_ROWS=$(DEMO_ROWS)
DURATION ?= 30m
# pytest-xdist workers for `make test` (tests/conftest.py keeps the Airflow-stack files on one of
# them); PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2

export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_PYTHON := $(PYTHON)
export UV_LINK_MODE := copy
# Installed packages get their bytecode at install time (pip does this by default, uv does not):
# where PYTHONDONTWRITEBYTECODE is set, as on CI machines, every process would otherwise compile
# Airflow, GX and pandas from source on each import (GX alone: 7.5 s against 3.3 s).
export UV_COMPILE_BYTECODE := 1

.PHONY: demo stop sync test lint bench soak system-deps venv venv-airbyte clean

system-deps:
	@bash scripts/install-system-deps.sh

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml
	$(UV) sync --frozen
	@touch $@

venv: $(VENV)/.synced

$(VENV_AIRBYTE)/.synced: $(UV) $(AIRBYTE_PROJECT)/uv.lock $(AIRBYTE_PROJECT)/pyproject.toml
	UV_PROJECT_ENVIRONMENT=$(abspath $(VENV_AIRBYTE)) UV_PYTHON=$(AIRBYTE_PYTHON) \
		$(UV) sync --frozen --project $(AIRBYTE_PROJECT)
	@touch $@

venv-airbyte: $(VENV_AIRBYTE)/.synced

lint: venv
	$(VENV)/bin/ruff check include tests dags plugins benchmarks

test: system-deps venv venv-airbyte lint
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# The full stack (scripts/demo.sh): Dataverse sandbox, SQLite ERP via ODBC, connections, the
# dynamics_api pool, `airflow standalone` with AIRFLOW_HOME=var/airflow, entity DAGs unpaused,
# users admin / operator / viewer. Ports: make demo DEMO_PORT=8765 AIRFLOW_PORT=8080
demo: system-deps venv
	@$(DEMO_ENV) bash scripts/demo.sh start

# Stops everything `make demo` (or `make sync`) started, by the pids in var/demo/pids; exit 0
# also when nothing runs.
stop:
	@bash scripts/demo.sh stop

# Every entity DAG once, parents first; prints the summary table. Demo up: manual runs through
# its REST API, run by its scheduler. Demo down: dag.test() with its own AIRFLOW_HOME
# (var/demo/airflow-sync). Never touches the running demo's metadata DB.
sync: system-deps venv
	@$(DEMO_ENV) bash scripts/demo.sh sync

# The long soak: every entity DAG every minute under a real scheduler for DURATION of simulated
# users (bad values included), then fix, one more cycle, and the report: runs, failures, dead
# letters, drift (d365sync.sandbox.soak). Exit status 1 when a check fails. SOAK_ARGS adds options
# (--rows, --accounts, --rate, --bad-per-kind; `d365sync soak --help`).
soak: system-deps venv
	$(VENV)/bin/d365sync soak --duration $(DURATION) --workdir var/soak/$(shell date -u +%Y%m%dT%H%M%S) $(SOAK_ARGS)

bench: venv
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(VENV)/bin/python $$script || exit 1; done

clean:
	rm -rf $(VENV) $(VENV_AIRBYTE) .uv var .pytest_cache .ruff_cache
