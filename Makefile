# The README names two commands: `make demo` and `make test`. Both set up everything they need
# from scratch: system ODBC packages, a pinned uv, and .venv from uv.lock.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .uv/bin/uv
VENV := .venv
DEMO_DIR ?= var/demo
DEMO_PORT ?= 8765
DEMO_ROWS ?= 5000

export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_PYTHON := $(PYTHON)
export UV_LINK_MODE := copy

.PHONY: demo test lint bench system-deps venv clean

system-deps:
	@bash scripts/install-system-deps.sh

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml
	$(UV) sync --frozen
	@touch $@

venv: $(VENV)/.synced

lint: venv
	$(VENV)/bin/ruff check include tests dags plugins benchmarks

test: system-deps venv lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: system-deps venv
	$(VENV)/bin/d365sync sandbox dataverse --host 127.0.0.1 --port $(DEMO_PORT) \
		--data $(DEMO_DIR)/dataverse --seed $(DEMO_ROWS)

bench: venv
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(VENV)/bin/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .uv var .pytest_cache .ruff_cache
