"""Named, pure value transforms referenced from entity YAML, compiled once into fast chains.

Vocabulary
----------
A chain is a list of steps; each step is a registered name with arguments::

    to_erp: [trim, {pad: {width: 10}}, {case: {to: upper}}]

A transform is a *builder* ``build(args, env) -> fn`` registered under a name with a small
pydantic model for its arguments. Builders run once, when a spec is loaded; the returned
``fn(value, row, ctx)`` runs per record, so nothing is looked up by name on the hot path.

* ``value`` is the field's value so far; ``None`` passes through untouched unless the
  transform says it handles ``None`` (aggregate, value_map with a null entry).
* ``row`` is what the chain reads from: the side's raw row for an inbound chain (side →
  canonical), the canonical record for an outbound chain (canonical → side). Transforms that
  need a second field (``tax`` with ``tax_field``) get its name already resolved by ``env``.
* ``ctx`` is the per-run :class:`TransformContext` (key-map lookups, runtime code tables).

Inverses
--------
Each transform names its inverse, so a field only states the direction canonical → side and
the way back is derived: ``pad`` ↔ ``trim``, ``currency to legacy`` ↔ ``currency to iso``,
``tax to net`` ↔ ``tax to gross``, ``date`` format ↔ parse, ``value_map`` ↔ its inverse,
``lookup to bind`` ↔ ``lookup to key``. Normalisers (trim, case, email, decimal) are their own
inverse: the canonical value is the normalised one. ``aggregate`` has none.

Escape hatch
------------
Exactly one: ``{custom: {function: "package.module:function", inverse: "...", args: {...}}}``.
The function is imported at spec load and called as ``function(value, **args)``. It runs on
every ERP or Dynamics value, so only modules the deployment declares may provide it (anything
else, ``os:system`` say, is a spec error before any import):

* ``d365sync.engine.transforms`` (this module), always;
* the modules of the ``d365sync.transforms`` entry-point group of installed distributions
  (``[project.entry-points."d365sync.transforms"] acme = "acme_sync.transforms"``);
* the comma-separated module prefixes in ``D365SYNC_TRANSFORM_MODULES`` (``acme_sync.transforms,
  acme_common``): a prefix allows the module and its submodules.

The function must also be *defined* in an allowed module (its ``__module__``), so an allowed
module that merely imports ``os.system`` does not pass it on.

Errors
------
Every failure is a :class:`TransformError` carrying the record key, field, rule and value, and
a *disposition* telling the pipeline what to do with the row: ``quarantine``,
``manual_review`` or ``park`` (a lookup whose parent is not synced yet).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from d365sync.engine.pii import mask_any, mask_key, mask_text

Side = Literal["dynamics", "erp"]
Disposition = Literal["quarantine", "manual_review", "park"]
Row = Mapping[str, Any]
Fn = Callable[[Any, Row, "TransformContext"], Any]
_UNSET: Any = object()


# ------------------------------------------------------------------------------------ errors
class TransformError(ValueError):
    """A value a rule refused; says which record, field, rule and value, and what to do next."""

    disposition: Disposition = "quarantine"
    # fields and columns whose values are personal data (the spec's ``pii: true``): shown as a
    # letter and a length, set by whoever knows the spec (the transform stage)
    personal: frozenset[str] = frozenset()

    def __init__(
        self,
        message: str,
        *,
        value: Any = _UNSET,
        rule: str | None = None,
        field: str | None = None,
        key: Any = None,
        disposition: Disposition | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.value, self.rule, self.field, self.key = message, value, rule, field, key
        if disposition is not None:
            self.disposition = disposition

    def located(
        self, *, key: Any = None, field: str | None = None, rule: str | None = None
    ) -> TransformError:
        """Fill in whatever the raiser could not know (the chain knows the rule, the plan the key)."""
        self.key = self.key if key is None else key
        self.field = self.field or field
        self.rule = self.rule or rule
        return self

    def __str__(self) -> str:
        """``record 'C1': field 'email': rule 'email': not a valid e-mail address (value 'j***@e***.com')``.

        The text travels to dead letters, CLI output, task logs and XCom, so the value (and any
        e-mail, phone or credential inside the message) is masked (:mod:`d365sync.engine.pii`);
        record key, field and rule stay readable. The raw value stays in :attr:`value`.
        """
        key = mask_key(self.key) if isinstance(self.key, str) else self.key
        where = [f"record {key!r}" if self.key is not None else None]
        where += [
            f"field {self.field!r}" if self.field else None,
            f"rule {self.rule!r}" if self.rule else None,
        ]
        field = self.field or ""
        masked = mask_any(field, self.value, by_shape=False, personal=self.personal)
        shown = "" if self.value is _UNSET else f" (value {masked!r})"
        message = mask_text(self.message)
        prefix = ": ".join(w for w in where if w)
        return f"{prefix}: {message}{shown}" if prefix else f"{message}{shown}"


class MissingParent(TransformError):
    """A lookup target that is not synced yet: the row is parked and retried, not rejected."""

    disposition: Disposition = "park"

    def __init__(self, target: str, value: Any) -> None:
        super().__init__(f"no {target} record is synced for this reference yet", value=value)
        self.target = target


class TransformSpecError(ValueError):
    """A chain that cannot be built: unknown name, bad arguments, missing inverse, bad import."""


# ----------------------------------------------------------------------------- runtime context
Lookup = Callable[[str, Any, Literal["id", "key"]], Any]


def _no_lookup(target: str, value: Any, to: Literal["id", "key"]) -> Any:
    raise TransformError(f"no key map is configured for lookups to {target}", value=value)


@dataclass
class TransformContext:
    """What transforms may consult at run time; built once per run or chunk by the pipeline.

    ``lookup(target, value, to)`` resolves through a key map: ``to="id"`` turns a canonical
    key into the Dynamics GUID, ``to="key"`` turns a GUID back into the canonical key; it
    returns None when the target record is unknown. The state store provides it for synced
    entities; reference tables (currencies) are read once by the pipeline.
    ``code_tables`` overrides a configured value map by name (e.g. a live CURR_CODE_MAP).
    """

    lookup: Lookup = _no_lookup
    code_tables: Mapping[str, Mapping[Any, Any]] = field(default_factory=dict)


class DictLookup:
    """A key map held in dicts: for tests and for small reference tables read once per run."""

    def __init__(self, maps: Mapping[str, Mapping[Any, Any]] | None = None) -> None:
        self._to_id: dict[str, dict[Any, Any]] = {t: dict(m) for t, m in (maps or {}).items()}
        self._to_key = {t: {v: k for k, v in m.items()} for t, m in self._to_id.items()}

    def add(self, target: str, key: Any, id_: Any) -> None:
        self._to_id.setdefault(target, {})[key] = id_
        self._to_key.setdefault(target, {})[id_] = key

    def __call__(self, target: str, value: Any, to: Literal["id", "key"]) -> Any:
        table = self._to_id if to == "id" else self._to_key
        return table.get(target, {}).get(value)


# ------------------------------------------------------------------------------ build inputs
@dataclass(frozen=True)
class ValueMapTable:
    """A compiled value map: forward canonical → side, inverse side → canonical, and the policy."""

    name: str
    forward: Mapping[Any, Any]
    inverse: Mapping[Any, Any]
    unmapped: Literal["quarantine", "default", "manual_review"] = "quarantine"
    default: Any = None
    inverse_default: Any = None


@dataclass(frozen=True)
class LookupTarget:
    """Where a lookup points in Dynamics: ``@odata.bind`` paths need the target's entity set."""

    name: str
    entity_set: str


