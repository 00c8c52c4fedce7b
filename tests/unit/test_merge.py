"""Unit tests of the three-way merge: one test per rule, read as the rule book."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from d365sync.engine.merge import (
    Base,
    DeletePolicy,
    EntityRules,
    FieldRule,
    MergeConfigError,
    RecordInput,
    SideRecord,
    merge_many,
    merge_record,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

CUSTOMERS = EntityRules(
    "customers",
    (
        FieldRule("name", owner="dynamics"),
        FieldRule("email", owner="dynamics", on_foreign_change="report"),
        FieldRule("credit_limit", owner="erp"),
        FieldRule("address_line1", owner="both", policy="last_write_wins", skew_seconds=30, prefer="erp"),
        FieldRule("city", owner="both", policy="owner_wins"),
        FieldRule("note", owner="both", policy="manual_review"),
        FieldRule("terms", owner="erp", policy="version"),
        FieldRule("status", owner="both", policy="version", on_version_conflict="owner_wins", prefer="erp"),
    ),
)

BASE_VALUES = {
    "name": "Acme",
    "email": "a@acme.com",
    "credit_limit": Decimal("100.00"),
    "address_line1": "1 Main St",
    "city": "Paris",
    "note": "n",
    "terms": "N30",
    "status": "open",
}


def base(**over: object) -> Base:
    values = {**BASE_VALUES, **over}
    return Base(values, dynamics_version="10", erp_version="20", dynamics_modified=T0, erp_modified=T0)


def dyn(seconds: float = 60, version: str = "11", **changes: object) -> SideRecord:
    return SideRecord({**BASE_VALUES, **changes}, T0 + timedelta(seconds=seconds), version)


def erp(seconds: float = 60, version: str = "21", **changes: object) -> SideRecord:
    return SideRecord({**BASE_VALUES, **changes}, T0 + timedelta(seconds=seconds), version)


def merge(d: SideRecord | None = None, e: SideRecord | None = None, b: Base | None = None, **kw: object):
    return merge_record(CUSTOMERS, RecordInput("K1", d, e, b if b is not None else base(), **kw))


# --- one side changed -----------------------------------------------------------------------


def test_owner_change_is_written_to_the_other_side_with_only_the_changed_field() -> None:
    decision = merge(e=erp(credit_limit=Decimal("250.00")))
    assert decision.erp is None
    assert decision.dynamics is not None
    assert decision.dynamics.op == "update"
    assert decision.dynamics.fields == {"credit_limit": Decimal("250.00")}
    assert decision.dynamics.expected_version == "10"
    assert decision.base.values["credit_limit"] == Decimal("250.00")
    assert decision.decisions[0].reason == "erp changed credit_limit; erp owns it"


def test_shared_field_changed_on_one_side_wins() -> None:
    decision = merge(d=dyn(city="Lyon"))
    assert decision.erp.fields == {"city": "Lyon"}
    assert decision.decisions[0].reason == "dynamics changed city; both sides may change it"


def test_foreign_change_is_reverted_on_the_side_that_may_not_own_it() -> None:
    decision = merge(d=dyn(credit_limit=Decimal("999")))
    assert decision.dynamics.fields == {"credit_limit": Decimal("100.00")}
    assert decision.erp is None
    assert decision.base.values["credit_limit"] == Decimal("100.00")
    assert decision.decisions[0].winner == "erp"
    assert "reverted" in decision.decisions[0].reason


def test_foreign_change_is_reported_when_configured_and_nothing_is_written() -> None:
    decision = merge(e=erp(email="x@evil.com"))
    assert decision.writes == []
    assert decision.reports[0].field == "email"
    assert decision.reports[0].side == "erp"
    assert "dynamics owns it: reported" in decision.reports[0].reason
    assert decision.base.values["email"] == "a@acme.com"


# --- echo (loop guard) ----------------------------------------------------------------------


def test_value_equal_to_base_is_an_echo_and_writes_nothing() -> None:
    decision = merge(d=dyn(), e=erp())
    assert decision.writes == []
    assert decision.decisions[0].reason == "echo: dynamics and erp values equal base"
    assert decision.base_changed  # the new ETags are remembered
    assert decision.base.dynamics_version == "11"


def test_equal_decimals_with_different_scale_are_an_echo() -> None:
    decision = merge(e=erp(credit_limit=Decimal("100.0")))
    assert decision.writes == []


def test_not_extracted_side_is_taken_to_be_at_base() -> None:
    decision = merge()
    assert decision.writes == [] and not decision.base_changed and decision.decisions == []


# --- both changed ---------------------------------------------------------------------------


def test_both_changed_to_the_same_value_is_no_conflict_and_no_write() -> None:
    decision = merge(d=dyn(city="Nice"), e=erp(city="Nice"))
    assert decision.writes == [] and decision.conflicts == []
    assert decision.base.values["city"] == "Nice"
    assert decision.decisions[0].reason == "both changed city to the same value"


def test_last_write_wins_newer_side_beyond_skew() -> None:
    decision = merge(d=dyn(seconds=102, address_line1="D"), e=erp(seconds=60, address_line1="E"))
    assert decision.erp.fields == {"address_line1": "D"}
    assert (
        decision.decisions[0].reason == "both changed address_line1; last_write_wins: dynamics newer by 42s"
    )


def test_last_write_wins_inside_skew_falls_back_to_prefer() -> None:
    decision = merge(d=dyn(seconds=80, address_line1="D"), e=erp(seconds=60, address_line1="E"))
    assert decision.dynamics.fields == {"address_line1": "E"}
    assert "within 30s skew tolerance; falls back to erp" in decision.decisions[0].reason


def test_last_write_wins_inside_skew_falls_back_to_the_owner() -> None:
    rules = EntityRules("x", (FieldRule("f", owner="dynamics", policy="last_write_wins", skew_seconds=5),))
    b = Base({"f": 1}, dynamics_modified=T0, erp_modified=T0)
    d = SideRecord({"f": 2}, T0 + timedelta(seconds=1))
    e = SideRecord({"f": 3}, T0 + timedelta(seconds=100))
    decision = merge_record(rules, RecordInput("k", d, e, b))
    assert decision.erp.fields == {"f": 2}  # an owned field never takes the non-owner's value


def test_owner_wins_gives_a_both_changed_field_to_its_owner() -> None:
    decision = merge(d=dyn(name="D"), e=erp(name="E"))
    assert decision.erp.fields == {"name": "D"}
    assert decision.dynamics is None
    assert decision.decisions[0].reason == "both changed name; dynamics owns it (owner_wins)"


def test_shared_owner_wins_without_prefer_is_parked() -> None:
    decision = merge(d=dyn(city="D"), e=erp(city="E"))
    assert decision.writes == []
    assert decision.conflicts[0].field == "city"


def test_manual_review_parks_the_field_and_lets_the_others_through() -> None:
    decision = merge(d=dyn(note="D", name="New"), e=erp(note="E"))
    (conflict,) = decision.conflicts
    assert (conflict.field, conflict.base, conflict.dynamics, conflict.erp) == ("note", "n", "D", "E")
    assert decision.erp.fields == {"name": "New"}
    assert decision.base.values["note"] == "n"  # base keeps the old value until a decision


def test_review_decision_is_applied_on_the_next_run() -> None:
    decision = merge(d=dyn(note="D"), e=erp(note="E"), decided={"note": "chosen"})
    assert decision.dynamics.fields == {"note": "chosen"}
    assert decision.erp.fields == {"note": "chosen"}
    assert decision.base.values["note"] == "chosen"
    assert decision.conflicts == []


def test_open_review_item_stays_parked_until_decided() -> None:
    # without the review item, erp's change alone would win (dynamics is back at base)
    decision = merge(e=erp(terms="N60"), under_review={"terms"})
    assert decision.writes == []
    assert decision.conflicts[0].reason == "awaiting review decision"


def test_open_review_item_no_longer_parked_when_both_sides_are_back_at_base() -> None:
    decision = merge(d=dyn(), e=erp(), under_review={"terms"})
    assert decision.conflicts == []


def test_open_review_item_refreshed_without_inventing_the_value_of_a_side_not_extracted() -> None:
    decision = merge(d=dyn(note="D2"), under_review={"note"})
    (conflict,) = decision.conflicts
    assert (conflict.base, conflict.dynamics, conflict.erp, conflict.unseen) == ("n", "D2", None, ("erp",))


def test_first_sync_review_has_no_base_value_stays_parked_and_takes_the_decision() -> None:
    first = merge_record(
        CUSTOMERS,
        RecordInput("m", SideRecord({"name": "A", "note": "D"}), SideRecord({"name": "A", "note": "E"})),
    )
    (conflict,) = first.conflicts
    assert (conflict.base, conflict.dynamics, conflict.erp, conflict.unseen) == (None, "D", "E", ())
    assert first.base.values == {"name": "A"}  # no base value for the parked field, no placeholder

    # the next run sees Dynamics only: still parked, nothing written, nothing invented
    again = merge_record(
        CUSTOMERS,
        RecordInput("m", SideRecord({"name": "A", "note": "D"}), None, first.base, under_review={"note"}),
    )
    (conflict,) = again.conflicts
    assert (conflict.base, conflict.dynamics, conflict.erp, conflict.unseen) == (None, "D", None, ("erp",))
    assert again.writes == [] and again.base.values == {"name": "A"}

    decided = merge_record(CUSTOMERS, RecordInput("m", None, None, again.base, decided={"note": "E"}))
    assert decided.dynamics.fields == {"note": "E"} and decided.erp.fields == {"note": "E"}
    assert decided.base.values == {"name": "A", "note": "E"} and decided.conflicts == []


# --- version policy -------------------------------------------------------------------------


def test_version_change_accepted_when_the_other_side_did_not_move() -> None:
    decision = merge(e=erp(terms="N60"), d=dyn(version="10"))
    assert decision.dynamics.fields == {"terms": "N60"}


def test_version_mismatch_on_the_other_side_is_a_conflict() -> None:
    decision = merge(e=erp(terms="N60"), d=dyn(name="Other"))
    assert [c.field for c in decision.conflicts] == ["terms"]
    assert "version conflict, manual review" in decision.conflicts[0].reason
    assert decision.erp.fields == {"name": "Other"}


def test_version_conflict_resolved_by_owner_when_configured() -> None:
    decision = merge(d=dyn(status="closed"), e=erp(status="hold"))
    assert decision.dynamics.fields == {"status": "hold"}
    assert "version conflict; falls back to erp" in decision.decisions[0].reason


def test_echo_with_new_etag_does_not_count_as_moved() -> None:
    decision = merge(e=erp(terms="N60"), d=dyn(version="99"))
    assert decision.conflicts == []
    assert decision.dynamics.fields == {"terms": "N60"}


# --- stale ----------------------------------------------------------------------------------


def test_change_older_than_last_sync_is_rejected_as_stale() -> None:
    decision = merge(d=dyn(seconds=-5, name="Old"))
    assert decision.writes == []
    assert decision.stale[0].side == "dynamics"
    assert decision.stale[0].reason.startswith("stale: dynamics modified")


def test_older_numeric_version_is_stale() -> None:
    old = SideRecord({**BASE_VALUES, "credit_limit": Decimal(1)}, None, 'W/"19"')
    decision = merge(e=old)
    assert decision.writes == [] and "version" in decision.stale[0].reason


def test_same_timestamp_is_not_stale() -> None:
    decision = merge(d=dyn(seconds=0, name="Same second"))
    assert decision.stale == [] and decision.erp.fields == {"name": "Same second"}


# --- reconcile repairs ----------------------------------------------------------------------


def test_repair_compares_a_stale_looking_row_by_value() -> None:
    # a direct SQL fix: old LAST_UPD, ROW_VER untouched; reconcile vouches for the ERP row
    fixed = erp(seconds=-86_400, version="20", credit_limit=Decimal("98765.43"))
    assert merge(e=fixed).stale and merge(e=fixed).writes == []
    decision = merge(e=fixed, repair={"erp"})
    assert decision.stale == []
    assert decision.dynamics.fields == {"credit_limit": Decimal("98765.43")}
    assert decision.dynamics.expected_version == "10"
    assert decision.erp is None
    assert decision.base.values["credit_limit"] == Decimal("98765.43")


def test_repair_never_moves_the_base_timestamp_or_version_backwards() -> None:
    fixed = erp(seconds=-86_400, version="19", credit_limit=Decimal("1.00"))
    decision = merge(e=fixed, repair={"erp"})
    assert decision.base.erp_modified == T0
    assert decision.base.erp_version == "20"


def test_repair_keeps_ownership_an_owned_field_never_takes_the_non_owners_value() -> None:
    fixed = erp(seconds=-86_400, version="20", name="ERP rename", credit_limit=Decimal("5.00"))
    decision = merge(e=fixed, repair={"erp"})
    assert decision.dynamics.fields == {"credit_limit": Decimal("5.00")}
    assert decision.erp.fields == {"name": "Acme"}  # dynamics owns it: reverted on the ERP
    assert decision.base.values["name"] == "Acme"


def test_repair_of_one_side_leaves_the_other_sides_staleness_check_alone() -> None:
    old_dyn = dyn(seconds=-60, version="9", city="Lyon")
    decision = merge(d=old_dyn, e=erp(seconds=-60, version="20", city="Nice"), repair={"erp"})
    assert [s.side for s in decision.stale] == ["dynamics"]
    assert decision.dynamics.fields == {"city": "Nice"}


def test_repair_of_a_row_at_base_values_writes_nothing() -> None:
    decision = merge(e=erp(seconds=-86_400, version="20"), repair={"erp"})
    assert decision.writes == [] and decision.stale == []
    assert decision.base.erp_modified == T0


# --- creates --------------------------------------------------------------------------------


def test_create_on_one_side_creates_on_the_other() -> None:
    record = RecordInput("new", SideRecord({"name": "N", "extra": 1}, T0, "1"), None, None)
    decision = merge_record(CUSTOMERS, record)
    assert decision.erp.op == "create"
    assert decision.erp.fields == {"name": "N"}  # unmapped fields are not sent
    assert decision.base.values == {"name": "N"}
    assert decision.base.dynamics_version == "1"


def test_create_against_the_entity_direction_is_reported() -> None:
    invoices = EntityRules("invoices", (FieldRule("amount", owner="erp"),), direction="erp_to_dynamics")
    decision = merge_record(invoices, RecordInput("i", SideRecord({"amount": 1}), None, None))
    assert decision.writes == [] and decision.base is None
    assert "not propagated: entity direction is erp_to_dynamics" in decision.reports[0].reason
    decision = merge_record(invoices, RecordInput("i", None, SideRecord({"amount": 1}), None))
    assert decision.dynamics.op == "create"


def test_never_synced_record_on_both_sides_is_matched_field_by_field() -> None:
    d = SideRecord({"name": "A", "city": "Paris", "credit_limit": Decimal(1)})
    e = SideRecord({"name": "B", "city": "Paris", "credit_limit": Decimal(2)})
    decision = merge_record(CUSTOMERS, RecordInput("m", d, e, None))
    assert decision.erp.fields == {"name": "A"}
    assert decision.dynamics.fields == {"credit_limit": Decimal(2)}
    assert decision.base.values == {"name": "A", "city": "Paris", "credit_limit": Decimal(2)}


# --- deletes --------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["deactivate", "delete"])
def test_delete_follows_the_policy_of_its_direction(action: str) -> None:
    rules = EntityRules("c", CUSTOMERS.fields, delete_policy=DeletePolicy(dynamics_to_erp=action))
    decision = merge_record(rules, RecordInput("K1", SideRecord.tombstone(T0), None, base()))
    assert decision.erp.op == action
    assert decision.erp.expected_version == "20"
    assert decision.base.deleted_on == "dynamics"


def test_delete_ignored_writes_nothing_but_closes_the_record() -> None:
    rules = EntityRules("c", CUSTOMERS.fields, delete_policy=DeletePolicy(erp_to_dynamics="ignore"))
    decision = merge_record(rules, RecordInput("K1", None, SideRecord.tombstone(), base()))
    assert decision.writes == [] and decision.base.deleted_on == "erp"


def test_edit_concurrent_with_a_delete_is_reported() -> None:
    decision = merge(d=SideRecord.tombstone(), e=erp(city="Lyon"))
    assert decision.erp.op == "deactivate"
    assert "edits dropped" in decision.reports[0].reason


def test_a_closed_record_writes_nothing_again() -> None:
    closed = Base(BASE_VALUES, deleted_on="dynamics")
    decision = merge(e=erp(city="Lyon"), b=closed)
    assert decision.writes == [] and "deleted on dynamics; ignored" in decision.reports[0].reason
    assert not decision.base_changed


def test_deleted_on_both_sides() -> None:
    decision = merge(d=SideRecord.tombstone(), e=SideRecord.tombstone())
    assert decision.writes == [] and decision.base.deleted_on == "both"


# --- configuration and bulk -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"owner": "neither"}, {"policy": "newest"}, {"prefer": "crm"}, {"on_foreign_change": "x"}],
)
def test_rules_outside_the_vocabulary_are_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(MergeConfigError):
        FieldRule("f", **kwargs)


def test_merge_many_is_lazy_and_keeps_order() -> None:
    records = (RecordInput(i, erp(credit_limit=Decimal(i)), None, base()) for i in range(3))
    decisions = merge_many(CUSTOMERS, records)
    assert [d.key for d in decisions] == [0, 1, 2]
