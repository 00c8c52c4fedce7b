"""Entity specs: pydantic models of ``include/entities/*.yaml``, validated before any I/O.

An entity file is a short document with a fixed vocabulary (see ``include/entities/README``
in the docstrings below and ``_defaults.yaml``): the Dynamics table and alternate key, the ERP
table and key, change detection per side, the fields (owner, columns, transforms each way,
conflict policy), lookups, value maps, create/delete policy per direction, expectations per
side and the schedule. ``_defaults.yaml`` is merged into every entity by :func:`merge_defaults`
and nowhere else.

Loading does three things, in order, and reports every problem as ``file: entity: field: …``:

1. parse and merge defaults, then validate the document with the models here;
2. check every table and column against a :class:`Catalog` (the sandbox schemas by default;
   pass one built from a real environment's metadata to validate against that);
3. compile each field's transform chains once (:class:`EntityPlan`), so the per-record path
   calls prebuilt functions and never resolves a name.

:func:`load_entities` then checks the files together: entity lookups name loaded entities, and
the dependencies between entities (:func:`dependencies`: lookups, and records another entity
creates) have no cycle. :func:`dependency_order` is the one parents-first order every runner uses.

This module is imported by DAG files at parse time: it imports only pydantic, yaml and the
stdlib at module level; schema catalogs and the ERP client's spec types load lazily.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from d365sync import ENTITIES_DIR
from d365sync.engine.transforms import (
    BuildEnv,
    Chain,
    LookupTarget,
    Step,
    TransformContext,
    TransformError,
    TransformSpecError,
    ValueMapTable,
    compile_chain,
    invert_chain,
    parse_args,
)

if TYPE_CHECKING:
    from d365sync.engine.merge import EntityRules
    from d365sync.erp.spec import TableSpec

Side = Literal["dynamics", "erp"]
Owner = Literal["dynamics", "erp", "both"]
PolicyName = Literal["owner_wins", "last_write_wins", "version", "manual_review"]
NonOwnerChange = Literal["revert", "report"]
DeletePolicy = Literal["deactivate", "delete", "ignore"]
SIDES: tuple[Side, Side] = ("dynamics", "erp")
STATE_COLUMNS = frozenset({"statecode", "statuscode"})  # Dataverse keeps them consistent with each other
DEFAULTS_FILE = "_defaults.yaml"
CRON = re.compile(r"^(@(hourly|daily|weekly|monthly|yearly|once|continuous)|(\S+\s+){4}\S+)$")


class Model(BaseModel):
    """Strict base: unknown keys are typos, and specs never change after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- transforms
class TransformStep(Model):
    """One step of a chain. YAML: ``trim``, ``{pad: {width: 10}}`` or ``{name: pad, args: {...}}``."""

    name: str = Field(description="A registered transform (see d365sync.engine.transforms) or 'custom'.")
    args: dict[str, Any] = Field(
        default_factory=dict, description="Arguments, checked against the transform."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}
        elif isinstance(data, dict) and len(data) == 1 and "name" not in data:
            ((name, args),) = data.items()
            data = {"name": name, "args": args or {}}
        if isinstance(data, dict):
            parse_args(str(data.get("name")), data.get("args"))  # unknown names and bad args fail here
        return data

    @property
    def step(self) -> Step:
        return (self.name, self.args)


Chainspec = list[TransformStep]


# ------------------------------------------------------------------------------ conflicts
class OwnerWins(Model):
    """Both sides changed the field: the owner's value is kept."""

    policy: Literal["owner_wins"] = Field(description="Discriminator.")
    winner: Side | None = Field(None, description="Who wins; required when the field is owned by both.")


class LastWriteWins(Model):
    """The later change wins; inside the clock-skew tolerance the fallback winner does."""

    policy: Literal["last_write_wins"] = Field(description="Discriminator.")
    clock_skew_seconds: float = Field(
        60, ge=0, le=86400, description="Changes closer than this count as a tie."
    )
    winner: Side | None = Field(None, description="Tie-break (fallback) side; required when owned by both.")


class VersionCheck(Model):
    """An ETag / ROW_VER mismatch against the base version is a conflict."""

    policy: Literal["version"] = Field(description="Discriminator.")
    on_mismatch: Literal["manual_review", "owner_wins"] = Field(
        "manual_review", description="What a version mismatch leads to."
    )
    winner: Side | None = Field(None, description="Who wins with on_mismatch=owner_wins (both-owned fields).")


class ManualReview(Model):
    """The field is parked in the review queue with both values and the base."""

    policy: Literal["manual_review"] = Field(description="Discriminator.")


ConflictPolicy = Annotated[
    OwnerWins | LastWriteWins | VersionCheck | ManualReview, Field(discriminator="policy")
]


# ------------------------------------------------------------------------ change detection
class Delta(Model):
    """Dataverse change tracking: delta tokens (Dynamics only)."""

    mode: Literal["delta"] = Field(description="Discriminator.")


class Cursor(Model):
    """A monotonically maintained timestamp/version column, re-read with an overlap window."""

    mode: Literal["cursor"] = Field(description="Discriminator.")
    column: str = Field(description="The cursor column (LAST_UPD, modifiedon).")
    overlap_seconds: int = Field(300, ge=0, le=86400, description="How far back each read re-starts.")


class Snapshot(Model):
    """No trustworthy timestamp: the whole table is hashed and diffed against the last run."""

    mode: Literal["snapshot"] = Field(description="Discriminator.")


ChangeDetection = Annotated[Delta | Cursor | Snapshot, Field(discriminator="mode")]


# ------------------------------------------------------------------------------ value maps
class UnmappedQuarantine(Model):
    """An unmapped value quarantines the row."""

    policy: Literal["quarantine"] = Field(description="Discriminator.")


class UnmappedReview(Model):
    """An unmapped value sends the record to manual review."""

    policy: Literal["manual_review"] = Field(description="Discriminator.")


class UnmappedDefault(Model):
    """An unmapped value becomes a default."""

    policy: Literal["default"] = Field(description="Discriminator.")
    value: Any = Field(None, description="Default for canonical → side.")
    inverse_value: Any = Field(None, description="Default for side → canonical.")


Unmapped = Annotated[UnmappedQuarantine | UnmappedReview | UnmappedDefault, Field(discriminator="policy")]


