"""What every stage of one entity run needs, and the small helpers they share.

Why a context object: each Airflow task of the DAG issue rebuilds it from small inputs
(entity name, run id, staging root, connections) and calls one stage; :func:`run_entity`
builds it once and calls them all. Stages take the context plus the manifests of the stages
before them (plain dicts of file names and counts) and return their own manifest.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from d365sync.engine.merge import Base
from d365sync.engine.pii import mask_text
from d365sync.engine.progress import Progress
from d365sync.engine.staging import PathLike, Staging
from d365sync.engine.state import Failure, StateStore

if TYPE_CHECKING:
    from d365sync.spec import EntitySpec

Side = Literal["dynamics", "erp"]
SIDES: tuple[Side, Side] = ("dynamics", "erp")
Manifest = dict[str, Any]
CLOCK_MARGIN = timedelta(minutes=5)  # allowed skew between our clock and Dataverse's modifiedon


@dataclass(frozen=True)
class Window:
    """A backfill window [start, end): modifiedon on Dynamics, the cursor column on the ERP."""

    start: datetime
    end: datetime


@dataclass
class RunContext:
    """One entity run: the spec, both clients, the state store, staging and the run's options.

    ``dry_run`` makes every stage read-only: nothing is written to either system nor to the
    state store (not even a staged watermark or a dead letter); the plan is all it produces.
    """

    spec: EntitySpec
    dynamics: Any
    erp: Any
    store: StateStore
    staging_root: PathLike | str
    run_id: str = field(default_factory=lambda: f"manual__{datetime.now(UTC):%Y%m%dT%H%M%S%f}")
    dry_run: bool = False
    window: Window | None = None
    chunk_size: int = 5000
    # GX has a fixed cost of ~0.1 s per suite run, so validation groups extract chunks into
    # batches of about this many rows (memory stays bounded by this, not by the entity).
    validation_batch: int = 25_000
    # Due dead letters retried per run, operator replays first, then the longest overdue: a
    # backlog of bad rows is worked off over several runs instead of making each run follow it.
    retries_per_run: int = 2_000
    # GX Data Docs of every validation batch go to <data_docs_dir>/<entity>/<side>/ (None: none)
    data_docs_dir: str | None = None
    progress_every: float = 30.0  # seconds between progress lines of a long extract or load
    actor: str = "d365sync"
    # Plan files are read by load and commit only. "all": every entry (the Airflow tasks, or a
    # kept staging to look at); "commit": only what commit reads back (run_entity hands the
    # loads their entries in memory); "none": a dry run, which has neither.
    plan_files: Literal["all", "commit", "none"] = "all"
    validator: Any = None  # validate(spec, side, rows, key_column=...); default: GX (engine.validation)
    _tctx: Any = None
    _erp_table: Any = None
    _select: list[str] | None = None
    _columns: dict[str, dict[str, str | None]] = field(default_factory=dict)
    _plan: Any = None
    _fresh: bool | None = None

    def __post_init__(self) -> None:
        """The store encrypts the spec's ``pii`` fields; with no key for them the run refuses to start."""
        self.store.privacy.register(self.spec.name, self.spec.pii_fields)

    @property
    def transform_context(self) -> Any:
        """One TransformContext per run: key-map lookups are cached across chunks and stages."""
        if self._tctx is None:
            from d365sync.engine.stages.lookups import transform_context

            self._tctx = transform_context(self.spec, self.store, self.dynamics)
        return self._tctx

    @property
    def erp_table(self) -> Any:
        """The spec's ERP TableSpec, built once per run (stages ask for it per record)."""
        if self._erp_table is None:
            self._erp_table = self.spec.erp_table_spec()
        return self._erp_table

    @property
    def dynamics_select(self) -> list[str]:
        """The spec's Dataverse ``$select``, built once per run."""
        if self._select is None:
            self._select = self.spec.dynamics_select
        return self._select

    @property
    def plan(self) -> Any:
        """The spec's compiled mapping (a pydantic property: read once per run, not per record)."""
        if self._plan is None:
            self._plan = self.spec.plan
        return self._plan

    @property
    def fresh(self) -> bool:
        """The entity's first run: when first asked, the store held no record, review or active
        dead letter of it, so per-key look-ups of those (thousands of ``IN`` queries in a 1M
        initial load) can only find what this run added. What it adds is for keys it holds
        back (quarantined, parked for review), which later stages skip anyway. Each Airflow
        task asks anew, after the tasks before it stored theirs."""
        if self._fresh is None:
            self._fresh = not self.store.holds_anything(self.entity)
        return self._fresh

    def write_columns(self, side: str) -> dict[str, str | None]:
        """Canonical field → the column it is written to on ``side`` (None: not written there)."""
        if side not in self._columns:
            self._columns[side] = {f.name: f.write.get(side) for f in self.plan.fields}
        return self._columns[side]

    @property
    def entity(self) -> str:
        return self.spec.name

    @property
    def staging(self) -> Staging:
        return Staging(self.staging_root, self.run_id, self.entity)

    @property
    def backfill(self) -> bool:
        return self.window is not None

    def progress(self, stage: str, total: int | None = None) -> Progress:
        """A :class:`Progress` for a long stage: logged, and stored on the run for the entity page
        (not in a dry run, which leaves the store untouched)."""

        def note(figures: Mapping[str, Any]) -> None:
            self.store.note_progress(self.run_id, self.entity, figures)

        return Progress(stage, total, report=None if self.dry_run else note, every=self.progress_every)

    def dead_letter(self, stage: str, failures: Iterable[Failure], *, retry_now: bool = False) -> int:
        """Queue failures, unless this is a dry run (which must leave the store untouched).

        ``retry_now`` makes the letters due at once (no backoff): for records that did nothing
        wrong but must be read again from both sides on the next run.

        The ``error`` text is shown to every reader of the queue (UI viewers, the CLI, the soak
        report), so whatever a stage or a foreign error message put in it is masked here once
        more (:func:`d365sync.engine.pii.mask_text`); the payload keeps the raw rows for a replay.
        """
        if self.dry_run:
            return sum(1 for _ in failures)
        failures = [replace(f, error=mask_text(f.error)) for f in failures]
        if not failures:
            return 0
        backoff = {"backoff": timedelta(0)} if retry_now else {}
        return self.store.dead_letter(self.entity, stage, self.run_id, failures, **backoff)


