"""The head schema of the sync state database: what all migrations together produce.

The store queries these tables. Migrations never import them (they freeze their own DDL), and
a test checks that a migrated database has exactly these columns, so the two cannot drift.
"""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text, UniqueConstraint, text

from d365sync.engine.migrations.types import IdType, UtcDateTime

metadata = MetaData()

#: Key map and merge base in one row per record, so both are always written together.
record = Table(
    "sync_record",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("entity", String(64), nullable=False),
    Column("dynamics_id", String(64)),
    Column("erp_key", String(255)),
    Column("status", String(16), nullable=False),
    Column("base_json", Text),
    Column("dynamics_version", String(128)),
    Column("erp_version", String(128)),
    Column("dynamics_modified", UtcDateTime),
    Column("erp_modified", UtcDateTime),
    Column("deleted_on", String(16)),
    Column("run_id", String(250)),
    Column("updated_at", UtcDateTime, nullable=False),
    #: start of the run that first stored the record: lag is never measured from before it
    Column("first_seen_at", UtcDateTime),
    UniqueConstraint("entity", "dynamics_id", name="uq_sync_record_dynamics"),
    UniqueConstraint("entity", "erp_key", name="uq_sync_record_erp"),
)

watermark = Table(
    "sync_watermark",
    metadata,
    Column("entity", String(64), primary_key=True),
    Column("side", String(16), primary_key=True),
    Column("value_json", Text),
    Column("token", Text),
    Column("run_id", String(250)),
    Column("updated_at", UtcDateTime, nullable=False),
)

watermark_pending = Table(
    "sync_watermark_pending",
    metadata,
    Column("entity", String(64), primary_key=True),
    Column("side", String(16), primary_key=True),
    Column("run_id", String(250), primary_key=True),
    Column("value_json", Text),
    Column("token", Text),
    Column("backfill", Integer, nullable=False),
    Column("staged_at", UtcDateTime, nullable=False),
)

review = Table(
    "sync_review",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("entity", String(64), nullable=False),
    Column("record_key", String(255), nullable=False),
    Column("field", String(128), nullable=False),
    Column("base_json", Text),
    Column("dynamics_json", Text),
    Column("erp_json", Text),
    Column("reason", Text),
    Column("status", String(16), nullable=False),
    Column("opened_run_id", String(250)),
    Column("opened_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("decided_by", String(255)),
    Column("decided_at", UtcDateTime),
    Column("chosen_json", Text),
    Column("comment", Text),
    Column("applied_run_id", String(250)),
    Column("applied_at", UtcDateTime),
    Column("changes_json", Text),  # when each side last changed the value (v006)
)
ACTIVE_REVIEW = text("status IN ('open', 'decided')")
Index(
    "uq_sync_review_active",
    review.c.entity,
    review.c.record_key,
    review.c.field,
    unique=True,
    sqlite_where=ACTIVE_REVIEW,
    postgresql_where=ACTIVE_REVIEW,
)

dead_letter = Table(
    "sync_dead_letter",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("entity", String(64), nullable=False),
    Column("record_key", String(255), nullable=False),
    Column("stage", String(32), nullable=False),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("run_id", String(250)),
    Column("first_failed_at", UtcDateTime, nullable=False),
    Column("last_failed_at", UtcDateTime, nullable=False),
    Column("next_retry_at", UtcDateTime),
    Column("skip_reason", Text),
    Column("handled_by", String(255)),
    Column("resolved_at", UtcDateTime),
    Column("payload_json", Text),
)
ACTIVE_DEAD_LETTER = text("status IN ('pending', 'replay')")
Index(
    "uq_sync_dead_letter_active",
    dead_letter.c.entity,
    dead_letter.c.record_key,
    dead_letter.c.stage,
    unique=True,
    sqlite_where=ACTIVE_DEAD_LETTER,
    postgresql_where=ACTIVE_DEAD_LETTER,
)
Index("ix_sync_dead_letter_due", dead_letter.c.entity, dead_letter.c.status, dead_letter.c.next_retry_at)

parked = Table(
    "sync_parked",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("entity", String(64), nullable=False),
    Column("record_key", String(255), nullable=False),
    Column("parent_entity", String(64), nullable=False),
    Column("parent_side", String(16), nullable=False),
    Column("parent_key", String(255), nullable=False),
    Column("payload_json", Text),
    Column("reason", Text),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("parked_run_id", String(250)),
    Column("parked_at", UtcDateTime, nullable=False),
    Column("released_run_id", String(250)),
    Column("released_at", UtcDateTime),
)
PARKED = text("status = 'parked'")
Index(
    "uq_sync_parked_active",
    parked.c.entity,
    parked.c.record_key,
    unique=True,
    sqlite_where=PARKED,
    postgresql_where=PARKED,
)

audit = Table(
    "sync_audit",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("entity", String(64), nullable=False),
    Column("record_key", String(255), nullable=False),
    Column("side", String(16), nullable=False),
    Column("operation", String(16), nullable=False),
    Column("fields_json", Text, nullable=False),
    Column("before_json", Text),
    Column("after_json", Text),
    Column("actor", String(255), nullable=False),
    Column("at", UtcDateTime, nullable=False),
)
Index("ix_sync_audit_record", audit.c.entity, audit.c.record_key)
Index("ix_sync_audit_run", audit.c.run_id)

run = Table(
    "sync_run",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("entity", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Column("counts_json", Text),
    Column("timings_json", Text),
    Column("error", Text),
    Column("progress_json", Text),  # a running run's stage, rows done/total, rate, ETA (v005)
)

#: Change notifications waiting for a run (webhooks, Service Bus, ERP polling); ids and changed
#: attribute names only, never values. ``id`` is the order of arrival.
inbox = Table(
    "sync_inbox",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("source", String(32), nullable=False),
    Column("entity", String(64), nullable=False),
    Column("table_name", String(128), nullable=False),
    Column("record_id", String(255), nullable=False),
    Column("message", String(16), nullable=False),
    Column("attributes", Text),
    Column("dedupe_key", String(255), nullable=False),
    Column("correlation_id", String(64)),
    Column("user_id", String(64)),
    Column("depth", Integer),
    Column("operation_created_on", UtcDateTime),
    Column("received_at", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("run_id", String(250)),
    Column("claimed_at", UtcDateTime),
    Column("done_at", UtcDateTime),
    UniqueConstraint("source", "entity", "dedupe_key", name="uq_sync_inbox_dedupe"),
)
Index("ix_sync_inbox_queue", inbox.c.entity, inbox.c.status, inbox.c.id)
Index("ix_sync_inbox_closed", inbox.c.status, inbox.c.done_at)
