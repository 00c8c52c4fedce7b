"""``doc_md`` for an entity DAG, generated from its spec: what syncs, who owns what, how conflicts end.

Pure string building over :class:`~d365sync.spec.EntitySpec` (no Airflow, no I/O), so the
Airflow UI's DAG docs can never drift from the YAML the run actually uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from d365sync.spec import EntitySpec, FieldSpec


def _cell(value: Any) -> str:
    text = "—" if value in (None, "", []) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _chain(steps: Sequence[Any] | None) -> str:
    if not steps:
        return "direct"
    return " → ".join(s.name if not s.args else f"{s.name}({_args(s.args)})" for s in steps)


def _args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in args.items())


def _policy(f: FieldSpec) -> str:
    c = f.conflict
    detail = []
    if getattr(c, "clock_skew_seconds", None) is not None:
        detail.append(f"skew {c.clock_skew_seconds:g}s")
    if getattr(c, "on_mismatch", None):
        detail.append(f"on mismatch {c.on_mismatch}")
    if f.winner:
        detail.append(f"winner {f.winner}")
    return c.policy + (f" ({', '.join(detail)})" if detail else "")


def field_rows(spec: EntitySpec) -> list[dict[str, Any]]:
    """One row per field: name, key, owner, both columns, both transform chains, conflict policy
    and what a non-owner change does (the DAG docs' tables and the UI's entity page)."""
    return [
        {
            "field": f.name,
            "key": f.name == spec.key,
            "owner": f.owner,
            "dynamics": f.dynamics,
            "erp": f.erp,
            "to_dynamics": _chain(f.to_dynamics) if f.dynamics else None,
            "to_erp": _chain(f.to_erp) if f.erp else None,
            "policy": _policy(f),
            "non_owner_change": f.on_non_owner_change,
        }
        for f in spec.fields.values()
    ]


def ownership_table(spec: EntitySpec) -> list[str]:
    rows = [
        "| field | owner | Dynamics | ERP | conflict policy | non-owner change |",
        "|---|---|---|---|---|---|",
    ]
    for r in field_rows(spec):
        key = " 🔑" if r["key"] else ""
        rows.append(
            f"| `{r['field']}`{key} | {r['owner']} | {_cell(r['dynamics'])} | {_cell(r['erp'])} "
            f"| {r['policy']} | {r['non_owner_change']} |"
        )
    return rows


def mapping_table(spec: EntitySpec) -> list[str]:
    rows = ["| field | canonical → Dynamics | canonical → ERP |", "|---|---|---|"]
    for r in field_rows(spec):
        rows.append(f"| `{r['field']}` | {_cell(r['to_dynamics'] or '—')} | {_cell(r['to_erp'] or '—')} |")
    return rows


def _detection(mode: Any) -> str:
    column = getattr(mode, "column", None)
    overlap = getattr(mode, "overlap_seconds", None)
    if column:
        return f"{mode.mode} on `{column}` (overlap {overlap}s)"
    return str(mode.mode)


def entity_doc_md(spec: EntitySpec, upstream: Sequence[str] = ()) -> str:
    """Markdown for the DAG's docs panel."""
    d, e = spec.dynamics, spec.erp
    lines = [
        f"# Sync `{spec.name}`",
        "",
        spec.description.strip() or "—",
        "",
        f"* **Dynamics**: `{d.table}` (`{d.entity_set}`), key `{d.key}`, "
        f"changes: {_detection(d.change_detection)}",
        f"* **ERP**: `{e.table}`, key `{', '.join(e.key)}`, changes: {_detection(e.change_detection)}",
        f"* **Schedule**: `{spec.schedule}` (UTC, data intervals); backfills re-read `modifiedon` / cursor "
        "windows and never move the live delta token or watermark",
        f"* **Creates**: to ERP {spec.creates.to_erp}, to Dynamics {spec.creates.to_dynamics}; "
        f"**deletes**: to ERP {spec.deletes.to_erp}, to Dynamics {spec.deletes.to_dynamics}",
        f"* **Validation**: {len(spec.validation.dynamics)} Dynamics / {len(spec.validation.erp)} ERP "
        f"expectations; bad rows wait as dead letters; over {spec.validation.invalid_share_threshold:.0%} "
        f"invalid of at least {spec.validation.min_rows} fresh rows a run alerts "
        f"({'and a full load stops' if spec.validation.stop_on_full_load else 'and goes on'})",
    ]
    if upstream:
        names = ", ".join(f"`{u}`" for u in upstream)
        lines.append(f"* **Depends on**: {names} (runs when they commit; missing parents are parked)")
    if spec.events.enabled:
        lines.append(f"* **Events**: {_events(spec)}")
    lines += ["", "## Ownership and conflict policies", "", *ownership_table(spec)]
    lines += ["", "## Mapping (transform chains)", "", *mapping_table(spec)]
    lines += [
        "",
        "## Tasks",
        "",
        "`extract_dynamics ∥ extract_erp → validate → transform → resolve → load_erp ∥ load_dynamics "
        "→ commit_state → report`. Data moves as Parquet under the staging root; XCom holds manifests.",
    ]
    if spec.events.enabled:
        lines += [
            "",
            f"`route` runs first: a run started by an event with at most {spec.events.fast_lane_max} waiting "
            "notifications takes `sync_events` (every stage in one task), anything else (scheduled, manual, "
            "backfill, dry run) the chain above; the other side is skipped.",
        ]
    return "\n".join(lines)


def _events(spec: EntitySpec) -> str:
    ev, signals = spec.events, []
    if ev.dynamics == "webhook":
        signals.append(f"Dataverse webhook notifications (inbox checked every {ev.inbox_poll_seconds:g}s)")
    if ev.erp == "poll":
        column = getattr(spec.erp.change_detection, "column", "?")
        signals.append(f"ERP `{column}` maximum polled every {ev.poll_seconds:g}s")
    return " and ".join(signals) + " start a run within seconds; the schedule stays as the safety net"
