"""Migration 6: a review item says when each side changed its value (``sync_review.changes_json``).

Why: an operator deciding between a Dynamics and an ERP value asks first who changed what, and
when. The merge knows each side's modification time (``modifiedon``, the ERP cursor column);
the review item keeps them, ``{"dynamics": <datetime>, "erp": <datetime>}``, for the queue.

Frozen: never edit; change the table with a new migration and update ``schema.py``.
"""

from __future__ import annotations

from sqlalchemy import Connection

from d365sync.engine.migrations.types import add_column

NAME = "review changes"


def upgrade(conn: Connection) -> None:
    """Add the nullable ``changes_json`` text column to ``sync_review``."""
    add_column(conn, "sync_review", "changes_json", "TEXT")
