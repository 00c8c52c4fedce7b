"""The pages and actions. Every route is guarded by the app-level dependency (``app.guard``).

Actions answer with a 303 back to the page they came from, carrying a short message, so a
reload never repeats a decision (post/redirect/get).
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from d365sync.airflow import docs
from d365sync.engine import health
from d365sync.engine.state import StateError
from d365sync.ui import present, queries
from d365sync.ui.airflow_api import TriggerError, TriggerUnconfirmed
from d365sync.ui.app import HERE, UiContext, ctx_of, guard, root
from d365sync.ui.auth import Principal
from d365sync.ui.messages import CHOICES, TYPES, banner, flash
from d365sync.ui.queries import AuditFilter, ReviewFilter

log = logging.getLogger(__name__)
router = APIRouter()
User = Annotated[Principal, Depends(guard)]
STATIC = {name: HERE / "static" / name for name in ("style.css", "icon.svg", "icon-dark.svg")}
# Ids and page numbers past what a database integer holds are a 422, not an OverflowError (500).
MAX_ID = 2**63 - 1
MAX_PAGE = 10**9
RowId = Annotated[int, Path(ge=1, le=MAX_ID)]
PageNo = Annotated[int, Query(ge=1, le=MAX_PAGE)]
PREFIX = "/d365sync"


def _page(request: Request, user: Principal, name: str, **context: Any) -> Response:
    ctx = ctx_of(request)
    nonce = getattr(request.state, "csrf_nonce", "")
    ok, error = banner(request.query_params)
    context |= {
        "user": user,
        "reveal": user.can_reveal,
        "base": root(request),
        "csrf": ctx.csrf.token(nonce, user.name),
        "msg": ok,
        "error": error,
        "active": name.removesuffix(".html"),
    }
    return ctx.templates.TemplateResponse(request, name, context)


def _back(request: Request, path: str, params: dict[str, Any], code: str, **args: object) -> RedirectResponse:
    """Back to ``path`` with its filters and a banner code (see :mod:`d365sync.ui.messages`)."""
    query = {k: v for k, v in params.items() if v not in (None, "")} | flash(code, **args)
    return RedirectResponse(f"{root(request)}{path}?{urlencode(query)}", status_code=303)


# --- navigation -----------------------------------------------------------------------------


@router.get("/")
def index(request: Request, user: User) -> RedirectResponse:
    return RedirectResponse(f"{root(request)}/health", status_code=303)


@router.get("/static/{name}")
def static(name: str, user: User) -> FileResponse:
    if name not in STATIC:
        raise HTTPException(404)
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(STATIC[name], media_type=media, headers={"Cache-Control": "max-age=3600"})


@router.get("/dag/{dag_id}")
def dag_page(request: Request, dag_id: str, user: User) -> Response:
    """The per-DAG link from the Airflow UI: an entity DAG opens its entity's page."""
    prefix = ctx_of(request).settings.dag_prefix
    entity = dag_id.removeprefix(prefix) if dag_id.startswith(prefix) else None
    return entity_page(request, entity or "", user, dag_id=dag_id)


@router.get("/entities/{entity}")
def entity_page(request: Request, entity: str, user: User, dag_id: str | None = None) -> Response:
    """One entity: its figures, last runs, field mapping, and links to its letters, reviews, DAG."""
    ctx = ctx_of(request)
    engine = ctx.store.engine
    known = entity in queries.entities(engine)
    report = health.build_health(ctx.store, days=14, stale_after_days=ctx.settings.stale_review_days)
    spec = _spec(entity)
    return _page(
        request,
        user,
        "entity.html",
        entity=entity,
        dag_id=dag_id or (f"{ctx.settings.dag_prefix}{entity}" if spec is not None else None),
        known=known,
        spec=spec,
        fields=docs.field_rows(spec) if spec is not None else [],
        runs=[present.run_row(r) for r in ctx.store.run_reports(entity, limit=10)] if entity else [],
        figures=report.entities.get(entity),
        reviews=queries.review_counts(engine).get(entity, 0),
        dead=queries.dead_letter_counts(engine).get("pending", {}).get(entity, 0),
        airflow=root(request).removesuffix(PREFIX),
        fmt=health.fmt_duration,
    )