class ValueMapSpec(Model):
    """Option-set / status-code pairs, canonical → side; the inverse is derived."""

    description: str = Field("", description="What the codes mean.")
    map: dict[Any, Any] = Field(min_length=1, description="canonical value → side value.")
    bijective: bool = Field(False, description="Require one-to-one pairs (needed where values round-trip).")
    prefer: dict[Any, Any] = Field(
        default_factory=dict, description="side value → canonical value, for sides that share a value."
    )
    unmapped: Unmapped = Field(
        default_factory=lambda: UnmappedQuarantine(policy="quarantine"), description="Unmapped value policy."
    )

    @model_validator(mode="after")
    def _bijection(self) -> ValueMapSpec:
        if self.bijective and (clashes := self.collisions()):
            raise ValueError(f"declared bijective but not one-to-one: {clashes}")
        return self

    def collisions(self) -> dict[Any, list[Any]]:
        """Side values that several canonical values map to (empty for a bijection)."""
        seen: dict[Any, list[Any]] = {}
        for canonical, value in self.map.items():
            seen.setdefault(value, []).append(canonical)
        return {v: ks for v, ks in seen.items() if len(ks) > 1}

    def table(self, name: str) -> ValueMapTable:
        inverse = {v: k for k, v in reversed(list(self.map.items()))} | self.prefer
        u = self.unmapped
        default = u.value if isinstance(u, UnmappedDefault) else None
        back = u.inverse_value if isinstance(u, UnmappedDefault) else None
        return ValueMapTable(name, dict(self.map), inverse, u.policy, default, back)


# --------------------------------------------------------------------------------- lookups
class EntityLookup(Model):
    """A reference to another synced entity, resolved through that entity's key map."""

    kind: Literal["entity"] = Field(description="Discriminator.")
    entity: str = Field(description="The target entity (file name without .yaml).")
    dynamics_table: str = Field(description="The target's Dynamics table (for @odata.bind).")
    entity_set: str | None = Field(
        None, description="The target's entity set; taken from the catalog if absent."
    )


class ReferenceLookup(Model):
    """A reference table that is read, not synced (currencies): key value ↔ GUID."""

    kind: Literal["reference"] = Field(description="Discriminator.")
    dynamics_table: str = Field(description="The referenced Dynamics table.")
    key: str = Field(description="Its alternate-key column holding the canonical value.")
    entity_set: str | None = Field(None, description="Its entity set; taken from the catalog if absent.")


LookupSpec = Annotated[EntityLookup | ReferenceLookup, Field(discriminator="kind")]


# ---------------------------------------------------------------------------- expectations
class _Expectation(Model):
    column: str = Field(description="The side's column as extracted (lookups: _x_value).")
    mostly: float | None = Field(None, gt=0, le=1, description="Share of rows that must pass (GX 'mostly').")

    def gx(self) -> tuple[str, dict[str, Any]]:
        """GX Core 1.x expectation class name and keyword arguments (the validator imports GX)."""
        kwargs = {"column": self.column, **self._kwargs()}
        return self.gx_class, kwargs if self.mostly is None else {**kwargs, "mostly": self.mostly}

    gx_class: ClassVar[str] = ""

    def _kwargs(self) -> dict[str, Any]:
        return {}

    def columns(self) -> tuple[str, ...]:
        """Every extracted column the expectation reads."""
        return (self.column,)

    @property
    def derived_column(self) -> str | None:
        """Name of a column the validator computes before GX runs (None: GX reads ``column``)."""
        return None


class NotNull(_Expectation):
    """Column is never null."""

    type: Literal["not_null"] = Field(description="Discriminator.")
    gx_class: ClassVar[str] = "ExpectColumnValuesToNotBeNull"


class Unique(_Expectation):
    """Column values are unique (every duplicate row fails).

    Legacy systems hold the same customer twice under new numbers with a name that differs only
    in case or spacing; ``together_with`` plus ``normalize`` catches those: the validator builds
    one derived column from the normalised values and GX checks that for uniqueness.
    """

    type: Literal["unique"] = Field(description="Discriminator.")
    together_with: tuple[str, ...] = Field(
        (), description="More columns that, with `column`, must be unique together (a compound key)."
    )
    normalize: bool = Field(
        False, description="Compare after trimming, case-folding and collapsing inner whitespace."
    )
    gx_class: ClassVar[str] = "ExpectColumnValuesToBeUnique"

    def columns(self) -> tuple[str, ...]:
        return (self.column, *self.together_with)

    @property
    def derived_column(self) -> str | None:
        if not (self.normalize or self.together_with):
            return None
        return "__unique__" + "+".join(self.columns()) + ("~normalized" if self.normalize else "")

    def gx(self) -> tuple[str, dict[str, Any]]:
        gx_class, kwargs = super().gx()
        return gx_class, {**kwargs, "column": self.derived_column or self.column}


class Regex(_Expectation):
    """Non-null values match a regular expression."""

    type: Literal["regex"] = Field(description="Discriminator.")
    regex: str = Field(description="Python/GX regular expression.")
    gx_class: ClassVar[str] = "ExpectColumnValuesToMatchRegex"

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        re.compile(value)
        return value

    def _kwargs(self) -> dict[str, Any]:
        return {"regex": self.regex}


class InSet(_Expectation):
    """Non-null values come from a fixed set."""

    type: Literal["in_set"] = Field(description="Discriminator.")
    values: list[Any] = Field(min_length=1, description="Allowed values.")
    gx_class: ClassVar[str] = "ExpectColumnValuesToBeInSet"

    def _kwargs(self) -> dict[str, Any]:
        return {"value_set": self.values}


class Between(_Expectation):
    """Non-null values lie within bounds (inclusive)."""

    type: Literal["between"] = Field(description="Discriminator.")
    min: float | None = Field(None, description="Lower bound, or none.")
    max: float | None = Field(None, description="Upper bound, or none.")
    gx_class: ClassVar[str] = "ExpectColumnValuesToBeBetween"

    def _kwargs(self) -> dict[str, Any]:
        return {"min_value": self.min, "max_value": self.max}


class MaxLength(_Expectation):
    """Text is at most ``max`` characters (e.g. the narrower column on the other side)."""

    type: Literal["max_length"] = Field(description="Discriminator.")
    max: int = Field(ge=1, description="Longest allowed value.")
    gx_class: ClassVar[str] = "ExpectColumnValueLengthsToBeBetween"

    def _kwargs(self) -> dict[str, Any]:
        return {"max_value": self.max}


Expectation = Annotated[NotNull | Unique | Regex | InSet | Between | MaxLength, Field(discriminator="type")]


class ValidationSpec(Model):
    """Great Expectations suites per side and the share of invalid rows that fails a run."""

    invalid_share_threshold: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of invalid fresh rows that is systemic, not a few bad records: an alert, "
        "and a stop on a full load when `stop_on_full_load`.",
    )
    min_rows: int = Field(
        100,
        ge=1,
        description="The share is judged only over a side with at least this many fresh rows in the run "
        "(1 bad row of 4 is that record's problem); retried rows never count.",
    )
    stop_on_full_load: bool = Field(
        True,
        description="Fail a full load (first read, or a full resync) past the threshold: a wrong mapping "
        "or table shows there. Incremental runs only alert; their bad rows wait as dead letters.",
    )
    dynamics: list[Expectation] = Field(
        default_factory=list, description="Expectations on extracted Dynamics rows."
    )
    erp: list[Expectation] = Field(default_factory=list, description="Expectations on extracted ERP rows.")


