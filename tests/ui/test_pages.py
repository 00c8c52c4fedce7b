"""What the pages show and what the actions store, against a real SQLite state store."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest

from d365sync.engine.state import AuditEntry, Failure, ReviewItem
from tests.ui.conftest import PII, PREFIX, Env
from tests.ui.test_access import READS, _url


def _flash(response: object) -> dict[str, list[str]]:
    return parse_qs(urlsplit(response.headers["location"]).query)  # type: ignore[attr-defined]


def _shown(ui: Env, response: object) -> str:
    """The banner texts of the page an action redirects to (as the browser would show them)."""
    page = ui.client.get(response.headers["location"])  # type: ignore[attr-defined]
    assert page.status_code == 200, page.text
    return " | ".join(re.findall(r'<p class="flash [a-z]+" role="\w+">(.*?)</p>', page.text))


def _post(ui: Env, role: str, path: str, form: dict[str, object]) -> object:
    client = ui.as_role(role)
    return client.post(f"{PREFIX}{path}", data={**form, "csrf_token": ui.csrf()})


# --- PII ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["viewer", "user"])
def test_no_page_shows_an_unmasked_email_or_phone_to_a_viewer(ui: Env, role: str) -> None:
    ui.store.decide_review(4, "held", by="oscar", comment=f"called {ui_phone()} / {PII[0]}")
    client = ui.as_role(role)
    pages = [_url(p) for p, _ in READS] + [
        f"{PREFIX}/reviews?status=decided",
        f"{PREFIX}/dead-letters?status=pending",
        f"{PREFIX}/audit?entity=customers",
    ]
    for url in pages:
        page = client.get(url).text
        body = page + re.sub(r"<[^>]+>", "", page)  # the markup and the text as shown (marks removed)
        for secret in PII:
            assert secret not in body, f"{secret!r} shown to a {role} on {url}"


QUOTED = ('"john doe"@example.com', "'a.b'@x.org", "+49 30 1234 5678", "PWD=hunter2")


def test_a_viewer_sees_quoted_addresses_phones_and_secrets_in_free_text_masked(ui: Env) -> None:
    """Issue 11, finding 4: quoted local parts slipped past the viewer masking."""
    error = f"not a valid e-mail address (value {QUOTED[0]!r}); also {QUOTED[1]} / {QUOTED[2]} / {QUOTED[3]}"
    ui.store.dead_letter("customers", "transform", "run-2", [Failure("C020", error, {"note": error})])
    ui.store.open_reviews("customers", "run-2", [ReviewItem("C021", "name", "a", "b", "c", error)])
    client = ui.as_role("viewer")
    urls = [f"{PREFIX}/dead-letters?entity=customers{view}" for view in ("", "&view=rows")]
    for url in [*urls, f"{PREFIX}/reviews?entity=customers"]:
        body = html.unescape(client.get(url).text)
        assert "C020" in body or "C021" in body or "not a valid e-mail address" in body
        for leak in ("john doe", "a.b'@x.org", "1234 5678", "hunter2"):
            assert leak not in body, f"{leak!r} shown to a viewer on {url}"


def ui_phone() -> str:
    return "+44 20 7946 0958"


def test_operator_sees_real_values_to_decide(ui: Env) -> None:
    page = ui.as_role("op").get(f"{PREFIX}/reviews?entity=customers").text
    body = re.sub(r"</?mark>", "", page)  # the text as shown: what changed is highlighted
    assert "jane.doe@example.com" in body and "j.doe@contoso.org" in body and ui_phone() in body


def test_audit_log_is_masked_even_for_admins(ui: Env) -> None:
    body = ui.as_role("admin").get(f"{PREFIX}/audit").text
    assert "j***@e***.com" in body and "jane.doe@example.com" not in body


# --- review queue ---------------------------------------------------------------------------


def test_decide_take_erp_stores_user_time_and_comment(ui: Env) -> None:
    response = _post(ui, "op", "/reviews/1/decide", {"choice": "erp", "comment": "ERP is master"})
    assert response.status_code == 303 and _flash(response)["msg"] == ["decided"]
    assert _shown(ui, response) == "Review 1 decided (erp)."
    (decided,) = ui.store.decided_reviews("customers")
    assert (decided.id, decided.chosen, decided.decided_by, decided.comment) == (
        1,
        "j.doe@contoso.org",
        "oscar",
        "ERP is master",
    )
    assert decided.decided_at is not None
    assert datetime.now(UTC) - decided.decided_at < timedelta(minutes=1)


def test_decide_entered_value_keeps_the_type(ui: Env) -> None:
    _post(ui, "admin", "/reviews/3/decide", {"choice": "value", "value": "160", "comment": "agreed"})
    (decided,) = ui.store.decided_reviews("customers")
    assert decided.chosen == 160 and isinstance(decided.chosen, int) and decided.decided_by == "ada"


def test_decide_bad_value_is_an_error_not_a_decision(ui: Env) -> None:
    response = _post(ui, "op", "/reviews/3/decide", {"choice": "value", "value": "lots"})
    assert "not a valid int" in _shown(ui, response)
    assert ui.store.decided_reviews("customers") == []


def test_decide_twice_reports_not_open(ui: Env) -> None:
    _post(ui, "op", "/reviews/2/decide", {"choice": "dynamics"})
    again = _post(ui, "op", "/reviews/2/decide", {"choice": "erp"})
    assert _shown(ui, again) == "Review 2 is not open."


def test_bulk_decision_for_a_filtered_set(ui: Env) -> None:
    items = [
        ReviewItem(f"C{i:03}", "creditlimit", Decimal("1"), Decimal(i), Decimal("2"), "")
        for i in range(100, 130)
    ]
    ui.store.open_reviews("customers", "run-2", items)
    form = {"choice": "dynamics", "scope": "filter", "entity": "customers", "field": "creditlimit"}
    response = _post(ui, "op", "/reviews/bulk", form | {"comment": "Dynamics owns credit"})
    assert _shown(ui, response).startswith("31 review item(s) decided")
    decided = ui.store.decided_reviews("customers")
    assert len(decided) == 31 and {d.field for d in decided} == {"creditlimit"}
    assert all(d.decided_by == "oscar" and d.comment == "Dynamics owns credit" for d in decided)
    assert next(d for d in decided if d.record_key == "C105").chosen == Decimal(105)
    assert [r.entity for r in ui.store.reviews()] == ["customers", "customers", "orders"]


def test_bulk_decision_respects_the_limit(ui: Env) -> None:
    items = [ReviewItem(f"K{i:04}", "name", "a", "b", "c", "") for i in range(600)]
    ui.store.open_reviews("products", "run-2", items)
    form = {"choice": "erp", "scope": "filter", "entity": "products", "comment": "bulk"}
    response = _post(ui, "op", "/reviews/bulk", form)
    assert _shown(ui, response).startswith("500 review item(s)")
    assert len(ui.store.reviews("products")) == 100


def test_review_queue_is_paginated_and_filtered(ui: Env) -> None:
    items = [ReviewItem(f"P{i:04}", "name", "a", "b", "c", "") for i in range(120)]
    ui.store.open_reviews("products", "run-2", items)
    client = ui.as_role("viewer")
    first = client.get(f"{PREFIX}/reviews?entity=products").text
    assert "120 item(s) · page 1 of 3" in first and 'rel="next"' in first
    last = client.get(f"{PREFIX}/reviews?entity=products&page=3").text
    assert last.count('<tr id="review-') == 20 and "P0119" in last and "P0099" not in last
    by_key = client.get(f"{PREFIX}/reviews?entity=products&key=P011").text
    assert "10 item(s)" in by_key


# --- dead letters ---------------------------------------------------------------------------


def test_replay_triggers_the_replay_dag_as_the_caller(ui: Env) -> None:
    response = _post(ui, "op", "/dead-letters/1/replay", {})
    assert _shown(ui, response) == "Replay of dead letter 1 queued."
    (call,) = ui.api.calls
    assert call["path"] == "/api/v2/dags/replay_dead_letters/dagRuns"
    assert call["auth"] == f"Bearer {ui.tokens['op']}"
    assert call["body"]["conf"] == {"entity": "customers", "keys": ["C010"]}
    assert call["body"]["logical_date"] is None
    (replay,) = ui.store.dead_letters("customers", status="replay")
    assert replay.id == 1


def test_replay_refused_by_airflow_changes_nothing(ui: Env) -> None:
    ui.api.status = 403
    response = _post(ui, "op", "/dead-letters/1/replay", {})
    assert "HTTP 403" in _shown(ui, response)
    assert [d.id for d in ui.store.dead_letters("customers")] == [1, 2]


def test_skip_needs_a_reason_and_records_it(ui: Env) -> None:
    empty = _post(ui, "op", "/dead-letters/2/skip", {"reason": "  "})
    assert "reason is required" in _shown(ui, empty)
    _post(ui, "op", "/dead-letters/2/skip", {"reason": "option value retired"})
    assert [d.id for d in ui.store.dead_letters("customers", status="skipped")] == [2]
    page = ui.as_role("viewer").get(f"{PREFIX}/dead-letters?status=skipped").text
    assert "skipped by oscar: option value retired" in page


def test_replay_note_speaks_to_operators_only(ui: Env) -> None:
    viewer = ui.as_role("viewer").get(f"{PREFIX}/dead-letters").text
    assert "as you" not in viewer and "Replay triggers" not in viewer
    assert "until an operator replays or skips them" in viewer
    operator = ui.as_role("op").get(f"{PREFIX}/dead-letters").text
    assert "DAG as you" in operator


def _quarantine_emails(ui: Env, count: int) -> None:
    """``count`` customers failing the same e-mail rule, each with its own (masked) value, as the
    validate stage writes them, plus one credit limit out of range."""
    from d365sync.engine.validation import Failure as RuleFailure

    rule = "expect_column_values_to_match_regex(column=CUST_EMAIL_ID, regex='^[^@]+@[^@]+$')"
    failures = [
        Failure(f"C1{i:02d}", "validation: " + RuleFailure(rule, "x", "CUST_EMAIL_ID", f"n***{i}").describe())
        for i in range(count)
    ]
    limit = "expect_column_values_to_be_between(column=CREDIT_LIMIT, min_value=0)"
    failures.append(
        Failure("C200", "validation: " + RuleFailure(limit, "x", "CREDIT_LIMIT", "-500").describe())
    )
    ui.store.dead_letter("customers", "validate", "run-2", failures)


def _groups(page: str) -> dict[str, int]:
    """Group row id → count, from the groups table."""
    return {g: int(n) for g, n in re.findall(r'<tr id="group-([0-9a-f]+)" data-count="(\d+)">', page)}


def test_pending_letters_are_grouped_by_entity_stage_and_cause(ui: Env) -> None:
    _quarantine_emails(ui, 12)
    page = ui.as_role("viewer").get(f"{PREFIX}/dead-letters").text
    assert sorted(_groups(page).values()) == [1, 1, 1, 12], "12 e-mails, 1 credit limit, 2 load errors"
    assert "15 pending letter(s) in 4 group(s)" in page
    emails = page[page.index("CUST_EMAIL_ID=…") - 400 :]
    assert "n***0" in emails, "a sample value is shown beside the group"
    assert '<table class="grid" id="dead-letters">' not in page, "the groups come first, not the rows"
    rows = ui.as_role("viewer").get(f"{PREFIX}/dead-letters?view=rows").text
    assert rows.count('<tr id="dead-letter-') == 15


def test_a_group_opens_as_its_rows(ui: Env) -> None:
    _quarantine_emails(ui, 3)
    page = ui.as_role("viewer").get(f"{PREFIX}/dead-letters").text
    (token,) = [g for g, n in _groups(page).items() if n == 3]
    rows = ui.as_role("viewer").get(f"{PREFIX}/dead-letters?group={token}").text
    assert sorted(re.findall(r'<td class="mono">(C1\d\d)</td>', rows)) == ["C100", "C101", "C102"]
    assert "3 letter(s) of customers · validate" in rows


def test_replaying_a_group_replays_each_of_its_letters_in_one_dag_run(ui: Env) -> None:
    _quarantine_emails(ui, 4)
    (token,) = [g for g, n in _groups(ui.as_role("op").get(f"{PREFIX}/dead-letters").text).items() if n == 4]
    response = _post(ui, "op", f"/dead-letters/groups/{token}/replay", {})
    assert _shown(ui, response) == "Replay of 4 dead letter(s) queued."
    (call,) = ui.api.calls
    assert call["body"]["conf"] == {"entity": "customers", "keys": ["C100", "C101", "C102", "C103"]}
    assert call["auth"] == f"Bearer {ui.tokens['op']}"
    replayed = {d.record_key for d in ui.store.dead_letters("customers", status="replay")}
    assert replayed == {"C100", "C101", "C102", "C103"}
    assert {d.record_key for d in ui.store.dead_letters("customers")} == {"C010", "C011", "C200"}
    again = _post(ui, "op", f"/dead-letters/groups/{token}/replay", {})
    assert _shown(ui, again) == "No pending dead letters are left in that group."
    assert len(ui.api.calls) == 1


def test_skipping_a_group_needs_a_reason_and_skips_only_that_group(ui: Env) -> None:
    _quarantine_emails(ui, 5)
    (token,) = [g for g, n in _groups(ui.as_role("op").get(f"{PREFIX}/dead-letters").text).items() if n == 5]
    empty = _post(ui, "op", f"/dead-letters/groups/{token}/skip", {"reason": " "})
    assert "reason is required" in _shown(ui, empty)
    done = _post(
        ui, "op", f"/dead-letters/groups/{token}/skip", {"reason": "test e-mails, not real customers"}
    )
    assert _shown(ui, done) == "5 dead letter(s) skipped."
    skipped = ui.store.dead_letters("customers", status="skipped")
    assert {d.record_key for d in skipped} == {f"C10{i}" for i in range(5)}
    assert {d.record_key for d in ui.store.dead_letters("customers")} == {"C010", "C011", "C200"}


def test_a_viewer_gets_no_group_actions(ui: Env) -> None:
    _quarantine_emails(ui, 2)
    page = ui.as_role("viewer").get(f"{PREFIX}/dead-letters").text
    assert "/replay" not in page and "/skip" not in page and "Open rows" in page
    (token,) = [g for g, n in _groups(page).items() if n == 2]
    refused = _post(ui, "viewer", f"/dead-letters/groups/{token}/skip", {"reason": "x"})
    assert refused.status_code == 403  # type: ignore[attr-defined]
    assert ui.store.dead_letters("customers", status="skipped") == []


# --- audit, health, docs, entity pages ------------------------------------------------------


def test_audit_search_by_entity_key_and_time(ui: Env) -> None:
    entries = [
        AuditEntry(f"K{i}", "dynamics", "update", ["name"], {"name": "a"}, {"name": "b"}) for i in range(3)
    ]
    ui.store.audit("run-2", "orders", entries, actor="sync")
    client = ui.as_role("viewer")
    assert "3 item(s)" in client.get(f"{PREFIX}/audit?entity=orders").text
    assert "1 item(s)" in client.get(f"{PREFIX}/audit?entity=orders&key=K1").text
    assert "3 item(s)" in client.get(f"{PREFIX}/audit?key=K*").text
    today = datetime.now(UTC).date()
    assert "4 item(s)" in client.get(f"{PREFIX}/audit?since={today}&until={today}").text
    assert "0 item(s)" in client.get(f"{PREFIX}/audit?until={today - timedelta(days=1)}").text
    assert "dates:" in client.get(f"{PREFIX}/audit?since=yesterday").text


def test_health_dashboard_renders_svg_charts_and_data_docs_link(ui: Env) -> None:
    body = ui.as_role("viewer").get(f"{PREFIX}/health").text
    assert body.count("<svg") >= 8
    assert 'id="chart-records"' in body and 'id="chart-open_reviews"' in body
    assert f'href="{PREFIX}/data-docs/customers/index.html"' in body
    summary = ui.as_role("viewer").get(f"{PREFIX}/api/health").json()
    assert summary["entities"]["customers"]["open_reviews"] == 3


def test_data_docs_cannot_escape_their_directory(ui: Env) -> None:
    (ui.docs.parent / "secret.txt").write_text("no")
    client = ui.as_role("admin")
    assert client.get(f"{PREFIX}/data-docs/../secret.txt").status_code == 404
    assert client.get(f"{PREFIX}/data-docs/%2e%2e/secret.txt").status_code == 404


def test_dag_link_opens_the_entity_page(ui: Env) -> None:
    client = ui.as_role("viewer")
    body = client.get(f"{PREFIX}/dag/sync_customers").text
    assert "Entity customers" in body
    assert f'href="{PREFIX}/reviews?entity=customers"><span>Open review items</span><strong>3<' in body
    other = client.get(f"{PREFIX}/dag/reconcile").text
    assert "does not sync an entity" in other


def test_entity_page_shows_the_mapping_the_last_runs_and_links(ui: Env) -> None:
    from d365sync.spec import entities_dir, load_entities

    spec = load_entities(entities_dir())["customers"]
    body = html.unescape(ui.as_role("viewer").get(f"{PREFIX}/entities/customers").text)
    fields = re.findall(r'<tr id="field-(\w+)">', body)
    assert fields == list(spec.fields), "one row per field of the spec, in its order"
    email = spec.fields["email"]
    row = body[body.index('<tr id="field-email">') :].split("</tr>", 1)[0]
    assert f"<td>{email.owner}</td>" in row and email.erp in row and email.dynamics in row
    assert email.conflict.policy in row
    runs = body[body.index('id="entity-runs"') :].split("</table>", 1)[0]
    assert "run-1" in runs and '<span class="state success">success</span>' in runs
    assert re.search(r'<td class="num">(59|60) min</td>', runs), "the seeded run took an hour"
    assert '<td class="num">6</td><td class="num">4</td>' in runs, "rows read per side"
    assert 'href="/dags/sync_customers" target="_top"' in body
    assert f'href="{PREFIX}/dead-letters?entity=customers"' in body


def test_review_queue_marks_what_each_side_changed_since_the_last_sync(ui: Env) -> None:
    ui.store.open_reviews(
        "customers", "run-2", [ReviewItem("C030", "name", "Acme", "<b>Acme</b>", "Acme Ltd")]
    )
    body = ui.as_role("op").get(f"{PREFIX}/reviews?entity=customers").text
    credit = body[body.index(f'<tr id="review-{_review_id(ui, "C003")}">') :].split("</tr>", 1)[0]
    assert '<td class="val dyn">1<mark>5</mark>0</td>' in credit, "100 → 150"
    assert '<td class="val erp">1<mark>75</mark></td>' in credit, "100 → 175"
    name = body[body.index(f'<tr id="review-{_review_id(ui, "C030")}">') :].split("</tr>", 1)[0]
    assert "<mark>&lt;b&gt;</mark>Acme<mark>&lt;/b&gt;</mark>" in name, "escaped, never markup"
    assert '<td class="val erp">Acme<mark> Ltd</mark></td>' in name


def _review_id(ui: Env, key: str, entity: str = "customers") -> int:
    return next(r.id for r in ui.store.reviews(entity, limit=100) if r.record_key == key)


def test_entity_page_shows_where_a_running_run_is(ui: Env) -> None:
    ui.store.start_run("run-9", "customers")
    figures = {"stage": "load_dynamics", "done": 45000, "total": 87000, "rate": 1500.0, "eta_s": 28.0}
    ui.store.note_progress("run-9", "customers", figures)
    body = ui.as_role("viewer").get(f"{PREFIX}/entities/customers").text
    row = body[body.index("run-9") :].split("</tr>", 1)[0]
    assert "running" in row
    assert (
        '<span class="running">load_dynamics: 45,000/87,000 (52%) rows, 1,500 rows/s, ETA 28 s</span>' in row
    )


def test_review_queue_says_when_and_by_whom_each_side_changed(ui: Env) -> None:
    day = datetime(2026, 11, 30, tzinfo=UTC)
    changed = {"dynamics": day.replace(hour=9, minute=15), "erp": day.replace(hour=10, minute=5)}
    item = ReviewItem("O050", "total", 10, 11, 12, "both changed", (), changed, {"dynamics": "Ana <Sales>"})
    ui.store.open_reviews("orders", "run-2", [item])
    body = ui.as_role("viewer").get(f"{PREFIX}/reviews?entity=orders").text
    row = body[body.index(f'<tr id="review-{_review_id(ui, "O050", "orders")}">') :].split("</tr>", 1)[0]
    assert '1<mark>1</mark><span class="when">changed 2026-11-30 09:15 by Ana &lt;Sales&gt;</span>' in row
    assert '<span class="when">changed 2026-11-30 10:05</span>' in row  # the ERP does not say who


def test_a_group_action_other_than_replay_or_skip_is_refused(ui: Env) -> None:
    _quarantine_emails(ui, 2)
    (token,) = [g for g, n in _groups(ui.as_role("op").get(f"{PREFIX}/dead-letters").text).items() if n == 2]
    refused = _post(ui, "op", f"/dead-letters/groups/{token}/delete", {"reason": "x"})
    assert refused.status_code == 422  # type: ignore[attr-defined]
    assert len(ui.store.dead_letters("customers")) == 5
