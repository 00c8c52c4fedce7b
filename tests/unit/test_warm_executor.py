"""``WarmLocalExecutor``: the modules it preloads before its workers fork, and what it skips."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from d365sync.airflow.executor import DEFAULT_PRELOAD, PRELOAD_ENV, WarmLocalExecutor, preload_modules


def test_the_configured_modules_are_imported_and_a_missing_one_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="d365sync.airflow.executor"):
        loaded = preload_modules({PRELOAD_ENV: "json, d365sync_no_such_module ,,csv"})
    assert loaded == ["json", "csv"]
    assert "d365sync_no_such_module" in caplog.text and "tasks will import it themselves" in caplog.text


def test_empty_turns_it_off() -> None:
    assert preload_modules({PRELOAD_ENV: ""}) == []


def test_by_default_a_fresh_interpreter_ends_up_with_great_expectations_loaded() -> None:
    """The default list, in a process of its own (this one may have imported GX already)."""
    code = (
        "import sys\n"
        "from d365sync.airflow.executor import preload_modules\n"
        "assert 'great_expectations' not in sys.modules\n"
        "print('LOADED=' + ','.join(preload_modules({})))\n"
        "assert 'great_expectations' in sys.modules\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    loaded = [line for line in out.stdout.splitlines() if line.startswith("LOADED=")]  # logs go there too
    assert loaded and loaded[-1].removeprefix("LOADED=").split(",") == list(DEFAULT_PRELOAD)


def test_it_is_a_local_executor_airflow_can_load_by_path() -> None:
    from airflow.executors.executor_loader import ExecutorLoader
    from airflow.executors.executor_utils import ExecutorName

    name = ExecutorName(module_path="d365sync.airflow.executor.WarmLocalExecutor")
    cls, _ = ExecutorLoader.import_executor_cls(name)
    assert cls is WarmLocalExecutor and cls.is_local