def _spec(entity: str) -> Any:
    """The entity's spec from the entity files the DAGs use (None: no such entity, or unreadable)."""
    from d365sync.spec import SpecError, entities_dir, load_entities_apart

    if not entity:
        return None
    try:
        return load_entities_apart(entities_dir())[0].get(entity)
    except (SpecError, OSError) as exc:
        log.warning("entity files not readable for the entity page: %s", exc)
        return None


# --- review queue ---------------------------------------------------------------------------


@router.get("/reviews")
def reviews(
    request: Request,
    user: User,
    entity: str = "",
    field: str = "",
    key: str = "",
    status: str = "open",
    page: PageNo = 1,
) -> Response:
    ctx = ctx_of(request)
    engine = ctx.store.engine
    flt = ReviewFilter(entity or None, field or None, key or None, status)
    return _page(
        request,
        user,
        "reviews.html",
        flt=flt,
        rows=queries.review_page(engine, flt, page, ctx.settings.page_size, ctx.store.privacy),
        counts=queries.review_counts(engine, status),
        fields=queries.review_fields(engine, entity or None, status),
        bulk_limit=ctx.settings.bulk_limit,
        filters={"entity": entity, "field": field, "key": key, "status": status},
    )


def _chosen(review: Any, choice: str, value: str) -> Any:
    if choice == "dynamics":
        return review.dynamics
    if choice == "erp":
        return review.erp
    if choice == "value":
        like = next((v for v in (review.dynamics, review.erp, review.base) if v is not None), "")
        return present.coerce(value, like)
    raise ValueError(f"unknown choice {choice!r}")


def _filters(entity: str, field: str, key: str, page: int = 1) -> dict[str, Any]:
    return {"entity": entity, "field": field, "key": key, "page": page if page > 1 else None}


@router.post("/reviews/{review_id}/decide")
def decide(
    request: Request,
    review_id: RowId,
    user: User,
    choice: Annotated[str, Form()],
    value: Annotated[str, Form()] = "",
    comment: Annotated[str, Form()] = "",
    entity: Annotated[str, Form()] = "",
    field: Annotated[str, Form()] = "",
    key: Annotated[str, Form()] = "",
    page: Annotated[int, Form(ge=1, le=MAX_PAGE)] = 1,
) -> RedirectResponse:
    ctx = ctx_of(request)
    back = _filters(entity, field, key, page)
    item = queries.review(ctx.store.engine, review_id, ctx.store.privacy)
    if item is None or item.status != "open":
        return _back(request, "/reviews", back, "not_open", id=review_id)
    if choice not in CHOICES:
        return _back(request, "/reviews", back, "bad_choice")
    try:
        chosen = _chosen(item, choice, value)
    except ValueError:
        return _back(request, "/reviews", back, "bad_value", type=_type_name(item))
    try:
        ctx.store.decide_review(review_id, chosen, by=user.name, comment=comment.strip() or None)
    except StateError as exc:
        log.warning("review %s not decided by %s: %s", review_id, user.name, exc)
        return _back(request, "/reviews", back, "decide_failed", id=review_id)
    return _back(request, "/reviews", back, "decided", id=review_id, choice=choice)


def _type_name(review: Any) -> str:
    like = next((v for v in (review.dynamics, review.erp, review.base) if v is not None), "")
    name = type(like).__name__
    return name if name in TYPES else "str"