# ------------------------------------------------------------------------- shared helpers
def now() -> datetime:
    return datetime.now(UTC)


def aware(value: Any) -> datetime | None:
    """Dataverse ISO text or ERP naive-UTC timestamps → aware UTC datetimes (None stays)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def norm_key(value: Any) -> str | None:
    """Canonical keys compare as trimmed text (CHAR columns come back padded)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def bucket_of(key: str, buckets: int) -> int:
    """Stable across processes (``hash`` is salted): both sides of a key meet in one bucket."""
    digest = hashlib.blake2b(key.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % max(1, buckets)


def base_to_dict(base: Base | None) -> dict[str, Any] | None:
    if base is None:
        return None
    return {
        "values": dict(base.values),
        "dynamics_version": base.dynamics_version,
        "erp_version": base.erp_version,
        "dynamics_modified": base.dynamics_modified,
        "erp_modified": base.erp_modified,
        "deleted_on": base.deleted_on,
    }


def base_from_dict(data: Mapping[str, Any] | None) -> Base | None:
    return None if data is None else Base(**data)


def replay_payload(rows: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """What a dead letter or parked child keeps so a later run can re-inject the rows as extracted."""
    return {"rows": [{"side": side, "row": dict(row)} for side, row in rows.items() if row is not None]}


@contextmanager
def fewer_collections(young: int = 100_000) -> Iterator[None]:
    """Run a stage with the cyclic garbage collector's young generation collected every
    ``young`` allocations instead of Python's 700.

    Why: a stage holds tens of thousands of small dicts (a bucket, a validation batch) and makes
    millions more; the rows hold no reference cycles, so almost every collection finds nothing,
    yet they cost 15-25 % of a large run (measured, issue 14). Memory is still freed at once by
    reference counting; the old setting is restored afterwards.
    """
    before = gc.get_threshold()
    gc.set_threshold(max(young, before[0]), max(50, before[1]), max(100, before[2]))
    gc.freeze()  # what was alive before the stage (modules, GX) is never scanned during it
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
