"""How onboarding pairs columns: names spelled differently on each side, types that fit or not."""

from __future__ import annotations

import pytest

from d365sync.onboard.match import name_score, pair_score, type_factor
from d365sync.onboard.metadata import DvAttribute, ErpColumn
from d365sync.onboard.scaffold import field_name


@pytest.mark.parametrize(
    ("erp", "dynamics", "custom", "least"),
    [
        ("EMAIL_ADDR", "emailaddress1", False, 1.0),
        ("CONTACT_NO", "new_contactnumber", True, 1.0),  # the publisher prefix goes
        ("FIRST_NAME", "firstname", False, 1.0),
        ("PHONE_NO", "telephone1", False, 0.85),
        ("CITY", "address1_city", False, 0.85),
        ("CUST_EMAIL_ID", "emailaddress1", False, 0.8),  # the word email inside the ERP name
    ],
)
def test_names_spelled_differently_still_pair(erp: str, dynamics: str, custom: bool, least: float) -> None:
    assert name_score(erp, dynamics, custom) >= least


@pytest.mark.parametrize(("erp", "dynamics"), [("JOB_TITLE", "telephone1"), ("CUST_NO", "description")])
def test_unrelated_names_stay_below_the_threshold(erp: str, dynamics: str) -> None:
    assert name_score(erp, dynamics) < 0.6


def col(name: str, type_name: str, sql_type: int, size: int | None = None) -> ErpColumn:
    return ErpColumn(name, type_name, sql_type, size, None, True)


def test_types_decide_whether_a_well_named_pair_fits() -> None:
    limit = DvAttribute("creditlimit", "Money")
    assert type_factor(col("CREDIT_LIMIT", "DECIMAL(15,2)", 12), limit) == 1.0  # SQLite: named DECIMAL
    assert type_factor(col("CREDIT_LIMIT", "VARCHAR(20)", 12, 20), limit) == 0.0
    assert pair_score(col("CREDIT_LIMIT", "VARCHAR(20)", 12, 20), limit) == 0.0
    due = DvAttribute("duedate", "DateTime")
    assert type_factor(col("DUE_DATE", "CHAR(8)", 1, 8), due) == 1.0  # a legacy YYYYMMDD date
    assert type_factor(col("DUE_CODE", "CHAR(8)", 1, 8), due) == 0.0
    lookup = DvAttribute("parentcustomerid", "Customer", targets=("account", "contact"))
    assert type_factor(col("CUST_NO", "CHAR(10)", 1, 10), lookup) == 0.0  # a lookup needs lookups:


def test_field_names_spell_out_the_erp_abbreviations() -> None:
    assert field_name("CONTACT_NO") == "contact_number"
    assert field_name("EMAIL_ADDR") == "email_address"
    assert field_name("QTY_ON_HAND") == "quantity_on_hand"