# ------------------------------------------------------------------------------- the sides
class DynamicsSideSpec(Model):
    """The Dataverse table an entity syncs with."""

    table: str = Field(description="Logical name (account).")
    entity_set: str = Field(description="Web API entity set (accounts).")
    key: str = Field(description="Alternate-key column holding the canonical key (accountnumber).")
    change_detection: ChangeDetection = Field(description="How changes are found: delta, cursor or snapshot.")
    inactive_state: int = Field(1, description="statecode written when a record is deactivated.")
    inactive_status: int = Field(2, description="statuscode written with inactive_state.")


class ErpSideSpec(Model):
    """The ERP table an entity syncs with."""

    table: str = Field(description="Table name (CUST_MASTER).")
    key: list[str] = Field(min_length=1, description="Key column(s) identifying one entity record.")
    change_detection: ChangeDetection = Field(description="cursor (with overlap) or snapshot.")
    grouped: bool = Field(False, description="Rows are grouped by `key` (a key prefix) and fields aggregate.")
    create_values: dict[str, Any] = Field(
        default_factory=dict, description="Constants set on rows we create."
    )
    inactive_status: str | None = Field(
        None, description="Status written on deactivation (table default if none)."
    )

    @field_validator("key", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class PerDirection(Model):
    """A setting per direction of flow."""

    to_erp: Any = Field(description="Applies to changes flowing into the ERP.")
    to_dynamics: Any = Field(description="Applies to changes flowing into Dynamics.")


class Creates(PerDirection):
    """Whether a record that exists on one side only is created on the other."""

    to_erp: bool = Field(description="Create ERP rows for new Dynamics records.")
    to_dynamics: bool = Field(description="Create Dynamics records for new ERP rows.")


class Deletes(PerDirection):
    """What a delete (or deactivation) on one side does to the other."""

    to_erp: DeletePolicy = Field(description="deactivate | delete | ignore in the ERP.")
    to_dynamics: DeletePolicy = Field(description="deactivate | delete | ignore in Dynamics.")


class Examples(Model):
    """Sample extracted rows per side (read names), documentation that the test suite executes.

    For each row: side → canonical → every other writable side → read back → canonical must
    give the same values. That is the echo guard's premise, checked per entity file.
    """

    dynamics: list[dict[str, Any]] = Field(default_factory=list, description="Rows as read from Dynamics.")
    erp: list[dict[str, Any]] = Field(default_factory=list, description="Rows as read from the ERP.")


# --------------------------------------------------------------------------------- fields
class FieldSpec(Model):
    """One canonical field: who owns it, where it lives on each side, how it is converted."""

    name: str = Field(description="Canonical name (the key under `fields:`).")
    description: str = Field("", description="What the field means.")
    owner: Owner = Field(description="dynamics | erp | both: who may change it.")
    dynamics: str | None = Field(None, description="Dynamics column (logical name; lookups without _value).")
    erp: str | None = Field(None, description="ERP column.")
    to_dynamics: Chainspec = Field(default_factory=list, description="Transforms canonical → Dynamics.")
    to_erp: Chainspec = Field(default_factory=list, description="Transforms canonical → ERP.")
    from_dynamics: Chainspec | None = Field(
        None, description="Dynamics → canonical; default: inverse of to_dynamics."
    )
    from_erp: Chainspec | None = Field(None, description="ERP → canonical; default: inverse of to_erp.")
    conflict: ConflictPolicy = Field(description="Policy when both sides changed the field.")
    on_non_owner_change: NonOwnerChange = Field(description="revert | report a change by the non-owner.")
    pii: bool = Field(
        False,
        description="Personal data: encrypted in the sync state store (bases, audit values, reviews), "
        "exported and erased per data subject by `d365sync privacy` (see docs/security.md).",
    )

    @model_validator(mode="before")
    @classmethod
    def _owned(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("owner") in (None, "none", "neither"):
            raise ValueError("owned by neither side: set owner to dynamics, erp or both")
        return data

    @model_validator(mode="after")
    def _columns_fit_owner(self) -> FieldSpec:
        for side in SIDES:
            if self.owner in (side, "both") and self.column(side) is None:
                raise ValueError(f"owner is {self.owner} but the field has no {side} column")
            if self.column(side) is None and (self.chain(side, "to") or self.chain(side, "from")):
                raise ValueError(f"transforms for {side} but no {side} column")
        if self.owner == "both" and self.conflict.policy != "manual_review" and self.winner is None:
            raise ValueError("owned by both sides: conflict.winner must name the side that wins a tie")
        return self

    def column(self, side: Side) -> str | None:
        return self.dynamics if side == "dynamics" else self.erp

    def chain(self, side: Side, way: Literal["to", "from"]) -> Chainspec | None:
        return getattr(self, f"{way}_{side}")

    @property
    def winner(self) -> Side | None:
        """Side that wins owner_wins, a last_write_wins tie or a version mismatch."""
        declared = getattr(self.conflict, "winner", None)
        return declared or (None if self.owner == "both" else self.owner)

    def value_maps_used(self) -> set[str]:
        steps = [s for side in SIDES for way in ("to", "from") for s in self.chain(side, way) or ()]
        return {s.args.get("map", "currency") for s in steps if s.name in ("value_map", "currency")}


# -------------------------------------------------------------------------------- entity
class Events(Model):
    """What starts a run between cron ticks (issue 13); the cron stays as the safety net.

    ``dynamics: webhook``: Dataverse notifications that reach the receiver's inbox start a run
    within seconds; ``dynamics: servicebus``: the same, delivered through an Azure Service Bus
    queue and the ``d365sync_servicebus_inbox`` DAG (docs/events-servicebus.md), and
    ``d365sync events register`` leaves the entity out. ``erp: poll``: one cheap query (the cursor
    column's maximum) every ``poll_seconds`` starts a run when it moved. Either way the run itself
    still reads the delta token and the cursor, so a lost notification only delays a change until
    the next event or tick.
    """

    dynamics: Literal["webhook", "servicebus", "none"] = Field(
        "none", description="Dataverse change notifications: by webhook or through Azure Service Bus."
    )
    erp: Literal["poll", "none"] = Field("none", description="ERP cursor polling (cursor tables only).")
    poll_seconds: float = Field(5.0, ge=1.0, le=3600.0, description="ERP poll interval.")
    inbox_poll_seconds: float = Field(1.0, ge=0.2, le=60.0, description="How often the inbox is checked.")
    fast_lane_max: int = Field(
        200, ge=0, le=100_000, description="Event runs with at most this many inbox events run as one task."
    )

    @property
    def enabled(self) -> bool:
        return self.dynamics != "none" or self.erp != "none"

    @property
    def inbox(self) -> bool:
        """Runs start from Dataverse notifications waiting in the inbox (webhook or Service Bus)."""
        return self.dynamics != "none"


class EntitySpec(Model):
    """One entity: a pair of tables kept in sync, field by field."""

    name: str = Field(description="Entity name; equals the file name without .yaml.")
    description: str = Field("", description="What the entity is and which way it flows.")
    schedule: str = Field(description="Cron expression (or @preset) for the entity's DAG.")
    dynamics: DynamicsSideSpec = Field(description="The Dataverse side.")
    erp: ErpSideSpec = Field(description="The ERP side.")
    key: str = Field(description="The canonical field that identifies a record on both sides.")
    fields: dict[str, FieldSpec] = Field(min_length=1, description="Canonical fields by name.")
    lookups: dict[str, LookupSpec] = Field(default_factory=dict, description="Targets of lookup transforms.")
    value_maps: dict[str, ValueMapSpec] = Field(default_factory=dict, description="Code tables by name.")
    creates: Creates = Field(description="Create policy per direction.")
    deletes: Deletes = Field(description="Delete policy per direction.")
    validation: ValidationSpec = Field(description="Expectations and the invalid-share threshold.")
    examples: Examples = Field(
        default_factory=lambda: Examples(),
        description="Sample rows; the generated entity suite round-trips them.",
    )
    load_parts: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "Parallel Dataverse load tasks (dynamic task mapping, each under the dynamics_api pool): "
            "part i writes every n-th bucket of keys. Worth it for large initial loads with "
            "workers to spare; every run pays one more task start per part."
        ),
    )
    events: Events = Field(
        default_factory=lambda: Events(), description="Event-driven runs (webhooks, ERP polling)."
    )

    @field_validator("fields", mode="before")
    @classmethod
    def _name_fields(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: {**v, "name": k} if isinstance(v, dict) else v for k, v in value.items()}

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not CRON.match(value.strip()):
            raise ValueError(f"{value!r} is not a cron expression or @preset")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EntitySpec:
        for check in (
            self._check_key,
            self._check_detection,
            self._check_bijections,
            self._check_state,
            self._check_events,
        ):
            check()
        return self

    def _check_key(self) -> None:
        key = self.fields.get(self.key)
        if key is None:
            raise ValueError(f"key: {self.key!r} is not a field (fields: {sorted(self.fields)})")
        if key.pii:
            raise ValueError(
                f"field {self.key!r} is the key and marked pii: true, but keys stay clear in the sync state "
                "store (every lookup needs them), so it could not be encrypted; key an entity by a "
                "number that is not personal data (docs/security.md)"
            )
        if key.dynamics != self.dynamics.key:
            raise ValueError(f"key field {self.key!r} must map dynamics.key {self.dynamics.key!r}")
        if key.erp not in self.erp.key:
            raise ValueError(f"key field {self.key!r} must map one of erp.key {self.erp.key}")

    def _check_detection(self) -> None:
        if self.erp.change_detection.mode == "delta":
            raise ValueError("erp.change_detection: delta tokens exist only in Dynamics")

    def _check_events(self) -> None:
        if self.events.erp == "poll" and self.erp.change_detection.mode != "cursor":
            raise ValueError(
                "events.erp: poll needs erp.change_detection mode cursor (a snapshot table has no "
                "column whose maximum moves when a row changes)"
            )

    def _check_bijections(self) -> None:
        for f in self.fields.values():
            for name in f.value_maps_used() if f.owner == "both" else ():
                vmap = self.value_maps.get(name)
                if vmap is not None and not vmap.bijective:
                    raise ValueError(
                        f"field {f.name!r} is owned by both sides, so value map {name!r} must be "
                        f"bijective: true (collisions: {vmap.collisions() or 'none'})"
                    )

    def _check_state(self) -> None:
        """statecode and statuscode move together in Dataverse: one owner for both.

        A status reason belongs to one state, so writing statuscode moves statecode (and a state
        change resets statuscode). Fields of different owners on the pair would let one side's
        value drag the state the other side owns.
        """
        coupled = [f for f in self.fields.values() if f.dynamics in STATE_COLUMNS]
        owners = {f.owner for f in coupled}
        if len(owners) > 1:
            shown = ", ".join(f"field {f.name!r} (owner {f.owner}) maps {f.dynamics}" for f in coupled)
            raise ValueError(
                f"{shown}: Dataverse moves statecode and statuscode together, so one side's value would "
                "change the state the other side owns; give them one owner, or map the other side's "
                "status to a column of its own (a custom choice column)"
            )

    _source: Path | None = PrivateAttr(None)
    _catalog: Catalog | None = PrivateAttr(None)
    _plan: EntityPlan | None = PrivateAttr(None)

    def _attach(self, source: Path, catalog: Catalog, plan: EntityPlan | None) -> None:
        self._source, self._catalog, self._plan = source, catalog, plan

    # -- what other modules need ---------------------------------------------------------
    @property
    def source(self) -> Path:
        """The file the spec was loaded from."""
        return self._source or Path(f"{self.name}.yaml")

    @property
    def plan(self) -> EntityPlan:
        """The compiled mapping; only specs loaded through load_entity/load_entities have one."""
        if self._plan is None:
            raise RuntimeError(f"entity {self.name} was not loaded with load_entity(); it has no plan")
        return self._plan

    @property
    def dynamics_select(self) -> list[str]:
        """``$select`` for the Dynamics client: id, mapped columns as read, version, state and the
        last modifier."""
        assert self._catalog is not None, "load the spec with load_entity()"
        dv = self._catalog.dynamics[self.dynamics.table]
        names = [
            dv.primary_id,
            *(dv.columns[f.dynamics].read_name for f in self.fields.values() if f.dynamics),
        ]
        names += [c for c in ("modifiedon", "versionnumber", "statecode", "statuscode") if c in dv.columns]
        if "modifiedby" in dv.columns:  # who changed it: the review queue names the person
            names.append("_modifiedby_value")
        return list(dict.fromkeys(names))

    def dynamics_has(self, *columns: str) -> bool:
        """Whether the Dataverse table has all these columns (logical names)."""
        assert self._catalog is not None, "load the spec with load_entity()"
        known = self._catalog.dynamics[self.dynamics.table].columns
        return all(c in known for c in columns)

    def erp_table_spec(self) -> TableSpec:
        """The ERP client's TableSpec: the table's keys, system columns and the mapped columns only."""
        from d365sync.erp.spec import TableSpec

        assert self._catalog is not None, "load the spec with load_entity()"
        table = self._catalog.erp[self.erp.table]
        system = {table.cursor_column, table.version_column, table.status_column, *table.key}
        used = system | {f.erp for f in self.fields.values()} | set(self.erp.create_values)
        data = table.model_dump()
        data["columns"] = [c for c in table.columns if c.name in used]
        data["hard_delete"] = table.hard_delete or self.deletes.to_erp == "delete"
        data["inactive_status"] = self.erp.inactive_status or table.inactive_status
        return TableSpec.model_validate(data)

    @property
    def pii_fields(self) -> frozenset[str]:
        """Canonical fields marked ``pii: true`` (encrypted at rest, erased per subject)."""
        return frozenset(name for name, f in self.fields.items() if f.pii)

    def pii_columns(self, side: str) -> frozenset[str]:
        """The ``side`` ("dynamics" or "erp") column names of the ``pii: true`` fields."""
        return frozenset(
            column for name in self.pii_fields if (column := getattr(self.fields[name], side, None))
        )

    def merge_fields(self) -> list[MergeField]:
        """Per-field rules for the three-way merge, in the merge module's vocabulary."""
        return [MergeField.of(f) for f in self.fields.values()]

    def merge_rules(self) -> EntityRules:
        """The merge module's :class:`~d365sync.engine.merge.EntityRules` for this entity."""
        from d365sync.engine.merge import DeletePolicy as MergeDeletes
        from d365sync.engine.merge import EntityRules, FieldRule

        rules = tuple(
            FieldRule(
                m.name,
                m.owner,
                m.policy,
                m.clock_skew_seconds or 0.0,
                m.winner,
                m.on_non_owner_change,
                m.on_version_mismatch or "manual_review",
            )
            for m in self.merge_fields()
        )
        deletes = MergeDeletes(self.deletes.to_erp, self.deletes.to_dynamics)
        return EntityRules(
            self.name, rules, _DIRECTIONS[self.creates.to_erp, self.creates.to_dynamics], deletes
        )

    def writes_to(self, f: FieldSpec, side: Side) -> bool:
        """Whether values of ``f`` may be written to ``side`` (changes, reverts or creates)."""
        if f.column(side) is None:
            return False
        return f.owner != side or (self.creates.to_erp if side == "erp" else self.creates.to_dynamics)