@router.post("/reviews/bulk")
def decide_bulk(
    request: Request,
    user: User,
    choice: Annotated[str, Form()],
    scope: Annotated[str, Form()] = "selected",
    ids: Annotated[list[int] | None, Form()] = None,
    value: Annotated[str, Form()] = "",
    comment: Annotated[str, Form()] = "",
    entity: Annotated[str, Form()] = "",
    field: Annotated[str, Form()] = "",
    key: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """Decide the selected items, or every open item matching the filter (up to the bulk limit)."""
    ctx = ctx_of(request)
    back = _filters(entity, field, key)
    if scope == "filter":
        flt = ReviewFilter(entity or None, field or None, key or None)
        targets = queries.review_ids(ctx.store.engine, flt, ctx.settings.bulk_limit)
    else:
        targets = [i for i in ids or [] if 1 <= i <= MAX_ID][: ctx.settings.bulk_limit]
    if choice not in CHOICES:
        return _back(request, "/reviews", back, "bad_choice")
    if not targets:
        return _back(request, "/reviews", back, "nothing_selected")
    done, failed = _decide_many(ctx, targets, choice, value, comment, user)
    if failed:
        log.warning(
            "bulk decision by %s: %d item(s) failed: %s", user.name, len(failed), "; ".join(failed[:5])
        )
        return _back(request, "/reviews", back, "bulk_failed", n=done, choice=choice, failed=len(failed))
    return _back(request, "/reviews", back, "bulk_decided", n=done, choice=choice)


def _decide_many(
    ctx: UiContext, ids: list[int], choice: str, value: str, comment: str, user: Principal
) -> tuple[int, list[str]]:
    done, errors = 0, []
    for review_id in ids:
        item = queries.review(ctx.store.engine, review_id, ctx.store.privacy)
        if item is None or item.status != "open":
            continue
        try:
            chosen = _chosen(item, choice, value)
            ctx.store.decide_review(review_id, chosen, by=user.name, comment=comment.strip() or None)
            done += 1
        except (ValueError, StateError) as exc:
            errors.append(f"{review_id}: {exc}")
    return done, errors


# --- dead letters ---------------------------------------------------------------------------


@router.get("/dead-letters")
def dead_letters(
    request: Request,
    user: User,
    entity: str = "",
    status: str = "pending",
    view: str = "",
    group: Annotated[str, Query(max_length=64)] = "",
    page: PageNo = 1,
) -> Response:
    """Pending letters grouped by cause first; ``view=rows`` (or another status) lists rows, and
    ``group`` lists one group's rows."""
    ctx = ctx_of(request)
    engine = ctx.store.engine
    size, privacy = ctx.settings.page_size, ctx.store.privacy
    chosen = queries.dead_letter_group(engine, group) if group else None
    grouped = status == "pending" and view != "rows" and not group
    if chosen is not None:
        rows = queries.dead_letters_by_id(engine, chosen.ids, page, size, privacy)
    elif grouped:
        rows = queries.Page([], 0, 1, size)
    else:
        rows = queries.dead_letter_page(engine, entity or None, status, page, size, privacy)
    return _page(
        request,
        user,
        "dead_letters.html",
        rows=rows,
        groups=queries.dead_letter_groups(engine, entity or None) if grouped else [],
        grouped=grouped,
        chosen=chosen,
        extra=queries.dead_letter_extra(engine, [d.id for d in rows.items]),
        counts=queries.dead_letter_counts(engine),
        entities=queries.entities(engine),
        filters={"entity": entity, "status": status, "view": "" if grouped else "rows", "group": group},
        replay_dag=ctx.settings.replay_dag_id,
        dag_prefix=ctx.settings.dag_prefix,
    )


@router.post("/dead-letters/groups/{token}/{action}")
def group_action(
    request: Request,
    token: Annotated[str, Path(max_length=64)],
    action: Literal["replay", "skip"],
    user: User,
    reason: Annotated[str, Form()] = "",
    entity: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """Replay (one replay DAG run, as the caller) or skip (with the reason given) every pending
    letter of one cause, up to the bulk limit."""
    ctx = ctx_of(request)
    back = {"entity": entity}
    if action == "skip" and not reason.strip():
        return _back(request, "/dead-letters", back, "reason_required")
    group = queries.dead_letter_group(ctx.store.engine, token)
    if group is None:
        return _back(request, "/dead-letters", back, "group_gone")
    ids = group.ids[: ctx.settings.bulk_limit]
    if action == "skip":
        done = ctx.store.skip_dead_letters(ids, reason.strip(), by=user.name)
        return _back(request, "/dead-letters", back, "group_skipped", n=done)
    keys = sorted({k for k in group.keys[: len(ids)]})
    note = (
        f"Replay of {len(ids)} dead letter(s) ({group.stage}) requested by {user.name} from the d365sync UI"
    )
    failed = _trigger_replay(request, user, {"entity": group.entity, "keys": keys}, note, back, ids[0])
    if failed is not None:
        return failed
    ctx.store.replay_dead_letters(ids, by=user.name)  # those the replay run took meanwhile are due anyway
    rest = group.count - len(ids)
    if rest:
        return _back(request, "/dead-letters", back, "group_replay_partial", n=len(ids), rest=rest)
    return _back(request, "/dead-letters", back, "group_replay_queued", n=len(ids))


def _trigger_replay(
    request: Request, user: Principal, conf: dict[str, Any], note: str, back: dict[str, Any], first: int
) -> RedirectResponse | None:
    """Trigger the replay DAG as ``user``: None once Airflow's answer shows the run, else the page
    to go back to, saying why (the letters then stay pending)."""
    ctx = ctx_of(request)
    try:
        run = ctx.airflow.trigger(ctx.settings.replay_dag_id, conf, user.token, note)
    except TriggerUnconfirmed as exc:
        log.warning("replay by %s not confirmed: %s", user.name, exc)
        return _back(request, "/dead-letters", back, "replay_unconfirmed", id=first)
    except TriggerError as exc:
        log.warning("replay by %s failed: %s", user.name, exc)
        if not exc.status:
            return _back(request, "/dead-letters", back, "replay_unreachable")
        return _back(request, "/dead-letters", back, "replay_refused", http=exc.status)
    keys = conf["keys"]
    log.info(
        "replay of %d %s record(s) queued by %s: run %s", len(keys), conf["entity"], user.name, run.dag_run_id
    )
    return None


@router.post("/dead-letters/{dead_letter_id}/replay")
def replay(
    request: Request,
    dead_letter_id: RowId,
    user: User,
    entity: Annotated[str, Form()] = "",
    status: Annotated[str, Form()] = "pending",
) -> RedirectResponse:
    """Trigger the replay DAG for this record (as the caller), then mark it due in the store.

    The caller's token goes to the configured Airflow API only (:mod:`d365sync.ui.airflow_api`),
    and the letter is marked only once Airflow's answer shows the replay run.
    """
    ctx = ctx_of(request)
    back = {"entity": entity, "status": status}
    dead = queries.dead_letter(ctx.store.engine, dead_letter_id, ctx.store.privacy)
    if dead is None or dead.status != "pending":
        return _back(request, "/dead-letters", back, "not_pending", id=dead_letter_id)
    conf = {"entity": dead.entity, "keys": [dead.record_key]}
    note = f"Replay of dead letter {dead_letter_id} requested by {user.name} from the d365sync UI"
    failed = _trigger_replay(request, user, conf, note, back, dead_letter_id)
    if failed is not None:
        return failed
    with contextlib.suppress(StateError):  # the replay run got there first: it is due either way
        ctx.store.replay_dead_letter(dead_letter_id, by=user.name)
    return _back(request, "/dead-letters", back, "replay_queued", id=dead_letter_id)


@router.post("/dead-letters/{dead_letter_id}/skip")
def skip(
    request: Request,
    dead_letter_id: RowId,
    user: User,
    reason: Annotated[str, Form()] = "",
    entity: Annotated[str, Form()] = "",
    status: Annotated[str, Form()] = "pending",
) -> RedirectResponse:
    ctx = ctx_of(request)
    back = {"entity": entity, "status": status}
    if not reason.strip():
        return _back(request, "/dead-letters", back, "reason_required")
    try:
        ctx.store.skip_dead_letter(dead_letter_id, reason.strip(), by=user.name)
    except StateError as exc:
        log.warning("dead letter %s not skipped by %s: %s", dead_letter_id, user.name, exc)
        return _back(request, "/dead-letters", back, "not_pending", id=dead_letter_id)
    return _back(request, "/dead-letters", back, "skipped", id=dead_letter_id)


# --- health ---------------------------------------------------------------------------------


def _report(ctx: UiContext, days: int) -> health.HealthReport:
    s = ctx.settings
    stale = s.stale_review_days
    return health.build_health(ctx.store, days=days, stale_after_days=stale, drift_dir=s.drift_dir)


@router.get("/health")
def health_page(request: Request, user: User, days: Annotated[int, Query(ge=1, le=365)] = 14) -> Response:
    ctx = ctx_of(request)
    report = _report(ctx, days)
    return _page(
        request,
        user,
        "health.html",
        report=report,
        charts=health.charts(report),
        days=days,
        fmt=health.fmt_duration,
        docs=_data_docs(ctx),
        dag_prefix=ctx.settings.dag_prefix,
    )


@router.get("/api/health")
def health_json(request: Request, user: User, days: Annotated[int, Query(ge=1, le=365)] = 14) -> JSONResponse:
    return JSONResponse(health.summary(_report(ctx_of(request), days)))


def _data_docs(ctx: UiContext) -> list[tuple[str, datetime]]:
    """Data Docs sites (``index.html`` files) under the configured directory, newest first."""
    root_dir = ctx.settings.data_docs_dir
    if root_dir is None or not root_dir.is_dir():
        return []
    found = [(p.relative_to(root_dir).as_posix(), p.stat().st_mtime) for p in root_dir.rglob("index.html")]
    found.sort(key=lambda f: f[1], reverse=True)
    return [(path, datetime.fromtimestamp(mtime, UTC)) for path, mtime in found[:20]]


@router.get("/data-docs/{path:path}")
def data_docs(request: Request, path: str, user: User) -> FileResponse:
    """Serve GX Data Docs read-only (values in them are masked by the validation stage)."""
    root_dir = ctx_of(request).settings.data_docs_dir
    if root_dir is None:
        raise HTTPException(404, "no Data Docs directory configured")
    target = (root_dir / path).resolve()
    if not target.is_relative_to(root_dir.resolve()) or not target.is_file():
        raise HTTPException(404)
    media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return FileResponse(target, media_type=media)


# --- audit log ------------------------------------------------------------------------------


def _when(raw: str, end: bool = False) -> datetime | None:
    """``2024-05-01`` or ``2024-05-01T10:00``, UTC; a bare date as ``until`` covers that day."""
    if not raw.strip():
        return None
    value = datetime.fromisoformat(raw.strip())
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value + timedelta(days=1) if end and len(raw.strip()) == 10 else value


@router.get("/audit")
def audit(
    request: Request,
    user: User,
    entity: str = "",
    key: str = "",
    since: str = "",
    until: str = "",
    page: PageNo = 1,
) -> Response:
    ctx = ctx_of(request)
    filters = {"entity": entity, "key": key, "since": since, "until": until}
    try:
        flt = AuditFilter(entity or None, key or None, _when(since), _when(until, end=True))
    except ValueError:
        flt, filters["error"] = AuditFilter(entity or None, key or None), "dates: YYYY-MM-DD[THH:MM]"
    return _page(
        request,
        user,
        "audit.html",
        rows=queries.audit_page(ctx.store.engine, flt, page, ctx.settings.page_size, ctx.store.privacy),
        entities=queries.entities(ctx.store.engine),
        filters=filters,
    )
