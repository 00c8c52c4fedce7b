"""Great Expectations validation of one side's extracted rows, with row-level quarantine.

Why this module exists: a dirty ERP row (a broken e-mail, a blank name, an unknown currency
code) must not stop the other 99 % of a batch, and must not be lost either. So every row that
fails any expectation is *quarantined* - kept whole, with its key and a readable reason - and
the rest continue. Only when the invalid share passes the entity's threshold does the run fail
(:class:`ValidationFailed`), still carrying the quarantined rows so the caller can persist them.

Which column names: the spec's expectations (``validation.dynamics`` / ``validation.erp``) name
the side's columns **as extracted** (``CUST_EMAIL_ID``, ``emailaddress1``, lookups as
``_x_value``), so :func:`validate` takes rows in the side's native column names, before any
transform, and ``key_column`` is the side's native key (``CUST_NO``, ``accountnumber``; a
sequence of names for a composite ERP key).

Decisions (documented in the report and the tests):

* **Quarantine is per row, whatever ``mostly`` says.** ``mostly`` only decides whether GX calls
  the expectation a success (shown in the statistics and Data Docs); a row that failed is still
  a row we must not load. The run-level tolerance is the entity's ``invalid_share_threshold``.
* **Every duplicate is quarantined** (GX's ``unique`` flags all rows sharing a value): which copy
  is right cannot be decided from extraction order, so a human picks. Keeping "the first" would
  silently sync an arbitrary record.
* **Nulls**: ``regex``, ``in_set``, ``between`` and ``max_length`` skip nulls (GX semantics);
  only ``not_null`` catches them. Write ``not_null`` where a value is required.
* **``between`` on text/Decimal columns**: the ERP returns ``Decimal`` or numeric text, so the
  column is converted to numbers first; a non-null value that is not a number fails the
  ``between`` rule (GX would otherwise raise on comparing text with a number).
* **One GX run per batch**: the suite is evaluated once on the whole batch with
  ``result_format=COMPLETE`` and ``unexpected_index_column_names=[*key, _ROW]``; the unexpected
  indexes are mapped back to rows. ``_ROW`` (the row's position) is added because keys are not
  unique when ``unique`` fails, or absent when ``not_null`` on the key fails.
* **PII**: quarantine reasons, the results JSON and Data Docs show e-mails, phones and
  credentials masked, also inside longer text (:mod:`d365sync.engine.pii`); only
  ``QuarantinedRow.row`` keeps the original values, because the quarantine table must allow a
  replay. Data Docs values are also HTML-escaped: GX renders them unescaped.
* **Chunks**: ``unique`` is checked within the batch given; duplicates split across chunks are
  not seen here (the key map in the state store is the cross-chunk guard).

GX and pandas are imported inside the functions: DAG files import the engine at parse time and
``import great_expectations`` costs ~3 s and ~250 MB.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from d365sync.engine.pii import mask_any

if TYPE_CHECKING:
    import pandas as pd

    from d365sync.spec import EntitySpec

_ROW: Final = "__d365sync_row__"
_META_INDEX: Final = "d365sync_index"
_DOCS_SITE: Final = "d365sync"
_MAX_SET_ITEMS: Final = 8
_FULL_KEYS: Final = ("unexpected_list", "unexpected_index_list", "unexpected_index_query")
_GX_LOGGER: Final = "great_expectations"


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Failure:
    """One expectation one row failed: the rule, the column and the (masked) offending value."""

    rule: str
    expectation: str
    column: str
    value: Any

    def describe(self) -> str:
        return f"{self.rule}: {self.column}={self.value!r}"


@dataclass(frozen=True)
class QuarantinedRow:
    """A row held back from the load; ``row`` is the original, unmasked, so it can be replayed."""

    key: Any
    failures: tuple[Failure, ...]
    row: Mapping[str, Any]

    @property
    def reason(self) -> str:
        """Readable, PII-masked reason, e.g. for the quarantine table or a dry-run plan."""
        return "; ".join(f.describe() for f in self.failures)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary without the raw row (the results file must not copy PII)."""
        return {
            "key": _plain(self.key),
            "failures": [
                {"rule": f.rule, "expectation": f.expectation, "column": f.column, "value": _plain(f.value)}
                for f in self.failures
            ],
        }