_DIRECTIONS = {
    (True, True): "both",
    (True, False): "dynamics_to_erp",
    (False, True): "erp_to_dynamics",
    (False, False): "none",
}


@dataclass(frozen=True)
class MergeField:
    """The flat per-field rule the merge module consumes (exact string values)."""

    name: str
    owner: Owner
    policy: PolicyName
    winner: Side | None
    clock_skew_seconds: float | None
    on_version_mismatch: Literal["manual_review", "owner_wins"] | None
    on_non_owner_change: NonOwnerChange
    sides: tuple[Side, ...]

    @classmethod
    def of(cls, f: FieldSpec) -> MergeField:
        c = f.conflict
        skew = c.clock_skew_seconds if isinstance(c, LastWriteWins) else None
        mismatch = c.on_mismatch if isinstance(c, VersionCheck) else None
        sides = tuple(s for s in SIDES if f.column(s) is not None)
        return cls(f.name, f.owner, c.policy, f.winner, skew, mismatch, f.on_non_owner_change, sides)


# ------------------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class DynamicsColumnInfo:
    """What validation and plans need to know about one Dataverse column."""

    name: str
    lookup: bool = False
    targets: tuple[str, ...] = ()

    @property
    def read_name(self) -> str:
        return f"_{self.name}_value" if self.lookup else self.name


