"""Lookups and navigation properties in the sandbox, with plain HTTP (requests + xml.etree).

Writes bind lookups the ways Dataverse accepts (``nav@odata.bind`` by id, alternate key, absolute
URL or ``$n``; ``null``; ``…/nav/$ref``; deep insert; bulk targets) and refuse bad binds with
Dataverse's codes; reads show ``_x_value`` GUIDs with their annotations, expand single-valued
navigation properties, and ``$metadata`` declares the navigation properties.
"""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import requests

from d365sync.dynamics.multipart import BatchPart, Changeset, build_batch_request, parse_batch_response
from tests.sandbox_fixtures import DataverseSandbox, SandboxFactory

EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
ALL_ANNOTATIONS = 'odata.include-annotations="*"'
FORMATTED = "OData.Community.Display.V1.FormattedValue"
LOGICAL_NAME = "Microsoft.Dynamics.CRM.lookuplogicalname"
NAVIGATION = "Microsoft.Dynamics.CRM.associatednavigationproperty"
UNDECLARED = "An undeclared property '{}' which only has property annotations in the payload"


@pytest.fixture(scope="module")
def sandbox(dataverse_sandbox_factory: SandboxFactory) -> DataverseSandbox:
    return dataverse_sandbox_factory(seed=5)


def _call(sandbox: DataverseSandbox, method: str, path: str, body: object = None, **headers: str):
    return requests.request(
        method, f"{sandbox.api_url}/{path}", json=body, headers=sandbox.headers(**headers), timeout=30
    )


def _create(sandbox: DataverseSandbox, entity_set: str, body: dict[str, Any]) -> dict[str, Any]:
    response = _call(sandbox, "POST", entity_set, body, Prefer="return=representation")
    assert response.status_code == 201, response.text
    return response.json()


def _contact(sandbox: DataverseSandbox, first: str, last: str) -> str:
    return _create(sandbox, "contacts", {"firstname": first, "lastname": last})["contactid"]


def _account(sandbox: DataverseSandbox, path: str, select: str = "_primarycontactid_value") -> dict:
    response = _call(sandbox, "GET", f"{path}?$select={select}")
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: requests.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def _run() -> str:
    return uuid.uuid4().hex[:8]


# -- writes ---------------------------------------------------------------------------------------
def test_bind_by_id_in_every_uri_form_and_by_alternate_key(sandbox: DataverseSandbox):
    run = _run()
    ada, grace, alan = (_contact(sandbox, n, f"{run}") for n in ("Ada", "Grace", "Alan"))
    parent = _create(sandbox, "accounts", {"name": "Parent", "accountnumber": f"P{run}"})["accountid"]
    created = _create(
        sandbox,
        "accounts",
        {
            "name": "Bound",
            "accountnumber": f"B{run}",
            "primarycontactid@odata.bind": f"/contacts({ada})",
            "parentaccountid@odata.bind": f"/accounts(accountnumber='P{run}')",
            "transactioncurrencyid@odata.bind": "/transactioncurrencies(isocurrencycode='EUR')",
        },
    )
    account = created["accountid"]
    assert created["_primarycontactid_value"] == ada and created["_parentaccountid_value"] == parent
    eur = _call(sandbox, "GET", "transactioncurrencies(isocurrencycode='EUR')").json()
    assert created["_transactioncurrencyid_value"] == eur["transactioncurrencyid"]

    for reference, expected in (
        (f"contacts({grace})", grace),
        (f"{sandbox.api_url}/contacts({alan})", alan),
        (f"/api/data/v9.2/contacts(contactid={ada})", ada),
    ):
        patched = _call(sandbox, "PATCH", f"accounts({account})", {"primarycontactid@odata.bind": reference})
        assert patched.status_code == 204, patched.text
        assert _account(sandbox, f"accounts({account})")["_primarycontactid_value"] == expected

    default_read = _call(sandbox, "GET", f"accounts(accountnumber='B{run}')").json()
    assert default_read["_primarycontactid_value"] == ada and default_read["_parentaccountid_value"] == parent
    plain = _create(sandbox, "accounts", {"name": "Unbound"})
    assert plain["_primarycontactid_value"] is None and plain["_parentaccountid_value"] is None