@dataclass(frozen=True)
class ExpectationStats:
    """How one expectation fared: GX's verdict (honours ``mostly``) and the rows it quarantined."""

    rule: str
    expectation: str
    column: str
    success: bool
    failed_rows: int


@dataclass(frozen=True)
class ValidationStatistics:
    """Counts for the run report and the threshold decision."""

    entity: str
    side: str
    evaluated: int
    valid: int
    quarantined: int
    invalid_share: float
    threshold: float
    expectations: tuple[ExpectationStats, ...] = ()

    @property
    def exceeded(self) -> bool:
        """Past the threshold: strictly more invalid rows than the entity tolerates."""
        return self.invalid_share > self.threshold

    @property
    def failures_by_rule(self) -> dict[str, int]:
        return {e.rule: e.failed_rows for e in self.expectations if e.failed_rows}

    def top_failures(self, n: int = 5) -> list[tuple[str, int]]:
        """The ``n`` rules that quarantined most rows, most first."""
        return Counter(self.failures_by_rule).most_common(n)

    def summary(self) -> str:
        """One paragraph saying what failed, for logs, exceptions and alerts."""
        head = (
            f"{self.entity}/{self.side}: {self.quarantined} of {self.evaluated} rows invalid "
            f"({self.invalid_share:.2%}, threshold {self.threshold:.2%})"
        )
        top = "; ".join(f"{rule} x{count}" for rule, count in self.top_failures())
        return f"{head}; top failures: {top}" if top else head

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "side": self.side,
            "evaluated": self.evaluated,
            "valid": self.valid,
            "quarantined": self.quarantined,
            "invalid_share": self.invalid_share,
            "threshold": self.threshold,
            "exceeded": self.exceeded,
            "expectations": [e.__dict__ for e in self.expectations],
        }


@dataclass
class ValidationResult:
    """Rows that may continue, rows held back, and the numbers; paths of what was written."""

    valid_rows: list[Mapping[str, Any]]
    quarantined: list[QuarantinedRow]
    statistics: ValidationStatistics
    results_path: Path | None = None
    docs_path: Path | None = None


class ValidationFailed(Exception):
    """The invalid share passed the threshold. Carries everything so nothing is lost."""

    def __init__(self, result: ValidationResult) -> None:
        super().__init__(result.statistics.summary())
        self.result = result
        self.statistics = result.statistics
        self.quarantined = result.quarantined
        self.valid_rows = result.valid_rows

    @property
    def summary(self) -> str:
        return self.statistics.summary()


class ExpectationError(RuntimeError):
    """GX could not evaluate an expectation (wrong column, wrong type): a spec or extract bug."""


# ------------------------------------------------------------------------------ public API
def validate(
    spec: EntitySpec,
    side: str,
    rows: Iterable[Mapping[str, Any]],
    *,
    key_column: str | Sequence[str],
    results_dir: Path | str | None = None,
    docs_dir: Path | str | None = None,
    run_name: str | None = None,
) -> ValidationResult:
    """Validate one side's batch against the spec's expectations and quarantine failing rows.

    ``rows`` are in the side's native column names (what the expectations name). Returns the
    valid rows (the same objects, untouched) and the quarantined ones; raises
    :class:`ValidationFailed` past ``spec.validation.invalid_share_threshold``, after writing
    the results JSON (``results_dir``) and Data Docs (``docs_dir``) when asked.
    """
    keys = [key_column] if isinstance(key_column, str) else list(key_column)
    batch = [r for r in rows]
    expectations = list(getattr(spec.validation, side))
    name = run_name or f"{spec.name}-{side}-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}"
    if batch and expectations:
        failures, gx_success, docs = _evaluate(spec, side, batch, keys, expectations, docs_dir, name)
    else:
        failures, gx_success, docs = {}, [True] * len(expectations), None
    result = _assemble(spec, side, batch, keys, expectations, failures, gx_success)
    result.docs_path = docs
    if results_dir is not None:
        result.results_path = _write_results(Path(results_dir), name, result)
    if result.statistics.exceeded:
        raise ValidationFailed(result)
    return result