@dataclass(frozen=True)
class DynamicsTableInfo:
    """A Dataverse table's names, columns and alternate keys."""

    logical_name: str
    entity_set: str
    primary_id: str
    columns: Mapping[str, DynamicsColumnInfo]
    keys: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Catalog:
    """Known tables and columns on both sides; specs are checked against it.

    :meth:`sandbox` builds it from the sandbox schemas. A real environment builds one from its
    own metadata (EntityDefinitions, ODBC catalog) and passes it to :func:`load_entities`.
    """

    dynamics: Mapping[str, DynamicsTableInfo]
    erp: Mapping[str, TableSpec]

    @classmethod
    def sandbox(cls) -> Catalog:
        global _SANDBOX
        if _SANDBOX is None:
            _SANDBOX = _sandbox_catalog()
        return _SANDBOX


_SANDBOX: Catalog | None = None


def _sandbox_catalog() -> Catalog:
    from d365sync.sandbox.dataverse.schema import TABLES as DV
    from d365sync.sandbox.erp.tables import TABLES as ERP

    dynamics = {
        t.logical_name: DynamicsTableInfo(
            t.logical_name,
            t.entity_set,
            t.primary_id,
            {c.name: DynamicsColumnInfo(c.name, c.is_lookup, c.targets) for c in t.columns},
            tuple(k.attributes for k in t.keys),
        )
        for t in DV.values()
    }
    return Catalog(dynamics, {t.name: t for t in ERP})


# -------------------------------------------------------------------------------- errors
class SpecError(ValueError):
    """Every problem found in the entity files, one line each: ``file: entity X: where: what``."""

    def __init__(self, issues: Sequence[str]) -> None:
        self.issues = list(issues)
        super().__init__("invalid entity spec:\n  " + "\n  ".join(self.issues))


def _issue(path: Path | str, entity: str, message: str) -> str:
    return f"{Path(path).name}: entity {entity}: {message}"


def _pydantic_issues(exc: ValidationError) -> Iterator[str]:
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if len(loc) >= 2 and loc[0] == "fields":
            rest = ".".join(loc[2:])
            yield f"field {loc[1]!r}: {rest + ': ' if rest else ''}{msg}"
        else:
            yield f"{'.'.join(loc) + ': ' if loc else ''}{msg}"


