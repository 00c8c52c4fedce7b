"""Migration 5: a running run says where it is (``sync_run.progress_json``).

Why: an initial load of a large entity runs for many minutes in one task. The task log shows its
progress, but the operator's entity page reads the state store, not the logs. Long extracts and
loads store their stage, rows done and total, rate and ETA here at the same interval they log
them (:mod:`d365sync.engine.progress`); a finished run keeps its last progress.

Frozen: never edit; change the table with a new migration and update ``schema.py``.
"""

from __future__ import annotations

from sqlalchemy import Connection

from d365sync.engine.migrations.types import add_column

NAME = "run progress"


def upgrade(conn: Connection) -> None:
    """Add the nullable ``progress_json`` text column to ``sync_run``."""
    add_column(conn, "sync_run", "progress_json", "TEXT")