def rule_text(expectation: Any) -> str:
    """``expect_column_values_to_match_regex(column=CUST_EMAIL_ID, regex='…')`` for a spec expectation."""
    gx_class, kwargs = expectation.gx()
    column = kwargs.pop("column")
    if expectation.derived_column is None:
        args = [f"column={column}"]
    else:  # name what the spec says, not the helper column the validator built for GX
        args = [f"columns=[{', '.join(expectation.columns())}]"]
        args += ["normalized=True"] if expectation.normalize else []
    args += [f"{k}={_short(v)}" for k, v in kwargs.items() if v is not None]
    return f"{_snake(gx_class)}({', '.join(args)})"


# ------------------------------------------------------------------------------ evaluation
def _evaluate(
    spec: EntitySpec,
    side: str,
    batch: list[Mapping[str, Any]],
    keys: list[str],
    expectations: list[Any],
    docs_dir: Path | str | None,
    name: str,
) -> tuple[dict[int, list[tuple[int, str]]], list[bool], Path | None]:
    """Run the suite once on the whole batch; map GX's unexpected indexes to row positions.

    Returns ``{row position: [(expectation index, column)]}``, GX's success per expectation and
    the Data Docs index when built.
    """
    frame = _frame(batch, keys, expectations)
    failures: dict[int, list[tuple[int, str]]] = {}
    for i, exp in enumerate(expectations):
        if exp.type == "between":
            for pos in _coerce_numeric(frame, exp.column):
                failures.setdefault(pos, []).append((i, exp.column))
    context = _context(docs_dir)
    run, gx_batch = _run_suite(context, f"{spec.name}.{side}", frame, keys, expectations)
    success = [True] * len(expectations)
    for res in run.results:
        i = int(res.expectation_config.meta[_META_INDEX])
        _raise_on_exception(res, expectations[i])
        success[i] = bool(res.success)
        for pos in _unexpected_positions(res):
            failures.setdefault(pos, []).append((i, expectations[i].column))
    docs = None
    if docs_dir is not None:
        personal = spec.pii_columns(side)
        docs = _build_docs(context, Path(docs_dir), run, gx_batch.id, name, expectations, personal)
    return failures, success, docs


def _frame(batch: list[Mapping[str, Any]], keys: list[str], expectations: list[Any]) -> pd.DataFrame:
    """Only the columns the suite and the key need, derived columns, and the row position."""
    import pandas as pd

    needed = list(dict.fromkeys([*keys, *(c for e in expectations for c in e.columns())]))
    missing = [c for c in needed if not any(c in r for r in batch)]  # stops at the first row that has it
    if missing:
        raise ExpectationError(
            f"batch has no column(s) {missing}; expectations use the side's extracted names"
        )
    data: dict[str, Any] = {c: [r.get(c) for r in batch] for c in needed}
    for exp in expectations:  # from the plain lists: iterating a frame's columns is far slower
        if exp.derived_column is not None:
            data[exp.derived_column] = _combined(data, exp.columns(), exp.normalize)
    frame = pd.DataFrame(data)
    frame[_ROW] = range(len(batch))
    return frame


def _combined(data: Mapping[str, list[Any]], columns: Sequence[str], normalize: bool) -> list[Any]:
    """One comparable value per row from several columns; None when every part is null."""
    fold = _normalized if normalize else _as_text
    rows = zip(*(data[c] for c in columns), strict=True)
    return [None if all(v is None for v in row) else "\x1f".join(fold(v) for v in row) for row in rows]


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


def _normalized(value: Any) -> str:
    return " ".join(_as_text(value).split()).casefold()


def _coerce_numeric(frame: pd.DataFrame, column: str) -> list[int]:
    """Make a ``between`` column numeric; return positions of non-null values that are not numbers."""
    import pandas as pd

    series = frame[column]
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return []
    numbers = pd.to_numeric(series.map(_number), errors="coerce")
    bad = series.notna() & numbers.isna()
    frame[column] = numbers
    return [int(p) for p in frame.loc[bad, _ROW]]


