"""``WarmLocalExecutor``: Airflow's LocalExecutor with the sync's heavy libraries imported once.

Why: an event-started run is a few seconds of work, and ``import great_expectations`` alone costs
3 s (15 s on a loaded 2-core machine) in every task process that validates. On Linux the
LocalExecutor forks its workers from the scheduler and each worker forks the task process
(``airflow.sdk.execution_time.supervisor``: a bare ``os.fork``, exec only on macOS), so whatever
the scheduler imported before its workers start is already in every task's memory, shared
copy-on-write. This executor imports :data:`DEFAULT_PRELOAD` (or the comma-separated modules in
``D365SYNC_EXECUTOR_PRELOAD``; empty turns it off) in :meth:`WarmLocalExecutor.start`, before
any worker exists. A module that fails to import is logged and skipped: the task imports it
itself then, as it always did.

Use: ``AIRFLOW__CORE__EXECUTOR=d365sync.airflow.executor.WarmLocalExecutor`` (``make demo`` does).
The scheduler then holds about 250 MB more. Nothing changes where tasks are started another way
(spawn start method, CeleryExecutor: a Celery worker pays the import once per child process).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Final

from airflow.executors.local_executor import LocalExecutor

PRELOAD_ENV: Final = "D365SYNC_EXECUTOR_PRELOAD"
DEFAULT_PRELOAD: Final = (
    "pandas",
    "pyarrow",
    "great_expectations",
    "great_expectations.expectations",
    "d365sync.engine.pipeline",
    "d365sync.engine.validation",
    "d365sync.dynamics",
    "d365sync.erp",
)

log = logging.getLogger(__name__)


def preload_modules(environ: dict[str, str] | None = None) -> list[str]:
    """Import the configured modules; the names imported (failures are logged, not raised)."""
    raw = (os.environ if environ is None else environ).get(PRELOAD_ENV)
    names = DEFAULT_PRELOAD if raw is None else tuple(n.strip() for n in raw.split(",") if n.strip())
    from d365sync.engine.validation import quiet_gx

    quiet_gx()  # GX logs ~200 lines at import unless its logger is quieted first
    loaded, began = [], time.monotonic()
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            log.warning("executor preload: cannot import %s (%s); tasks will import it themselves", name, exc)
        else:
            loaded.append(name)
    quiet_gx()
    log.info("executor preload: %d modules in %.1f s", len(loaded), time.monotonic() - began)
    return loaded


class WarmLocalExecutor(LocalExecutor):
    """LocalExecutor whose forked workers (and their task processes) inherit preloaded modules."""

    def start(self) -> None:
        preload_modules()
        super().start()