def test_upsert_and_bulk_targets_bind_lookups(sandbox: DataverseSandbox):
    run = _run()
    ada = _contact(sandbox, "Ada", run)
    upserted = _call(
        sandbox,
        "PATCH",
        f"accounts(accountnumber='U{run}')",
        {"name": "Upserted", "primarycontactid@odata.bind": f"/contacts({ada})"},
        Prefer="return=representation",
    )
    assert upserted.status_code == 201 and upserted.json()["_primarycontactid_value"] == ada
    created = _call(
        sandbox,
        "POST",
        "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        {
            "Targets": [
                {
                    "@odata.type": "Microsoft.Dynamics.CRM.account",
                    "name": f"Bulk {i}",
                    "accountnumber": f"C{i}{run}",
                    "primarycontactid@odata.bind": f"/contacts({ada})",
                    "parentaccountid@odata.bind": f"/accounts(accountnumber='U{run}')",
                }
                for i in range(2)
            ]
        },
    )
    assert created.status_code == 200, created.text
    for account in created.json()["Ids"]:
        row = _account(sandbox, f"accounts({account})", "_primarycontactid_value,_parentaccountid_value")
        assert row["_primarycontactid_value"] == ada
        assert row["_parentaccountid_value"] == upserted.json()["accountid"]

    grace = _contact(sandbox, "Grace", run)
    doomed = {"@odata.id": f"accounts(accountnumber='D{run}')", "name": "Never"}
    bad = [
        {
            "@odata.id": f"accounts(accountnumber='U{run}')",
            "primarycontactid@odata.bind": f"/contacts({grace})",
        },
        {**doomed, "primarycontactid@odata.bind": f"/contacts({uuid.uuid4()})"},
    ]
    failed = _call(sandbox, "POST", "accounts/Microsoft.Dynamics.CRM.UpsertMultiple", {"Targets": bad})
    assert _error(failed, 404)["code"] == "0x80040217"
    assert _account(sandbox, f"accounts(accountnumber='U{run}')")["_primarycontactid_value"] == ada
    upsert_ok = _call(sandbox, "POST", "accounts/Microsoft.Dynamics.CRM.UpsertMultiple", {"Targets": bad[:1]})
    assert upsert_ok.status_code == 204, upsert_ok.text
    assert _account(sandbox, f"accounts(accountnumber='U{run}')")["_primarycontactid_value"] == grace


def test_unbind_with_null_and_ref(sandbox: DataverseSandbox):
    run = _run()
    ada, grace = _contact(sandbox, "Ada", run), _contact(sandbox, "Grace", run)
    account = _create(
        sandbox, "accounts", {"name": "Refs", "primarycontactid@odata.bind": f"/contacts({ada})"}
    )
    path = f"accounts({account['accountid']})"

    reference = _call(sandbox, "GET", f"{path}/primarycontactid/$ref").json()
    assert reference["@odata.id"] == f"{sandbox.api_url}/contacts({ada})"
    related = _call(sandbox, "GET", f"{path}/primarycontactid?$select=fullname").json()
    assert (related["fullname"], related["contactid"]) == (f"Ada {run}", ada)

    assert _call(sandbox, "DELETE", f"{path}/primarycontactid/$ref").status_code == 204
    assert _account(sandbox, path)["_primarycontactid_value"] is None
    assert _call(sandbox, "GET", f"{path}/primarycontactid/$ref").status_code == 204
    assert _call(sandbox, "GET", f"{path}/primarycontactid").status_code == 204

    put = _call(
        sandbox, "PUT", f"{path}/primarycontactid/$ref", {"@odata.id": f"{sandbox.api_url}/contacts({grace})"}
    )
    assert put.status_code == 204, put.text
    assert _account(sandbox, path)["_primarycontactid_value"] == grace

    assert _call(sandbox, "PATCH", path, {"primarycontactid@odata.bind": None}).status_code == 204
    assert _account(sandbox, path)["_primarycontactid_value"] is None
    _call(sandbox, "PATCH", path, {"primarycontactid@odata.bind": f"/contacts({ada})"})
    assert _call(sandbox, "PATCH", path, {"primarycontactid": None}).status_code == 204  # nav name itself
    assert _account(sandbox, path)["_primarycontactid_value"] is None


