"""A review decision written to both systems by the next run (the engine half of issue 6).

Invoices flow ERP → Dynamics and the ERP owns every field, but a value decided by a human in
the review queue overrides ownership: it is written to Dynamics *and* to the ERP
(``INV_HEADER``), the review item is closed, and the run after that writes nothing. An ERP
update that changes no row is never counted as a success.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from d365sync.cli import main
from d365sync.engine.stages.context import norm_key
from d365sync.sandbox.dataverse.config import PERSON_USER
from tests.integration.pipeline_env import Env, sync_cli_connections
from tests.integration.test_pipeline import _no_failures, _synced_invoice, _upsert
from tests.integration.test_pipeline import env as env
from tests.sandbox_fixtures import SandboxFactory

pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)

DECIDED = Decimal("3.33")


def _erp_amounts(env: Env, invoice: str) -> tuple[Decimal, Decimal, Decimal]:
    (row,) = env.erp_rows(
        "SELECT GROSS_AMOUNT, NET_AMOUNT, TAX_AMOUNT FROM INV_HEADER WHERE INV_NO = ?", invoice
    )
    return tuple(Decimal(str(v)).quantize(Decimal("0.01")) for v in row)  # type: ignore[return-value]


def _dynamics_total(env: Env, invoice: str) -> Decimal:
    (row,) = env.dynamics_rows("invoices", ["invoicenumber", "totalamount"], f"invoicenumber eq '{invoice}'")
    return Decimal(str(row["totalamount"])).quantize(Decimal("0.01"))


def test_a_decided_total_reaches_dynamics_and_the_erp_then_nothing_more_is_written(env: Env) -> None:
    _no_failures(env.run_all())
    invoice = _synced_invoice(env)
    _, net, tax = _erp_amounts(env, invoice)

    # the total changed on both sides: manual review
    env.erp.execute([f"UPDATE INV_HEADER SET GROSS_AMOUNT = 2.22 WHERE INV_NO = '{invoice}'"])
    _upsert(env, "invoices", "invoice", "invoicenumber", {"invoicenumber": invoice, "totalamount": 1.11})
    _no_failures({"invoices": env.run("invoices")})
    (review,) = [r for r in env.store.reviews("invoices") if norm_key(r.record_key) == invoice]
    assert review.field == "total"
    assert (_dynamics_total(env, invoice), _erp_amounts(env, invoice)[0]) == (
        Decimal("1.11"),
        Decimal("2.22"),
    )

    env.store.decide_review(review.id, chosen=DECIDED, by="alice", comment="total confirmed by finance")
    result = env.run("invoices")
    _no_failures({"invoices": result})
    assert result.plan.writes == {"dynamics": {"update": 1}, "erp": {"update": 1}}
    assert env.store.dead_letters("invoices") == []
    assert _dynamics_total(env, invoice) == DECIDED
    # the spec maps total → GROSS_AMOUNT (decimal, scale 2) and tax → TAX_AMOUNT on its own;
    # NET_AMOUNT is not mapped: only the gross amount takes the decision
    assert _erp_amounts(env, invoice) == (DECIDED, net, tax)
    assert review.id not in {r.id for r in env.store.reviews("invoices")}
    assert review.id not in {r.id for r in env.store.reviews("invoices", status="decided")}
    assert review.id in {r.id for r in env.store.reviews("invoices", status="applied")}

    # a further run writes nothing
    env.sandbox.reset_counters()
    before = env.erp_fingerprint()
    assert env.run("invoices").plan.writes == {"dynamics": {}, "erp": {}}
    assert env.write_requests() == 0
    assert env.erp_fingerprint() == before
    assert _erp_amounts(env, invoice)[0] == DECIDED


@pytest.fixture
def demo_env(dataverse_sandbox_factory: SandboxFactory, tmp_path: Path) -> Iterator[Env]:
    """The pipeline env with the demo's second application user, the person who edits."""
    environment = Env.create(dataverse_sandbox_factory(seed=30, extra_users=[PERSON_USER]), tmp_path)
    yield environment
    environment.close()


def test_the_demo_conflict_seeder_fills_the_review_queue_after_the_first_sync(
    demo_env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``d365sync sandbox conflicts`` (started by ``make demo``): it waits for a successful invoices
    run, edits invoices on both sides as a person and as the ERP would, and the next run parks each
    one for review with both sides' values and the time each side changed."""
    env = demo_env
    sync_cli_connections(env.sandbox, tmp_path, monkeypatch)  # the env's own files under tmp_path
    assert main(["sandbox", "conflicts", "--invoices", "2", "--wait", "0"]) == 1  # no run yet
    assert "no successful invoices run" in capsys.readouterr().err

    _no_failures(env.run_all())
    assert main(["sandbox", "conflicts", "--invoices", "2", "--wait", "5"]) == 0
    out = capsys.readouterr().out
    edited = [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("invoice ")]
    assert len(edited) == 2 and "2 invoice(s) edited on both sides" in out

    _no_failures({"invoices": env.run("invoices")})
    reviews = {norm_key(r.record_key): r for r in env.store.reviews("invoices")}
    assert set(edited) <= set(reviews)
    for number in edited:
        review = reviews[number]
        assert review.field == "total" and review.dynamics != review.erp
        assert set(review.changed) == {"dynamics", "erp"}
        # who: Dataverse names the person's user; a legacy ERP keeps no user on the row
        assert review.changed_by == {"dynamics": f"# {PERSON_USER['name']}"}  # an application user


def test_the_demo_conflict_seeder_looks_again_until_invoices_reach_dataverse(
    demo_env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's first successful invoices run can come before the customers run: its invoices
    wait, parked, and none is in Dataverse yet. The seeder then looks again until enough are
    there, instead of giving up with an empty review queue."""
    import threading

    from d365sync.sandbox import conflicts

    env = demo_env
    sync_cli_connections(env.sandbox, tmp_path, monkeypatch)
    monkeypatch.setattr(conflicts, "RETRY_SECONDS", 0.2)
    first_pass, real_edit = threading.Event(), conflicts._edit

    def edit(*args: object) -> int:
        found = real_edit(*args)  # type: ignore[arg-type]
        first_pass.set()
        return found

    monkeypatch.setattr(conflicts, "_edit", edit)
    _no_failures({"invoices": env.run("invoices")})  # before its customers: every invoice parked
    assert env.store.parked_children("invoices")
    outcome: dict[str, int] = {}
    seeder = threading.Thread(
        target=lambda: outcome.update(rc=main(["sandbox", "conflicts", "--invoices", "2", "--wait", "300"]))
    )
    seeder.start()
    assert first_pass.wait(60)  # it has looked once, and found none
    _no_failures(env.run_all())
    seeder.join(120)
    assert outcome == {"rc": 0}
    out = capsys.readouterr().out
    assert "0 invoice(s) in Dataverse to edit so far; looking again" in out
    assert "2 invoice(s) edited on both sides" in out
    _no_failures({"invoices": env.run("invoices")})
    assert len(env.store.reviews("invoices")) >= 2
