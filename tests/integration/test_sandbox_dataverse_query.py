"""Reads against the sandbox: paging, $filter, $select/$expand/$count, metadata, errors."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from urllib.parse import unquote

import pytest
import requests

from tests.sandbox_fixtures import DataverseSandbox


def _get(sandbox: DataverseSandbox, path: str, **headers: str) -> requests.Response:
    url = path if path.startswith("http") else f"{sandbox.api_url}/{path}"
    return requests.get(url, headers=sandbox.headers(**headers), verify=sandbox.verify, timeout=60)


@pytest.fixture(scope="module")
def big_sandbox(dataverse_sandbox_factory) -> DataverseSandbox:
    return dataverse_sandbox_factory(seed=12_500)


def test_paging_over_12000_rows_with_next_link(big_sandbox: DataverseSandbox):
    started = time.monotonic()
    url = "accounts?$select=name,accountnumber"
    seen: list[str] = []
    pages = 0
    while url:
        body = _get(big_sandbox, url, Prefer="odata.maxpagesize=5000").json()
        seen += [row["accountid"] for row in body["value"]]
        pages += 1
        url = body.get("@odata.nextLink", "")
        if url:
            assert "$skiptoken=" in url
            assert unquote(url.split("$skiptoken=")[1]).startswith("<cookie pagenumber=")
    assert pages == 3
    assert len(seen) == len(set(seen)) == 12_500
    assert time.monotonic() - started < 30


def test_paging_with_orderby_is_complete_and_ordered(big_sandbox: DataverseSandbox):
    url = (
        "accounts?$select=name,creditlimit&$orderby=creditlimit desc,name&$filter=address1_city eq 'seattle'"
    )
    rows: list[dict] = []
    while url:
        body = _get(big_sandbox, url, Prefer="odata.maxpagesize=333").json()
        rows += body["value"]
        url = body.get("@odata.nextLink", "")
    keys = [(-r["creditlimit"], r["name"].lower()) for r in rows]
    assert keys == sorted(keys)
    count = _get(big_sandbox, "accounts/$count?$filter=address1_city eq 'Seattle'")
    assert len(rows) == len({r["accountid"] for r in rows}) == int(count.text)


def test_count_is_capped_at_5000(big_sandbox: DataverseSandbox):
    body = _get(big_sandbox, "accounts?$select=name&$count=true", Prefer="odata.maxpagesize=1").json()
    assert body["@odata.count"] == 5000
    assert body["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] is True
    assert _get(big_sandbox, "accounts/$count").text == "5000"


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("accountnumber eq 'ACC-000007'", 1),
        ("accountnumber eq 'acc-000007'", 1),  # case-insensitive like Dataverse
        ("startswith(accountnumber,'ACC-00001')", 10),
        ("endswith(accountnumber,'7') and creditlimit ge 0", 5),
        ("contains(emailaddress1,'account1') or accountnumber eq 'ACC-000020'", 12),
        ("not (statecode eq 0)", 0),
        ("description eq null", 50),
        ("accountnumber in ('ACC-000001','ACC-000002')", 2),
        ("modifiedon ge 2000-01-01T00:00:00Z", 50),
        ("createdon lt 2000-01-01", 0),
        ("transactioncurrencyid/isocurrencycode eq 'USD'", 17),
    ],
)
def test_filter_forms(dataverse_sandbox: DataverseSandbox, expression: str, expected: int):
    response = _get(dataverse_sandbox, f"accounts?$select=accountnumber&$filter={expression}")
    assert response.status_code == 200, response.text
    assert len(response.json()["value"]) == expected


def test_filter_on_lookup_value_and_guid(dataverse_sandbox: DataverseSandbox):
    usd = _get(dataverse_sandbox, "transactioncurrencies?$filter=isocurrencycode eq 'USD'").json()["value"][0]
    currency_id = usd["transactioncurrencyid"]
    rows = _get(
        dataverse_sandbox, f"accounts?$select=name&$filter=_transactioncurrencyid_value eq {currency_id}"
    )
    assert len(rows.json()["value"]) == 17
    quoted = _get(
        dataverse_sandbox, f"accounts?$filter=_transactioncurrencyid_value eq '{currency_id.upper()}'"
    )
    assert len(quoted.json()["value"]) == 17


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("name eq", "Syntax error"),
        ("name eq 'x' and", "Syntax error"),
        ("name eq 'unterminated", "Syntax error"),
        ("(((name eq 'x'", "Syntax error"),
        ("creditlimit eq 'abc'", "incompatible types"),
        ("foo eq 1", "Could not find a property named 'foo' on type 'Microsoft.Dynamics.CRM.account'."),
        ("unknownfn(name)", "Unknown function"),
        ("name", "boolean"),
    ],
)
def test_malformed_filter_is_400(dataverse_sandbox: DataverseSandbox, expression: str, fragment: str):
    response = _get(dataverse_sandbox, f"accounts?$filter={expression}")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "0x80060888"
    assert fragment in error["message"]


def test_select_expand_top_and_single(dataverse_sandbox: DataverseSandbox):
    body = _get(
        dataverse_sandbox,
        "accounts?$select=name,_transactioncurrencyid_value&$top=3&$orderby=accountnumber"
        "&$expand=transactioncurrencyid($select=isocurrencycode)",
    ).json()
    assert len(body["value"]) == 3 and "@odata.nextLink" not in body
    row = body["value"][0]
    assert set(row) == {
        "@odata.etag",
        "name",
        "_transactioncurrencyid_value",
        "accountid",
        "transactioncurrencyid",
    }
    assert row["transactioncurrencyid"]["isocurrencycode"] in {"USD", "EUR", "GBP"}
    single = _get(dataverse_sandbox, f"accounts({row['accountid']})?$select=name")
    assert single.json()["name"] == row["name"]
    by_key = _get(dataverse_sandbox, "accounts(accountnumber='ACC-000000')?$select=accountnumber")
    assert by_key.json()["accountnumber"] == "ACC-000000"
    not_modified = _get(
        dataverse_sandbox, f"accounts({row['accountid']})", **{"If-None-Match": row["@odata.etag"]}
    )
    assert not_modified.status_code == 304
    ignored_top = _get(
        dataverse_sandbox, "accounts?$select=name&$top=2", Prefer="odata.maxpagesize=10"
    ).json()
    assert len(ignored_top["value"]) == 10


def test_errors_for_unknown_things(dataverse_sandbox: DataverseSandbox):
    unknown_set = _get(dataverse_sandbox, "foos")
    assert unknown_set.status_code == 404
    assert unknown_set.json() == {
        "error": {"code": "0x8006088a", "message": "Resource not found for the segment 'foos'."}
    }
    skip = _get(dataverse_sandbox, "accounts?$skip=10")
    assert skip.status_code == 400 and "$skip is not supported" in skip.json()["error"]["message"]
    bad_select = _get(dataverse_sandbox, "accounts?$select=foo")
    assert bad_select.status_code == 400
    missing = _get(dataverse_sandbox, "accounts(00000000-0000-0000-0000-000000000001)")
    assert missing.status_code == 404
    assert "Does Not Exist" in missing.json()["error"]["message"]
    bad_key = _get(dataverse_sandbox, "accounts(name='x')")
    assert (
        bad_key.status_code == 400
        and "key in the request URI is not valid" in bad_key.json()["error"]["message"]
    )


def test_metadata_endpoints(dataverse_sandbox: DataverseSandbox):
    definitions = _get(
        dataverse_sandbox,
        "EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute"
        "&$filter=LogicalName eq 'salesorder'",
    ).json()["value"]
    assert definitions[0]["EntitySetName"] == "salesorders"
    account = _get(
        dataverse_sandbox, "EntityDefinitions(LogicalName='account')?$expand=Attributes,Keys"
    ).json()
    assert account["ChangeTrackingEnabled"] is True
    name = next(a for a in account["Attributes"] if a["LogicalName"] == "name")
    assert name["MaxLength"] == 160 and name["RequiredLevel"]["Value"] == "ApplicationRequired"
    assert account["Keys"][0]["KeyAttributes"] == ["accountnumber"]
    csdl = _get(dataverse_sandbox, "$metadata").text
    assert '<EntitySet Name="accounts"' in csdl and "Org.OData.Capabilities.V1.ChangeTracking" in csdl
    service = _get(dataverse_sandbox, "").json()
    assert {"accounts", "contacts", "salesorders", "invoices", "products", "transactioncurrencies"} <= {
        s["name"] for s in service["value"]
    }
    older = requests.get(
        f"{dataverse_sandbox.base_url}/api/data/v9.0/accounts?$top=1",
        headers=dataverse_sandbox.headers(),
        timeout=30,
    )
    assert older.status_code == 200


def test_entity_definitions_select_keeps_expanded_properties(dataverse_sandbox: DataverseSandbox):
    rows = _get(
        dataverse_sandbox,
        "EntityDefinitions?$select=LogicalName,EntitySetName"
        "&$expand=Keys($select=SchemaName,KeyAttributes),Attributes($select=LogicalName)",
    ).json()["value"]
    account = next(r for r in rows if r["LogicalName"] == "account")
    # EntityMetadata is the declared type: no @odata.type, as in the Web API; MetadataId always.
    assert set(account) == {"MetadataId", "LogicalName", "EntitySetName", "Keys", "Attributes"}
    assert [k["KeyAttributes"] for k in account["Keys"]] == [["accountnumber"]]
    assert set(account["Keys"][0]) == {"MetadataId", "SchemaName", "KeyAttributes"}
    assert "name" in {a["LogicalName"] for a in account["Attributes"]}
    assert all(set(a) == {"@odata.type", "MetadataId", "LogicalName"} for a in account["Attributes"])
    assert all("Keys" in r and "Attributes" in r for r in rows)

    single = _get(
        dataverse_sandbox, "EntityDefinitions(LogicalName='product')?$select=LogicalName&$expand=Keys"
    ).json()
    assert single["LogicalName"] == "product" and "EntitySetName" not in single
    assert [k["KeyAttributes"] for k in single["Keys"]] == [["productnumber"]]


EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
NAMESPACE = "Microsoft.Dynamics.CRM"


def _qualified(name: str) -> str:
    name = name.removeprefix("Collection(").removesuffix(")")
    return f"{NAMESPACE}.{name.removeprefix('mscrm.')}" if name.startswith("mscrm.") else name


def test_metadata_declares_every_service_document_set_and_entity_definitions(
    dataverse_sandbox: DataverseSandbox,
):
    csdl = ET.fromstring(_get(dataverse_sandbox, "$metadata").content)
    (schema,) = csdl.iter(f"{EDM}Schema")
    assert (schema.get("Namespace"), schema.get("Alias")) == (NAMESPACE, "mscrm")
    declared = {
        f"{NAMESPACE}.{t.get('Name')}": t
        for kind in ("EntityType", "ComplexType", "EnumType")
        for t in schema.findall(f"{EDM}{kind}")
    }
    sets = {s.get("Name"): s.get("EntityType") for s in csdl.iter(f"{EDM}EntitySet")}

    service = _get(dataverse_sandbox, "").json()["value"]
    service_sets = {s["name"] for s in service if s.get("kind", "EntitySet") == "EntitySet"}
    assert "EntityDefinitions" in service_sets
    assert service_sets <= set(sets), sorted(service_sets - set(sets))
    assert sets["EntityDefinitions"] == f"{NAMESPACE}.EntityMetadata"
    assert all(entity_type in declared for entity_type in sets.values())

    # Every type reference resolves (Edm primitives aside).
    for element in schema.iter():
        for attribute in ("Type", "BaseType"):
            reference = element.get(attribute)
            if reference and not reference.startswith(("Edm.", "Collection(Edm.")):
                assert _qualified(reference) in declared, (element.get("Name"), reference)

    def members(type_name: str) -> dict[str, str]:
        """Properties and navigation properties of a type, its base types included."""
        element = declared[type_name]
        found = {
            p.get("Name"): p.get("Type")
            for p in [*element.findall(f"{EDM}Property"), *element.findall(f"{EDM}NavigationProperty")]
        }
        base = element.get("BaseType")
        return {**members(_qualified(base)), **found} if base else found

    entity_metadata = members(f"{NAMESPACE}.EntityMetadata")
    assert entity_metadata["Keys"] == "Collection(mscrm.EntityKeyMetadata)"
    assert entity_metadata["Attributes"] == "Collection(mscrm.AttributeMetadata)"
    assert (
        declared[f"{NAMESPACE}.MetadataBase"].find(f"{EDM}Key/{EDM}PropertyRef").get("Name") == "MetadataId"
    )

    # Every property EntityDefinitions returns is declared on the type it claims to be.
    rows = _get(dataverse_sandbox, "EntityDefinitions?$expand=Attributes,Keys").json()["value"]
    assert rows
    for row in rows:
        assert "@odata.type" not in row  # the declared type needs none
        assert set(row) <= set(entity_metadata), row["LogicalName"]
        key_members = members(f"{NAMESPACE}.EntityKeyMetadata")
        assert all(set(key) <= set(key_members) for key in row["Keys"])
        for attribute in row["Attributes"]:
            declared_type = attribute["@odata.type"].removeprefix("#")
            assert f"{NAMESPACE}.AttributeMetadata" in _base_chain(declared, declared_type)
            assert set(attribute) - {"@odata.type"} <= set(members(declared_type)), attribute["LogicalName"]
            enum = declared[f"{NAMESPACE}.AttributeTypeCode"]
            assert attribute["AttributeType"] in {m.get("Name") for m in enum.findall(f"{EDM}Member")}


def _base_chain(declared: dict[str, ET.Element], type_name: str) -> list[str]:
    chain = [type_name]
    while base := declared[chain[-1]].get("BaseType"):
        chain.append(_qualified(base))
    return chain


def test_microsoft_python_sdk_reads_and_writes(
    dataverse_sandbox_tls: DataverseSandbox, monkeypatch: pytest.MonkeyPatch
):
    from azure.core.credentials import AccessToken
    from PowerPlatform.Dataverse.client import DataverseClient

    dataverse_sandbox = dataverse_sandbox_tls
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", dataverse_sandbox.ca_bundle or "")

    class StaticCredential:
        def get_token(self, *scopes: str, **_: object) -> AccessToken:
            return AccessToken(dataverse_sandbox.token(), int(time.time()) + 3000)

    client = DataverseClient(dataverse_sandbox.base_url, StaticCredential())
    try:
        record_id = client.records.create("account", {"name": "SDK account", "accountnumber": "SDK-1"})
        fetched = client.records.retrieve("account", record_id, select=["name"])
        assert fetched["name"] == "SDK account"
    finally:
        close = getattr(client, "close", None)
        if close:
            close()
