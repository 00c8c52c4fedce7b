"""Onboarding a sixth entity from live metadata: ``d365sync entity scaffold`` drafts contacts from the
sandbox's ``contact`` table and the ERP's ``CUST_CONTACT``, a person decides only the owners,
``d365sync spec check --live`` passes, and ``d365sync sync contacts`` syncs both ways.

Everything is real: the Dataverse sandbox over HTTP (its EntityDefinitions), the SQLite ERP through
the SQLite3 ODBC driver (its catalog), the CLI as a user runs it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from d365sync.cli import main
from d365sync.onboard.check import Live, check
from d365sync.onboard.metadata import DvKey, read_dynamics_table, read_erp_table
from d365sync.onboard.scaffold import draft, render
from tests.integration.pipeline_env import ENTITIES, Env, sync_cli_connections
from tests.sandbox_fixtures import SandboxFactory

pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)
OWNERS = {
    "first_name": "erp",
    "last_name": "erp",
    "email_address": "dynamics",
    "phone_number": "dynamics",
    "job_title": "erp",
}


def decide_owners(text: str) -> str:
    """What the person edits: each ``owner: TODO`` line, nothing else."""
    lines, field = [], None
    for line in text.splitlines():
        found = re.match(r"^  (\w+):$", line)
        field = found[1] if found else field
        if line.strip().startswith("owner: TODO"):
            line = f"    owner: {OWNERS[field]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture
def onboarding(
    dataverse_sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Env, Path, list[str]]:
    sandbox = dataverse_sandbox_factory(seed=20)  # 2 seeded contacts, numbered D000000000…
    env = Env.create(sandbox, tmp_path, rows=40)  # 4 ERP contacts, P000000001…
    staging = sync_cli_connections(sandbox, tmp_path, monkeypatch)
    entities = tmp_path / "entities"
    entities.mkdir()
    shutil.copy(ENTITIES / "_defaults.yaml", entities)
    yield env, entities, staging
    env.close()


def test_scaffold_edit_owners_check_live_and_sync_both_ways(
    onboarding: tuple[Env, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    env, entities, staging = onboarding
    spec = entities / "contacts.yaml"
    scaffold = [
        "entity",
        "scaffold",
        "--dynamics-table",
        "contact",
        "--erp-table",
        "CUST_CONTACT",
        "--out",
        str(spec),
    ]
    assert main(scaffold) == 0
    assert "key new_contactnumber ↔ CONTACT_NO" in capsys.readouterr().out
    draft_text = spec.read_text()
    body = yaml.safe_load(draft_text)
    assert body["dynamics"] == {"table": "contact", "entity_set": "contacts", "key": "new_contactnumber"}
    assert body["erp"]["key"] == "CONTACT_NO" and body["erp"]["change_detection"]["column"] == "LAST_UPD"
    pairs = {name: (f["dynamics"], f["erp"]) for name, f in body["fields"].items()}
    assert pairs == {
        "contact_number": ("new_contactnumber", "CONTACT_NO"),
        "first_name": ("firstname", "FIRST_NAME"),
        "last_name": ("lastname", "LAST_NAME"),
        "email_address": ("emailaddress1", "EMAIL_ADDR"),
        "phone_number": ("telephone1", "PHONE_NO"),
        "job_title": ("jobtitle", "JOB_TITLE"),
    }
    assert body["fields"]["email_address"]["to_erp"] == [{"email": {"max_length": 80}}]
    assert body["fields"]["contact_number"]["to_erp"] == ["trim"]  # CHAR(10)
    # the ERP holds 40 of Dynamics' 50 characters of a first name: guarded before the write
    assert {"type": "max_length", "column": "firstname", "max": 40} in body["validation"]["dynamics"]
    assert {"type": "not_null", "column": "LAST_NAME"} in body["validation"]["erp"]  # lastname is required
    assert "ERP CUST_NO CHAR(10): a reference?" in draft_text

    # undecided ownership does not pass: each field named
    assert main(["spec", "check", "--live", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "5 problem(s)" in out and "field 'first_name': ownership is not decided" in out

    spec.write_text(decide_owners(draft_text))
    changed = [
        a for a, b in zip(draft_text.splitlines(), spec.read_text().splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 5 and all("owner: TODO" in line for line in changed)
    assert main(["spec", "check", "--live", str(spec)]) == 0
    assert "contacts.yaml: OK against the live systems" in capsys.readouterr().out

    # the first sync creates each side's contacts on the other
    assert main(["sync", "contacts", "--entities", str(entities), *staging]) == 0
    capsys.readouterr()
    erp_numbers = {r["CONTACT_NO"].strip(): r for r in erp_contacts(env)}
    dv_numbers = {r["new_contactnumber"]: r for r in dv_contacts(env)}
    assert {"P000000001", "D000000000", "D000000001"} <= set(erp_numbers)
    assert set(erp_numbers) == set(dv_numbers)
    assert dv_numbers["P000000001"]["lastname"] == erp_numbers["P000000001"]["LAST_NAME"]

    # then each side's edits of the fields it owns reach the other
    env.erp.execute(
        ["UPDATE CUST_CONTACT SET JOB_TITLE = 'Head of purchasing' WHERE CONTACT_NO = 'P000000001'"]
    )
    env.dynamics.update(
        "contacts", {"new_contactnumber": "D000000001"}, {"emailaddress1": "Dara.New@Example.com"}
    )
    assert main(["sync", "contacts", "--entities", str(entities), *staging]) == 0
    assert dv_contacts(env, "P000000001")[0]["jobtitle"] == "Head of purchasing"
    erp_row = next(r for r in erp_contacts(env) if r["CONTACT_NO"].strip() == "D000000001")
    assert erp_row["EMAIL_ADDR"] == "dara.new@example.com"  # the e-mail transform's lower case


def erp_contacts(env: Env) -> list[dict[str, object]]:
    from d365sync.sandbox.erp.tables import CUST_CONTACT

    return [row for chunk in env.erp.iter_rows(CUST_CONTACT) for row in chunk]


def dv_contacts(env: Env, number: str | None = None) -> list[dict[str, object]]:
    select = ["new_contactnumber", "firstname", "lastname", "emailaddress1", "jobtitle"]
    flt = f"new_contactnumber eq '{number}'" if number else "new_contactnumber ne null"
    return list(env.dynamics.iter_rows("contacts", select, filter=flt))


def test_check_live_names_each_problem_with_its_fix(onboarding: tuple[Env, Path, list[str]]) -> None:
    """A narrower ERP column without a guard, an inactive key, change tracking off and an unindexed
    cursor: each found in the live metadata, each with its fix."""
    env, entities, _ = onboarding
    dv = read_dynamics_table(env.dynamics, "contact")
    erp = read_erp_table(env.erp, "CUST_CONTACT")
    spec = entities / "contacts.yaml"
    text = decide_owners(render(draft(dv, erp, "contacts"), "test"))
    # phone is Dynamics' (to the ERP's 20 of 50 characters); the first name is the ERP's (40 into 50)
    unguarded = text.replace(
        "    - {type: max_length, column: telephone1, max: 20}  # ERP PHONE_NO holds 20\n", ""
    )
    unguarded = unguarded.replace(
        "    - {type: max_length, column: firstname, max: 40}  # ERP FIRST_NAME holds 40\n", ""
    )
    assert unguarded.count("max_length") == text.count("max_length") - 2
    spec.write_text(unguarded)
    currency = read_dynamics_table(env.dynamics, "transactioncurrency")
    pending_key = DvKey("new_contactnumber_key", ("new_contactnumber",), "Pending")
    broken = Live(
        {
            "contact": _replace(dv, keys=(pending_key,), change_tracking=False),
            "transactioncurrency": currency,
        },
        _replace(erp, indexes={}),
    )
    problems = {p.where: p for p in check(spec, lambda *_: broken)}
    assert set(problems) == {
        "field 'phone_number'",
        "dynamics.key",
        "dynamics.change_detection",
        "erp.change_detection",
    }
    phone = problems["field 'phone_number'"]
    assert "telephone1 holds up to 50 characters, ERP PHONE_NO only 20" in phone.what
    assert "{type: max_length, column: telephone1, max: 20}" in phone.fix
    assert "Pending" in problems["dynamics.key"].what
    assert "Track changes" in problems["dynamics.change_detection"].fix
    assert (
        problems["erp.change_detection"].fix
        == "CREATE INDEX IX_CUST_CONTACT_LAST_UPD ON CUST_CONTACT (LAST_UPD, CONTACT_NO)"
    )

    # a column the table does not have is named with the loader's hint
    spec.write_text(text.replace("erp: JOB_TITLE", "erp: JOBTITLE"))
    live = Live({"contact": dv, "transactioncurrency": currency}, erp)
    [problem] = check(spec, lambda *_: live)
    assert "unknown CUST_CONTACT column 'JOBTITLE'" in problem.what


def _replace(obj: object, **changes: object) -> object:
    from dataclasses import replace

    return replace(obj, **changes)  # type: ignore[type-var]


def test_a_draft_of_accounts_pairs_the_currency_pads_char_and_loads_once_owned(
    onboarding: tuple[Env, Path, list[str]],
) -> None:
    """The customers pair drafted from scratch: the currency code meets the transactioncurrency
    lookup through the shared defaults, a CHAR column is padded on the way in, and with owners
    decided the draft loads against the shipped catalog (its examples-free round trip included)."""
    from d365sync.spec import load_entity

    env, entities, _ = onboarding
    found = draft(
        read_dynamics_table(env.dynamics, "account"), read_erp_table(env.erp, "CUST_MASTER"), "accounts"
    )
    pairs = {p.erp.name: p.dv.name for p in found.pairs}
    assert pairs["CURR_CODE"] == "transactioncurrencyid" and pairs["CREDIT_LIMIT"] == "creditlimit"
    assert pairs["CUST_EMAIL_ID"] == "emailaddress1" and pairs["CITY"] == "address1_city"
    text = render(found, "test")
    body = yaml.safe_load(text)
    assert body["fields"]["currency_code"]["to_dynamics"] == [
        {"lookup": {"target": "currency", "to": "bind"}}
    ]
    assert body["fields"]["postcode"]["to_erp"] == ["trim", {"pad": {"width": 10}}]
    assert body["fields"]["credit_limit"]["to_erp"] == [{"decimal": {"scale": 2}}]
    owned = re.sub(r"owner: TODO .*", "owner: erp", text)
    (entities / "accounts.yaml").write_text(owned)
    spec = load_entity(entities / "accounts.yaml")
    assert spec.fields["currency_code"].erp == "CURR_CODE" and spec.key == "customer_number"