def test_deep_insert_creates_the_related_row(sandbox: DataverseSandbox):
    run = _run()
    account = _create(
        sandbox, "accounts", {"name": "Deep", "primarycontactid": {"firstname": "Deep", "lastname": run}}
    )
    contact = _call(sandbox, "GET", f"contacts({account['_primarycontactid_value']})?$select=fullname").json()
    assert contact["fullname"] == f"Deep {run}"
    deep_update = _call(
        sandbox, "PATCH", f"accounts({account['accountid']})", {"primarycontactid": {"lastname": "x"}}
    )
    assert "Deep insert" in _error(deep_update, 400)["message"]


def test_owner_is_the_caller_and_can_be_assigned(sandbox: DataverseSandbox):
    me = _call(sandbox, "GET", "WhoAmI").json()["UserId"]
    users = _call(sandbox, "GET", "systemusers?$select=fullname,applicationid,accessmode").json()["value"]
    by_id = {u["systemuserid"]: u for u in users}
    assert by_id[me]["applicationid"] == sandbox.client_id and by_id[me]["accessmode"] == 4
    admin = next(u["systemuserid"] for u in users if u["fullname"] == "Sandbox Administrator")

    account = _create(sandbox, "accounts", {"name": "Owned"})
    assert account["_ownerid_value"] == me
    path = f"accounts({account['accountid']})"
    assert _call(sandbox, "PATCH", path, {"ownerid@odata.bind": f"/systemusers({admin})"}).status_code == 204
    owned = _call(sandbox, "GET", f"{path}?$select=name&$expand=ownerid($select=fullname)").json()
    assert owned["ownerid"] == {"fullname": "Sandbox Administrator", "systemuserid": admin}
    assert _error(_call(sandbox, "PATCH", path, {"ownerid@odata.bind": None}), 400)["code"] == "0x80040203"


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (
            {"PrimaryContactId@odata.bind": "/contacts({contact})"},
            400,
            "0x80060888",
            UNDECLARED.format("PrimaryContactId"),
        ),
        (
            {"customerid@odata.bind": "/accounts({account})"},
            400,
            "0x80060888",
            UNDECLARED.format("customerid"),
        ),
        (
            {"primarycontactid@odata.bind": "/contacts({missing})"},
            404,
            "0x80040217",
            "contact With Id = {missing} Does Not Exist",
        ),
        (
            {"parentaccountid@odata.bind": "/accounts(accountnumber='NO-SUCH')"},
            404,
            "0x80040217",
            "A record with the specified key values does not exist in account entity",
        ),
        (
            {"primarycontactid@odata.bind": "/accounts({account})"},
            400,
            "0x80060888",
            "references entity set 'accounts', but 'primarycontactid' expects 'contacts'",
        ),
        ({"primarycontactid@odata.bind": "contacts"}, 400, "0x80060888", "names an entity set, not a record"),
        ({"primarycontactid@odata.bind": "/people(1)"}, 400, "0x80060888", "segment 'people'"),
        ({"primarycontactid@odata.bind": "/contacts(not-a-guid)"}, 400, "0x80060888", "not a valid GUID"),
        (
            {"primarycontactid@odata.bind": "/contacts({contact})/fullname"},
            400,
            "0x80060888",
            "not one of its",
        ),
        ({"primarycontactid@odata.bind": 42}, 400, "0x80060888", "must be a non-empty URL string"),
        (
            {"primarycontactid@odata.bind": "$1"},
            400,
            "0x80060888",
            "Content-ID Reference: '$1' does not exist",
        ),
        ({"primarycontactid": "{contact}"}, 400, "0x80060888", "'PrimitiveValue' node with non-null value"),
        (
            {"_primarycontactid_value": "{contact}"},
            400,
            "0x80048d19",
            "CRM do not support direct update of Entity Reference properties",
        ),
    ],
)
def test_bad_binds_get_dataverse_errors_and_write_nothing(
    sandbox: DataverseSandbox, body: dict, status: int, code: str, message: str
):
    run = _run()
    ids = {"contact": _contact(sandbox, "Bad", run), "missing": uuid.uuid4()}
    ids["account"] = _create(sandbox, "accounts", {"name": "Target"})["accountid"]
    filled = {key: value.format(**ids) if isinstance(value, str) else value for key, value in body.items()}
    error = _error(
        _call(sandbox, "POST", "accounts", {"name": "Bad", "accountnumber": f"X{run}", **filled}), status
    )
    assert error["code"] == code
    assert message.format(**ids) in error["message"]
    assert _call(sandbox, "GET", f"accounts?$filter=accountnumber eq 'X{run}'").json()["value"] == []