@dataclass(frozen=True)
class BuildEnv:
    """Everything a builder may need, fixed at spec load.

    ``column`` maps a canonical field name to the name the chain's ``row`` uses: the side's
    read column for inbound chains, the canonical name itself for outbound ones.
    """

    field_name: str = "?"
    side: Side = "erp"
    inbound: bool = False
    value_maps: Mapping[str, ValueMapTable] = field(default_factory=dict)
    lookups: Mapping[str, LookupTarget] = field(default_factory=dict)
    column: Callable[[str], str] = str


class Args(BaseModel):
    """Base for transform arguments: unknown keys are errors, so typos surface at load."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(Args):
    """The transform takes no arguments."""


Builder = Callable[[Any, BuildEnv], Fn]
Inverse = Callable[[Any], "tuple[str, dict[str, Any]] | None"]


@dataclass(frozen=True)
class TransformDef:
    """A registry entry: argument model, builder, inverse and a one-line summary for docs."""

    name: str
    args: type[Args]
    build: Builder
    inverse: Inverse
    summary: str
    handles_none: bool = False


REGISTRY: dict[str, TransformDef] = {}


def _self_inverse(name: str) -> Inverse:
    return lambda args: (name, args.model_dump(exclude_defaults=True))


def _none_inverse(args: Any) -> None:
    return None


def transform(
    name: str,
    args: type[Args] = NoArgs,
    inverse: Inverse | Literal["self"] | None = "self",
    handles_none: bool = False,
) -> Callable[[Builder], Builder]:
    """Register a builder; its docstring's first line is the summary shown in errors and docs."""

    def register(build: Builder) -> Builder:
        inv = _self_inverse(name) if inverse == "self" else (inverse or _none_inverse)
        summary = (build.__doc__ or name).strip().splitlines()[0]
        REGISTRY[name] = TransformDef(name, args, build, inv, summary, handles_none)
        return build

    return register