def _number(value: Any) -> Any:
    """Decimal and numeric text become floats (bounds only); anything else becomes NaN."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, int | float | Decimal):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return math.nan


def quiet_gx() -> None:
    """Keep Great Expectations' own chatter out of task logs: its loggers at WARNING.

    On first import GX logs one INFO line per public API it registers
    (``great_expectations._docs_decorators``, ~210 lines) and DEBUG lines per expectation and
    datasource type; creating a context logs INFO again (``data_context.types.base`` sets
    its own logger to INFO at import, so the parent's level alone does not cover it). In an Airflow
    task log that buried a validation error under 200+ lines. Warnings and errors still pass.
    ``D365SYNC_GX_LOG_LEVEL`` (e.g. ``DEBUG``) lets them through when debugging GX itself.
    Called before the first ``import great_expectations`` and again after (idempotent, cheap).
    """
    level = logging.getLevelName(os.environ.get("D365SYNC_GX_LOG_LEVEL", "WARNING").upper())
    level = level if isinstance(level, int) else logging.WARNING
    logging.getLogger(_GX_LOGGER).setLevel(level)
    for name, child in list(logging.Logger.manager.loggerDict.items()):
        ours = name.startswith(_GX_LOGGER + ".") and isinstance(child, logging.Logger)
        if ours and logging.NOTSET < child.level < level:
            child.setLevel(level)


def _context(docs_dir: Path | str | None) -> Any:
    """Ephemeral context, GX logging quiet, progress bars off; a filesystem docs site when asked."""
    quiet_gx()  # before the import: the registration noise is logged while importing
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    quiet_gx()  # after it: modules that set their own logger's level at import

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name=_DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
            },
        )
    return context


def _run_suite(
    context: Any, name: str, frame: pd.DataFrame, keys: list[str], expectations: list[Any]
) -> tuple[Any, Any]:
    """One suite run on the batch with COMPLETE results indexed by key and row position.

    ``Batch.validate`` rather than ``ValidationDefinition.run``: the latter also serialises the
    whole COMPLETE result into the results store, which doubled the time on 100k rows. Docs
    store a masked, trimmed copy themselves (:func:`_build_docs`). Returns (result, suite).
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = context.suites.add(
        gx.ExpectationSuite(
            name=name, expectations=[_gx_expectation(gxe, i, e) for i, e in enumerate(expectations)]
        )
    )
    asset = context.data_sources.add_pandas("batch").add_dataframe_asset("rows")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(
        suite,
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": [*keys, _ROW],
            "return_unexpected_index_query": False,
        },
    )
    return result, batch


def _gx_expectation(gxe: Any, index: int, expectation: Any) -> Any:
    """The GX expectation for a spec expectation, tagged with its position in the spec."""
    gx_class, kwargs = expectation.gx()
    return getattr(gxe, gx_class)(**kwargs, meta={_META_INDEX: index})


def _raise_on_exception(res: Any, expectation: Any) -> None:
    info = res.exception_info or {}
    if info.get("raised_exception"):
        raise ExpectationError(
            f"{rule_text(expectation)} could not be evaluated: {info.get('exception_message')}"
        )


def _unexpected_positions(res: Any) -> list[int]:
    return [int(item[_ROW]) for item in res.result.get("unexpected_index_list") or ()]


# ------------------------------------------------------------------------------- assembling
def _assemble(
    spec: EntitySpec,
    side: str,
    batch: list[Mapping[str, Any]],
    keys: list[str],
    expectations: list[Any],
    failures: dict[int, list[tuple[int, str]]],
    success: list[bool],
) -> ValidationResult:
    """Split the batch into valid and quarantined rows, in the batch's order, and count."""
    rules = [rule_text(e) for e in expectations]
    personal = spec.pii_columns(side)
    quarantined = [
        _quarantine(batch[pos], keys, expectations, rules, failures[pos], personal)
        for pos in sorted(failures)
    ]
    valid = [row for pos, row in enumerate(batch) if pos not in failures]
    per_rule = Counter(i for hits in failures.values() for i in {i for i, _ in hits})
    stats = ValidationStatistics(
        entity=spec.name,
        side=side,
        evaluated=len(batch),
        valid=len(valid),
        quarantined=len(quarantined),
        invalid_share=len(quarantined) / len(batch) if batch else 0.0,
        threshold=spec.validation.invalid_share_threshold,
        expectations=tuple(
            ExpectationStats(rules[i], e.gx()[0], e.column, success[i], per_rule.get(i, 0))
            for i, e in enumerate(expectations)
        ),
    )
    return ValidationResult(valid_rows=valid, quarantined=quarantined, statistics=stats)