def _batch(sandbox: DataverseSandbox, items: list) -> list:
    content_type, body = build_batch_request(items)
    headers = sandbox.headers(**{"Content-Type": content_type, "Prefer": "odata.continue-on-error"})
    response = requests.post(f"{sandbox.api_url}/$batch", data=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return parse_batch_response(response.headers["Content-Type"], response.content)


def _part(method: str, url: str, body: dict | None = None, content_id: str | None = None) -> BatchPart:
    data = json.dumps(body).encode() if body is not None else b""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    return BatchPart(method=method, url=url, headers=headers, body=data, content_id=content_id)


def test_changeset_binds_and_refs_by_content_id(sandbox: DataverseSandbox):
    run = _run()
    good = Changeset(
        [
            _part("POST", "contacts", {"firstname": "Batch", "lastname": run}, "1"),
            _part("POST", "accounts", {"name": "Parent", "accountnumber": f"BP{run}"}, "2"),
            _part("POST", "accounts", {"name": "Child", "primarycontactid@odata.bind": "$1"}, "3"),
            _part("PUT", "$3/parentaccountid/$ref", {"@odata.id": "$2"}, "4"),
        ]
    )
    wrong_type = Changeset(
        [
            _part("POST", "accounts", {"name": "Rolled back", "accountnumber": f"RB{run}"}, "5"),
            _part("PATCH", "$5", {"primarycontactid@odata.bind": "$5"}, "6"),
        ]
    )
    forward = Changeset(
        [_part("POST", "accounts", {"name": "Early", "primarycontactid@odata.bind": "$9"}, "7")]
    )
    results = _batch(sandbox, [good, wrong_type, forward])

    assert isinstance(results[0], Changeset) and [p.status for p in results[0].parts] == [204] * 4
    child = results[0].parts[2].headers["OData-EntityId"].rsplit("/", 1)[1]
    row = _account(sandbox, child, "_primarycontactid_value,_parentaccountid_value")
    contact = results[0].parts[0].headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    parent = results[0].parts[1].headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    assert (row["_primarycontactid_value"], row["_parentaccountid_value"]) == (contact, parent)

    assert results[1].status == 400
    assert "expects 'contacts'" in json.loads(results[1].body)["error"]["message"]
    assert _call(sandbox, "GET", f"accounts?$filter=accountnumber eq 'RB{run}'").json()["value"] == []
    assert results[2].status == 400
    assert "Content-ID Reference: '$9' does not exist" in json.loads(results[2].body)["error"]["message"]

    unbind = _batch(
        sandbox,
        [
            Changeset(
                [_part("PATCH", child, {"name": "Child"}, "1"), _part("DELETE", "$1/primarycontactid/$ref")]
            )
        ],
    )
    assert [p.status for p in unbind[0].parts] == [204, 204]
    assert _account(sandbox, child)["_primarycontactid_value"] is None


# -- reads ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family(sandbox: DataverseSandbox) -> dict[str, str]:
    """A parent account with a primary contact, its child account, and an account with no lookups."""
    run = _run()
    contact = _create(
        sandbox,
        "contacts",
        {"firstname": "Mary", "lastname": f"Jackson {run}", "emailaddress1": "mary@example.com"},
    )["contactid"]
    parent = _create(
        sandbox,
        "accounts",
        {
            "name": f"Parent {run}",
            "accountnumber": f"F{run}",
            "primarycontactid@odata.bind": f"/contacts({contact})",
        },
    )["accountid"]
    child = _create(
        sandbox,
        "accounts",
        {
            "name": f"Child {run}",
            "accountnumber": f"G{run}",
            "parentaccountid@odata.bind": f"/accounts({parent})",
        },
    )["accountid"]
    lonely = _create(sandbox, "accounts", {"name": f"Lonely {run}", "accountnumber": f"H{run}"})["accountid"]
    return {"run": run, "contact": contact, "parent": parent, "child": child, "lonely": lonely}


def test_lookup_annotations(sandbox: DataverseSandbox, family: dict[str, str]):
    path = f"accounts({family['parent']})?$select=name,_primarycontactid_value,_parentaccountid_value"
    full = _call(sandbox, "GET", path, Prefer=ALL_ANNOTATIONS)
    assert full.headers["Preference-Applied"] == ALL_ANNOTATIONS
    row = full.json()
    assert row["_primarycontactid_value"] == family["contact"]
    assert row[f"_primarycontactid_value@{LOGICAL_NAME}"] == "contact"
    assert row[f"_primarycontactid_value@{NAVIGATION}"] == "primarycontactid"
    assert row[f"_primarycontactid_value@{FORMATTED}"] == f"Mary Jackson {family['run']}"
    assert row["_parentaccountid_value"] is None
    assert not [key for key in row if key.startswith("_parentaccountid_value@")]

    only_formatted = _call(sandbox, "GET", path, Prefer=f'odata.include-annotations="{FORMATTED}"').json()
    assert [k for k in only_formatted if "@" in k and not k.startswith("@")] == [
        f"_primarycontactid_value@{FORMATTED}"
    ]
    crm_only = _call(
        sandbox, "GET", path, Prefer='odata.include-annotations="Microsoft.Dynamics.CRM.*"'
    ).json()
    assert {k for k in crm_only if "@" in k and not k.startswith("@")} == {
        f"_primarycontactid_value@{LOGICAL_NAME}",
        f"_primarycontactid_value@{NAVIGATION}",
    }
    plain = _call(sandbox, "GET", path).json()
    assert not [k for k in plain if "@" in k and not k.startswith("@")]

    owners = _call(sandbox, "GET", "accounts?$select=_ownerid_value&$top=1", Prefer=ALL_ANNOTATIONS)
    owner = owners.json()["value"][0]
    assert owner[f"_ownerid_value@{LOGICAL_NAME}"] == "systemuser"
    assert owner[f"_ownerid_value@{FORMATTED}"] == "# sandbox-app"


def test_polymorphic_customer_lookup(sandbox: DataverseSandbox, family: dict[str, str]):
    order = _create(
        sandbox,
        "salesorders",
        {
            "name": "Order",
            "ordernumber": f"O{family['run']}",
            "customerid_contact@odata.bind": f"/contacts({family['contact']})",
        },
    )
    path = f"salesorders({order['salesorderid']})"
    row = _call(
        sandbox,
        "GET",
        f"{path}?$select=_customerid_value&$expand=customerid_contact($select=fullname),customerid_account($select=name)",
        Prefer=ALL_ANNOTATIONS,
    ).json()
    assert row[f"_customerid_value@{LOGICAL_NAME}"] == "contact"
    assert row[f"_customerid_value@{NAVIGATION}"] == "customerid_contact"
    assert row["customerid_contact"]["contactid"] == family["contact"] and row["customerid_account"] is None
    invoice = _create(
        sandbox,
        "invoices",
        {
            "name": "Invoice",
            "customerid_account@odata.bind": f"/accounts({family['parent']})",
            "salesorderid@odata.bind": f"/salesorders(ordernumber='O{family['run']}')",
        },
    )
    assert (
        invoice["_salesorderid_value"] == order["salesorderid"]
        and invoice["_customerid_value"] == family["parent"]
    )
    assert _call(sandbox, "DELETE", f"{path}/customerid_account/$ref").status_code == 204  # points elsewhere
    assert _account(sandbox, path, "_customerid_value")["_customerid_value"] == family["contact"]


def test_expand_single_valued_navigation_properties(sandbox: DataverseSandbox, family: dict[str, str]):
    run = family["run"]
    listed = _call(
        sandbox,
        "GET",
        f"accounts?$select=name&$filter=startswith(name,'Parent {run}') or startswith(name,'Lonely {run}')"
        "&$orderby=name desc&$expand=primarycontactid($select=fullname,emailaddress1)",
    ).json()
    assert listed["@odata.context"].endswith("#accounts(name,primarycontactid(fullname,emailaddress1))")
    parent, lonely = listed["value"]
    assert parent["primarycontactid"] == {
        "fullname": f"Mary Jackson {run}",
        "emailaddress1": "mary@example.com",
        "contactid": family["contact"],
    }
    assert lonely["primarycontactid"] is None and "primarycontactid" in lonely

    single = _call(sandbox, "GET", f"accounts({family['child']})?$expand=parentaccountid").json()
    assert single["parentaccountid"]["accountid"] == family["parent"]
    assert "@odata.etag" not in single["parentaccountid"] and "name" in single["parentaccountid"]
    assert single["@odata.context"].endswith("#accounts(parentaccountid())/$entity")

    nested = _call(
        sandbox,
        "GET",
        f"accounts({family['child']})?$select=name&$expand=parentaccountid($select=name;"
        "$expand=primarycontactid($select=fullname)),createdby($select=fullname)",
    ).json()
    assert nested["parentaccountid"]["primarycontactid"]["fullname"] == f"Mary Jackson {run}"
    assert nested["createdby"]["fullname"] == "# sandbox-app"

    filtered = _call(
        sandbox,
        "GET",
        f"accounts({family['parent']})?$expand=primarycontactid($select=fullname;$filter=firstname eq 'Bob')",
    ).json()
    assert filtered["primarycontactid"] is None
    ref = _call(
        sandbox, "GET", f"accounts({family['parent']})?$select=name&$expand=primarycontactid/$ref"
    ).json()
    assert ref["primarycontactid"] == {"@odata.id": f"{sandbox.api_url}/contacts({family['contact']})"}


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("$select=primarycontactid", "Could not find a property named 'primarycontactid'"),
        ("$expand=PrimaryContactId", "Could not find a property named 'PrimaryContactId'"),
        ("$expand=primarycontactid($top=1)", "Only $select and $filter clause can be provided"),
        (
            "$expand=primarycontactid($select=nope)",
            "Could not find a property named 'nope' on type 'Microsoft.Dynamics.CRM.contact'",
        ),
        ("$expand=contact_customer_accounts", "cannot expand the collection-valued navigation property"),
        ("$expand=contact_customer_accounts/$ref", "Expand with $ref is only supported on lookup type"),
        ("$expand=" + ",".join(["createdby"] * 16), "at most 15"),
    ],
)
def test_bad_selects_and_expands(sandbox: DataverseSandbox, query: str, fragment: str):
    error = _error(_call(sandbox, "GET", f"accounts?{query}"), 400)
    assert error["code"] == "0x80060888" and fragment in error["message"]