# ------------------------------------------------------------------------------- defaults
_TAGS = ("mode", "policy", "kind", "type")


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` wins; mappings merge key by key, unless they are different union variants."""
    if any(t in base and t in over and base[t] != over[t] for t in _TAGS):
        return dict(over)
    merged = dict(base)
    for name, value in over.items():
        old = merged.get(name)
        both = isinstance(old, Mapping) and isinstance(value, Mapping)
        merged[name] = deep_merge(old, value) if both else value  # type: ignore[arg-type]
    return merged


def merge_defaults(defaults: Mapping[str, Any], doc: Mapping[str, Any]) -> dict[str, Any]:
    """The one place defaults apply: ``entity:`` into the document, ``field:`` into each field.

    Field defaults come from ``_defaults.yaml`` ``field:``, then the entity's own
    ``field_defaults:``, then the field itself.
    """
    entity = deep_merge(defaults.get("entity") or {}, doc)
    field_base = deep_merge(defaults.get("field") or {}, entity.pop("field_defaults", None) or {})
    fields = entity.get("fields")
    if isinstance(fields, Mapping):
        entity["fields"] = {
            k: deep_merge(field_base, v) if isinstance(v, Mapping) else v for k, v in fields.items()
        }
    return entity


def read_defaults(directory: Path | str) -> dict[str, Any]:
    """``_defaults.yaml`` of a directory (empty when absent); only ``entity`` and ``field`` keys."""
    path = Path(directory) / DEFAULTS_FILE
    if not path.exists():
        return {}
    data = read_yaml(path, "defaults")
    unknown = set(data) - {"entity", "field", "description", "privacy"}
    if unknown:
        raise SpecError(
            [_issue(path, "defaults", f"unknown top-level keys {sorted(unknown)} (entity, field, privacy)")]
        )
    return data


# ------------------------------------------------------------------------------- privacy
class Retention(Model):
    """How long the sync keeps what it no longer needs (days; 0 keeps forever)."""

    audit_days: int = Field(90, ge=0, description="Audit rows (erasure records are kept).")
    dead_letter_days: int = Field(
        30, ge=0, description="Resolved, skipped and superseded dead letters; released parked children."
    )
    run_days: int = Field(90, ge=0, description="Run reports (the health report's history).")
    review_days: int = Field(
        90,
        ge=0,
        description="Review items applied, or closed because both sides agreed again (their values).",
    )
    staging_days: int = Field(14, ge=0, description="Staging files, committed or not (and health reports).")
    inbox_days: int = Field(
        7, ge=0, description="Event inbox rows done or ignored (notifications: ids and attribute names)."
    )


class PrivacySettings(Model):
    """The ``privacy:`` section of ``_defaults.yaml``: retention of the sync's own stores."""

    retention: Retention = Field(default_factory=lambda: Retention(), description="Retention periods.")


def load_privacy_settings(directory: Path | str) -> PrivacySettings:
    """``privacy:`` of the entity directory's ``_defaults.yaml`` (the defaults when absent)."""
    path = Path(directory) / DEFAULTS_FILE
    try:
        return PrivacySettings.model_validate(read_defaults(directory).get("privacy") or {})
    except ValidationError as exc:
        raise SpecError([_issue(path, "defaults", f"privacy: {i}") for i in _pydantic_issues(exc)]) from None


def read_yaml(path: Path, entity: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError([_issue(path, entity, f"cannot read YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise SpecError([_issue(path, entity, "the document must be a mapping")])
    return data


# -------------------------------------------------------------------------------- loading
def load_entity(
    path: Path | str, catalog: Catalog | None = None, defaults: Mapping[str, Any] | None = None
) -> EntitySpec:
    """Parse, merge defaults, validate, check against the catalog and compile one entity file."""
    path = Path(path)
    name = path.stem
    merged = merge_defaults(
        read_defaults(path.parent) if defaults is None else defaults, read_yaml(path, name)
    )
    if merged.setdefault("name", name) != name:
        raise SpecError([_issue(path, name, f"name: {merged['name']!r} must equal the file name {name!r}")])
    try:
        spec = EntitySpec.model_validate(merged)
    except ValidationError as exc:
        raise SpecError([_issue(path, name, i) for i in _pydantic_issues(exc)]) from None
    catalog = catalog or Catalog.sandbox()
    issues = list(check_catalog(spec, catalog))
    plan = None if issues else _compile(spec, catalog, issues)
    if issues:
        raise SpecError([_issue(path, name, i) for i in issues])
    spec._attach(path, catalog, plan)
    return spec


def entities_dir() -> Path:
    """Where the entity files are: ``D365SYNC_ENTITIES_DIR``, else the shipped ``include/entities``."""
    return Path(os.environ.get("D365SYNC_ENTITIES_DIR") or ENTITIES_DIR)


def personal_names(specs: Mapping[str, EntitySpec]) -> frozenset[str]:
    """Every name a ``pii: true`` value goes by: canonical fields and both sides' columns."""
    return frozenset(
        name
        for spec in specs.values()
        for name in spec.pii_fields | spec.pii_columns("dynamics") | spec.pii_columns("erp")
    )


def load_entities(directory: Path | str, catalog: Catalog | None = None) -> dict[str, EntitySpec]:
    """Every ``*.yaml`` entity of a directory (``_``-prefixed files are not entities), checked together."""
    specs, apart = _load_files(Path(directory), catalog)
    issues = [issue for found in apart.values() for issue in found]
    issues.extend(_cross_check(specs))
    if not issues:
        issues.extend(_cycle_issues(specs))
    if issues:
        raise SpecError(issues)
    return specs


def load_entities_apart(
    directory: Path | str, catalog: Catalog | None = None
) -> tuple[dict[str, EntitySpec], dict[str, list[str]]]:
    """The entities that load, and the issues of those that do not, each on its own: a file being
    written (a scaffold's ``owner: TODO``) or broken by an edit sets aside that entity and the ones
    that look it up, never the others. What a running deployment (DAGs, UI, event intake) reads;
    :func:`load_entities` stays strict for the CLI and the tests."""
    specs, apart = _load_files(Path(directory), catalog)
    while failing := {n: i for n, s in specs.items() if (i := list(_cross_issues(s, specs)))}:
        for name, issues in failing.items():
            apart[name] = issues
            del specs[name]
    if cycle := list(_cycle_issues(specs)):
        apart |= dict.fromkeys(specs, cycle)
        specs = {}
    return specs, apart


def _load_files(
    directory: Path, catalog: Catalog | None
) -> tuple[dict[str, EntitySpec], dict[str, list[str]]]:
    """Each entity file on its own: the specs that load, and the issues of each one that does not."""
    defaults, specs, apart = read_defaults(directory), {}, {}
    for path in sorted(directory.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        try:
            specs[path.stem] = load_entity(path, catalog, defaults)
        except SpecError as exc:
            apart[path.stem] = exc.issues
    return specs, apart


def _cross_check(specs: Mapping[str, EntitySpec]) -> Iterator[str]:
    for spec in specs.values():
        yield from _cross_issues(spec, specs)


def _cross_issues(spec: EntitySpec, specs: Mapping[str, EntitySpec]) -> Iterator[str]:
    """The entity lookups of ``spec`` that ``specs`` cannot serve."""
    for name, lk in spec.lookups.items():
        if not isinstance(lk, EntityLookup):
            continue
        target = specs.get(lk.entity)
        where = f"lookups.{name}"
        if target is None:
            yield _issue(spec.source, spec.name, f"{where}: no entity {lk.entity!r} (have {sorted(specs)})")
        elif target.dynamics.table != lk.dynamics_table:
            yield _issue(
                spec.source,
                spec.name,
                f"{where}: {lk.entity} syncs {target.dynamics.table}, not {lk.dynamics_table}",
            )


# --------------------------------------------------------------------------- dependencies
def dependencies(spec: EntitySpec, specs: Mapping[str, EntitySpec]) -> dict[str, str]:
    """The entities that must sync before ``spec``, each with the reason it waits for them.

    Both come from fields every spec already has, so no file declares an order by hand:

    * an entity lookup: ``orders`` resolves its customer through the ``customers`` key map;
    * a shared table: an entity that does not create records on a side (``creates``) only
      updates what another entity syncing the same table there creates — ``inventory`` sets
      ``product.quantityonhand`` on the Dynamics products that ``products`` creates.

    A lookup of an entity that is not in ``specs`` is a :class:`SpecError` naming the file.
    """
    found: dict[str, str] = {}
    unknown = []
    for name, lk in spec.lookups.items():
        if not isinstance(lk, EntityLookup):
            continue
        if lk.entity not in specs:
            unknown.append(
                _issue(
                    spec.source, spec.name, f"lookups.{name}: no entity {lk.entity!r} (have {sorted(specs)})"
                )
            )
        elif lk.entity != spec.name:
            found.setdefault(lk.entity, f"lookups.{name} resolves {lk.entity} records through its key map")
    if unknown:
        raise SpecError(unknown)
    for other in sorted(specs.values(), key=lambda o: o.name):
        if other.name == spec.name:
            continue
        for side in SIDES:
            table = getattr(spec, side).table
            mine, theirs = (getattr(s.creates, f"to_{side}") for s in (spec, other))
            if not mine and theirs and getattr(other, side).table == table:
                reason = f"{other.name} creates the {side} {table} records {spec.name} only updates"
                found.setdefault(other.name, reason)
    return found


def dependency_order(specs: Mapping[str, EntitySpec]) -> list[str]:
    """Entity names, every one after its :func:`dependencies`; alphabetical among equals.

    The one order for every runner: ``d365sync sync --all``, ``make sync`` and the Airflow
    wiring (:mod:`d365sync.airflow.dag_factory`), the reconcile DAG and the test helpers.
    A cycle is a :class:`SpecError` naming the files and why each waits for the next.
    """
    graph = {name: dependencies(spec, specs) for name, spec in specs.items()}
    if issues := list(_cycle_issues(specs, graph)):
        raise SpecError(issues)
    done: list[str] = []
    pending = sorted(graph)
    while pending:
        ready = next(n for n in pending if all(d in done for d in graph[n]))
        done.append(ready)
        pending.remove(ready)
    return done


def _cycle_issues(
    specs: Mapping[str, EntitySpec], graph: Mapping[str, Mapping[str, str]] | None = None
) -> Iterator[str]:
    """One issue for the first dependency cycle found (none when the graph is acyclic)."""
    from graphlib import CycleError, TopologicalSorter
    from itertools import pairwise

    if graph is None:
        try:
            graph = {name: dependencies(spec, specs) for name, spec in specs.items()}
        except SpecError as exc:
            yield from exc.issues
            return
    try:
        TopologicalSorter({n: sorted(deps) for n, deps in sorted(graph.items())}).prepare()
    except CycleError as exc:
        cycle = list(exc.args[1])  # [a, b, …, a]: each node must sync before the next one
        steps = [
            f"{specs[a].source.name} waits for {specs[b].source.name} ({graph[a][b]})"
            for b, a in pairwise(cycle)
        ]
        yield "entities depend on each other in a cycle: " + "; ".join(steps)


# ------------------------------------------------------------------------ catalog checks
def check_catalog(spec: EntitySpec, catalog: Catalog) -> Iterator[str]:
    """Every table and column the spec names exists in the catalog."""
    dv = catalog.dynamics.get(spec.dynamics.table)
    erp = catalog.erp.get(spec.erp.table)
    if dv is None:
        known = sorted(catalog.dynamics)
        yield f"dynamics.table: unknown Dynamics table {spec.dynamics.table!r} (known: {known})"
    else:
        yield from _check_dynamics(spec, dv)
    if erp is None:
        yield f"erp.table: unknown ERP table {spec.erp.table!r} (known: {sorted(catalog.erp)})"
    else:
        yield from _check_erp(spec, erp)
    for name, lk in spec.lookups.items():
        if lk.dynamics_table not in catalog.dynamics:
            yield f"lookups.{name}: unknown Dynamics table {lk.dynamics_table!r}"


def _unknown(kind: str, column: str, known: Iterable[str]) -> str:
    known = sorted(known)
    hint = [k for k in known if k.lower() == column.lower()]
    return f"unknown {kind} column {column!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")


def _check_dynamics(spec: EntitySpec, dv: DynamicsTableInfo) -> Iterator[str]:
    d, cols = spec.dynamics, dv.columns
    if d.entity_set != dv.entity_set:
        yield f"dynamics.entity_set: {d.entity_set!r}, but {dv.logical_name} is served as {dv.entity_set!r}"
    if (d.key,) not in dv.keys:
        yield f"dynamics.key: {d.key!r} is not an alternate key of {dv.logical_name} (keys: {list(dv.keys)})"
    if isinstance(d.change_detection, Cursor) and d.change_detection.column not in cols:
        yield "dynamics.change_detection.column: " + _unknown("Dynamics", d.change_detection.column, cols)
    for f in spec.fields.values():
        if f.dynamics is not None and f.dynamics not in cols:
            yield f"field {f.name!r}: dynamics: " + _unknown(f"{dv.logical_name}", f.dynamics, cols)
    reads = {c.read_name for c in cols.values()}
    for i, exp in enumerate(spec.validation.dynamics):
        for column in exp.columns():
            if column not in reads:
                yield f"validation.dynamics.{i}.column: " + _unknown(dv.logical_name, column, reads)


def _check_erp(spec: EntitySpec, table: TableSpec) -> Iterator[str]:
    e, cols = spec.erp, set(table.column_names)
    named = [("erp.key", c) for c in e.key] + [("erp.create_values", c) for c in e.create_values]
    if isinstance(e.change_detection, Cursor):
        named.append(("erp.change_detection.column", e.change_detection.column))
    named += [
        (f"validation.erp.{i}.column", c) for i, x in enumerate(spec.validation.erp) for c in x.columns()
    ]
    named += [(f"field {f.name!r}: erp", f.erp) for f in spec.fields.values() if f.erp is not None]
    for where, column in named:
        if column not in cols:
            yield f"{where}: " + _unknown(table.name, column, cols)
    if not e.grouped and tuple(e.key) != table.key:
        yield f"erp.key: {e.key} is not the key of {table.name} {list(table.key)} (grouped: true aggregates)"
    if e.grouped and tuple(e.key) != table.key[: len(e.key)]:
        yield f"erp.key: grouping needs a prefix of the key of {table.name} {list(table.key)}"
    if spec.deletes.to_erp == "deactivate" and table.status_column is None:
        yield f"deletes.to_erp: deactivate needs a status column, and {table.name} has none"


# -------------------------------------------------------------------------------- compile
def _compile(spec: EntitySpec, catalog: Catalog, issues: list[str]) -> EntityPlan:
    """Resolve every transform name to a built function once; problems go to ``issues``."""
    maps = {name: vm.table(name) for name, vm in spec.value_maps.items()}
    targets = {name: _lookup_target(name, lk, catalog) for name, lk in spec.lookups.items()}
    dv = catalog.dynamics[spec.dynamics.table]
    plans = []
    for f in spec.fields.values():
        try:
            plans.append(_field_plan(spec, f, dv, maps, targets))
        except TransformSpecError as exc:
            issues.append(f"field {f.name!r}: {exc}")
    table = catalog.erp[spec.erp.table]
    return EntityPlan(spec.name, spec.key, plans, tuple(spec.erp.key) if spec.erp.grouped else None, table)


def _lookup_target(name: str, lk: LookupSpec, catalog: Catalog) -> LookupTarget:
    entity_set = lk.entity_set or catalog.dynamics[lk.dynamics_table].entity_set
    return LookupTarget(name, entity_set)


def _field_plan(
    spec: EntitySpec,
    f: FieldSpec,
    dv: DynamicsTableInfo,
    maps: Mapping[str, ValueMapTable],
    targets: Mapping[str, LookupTarget],
) -> FieldPlan:
    read, write, inbound, outbound = {}, {}, {}, {}
    for side in SIDES:
        column = f.column(side)
        if column is None:
            continue
        read[side] = dv.columns[column].read_name if side == "dynamics" else column
        to = [s.step for s in f.chain(side, "to") or ()]
        back = f.chain(side, "from")
        steps_in = [s.step for s in back] if back is not None else _inverse(to, side)
        inbound[side] = compile_chain(steps_in, _env(spec, f, side, True, maps, targets))
        outbound[side] = compile_chain(to, _env(spec, f, side, False, maps, targets))
        write[side] = _write_name(spec, f, side, dv, to)
    writable = frozenset(s for s in SIDES if spec.writes_to(f, s))
    return FieldPlan(f.name, read, write, inbound, outbound, writable)


def _inverse(steps: list[Step], side: Side) -> list[Step]:
    try:
        return invert_chain(steps)
    except TransformSpecError as exc:
        raise TransformSpecError(f"from_{side}: {exc}") from None


def _env(
    spec: EntitySpec,
    f: FieldSpec,
    side: Side,
    inbound: bool,
    maps: Mapping[str, ValueMapTable],
    targets: Mapping[str, LookupTarget],
) -> BuildEnv:
    def column(name: str) -> str:
        other = spec.fields.get(name)
        if other is None:
            raise TransformSpecError(f"refers to unknown field {name!r}")
        if not inbound:
            return name
        if other.column(side) is None:
            raise TransformSpecError(f"field {name!r} has no {side} column to read")
        return str(other.column(side))

    return BuildEnv(f.name, side, inbound, maps, targets, column)


def _write_name(spec: EntitySpec, f: FieldSpec, side: Side, dv: DynamicsTableInfo, to: list[Step]) -> str:
    column = str(f.column(side))
    info = dv.columns.get(column) if side == "dynamics" else None
    if info is None or not info.lookup:
        return column
    binds = [args for name, args in to if name == "lookup" and args.get("to") == "bind"]
    if not binds:
        raise TransformSpecError(f"{column} is a lookup: to_dynamics must end with {{lookup: {{to: bind}}}}")
    target = spec.lookups[binds[-1]["target"]].dynamics_table
    if len(info.targets) > 1:
        return f"{column}_{target}@odata.bind"
    return f"{column}@odata.bind"


# ----------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class FieldPlan:
    """One field compiled: column names as read and as written, and built chains per side."""

    name: str
    read: Mapping[Side, str]
    write: Mapping[Side, str]
    inbound: Mapping[Side, Chain | None]
    outbound: Mapping[Side, Chain | None]
    writable: frozenset[Side]


@dataclass
class MappedRows:
    """Rows mapped to canonical records, and the rows that failed with why."""

    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[TransformError] = field(default_factory=list)


class EntityPlan:
    """The per-record mapping of one entity, built once at load; the hot path of a run.

    Canonical records hold only the fields that have a column on the side they came from; a
    field absent from a side's record has no opinion on that side.
    """

    def __init__(
        self, entity: str, key: str, fields: Sequence[FieldPlan], group_by: tuple[str, ...] | None, table: Any
    ) -> None:
        self.entity, self.key_field, self.fields, self.group_by = entity, key, tuple(fields), group_by
        self._erp_table = table
        self._in = {s: tuple((f.name, f.read[s], f.inbound[s]) for f in fields if s in f.read) for s in SIDES}
        self._out = {
            s: {f.name: (f.write[s], f.outbound[s]) for f in fields if s in f.writable} for s in SIDES
        }
        self._mapped = {
            s: {f.name: (f.write[s], f.outbound[s]) for f in fields if s in f.write} for s in SIDES
        }
        key_plan = next(f for f in fields if f.name == key)
        self._key_in = {s: (key_plan.read[s], key_plan.inbound[s]) for s in SIDES}

    def to_canonical(self, side: Side, row: Mapping[str, Any], ctx: TransformContext) -> dict[str, Any]:
        """One extracted row (read names) → canonical record; TransformError names key and field."""
        out: dict[str, Any] = {}
        name = self.key_field
        try:
            for name, column, chain in self._in[side]:
                value = row.get(column)
                out[name] = value if chain is None else chain(value, row, ctx)
        except TransformError as exc:
            raise exc.located(key=self._raw_key(side, row), field=name) from None
        return out

    def from_canonical(
        self,
        side: Side,
        record: Mapping[str, Any],
        ctx: TransformContext,
        fields: Iterable[str] | None = None,
        override: Collection[str] = (),
    ) -> dict[str, Any]:
        """Canonical values → a write payload for ``side`` (write names), all or only ``fields``.

        ``override`` names fields written even where ownership forbids it (a review decision
        beats ownership); they still need a column on ``side``.
        """
        out_map, mapped = self._out[side], self._mapped[side]
        wanted = list(out_map) if fields is None else list(fields)
        names = [n for n in wanted if n in out_map or (n in override and n in mapped)]
        out: dict[str, Any] = {}
        name = self.key_field
        try:
            for name in names:
                column, chain = mapped[name]
                value = record.get(name)
                out[column] = value if chain is None else chain(value, record, ctx)
        except TransformError as exc:
            raise exc.located(key=record.get(self.key_field), field=name) from None
        return out

    def key(self, side: Side, row: Mapping[str, Any], ctx: TransformContext) -> Any:
        """The canonical key of an extracted row."""
        column, chain = self._key_in[side]
        value = row.get(column)
        try:
            return value if chain is None else chain(value, row, ctx)
        except TransformError as exc:
            raise exc.located(key=value, field=self.key_field) from None

    def map_rows(self, side: Side, rows: Iterable[Mapping[str, Any]], ctx: TransformContext) -> MappedRows:
        """A chunk of rows → canonical records; failures are collected, the other rows go on."""
        result = MappedRows()
        convert, ok, bad = self.to_canonical, result.records.append, result.errors.append
        for row in rows:
            try:
                ok(convert(side, row, ctx))
            except TransformError as exc:
                bad(exc)
        return result

    def group(self, rows: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
        """ERP rows in key order → one row per entity record (aggregated entities only)."""
        from d365sync.engine.transforms import group_rows

        return rows if self.group_by is None else group_rows(rows, self.group_by)

    def readback(self, side: Side, written: Mapping[str, Any]) -> dict[str, Any]:
        """What reading ``side`` returns after ``written`` was stored (bind paths become GUIDs)."""
        out: dict[str, Any] = {}
        for f in self.fields:
            if side in f.writable and f.write[side] in written:
                value = written[f.write[side]]
                if f.write[side].endswith("@odata.bind") and isinstance(value, str):
                    value = value[value.index("(") + 1 : -1]
                out[f.read[side]] = value
        return out

    def _raw_key(self, side: Side, row: Mapping[str, Any]) -> Any:
        return row.get(self._key_in[side][0])
