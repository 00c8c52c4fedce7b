"""How values look on a page: masked for those who may not see personal data, readable for all.

Why here and not in the templates: "no page shows an unmasked e-mail or phone to a viewer" is
a rule, so it lives in one function every template goes through (``show``/``text``), and the
tests check the rendered pages, not the templates. The masking rules themselves live in
:mod:`d365sync.engine.pii`, the one module every masking caller uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final

from d365sync.engine.pii import mask_any, mask_key, mask_text
from d365sync.engine.progress import describe

if TYPE_CHECKING:
    from markupsafe import Markup

EMPTY: Final = "(empty)"
log = logging.getLogger(__name__)


def as_text(value: Any) -> str:
    """A value as one line of text."""
    if value is None:
        return EMPTY
    if isinstance(value, (Decimal, int, float, bool)):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False, sort_keys=True)
    return str(value)


def show(field: str, value: Any, reveal: bool, personal: Collection[str] = ()) -> str:
    """The value of ``field`` for a reader; masked unless ``reveal`` (``personal``: the names of
    ``pii: true`` fields and columns, shown as a letter and a length)."""
    return as_text(value if reveal else mask_any(field, value, personal=personal))


def personal_fields() -> frozenset[str]:
    """The ``pii: true`` names of the entity files the DAGs use (``D365SYNC_ENTITIES_DIR``, else
    the shipped ones); every e-mail and phone is masked by shape whatever this finds."""
    from d365sync.spec import entities_dir, load_entities_apart, personal_names

    try:  # a file that does not load (being written) must not unmask the others' fields
        return personal_names(load_entities_apart(entities_dir())[0])
    except Exception as exc:  # the DAGs report a broken spec; the pages still mask by shape
        log.warning("personal fields unknown (%s): names and addresses are not masked for viewers", exc)
        return frozenset()


def text(value: str | None, reveal: bool) -> str:
    """Free text for a reader; masked unless ``reveal``."""
    return (value or "") if reveal else mask_text(value)


def key(value: str, reveal: bool) -> str:
    return value if reveal else mask_key(value)


def coerce(raw: str, like: Any) -> Any:
    """An operator's typed value, converted to the type of the values it replaces."""
    raw = raw.strip()
    if raw == "" and not isinstance(like, str):
        return None
    try:
        return _coerce(raw, like)
    except (ValueError, InvalidOperation):
        raise ValueError(f"{raw!r} is not a valid {type(like).__name__}") from None


def _coerce(raw: str, like: Any) -> Any:
    if isinstance(like, bool):
        if raw.lower() not in {"true", "false", "1", "0", "yes", "no"}:
            raise ValueError(raw)
        return raw.lower() in {"true", "1", "yes"}
    if isinstance(like, Decimal):
        return Decimal(raw)
    if isinstance(like, int):
        return int(raw)
    if isinstance(like, float):
        return float(raw)
    if isinstance(like, datetime):
        return datetime.fromisoformat(raw)
    if isinstance(like, date):
        return date.fromisoformat(raw)
    if isinstance(like, (dict, list)):
        return json.loads(raw)
    return raw


def run_row(report: Any) -> dict[str, Any]:
    """A run report as one row of the entity page: outcome, start, duration, reads, writes."""
    counts = report.counts or {}
    writes = {
        side: sum(n for k, n in counts.items() if k.startswith(f"{side}_") and k.split("_", 1)[1] in _WRITES)
        for side in ("dynamics", "erp")
    }
    seconds = (report.finished_at - report.started_at).total_seconds() if report.finished_at else None
    return {
        "run_id": report.run_id,
        "status": report.status,
        "started_at": report.started_at,
        "seconds": seconds,
        "read": {side: counts.get(f"extracted_{side}", 0) for side in ("dynamics", "erp")},
        "writes": writes,
        "failed": sum(counts.get(f"{side}_failed", 0) for side in ("dynamics", "erp")),
        "stage": max(report.timings, key=report.timings.get) if report.timings else None,
        "progress": describe(report.progress) if report.status == "running" and report.progress else None,
        "error": report.error,
    }


_WRITES: Final = ("create", "update", "delete", "deactivate")


def diff(field: str, base: Any, value: Any, reveal: bool, personal: Collection[str] = ()) -> Markup:
    """``value`` as the reader may see it (:func:`show`), HTML-escaped, with the characters that
    differ from ``base`` (shown the same way) in ``<mark>``: what this side changed."""
    import difflib

    from markupsafe import Markup, escape

    old, new = show(field, base, reveal, personal), show(field, value, reveal, personal)
    if base is None or old == new:
        return Markup(escape(new))
    out = []
    for op, _, _, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        part = escape(new[j1:j2])
        out.append(part if op == "equal" or not part else Markup("<mark>") + part + Markup("</mark>"))
    return Markup("").join(out)