def test_filter_on_lookups(sandbox: DataverseSandbox, family: dict[str, str]):
    def names(where: str) -> list[str]:
        response = _call(sandbox, "GET", f"accounts?$select=name&$filter={where}&$orderby=name")
        assert response.status_code == 200, response.text
        return [r["name"] for r in response.json()["value"]]

    run = family["run"]
    assert names(f"_primarycontactid_value eq {family['contact']}") == [f"Parent {run}"]
    assert names(f"_parentaccountid_value eq '{family['parent'].upper()}'") == [f"Child {run}"]
    assert names(f"primarycontactid/fullname eq 'Mary Jackson {run}'") == [f"Parent {run}"]
    assert names(f"startswith(name,'Lonely {run}') and _primarycontactid_value eq null") == [f"Lonely {run}"]
    values = json.dumps([family["contact"]])
    in_filter = f"Microsoft.Dynamics.CRM.In(PropertyName='primarycontactid',PropertyValues={values})"
    assert names(in_filter) == [f"Parent {run}"]
    nested = _call(sandbox, "GET", "accounts?$filter=parentaccountid/primarycontactid/fullname eq 'x'")
    assert "entityRelationshipRole" in _error(nested, 400)["message"]


# -- metadata ---------------------------------------------------------------------------------------
def _entity_types(sandbox: DataverseSandbox) -> dict[str, ET.Element]:
    response = _call(sandbox, "GET", "$metadata")
    assert response.status_code == 200
    return {e.get("Name", ""): e for e in ET.fromstring(response.content).iter(f"{EDM}EntityType")}


