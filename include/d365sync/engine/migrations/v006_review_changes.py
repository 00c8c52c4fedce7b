"""Migration 6: a review item says when each side changed its value (``sync_review.changes_json``).

Why: an operator deciding between a Dynamics and an ERP value asks first who changed what, and
when. The merge knows each side's modification time (``modifiedon``, the ERP cursor column);
the review item keeps them, ``{"dynamics": <datetime>, "erp": <datetime>}``, for the queue.

Frozen: never edit; change the table with a new migration and update ``schema.py``.
"""

from __future__ import annotations

from sqlalchemy import Connection, MetaData, Table, text

NAME = "review changes"


def upgrade(conn: Connection) -> None:
    """Add the nullable ``changes_json`` text column to ``sync_review``."""
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    target = Table("sync_review", MetaData(), schema=schema)
    table = conn.dialect.identifier_preparer.format_table(target)
    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN changes_json TEXT"))