# ------------------------------------------------------------------------------- compilation
Step = tuple[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Chain:
    """Compiled steps; calling it runs them in order and names the failing rule on error."""

    steps: tuple[tuple[str, Fn, bool], ...]

    def __call__(self, value: Any, row: Row, ctx: TransformContext) -> Any:
        for rule, fn, handles_none in self.steps:
            if value is None and not handles_none:
                continue
            try:
                value = fn(value, row, ctx)
            except TransformError as exc:
                raise exc.located(rule=rule) from None
            except (ValueError, TypeError, ArithmeticError, KeyError) as exc:
                raise TransformError(str(exc), value=value, rule=rule) from exc
        return value


@dataclass(frozen=True)
class _OneStep(Chain):
    """A chain of one step (most are): the same call without the loop (the hot path of a run)."""

    def __post_init__(self) -> None:
        ((rule, fn, handles_none),) = self.steps
        object.__setattr__(self, "_step", (rule, fn, handles_none))

    def __call__(self, value: Any, row: Row, ctx: TransformContext) -> Any:
        rule, fn, handles_none = self._step  # type: ignore[attr-defined]
        if value is None and not handles_none:
            return None
        try:
            return fn(value, row, ctx)
        except TransformError as exc:
            raise exc.located(rule=rule) from None
        except (ValueError, TypeError, ArithmeticError, KeyError) as exc:
            raise TransformError(str(exc), value=value, rule=rule) from exc


def parse_args(name: str, args: Mapping[str, Any] | None) -> Args:
    """Validate a step's arguments against its transform; unknown names list what exists."""
    tdef = REGISTRY.get(name)
    if tdef is None:
        raise TransformSpecError(f"unknown transform {name!r} (known: {', '.join(sorted(REGISTRY))})")
    try:
        return tdef.args.model_validate(dict(args or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
        raise TransformSpecError(f"transform {name!r}: {problems}") from None


def compile_chain(steps: Sequence[Step], env: BuildEnv) -> Chain | None:
    """Build every step once; an empty or all-``direct`` chain compiles to None (no call at all)."""
    built: list[tuple[str, Fn, bool]] = []
    for name, raw in steps:
        if name == "direct":
            continue
        args = parse_args(name, raw)
        tdef = REGISTRY[name]
        built.append((name, tdef.build(args, env), tdef.handles_none))
    if not built:
        return None
    return _OneStep(tuple(built)) if len(built) == 1 else Chain(tuple(built))


def invert_chain(steps: Sequence[Step]) -> list[Step]:
    """The chain back: inverses of the steps in reverse order; raises if a step has none."""
    back: list[Step] = []
    for name, raw in reversed(steps):
        inverse = REGISTRY[name].inverse(parse_args(name, raw))
        if inverse is None:
            raise TransformSpecError(
                f"transform {name!r} has no inverse; state the other direction explicitly"
            )
        back.append(inverse)
    return back


# ------------------------------------------------------------------------------- transforms
@transform("direct")
def _direct(args: NoArgs, env: BuildEnv) -> Fn:
    """The value as is (compiled away: costs nothing)."""
    return lambda value, row, ctx: value


class TrimArgs(Args):
    side: Literal["both", "left", "right"] = Field("both", description="Which end to strip blanks from.")
    blank_as_null: bool = Field(False, description="Turn a value that is empty after trimming into null.")


@transform("trim", TrimArgs)
def _trim(args: TrimArgs, env: BuildEnv) -> Fn:
    """Strip blanks (CHAR padding, stray spaces); optionally treat blank as null."""
    strip = {"both": str.strip, "left": str.lstrip, "right": str.rstrip}[args.side]
    blank = args.blank_as_null

    def run(value: Any, row: Row, ctx: TransformContext) -> Any:
        text = strip(_text(value))
        return None if blank and not text else text

    return run


def _pad_inverse(args: PadArgs) -> Step:
    return ("trim", {"side": "right" if args.align == "left" else "left"})


class PadArgs(Args):
    width: int = Field(ge=1, le=8000, description="The CHAR(n) width to pad (and check) to.")
    fill: str = Field(" ", min_length=1, max_length=1, description="Pad character.")
    align: Literal["left", "right"] = Field(
        "left", description="left: pad on the right (text); right: numbers."
    )


@transform("pad", PadArgs, inverse=_pad_inverse)
def _pad(args: PadArgs, env: BuildEnv) -> Fn:
    """Pad to CHAR(n); a value longer than n is an error, never silently cut."""
    width, fill, left = args.width, args.fill, args.align == "left"

    def run(value: Any, row: Row, ctx: TransformContext) -> Any:
        text = _text(value)
        if len(text) > width:
            raise TransformError(f"longer than CHAR({width})", value=value)
        return text.ljust(width, fill) if left else text.rjust(width, fill)

    return run


class CaseArgs(Args):
    to: Literal["upper", "lower", "title"] = Field(description="Target letter case.")


@transform("case", CaseArgs)
def _case(args: CaseArgs, env: BuildEnv) -> Fn:
    """Upper, lower or title case (a normaliser: the canonical value is already in that case)."""
    convert = {"upper": str.upper, "lower": str.lower, "title": str.title}[args.to]
    return lambda value, row, ctx: convert(_text(value))


# Internationalised addresses (RFC 6531 local parts, IDN domains) are valid: "renée@exemple.fr"
# is a real customer's address, and both Dataverse and the ERP store it as text.
_LABEL = r"[^\W_](?:(?:[^\W_]|-){0,61}[^\W_])?"
EMAIL = re.compile(rf"^[\w.!#$%&'*+/=?^`{{|}}~-]+@{_LABEL}(?:\.{_LABEL})+$")


class EmailArgs(Args):
    lower: bool = Field(
        True, description="Lower-case the address (mailbox matching is case-blind in practice)."
    )
    max_length: int | None = Field(
        None, ge=3, description="Reject longer addresses (the narrower column's limit)."
    )


@transform("email", EmailArgs)
def _email(args: EmailArgs, env: BuildEnv) -> Fn:
    """Trim, optionally lower-case, and validate the address format; blank becomes null."""
    lower, limit = args.lower, args.max_length

    def run(value: Any, row: Row, ctx: TransformContext) -> Any:
        text = _text(value).strip()
        if not text:
            return None
        text = text.lower() if lower else text
        if not EMAIL.match(text):
            raise TransformError("not a valid e-mail address", value=value)
        if limit is not None and len(text) > limit:
            raise TransformError(f"e-mail longer than {limit} characters", value=value)
        return text

    return run


class DecimalArgs(Args):
    scale: int = Field(2, ge=0, le=18, description="Decimal places; rounded half-even, like the ERP column.")


@transform("decimal", DecimalArgs)
def _decimal(args: DecimalArgs, env: BuildEnv) -> Fn:
    """Exact Decimal at a fixed scale, so 12.5 from JSON and 12.50 from ODBC compare equal."""
    quantum = Decimal(1).scaleb(-args.scale)
    return lambda value, row, ctx: to_decimal(value).quantize(quantum, ROUND_HALF_EVEN)


def _flip_to(name: str, forward: str, backward: str) -> Inverse:
    def inverse(args: Any) -> Step:
        data = args.model_dump(exclude_defaults=True)
        data["to"] = backward if args.to == forward else forward
        return (name, data)

    return inverse


class CurrencyArgs(Args):
    to: Literal["legacy", "iso"] = Field(description="legacy: ISO 4217 → ERP code; iso: ERP code → ISO 4217.")
    map: str = Field("currency", description="The value map holding legacy → ISO pairs.")


ISO_4217 = re.compile(r"^[A-Z]{3}$")


@transform("currency", CurrencyArgs, inverse=_flip_to("currency", "legacy", "iso"))
def _currency(args: CurrencyArgs, env: BuildEnv) -> Fn:
    """ISO 4217 ↔ legacy ERP currency codes through a table; unknown codes name the value."""
    table = _value_map(env, args.map)
    to_iso = args.to == "iso"
    static = table.forward if to_iso else table.inverse
    name, live_inverse = table.name, _LiveInverse(table)

    def run(value: Any, row: Row, ctx: TransformContext) -> Any:
        code = _text(value).strip()
        live = ctx.code_tables.get(name)
        pairs = static if live is None else (live if to_iso else live_inverse(live))
        result = pairs.get(code) if to_iso else pairs.get(code.upper())
        if result is None:
            kind = "legacy currency code" if to_iso else "ISO 4217 currency"
            raise TransformError(f"unknown {kind} {code!r} (not in the {name} table)", value=value)
        if to_iso and not ISO_4217.match(result):
            raise TransformError(
                f"{name} table maps {code!r} to {result!r}, not an ISO 4217 code", value=value
            )
        return result

    return run


class TaxArgs(Args):
    to: Literal["net", "gross"] = Field(description="net: gross → net; gross: net → gross.")
    rate: Decimal | None = Field(
        None, ge=0, le=10, description="Tax rate (0.19 = 19 %) when no tax field is kept."
    )
    tax_field: str | None = Field(
        None, description="Canonical field holding the tax amount (exact, preferred)."
    )
    scale: int = Field(2, ge=0, le=18, description="Decimal places of the target column; rounded half-even.")

    @model_validator(mode="after")
    def _one_source(self) -> TaxArgs:
        if (self.rate is None) == (self.tax_field is None):
            raise ValueError("give exactly one of rate or tax_field")
        return self


@transform("tax", TaxArgs, inverse=_flip_to("tax", "net", "gross"))
def _tax(args: TaxArgs, env: BuildEnv) -> Fn:
    """Gross ↔ net by a rate or an explicit tax field; exact Decimal, half-even to the scale."""
    quantum = Decimal(1).scaleb(-args.scale)
    sign = -1 if args.to == "net" else 1
    if args.tax_field is not None:
        column = env.column(args.tax_field)

        def by_field(value: Any, row: Row, ctx: TransformContext) -> Any:
            tax = row.get(column)
            tax = Decimal(0) if tax is None else to_decimal(tax)
            return (to_decimal(value) + sign * tax).quantize(quantum, ROUND_HALF_EVEN)

        return by_field
    factor = Decimal(1) + (args.rate or Decimal(0))

    def by_rate(value: Any, row: Row, ctx: TransformContext) -> Any:
        amount = to_decimal(value)
        result = amount / factor if sign < 0 else amount * factor
        return result.quantize(quantum, ROUND_HALF_EVEN)

    return by_rate


DateFormat = Literal["yyyymmdd", "iso_date", "iso_datetime_utc"]


def _date_inverse(args: DateArgs) -> Step:
    return ("date", {"format": args.format, "parse": not args.parse})


class DateArgs(Args):
    format: DateFormat = Field(
        description="yyyymmdd: legacy CHAR(8); iso_date: Dataverse DateOnly; "
        "iso_datetime_utc: 'YYYY-MM-DDT00:00:00Z'."
    )
    parse: bool = Field(False, description="False: canonical date → format; True: format → canonical date.")


@transform("date", DateArgs, inverse=_date_inverse)
def _date(args: DateArgs, env: BuildEnv) -> Fn:
    """Canonical ``date`` ↔ legacy YYYYMMDD, ISO DateOnly or ISO UTC datetime; blank/00000000 → null."""
    if args.parse:
        return lambda value, row, ctx: parse_date(value)
    formatter = _DATE_FORMATS[args.format]
    return lambda value, row, ctx: formatter(parse_date(value))


_DATE_FORMATS: dict[str, Callable[[date], str]] = {
    "yyyymmdd": lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}",
    "iso_date": date.isoformat,
    "iso_datetime_utc": lambda d: f"{d.isoformat()}T00:00:00Z",
}


class ValueMapArgs(Args):
    map: str = Field(description="Name of a value map declared in the entity (or the shared defaults).")
    inverse: bool = Field(False, description="Map side → canonical instead of canonical → side.")


def _value_map_inverse(args: ValueMapArgs) -> Step:
    return ("value_map", {"map": args.map, "inverse": not args.inverse})


@transform("value_map", ValueMapArgs, inverse=_value_map_inverse, handles_none=True)
def _value_map_step(args: ValueMapArgs, env: BuildEnv) -> Fn:
    """Option sets and status codes; unmapped values follow the map's policy."""
    table = _value_map(env, args.map)
    pairs = table.inverse if args.inverse else table.forward
    fallback = table.inverse_default if args.inverse else table.default
    policy, name = table.unmapped, table.name

    def run(value: Any, row: Row, ctx: TransformContext) -> Any:
        try:
            return pairs[value]
        except (KeyError, TypeError):
            if value is None:
                return None
            if policy == "default":
                return fallback
            raise TransformError(f"no entry in value map {name!r}", value=value, disposition=policy) from None

    return run


class LookupArgs(Args):
    target: str = Field(description="A lookup declared in the entity: another entity or a reference table.")
    to: Literal["bind", "id", "key"] = Field(
        description="bind: key → '/set(guid)' for @odata.bind; id: key → GUID; "
        "key: GUID (or bind path) → key."
    )
    missing: Literal["park", "null"] = Field(
        "park", description="park: an unknown target parks the row; null: the reference is left empty."
    )


def _lookup_inverse(args: LookupArgs) -> Step:
    back = "key" if args.to != "key" else "bind"
    return ("lookup", {"target": args.target, "to": back, "missing": args.missing})


@transform("lookup", LookupArgs, inverse=_lookup_inverse)
def _lookup(args: LookupArgs, env: BuildEnv) -> Fn:
    """Resolve a reference through the key map; an unknown parent parks the row (or nulls it)."""
    target = env.lookups.get(args.target)
    if target is None:
        known = sorted(env.lookups)
        raise TransformSpecError(f"lookup target {args.target!r} is not declared (known: {known})")
    name, prefix, soft = target.name, f"/{target.entity_set}(", args.missing == "null"
    if args.to == "key":
        return lambda value, row, ctx: _resolve(ctx, name, _strip_bind(str(value), prefix), "key", soft)
    if args.to == "id":
        return lambda value, row, ctx: _resolve(ctx, name, value, "id", soft)

    def bind(value: Any, row: Row, ctx: TransformContext) -> Any:
        found = _resolve(ctx, name, value, "id", soft)
        return None if found is None else f"{prefix}{found})"

    return bind


class AggregateArgs(Args):
    fn: Literal["sum", "min", "max", "count"] = Field(description="How a group's values are combined.")


@transform("aggregate", AggregateArgs, inverse=None, handles_none=True)
def _aggregate(args: AggregateArgs, env: BuildEnv) -> Fn:
    """Combine a group's values (nulls ignored); a lone scalar counts as a group of one."""
    fn = _AGGREGATES[args.fn]

    def run(value: Any, row: Row, ctx: TransformContext) -> Any:
        values = value if isinstance(value, list | tuple) else [value]
        return fn([v for v in values if v is not None])

    return run


def _sum(values: list[Any]) -> Any:
    return sum((to_decimal(v) for v in values), Decimal(0))


_AGGREGATES: dict[str, Callable[[list[Any]], Any]] = {
    "sum": _sum,
    "min": lambda values: min(values) if values else None,
    "max": lambda values: max(values) if values else None,
    "count": len,
}

DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class CustomArgs(Args):
    function: str = Field(
        pattern=DOTTED.pattern,
        description="'package.module:function', called as f(value, **args); the module must be "
        "declared (d365sync.transforms entry points or D365SYNC_TRANSFORM_MODULES).",
    )
    inverse: str | None = Field(
        None, pattern=DOTTED.pattern, description="The function for the way back, if any."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the function."
    )


def _custom_inverse(args: CustomArgs) -> Step | None:
    if args.inverse is None:
        return None
    return ("custom", {"function": args.inverse, "inverse": args.function, "args": args.args})


@transform("custom", CustomArgs, inverse=_custom_inverse)
def _custom(args: CustomArgs, env: BuildEnv) -> Fn:
    """The one escape hatch: a dotted path to your own pure function."""
    fn, kwargs, path = import_function(args.function), dict(args.args), args.function

    def run(value: Any, row: Row, ctx: TransformContext) -> Any:
        try:
            return fn(value, **kwargs)
        except TransformError:
            raise
        except Exception as exc:  # foreign code: any failure is this row's failure, not the run's
            raise TransformError(f"{path} failed: {type(exc).__name__}: {exc}", value=value) from exc

    return run


# ---------------------------------------------------------------------------------- helpers
TRANSFORM_MODULES_ENV = "D365SYNC_TRANSFORM_MODULES"
TRANSFORM_ENTRY_POINTS = "d365sync.transforms"
BUILTIN_TRANSFORM_MODULES = (__name__,)


def allowed_transform_modules() -> tuple[str, ...]:
    """Module prefixes custom transforms may come from: built in, entry points, environment."""
    declared = [ep.module for ep in importlib.metadata.entry_points(group=TRANSFORM_ENTRY_POINTS)]
    configured = os.environ.get(TRANSFORM_MODULES_ENV, "").split(",")
    prefixes = (*BUILTIN_TRANSFORM_MODULES, *declared, *configured)
    return tuple(dict.fromkeys(p.strip() for p in prefixes if p.strip()))


def _module_allowed(module: str, prefixes: Sequence[str]) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in prefixes)


def import_function(path: str) -> Callable[..., Any]:
    """Import ``package.module:function`` once, at spec load; failures are spec errors.

    Only from the declared modules (:func:`allowed_transform_modules`), checked before the
    import, so a spec can neither run a module's import-time code nor name ``os:system``.
    """
    module_name, _, attr = path.partition(":")
    prefixes = allowed_transform_modules()
    if not DOTTED.match(path) or not _module_allowed(module_name, prefixes):
        raise TransformSpecError(
            f"custom transform {path!r} is not from an allowed module (allowed: "
            f"{', '.join(prefixes)}; declare more in the {TRANSFORM_ENTRY_POINTS!r} entry-point "
            f"group or in {TRANSFORM_MODULES_ENV})"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TransformSpecError(f"cannot import custom transform {path!r}: {exc}") from None
    if not callable(fn):
        raise TransformSpecError(f"custom transform {path!r} is not callable")
    defined_in = getattr(fn, "__module__", None)
    if not isinstance(defined_in, str) or not _module_allowed(defined_in, prefixes):
        raise TransformSpecError(
            f"custom transform {path!r} is defined in {defined_in!r}, not in an allowed module "
            f"(allowed: {', '.join(prefixes)})"
        )
    return fn


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TransformError(f"expected text, got {type(value).__name__}", value=value)
    return value


def to_decimal(value: Any) -> Decimal:
    """Exact Decimal from int, str, Decimal or float (via repr, so 0.1 stays 0.1)."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise TransformError("expected a number, got a boolean", value=value)
    try:
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except InvalidOperation:
        raise TransformError("not a number", value=value) from None


def parse_date(value: Any) -> date | None:
    """Accept a date, a datetime (converted to UTC), 'YYYYMMDD' or ISO text; blank → None."""
    if isinstance(value, datetime):
        return (value.astimezone(UTC) if value.tzinfo else value).date()
    if isinstance(value, date):
        return value
    text = _text(value).strip()
    if text in ("", "00000000"):
        return None
    try:
        if len(text) == 8 and text.isdigit():
            return date(int(text[:4]), int(text[4:6]), int(text[6:]))
        if len(text) == 10:
            return date.fromisoformat(text)
        return parse_date(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise TransformError("not a date (YYYYMMDD or ISO 8601)", value=value) from None


def _value_map(env: BuildEnv, name: str) -> ValueMapTable:
    table = env.value_maps.get(name)
    if table is None:
        raise TransformSpecError(f"value map {name!r} is not declared (known: {sorted(env.value_maps)})")
    return table


class _LiveInverse:
    """Inverse of a run-time code table, computed once per table object.

    Where several legacy codes share an ISO code, the configured map's preference wins if the
    live table still has it; otherwise the first code listed.
    """

    def __init__(self, configured: ValueMapTable) -> None:
        self._configured = configured.inverse
        self._cache: tuple[int, dict[Any, Any]] | None = None

    def __call__(self, live: Mapping[Any, Any]) -> dict[Any, Any]:
        if self._cache is None or self._cache[0] != id(live):
            inverse = {v: k for k, v in reversed(list(live.items()))}
            inverse.update({iso: leg for iso, leg in self._configured.items() if live.get(leg) == iso})
            self._cache = (id(live), inverse)
        return self._cache[1]


def _strip_bind(value: str, prefix: str) -> str:
    return value[len(prefix) : -1] if value.startswith(prefix) and value.endswith(")") else value


def _resolve(ctx: TransformContext, target: str, value: Any, to: Literal["id", "key"], soft: bool) -> Any:
    found = ctx.lookup(target, value, to)
    if found is None and not soft:
        raise MissingParent(target, value)
    return found


def group_rows(rows: Iterable[Row], key: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows sorted by ``key`` → one row per key, other columns as lists (for ``aggregate``)."""
    current: dict[str, Any] | None = None
    ident: tuple[Any, ...] | None = None
    for row in rows:
        row_key = tuple(row[k] for k in key)
        if row_key != ident:
            if current is not None:
                yield current
            ident, current = row_key, {k: row[k] for k in key}
        assert current is not None
        for name, value in row.items():
            if name not in key:
                current.setdefault(name, []).append(value)
    if current is not None:
        yield current