def _quarantine(
    row: Mapping[str, Any],
    keys: list[str],
    expectations: list[Any],
    rules: list[str],
    hits: list[tuple[int, str]],
    personal: frozenset[str] = frozenset(),
) -> QuarantinedRow:
    key = row.get(keys[0]) if len(keys) == 1 else tuple(row.get(k) for k in keys)
    seen = sorted({i for i, _ in hits})
    failures = tuple(
        Failure(
            rules[i],
            expectations[i].gx()[0],
            expectations[i].column,
            mask_any(expectations[i].column, row.get(expectations[i].column), personal=personal),
        )
        for i in seen
    )
    return QuarantinedRow(key=key, failures=failures, row=row)


# --------------------------------------------------------------------------------- writing
def _write_results(directory: Path, name: str, result: ValidationResult) -> Path:
    """``<name>.json``: statistics and masked quarantine reasons, written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "run": name,
        "statistics": result.statistics.as_dict(),
        "summary": result.statistics.summary(),
        "quarantined": [q.as_dict() for q in result.quarantined],
    }
    path = directory / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle, ensure_ascii=False, indent=2, default=_plain)
    os.replace(tmp, path)
    return path


def _build_docs(
    context: Any,
    docs_dir: Path,
    run: Any,
    batch_id: str,
    name: str,
    expectations: list[Any],
    personal: frozenset[str],
) -> Path:
    """Store a masked, trimmed copy of the result and render the docs site into ``docs_dir``.

    The COMPLETE result holds raw values and every index; Data Docs only render the partial
    lists, so the full ones are dropped and PII columns masked before anything is rendered.
    """
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    for res in run.results:
        _sanitize(res.result, expectations[int(res.expectation_config.meta[_META_INDEX])].column, personal)
    run_id = RunIdentifier(run_name=name, run_time=datetime.now(UTC))
    run.meta.update(run_id=run_id, validation_time=run_id.run_time)
    key = ValidationResultIdentifier(
        expectation_suite_identifier=ExpectationSuiteIdentifier(name=run.suite_name),
        run_id=run_id,
        batch_identifier=batch_id,
    )
    context.validation_results_store.set(key, run)
    context.build_data_docs(site_names=[_DOCS_SITE])
    return docs_dir.resolve() / "index.html"


def _sanitize(result: dict[str, Any], column: str, personal: frozenset[str] = frozenset()) -> None:
    """What Data Docs may render of one expectation's result: masked, HTML-escaped values.

    GX's renderer puts unexpected values into the HTML as they are (no escaping), and the docs
    are served on the Airflow origin: an account named ``<img src=x onerror=…>`` would run as
    script in the viewer's browser. So every value (and key) is masked
    (:func:`d365sync.engine.pii.mask_any`) and then escaped, and the full lists are dropped.
    """
    for name in _FULL_KEYS:
        result.pop(name, None)
    if "partial_unexpected_list" in result:
        result["partial_unexpected_list"] = [
            _for_docs(column, v, personal=personal) for v in result["partial_unexpected_list"]
        ]
    if "partial_unexpected_counts" in result:
        result["partial_unexpected_counts"] = [
            {**c, "value": _for_docs(column, c.get("value"), personal=personal)}
            for c in result["partial_unexpected_counts"]
        ]
    if "partial_unexpected_index_list" in result:
        result["partial_unexpected_index_list"] = [
            {k: _for_docs(k, v, by_shape=k == column, personal=personal) for k, v in item.items()}
            for item in result["partial_unexpected_index_list"]
        ]
    if isinstance(result.get("observed_value"), str):
        result["observed_value"] = _for_docs(column, result["observed_value"], personal=personal)


def _for_docs(column: str, value: Any, by_shape: bool = True, personal: frozenset[str] = frozenset()) -> Any:
    """A value as Data Docs may show it: personal data masked, then HTML-escaped (keys of the
    index list pass ``by_shape=False``: a numeric record key stays readable)."""
    shown = mask_any(column, _plain(value), by_shape=by_shape, personal=personal)
    if isinstance(shown, list):
        return [_for_docs(column, v, by_shape, personal) for v in shown]
    return html.escape(shown) if isinstance(shown, str) else shown


# --------------------------------------------------------------------------------- helpers
def _plain(value: Any) -> Any:
    """numpy scalars, Decimals and NaN as plain JSON values."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > _MAX_SET_ITEMS:
        return repr(value[:_MAX_SET_ITEMS])[:-1] + ", …]"
    return repr(value)