def _navigation(entity_type: ET.Element, name: str) -> ET.Element:
    found = entity_type.find(f"{EDM}NavigationProperty[@Name='{name}']")
    assert found is not None, name
    return found


def test_metadata_declares_navigation_properties(sandbox: DataverseSandbox):
    types = _entity_types(sandbox)
    account, contact, salesorder = types["account"], types["contact"], types["salesorder"]
    primary = _navigation(account, "primarycontactid")
    assert (primary.get("Type"), primary.get("Partner")) == ("mscrm.contact", "account_primary_contact")
    constraint = primary.find(f"{EDM}ReferentialConstraint")
    assert constraint is not None
    assert (constraint.get("Property"), constraint.get("ReferencedProperty")) == (
        "_primarycontactid_value",
        "contactid",
    )
    value = account.find(f"{EDM}Property[@Name='_primarycontactid_value']")
    assert value is not None and value.get("Type") == "Edm.Guid"
    assert _navigation(contact, "account_primary_contact").get("Type") == "Collection(mscrm.account)"
    assert _navigation(account, "parentaccountid").get("Partner") == "account_parent_account"
    assert {n.get("Name") for n in salesorder.iter(f"{EDM}NavigationProperty")} >= {
        "customerid_account",
        "customerid_contact",
    }
    assert _navigation(account, "ownerid").get("Type") == "mscrm.systemuser"

    for type_name, entity_type in types.items():  # every partner is declared, pointing back
        for nav in entity_type.iter(f"{EDM}NavigationProperty"):
            target = nav.get("Type", "").removeprefix("Collection(").removesuffix(")").removeprefix("mscrm.")
            if nav.get("Partner") and target in types:
                assert _navigation(types[target], nav.get("Partner", "")).get("Partner") == nav.get("Name"), (
                    type_name
                )


def test_entity_definitions_describe_lookups(sandbox: DataverseSandbox):
    def attribute(table: str, name: str) -> dict:
        path = f"EntityDefinitions(LogicalName='{table}')/Attributes(LogicalName='{name}')"
        return _call(sandbox, "GET", f"{path}?$select=LogicalName,AttributeType").json()

    primary = _call(
        sandbox, "GET", "EntityDefinitions(LogicalName='account')/Attributes(LogicalName='primarycontactid')"
    ).json()
    assert (primary["AttributeType"], primary["Targets"]) == ("Lookup", ["contact"])
    assert primary["@odata.type"] == "#Microsoft.Dynamics.CRM.LookupAttributeMetadata"
    customer = _call(
        sandbox, "GET", "EntityDefinitions(LogicalName='salesorder')/Attributes(LogicalName='customerid')"
    ).json()
    assert (customer["AttributeType"], customer["Targets"]) == ("Customer", ["account", "contact"])
    assert attribute("account", "parentaccountid")["AttributeType"] == "Lookup"
