"""Third-party clients work unchanged against the Dataverse sandbox over HTTPS.

Acceptance item: "Generic OData and Dataverse clients work unchanged: entity set names and keys
are discoverable from metadata, and CRUD, paging, upsert and batch work over HTTPS."

Nothing here imports project code except the sandbox fixture: the point is that Microsoft's
own libraries (MSAL, azure-identity, the ``PowerPlatform.Dataverse`` SDK) and a generic OData
client written with plain ``requests`` + ``xml.etree`` can talk to the sandbox as they would to
a real environment, trusting only a private CA (``REQUESTS_CA_BUNDLE``).
"""

from __future__ import annotations

import email
import email.policy
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import msal
import pytest
import requests
from azure.identity import ClientSecretCredential
from PowerPlatform.Dataverse import col
from PowerPlatform.Dataverse.client import DataverseClient
from PowerPlatform.Dataverse.core.errors import HttpError
from PowerPlatform.Dataverse.models import UpsertItem

from tests.sandbox_fixtures import DataverseSandbox, SandboxFactory

GUID_LEN = 36
EDMX = "{http://docs.oasis-open.org/odata/ns/edmx}"
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
ODATA_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers (third-party APIs only)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_tls_sandbox(dataverse_sandbox_factory: SandboxFactory) -> DataverseSandbox:
    """A private HTTPS sandbox (trustme CA): these tests add >5,000 rows, so not the shared one."""
    return dataverse_sandbox_factory(tls=True)


@pytest.fixture
def sandbox(private_tls_sandbox: DataverseSandbox, monkeypatch: pytest.MonkeyPatch) -> DataverseSandbox:
    """The TLS sandbox, with its private CA trusted the way a real deployment would do it."""
    assert private_tls_sandbox.ca_bundle and private_tls_sandbox.base_url.startswith("https://")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", private_tls_sandbox.ca_bundle)
    monkeypatch.setenv("SSL_CERT_FILE", private_tls_sandbox.ca_bundle)
    return private_tls_sandbox


def _authority_host(sandbox: DataverseSandbox) -> str:
    """``https://host:port`` (azure-identity appends the tenant itself)."""
    authority = str(sandbox.authority).rstrip("/")
    suffix = f"/{sandbox.tenant}"
    return authority[: -len(suffix)] if authority.endswith(suffix) else authority


def _tenant_authority(sandbox: DataverseSandbox) -> str:
    """``https://host:port/<tenant>`` as MSAL expects it."""
    return f"{_authority_host(sandbox)}/{sandbox.tenant}"


def _scope(sandbox: DataverseSandbox) -> str:
    return f"{str(sandbox.base_url).rstrip('/')}/.default"


def _api(sandbox: DataverseSandbox) -> str:
    return str(sandbox.api_url).rstrip("/")


def _run_id(prefix: str) -> str:
    """A short unique prefix; accountnumber is a 20-character column."""
    return f"{prefix}{uuid.uuid4().hex[:7]}"


def _msal_app(
    sandbox: DataverseSandbox, http: requests.Session, secret: str | None = None
) -> msal.ConfidentialClientApplication:
    """MSAL exactly as an integrator would configure it for a non-Microsoft authority."""
    return msal.ConfidentialClientApplication(
        sandbox.client_id,
        client_credential=secret or sandbox.client_secret,
        authority=_tenant_authority(sandbox),
        instance_discovery=False,
        http_client=http,
    )


@pytest.fixture
def msal_token(sandbox: DataverseSandbox) -> Iterator[str]:
    with requests.Session() as http:
        app = _msal_app(sandbox, http)
        result = app.acquire_token_for_client(scopes=[_scope(sandbox)])
        assert "access_token" in result, result
        yield str(result["access_token"])


@pytest.fixture
def odata(sandbox: DataverseSandbox, msal_token: str) -> Iterator[requests.Session]:
    """A plain OData session: bearer token plus the standard OData headers, nothing else."""
    with requests.Session() as http:
        http.headers.update(ODATA_HEADERS)
        http.headers["Authorization"] = f"Bearer {msal_token}"
        yield http


@pytest.fixture
def credential(sandbox: DataverseSandbox) -> Iterator[ClientSecretCredential]:
    cred = ClientSecretCredential(
        sandbox.tenant,
        sandbox.client_id,
        sandbox.client_secret,
        authority=_authority_host(sandbox),
        disable_instance_discovery=True,
    )
    with cred:
        yield cred


@pytest.fixture
def sdk(sandbox: DataverseSandbox, credential: ClientSecretCredential) -> Iterator[DataverseClient]:
    with DataverseClient(str(sandbox.base_url).rstrip("/"), credential) as client:
        yield client


# --------------------------------------------------------------------------------------------
# Authentication: MSAL and azure-identity against the sandbox authority
# --------------------------------------------------------------------------------------------


def test_msal_client_credentials_token_works_and_is_cached(sandbox: DataverseSandbox) -> None:
    with requests.Session() as http:
        app = _msal_app(sandbox, http)
        first = app.acquire_token_for_client(scopes=[_scope(sandbox)])
        assert "access_token" in first, first
        assert first["token_type"].lower() == "bearer"
        assert int(first["expires_in"]) > 300
        second = app.acquire_token_for_client(scopes=[_scope(sandbox)])
        assert second["access_token"] == first["access_token"]
        assert second.get("token_source") == "cache"

        whoami = http.get(
            f"{_api(sandbox)}/WhoAmI",
            headers={**ODATA_HEADERS, "Authorization": f"Bearer {first['access_token']}"},
            timeout=30,
        )
        assert whoami.status_code == 200, whoami.text
        assert len(whoami.json()["UserId"]) == GUID_LEN


def test_msal_rejects_wrong_secret(sandbox: DataverseSandbox) -> None:
    with requests.Session() as http:
        app = _msal_app(sandbox, http, "not-the-secret")
        result = app.acquire_token_for_client(scopes=[_scope(sandbox)])
    assert "access_token" not in result
    assert result.get("error") in {"invalid_client", "unauthorized_client"}, result


def test_api_rejects_missing_or_bad_token(sandbox: DataverseSandbox) -> None:
    with requests.Session() as http:
        anonymous = http.get(f"{_api(sandbox)}/accounts?$top=1", headers=ODATA_HEADERS, timeout=30)
        forged = http.get(
            f"{_api(sandbox)}/accounts?$top=1",
            headers={**ODATA_HEADERS, "Authorization": "Bearer forged.token.value"},
            timeout=30,
        )
    assert anonymous.status_code == 401
    assert forged.status_code == 401


def test_azure_identity_client_secret_credential(
    sandbox: DataverseSandbox, credential: ClientSecretCredential
) -> None:
    token = credential.get_token(_scope(sandbox))
    assert token.token
    response = requests.get(
        f"{_api(sandbox)}/WhoAmI",
        headers={**ODATA_HEADERS, "Authorization": f"Bearer {token.token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert {"UserId", "BusinessUnitId", "OrganizationId"} <= set(response.json())


# --------------------------------------------------------------------------------------------
# Microsoft's Dataverse SDK (PowerPlatform.Dataverse 1.1)
# --------------------------------------------------------------------------------------------


def test_sdk_discovers_tables_and_alternate_keys(sdk: DataverseClient) -> None:
    info = sdk.tables.get("account")
    assert info is not None
    assert info.entity_set_name == "accounts"
    assert info.primary_id_attribute == "accountid"
    assert info.primary_name_attribute == "name"

    listed = {t["LogicalName"]: t["EntitySetName"] for t in sdk.tables.list()}
    assert {
        "account": "accounts",
        "contact": "contacts",
        "salesorder": "salesorders",
        "invoice": "invoices",
        "product": "products",
        "transactioncurrency": "transactioncurrencies",
    }.items() <= listed.items()

    keys = sdk.tables.get_alternate_keys("account")
    assert ["accountnumber"] in [list(k.key_attributes) for k in keys]


def test_sdk_crud_round_trip(sdk: DataverseClient) -> None:
    number = _run_id("C")
    account_id = sdk.records.create(
        "account", {"name": "SDK Contoso", "accountnumber": number, "telephone1": "555-0100"}
    )
    assert len(account_id) == GUID_LEN

    record = sdk.records.retrieve("account", account_id, select=["name", "accountnumber", "telephone1"])
    assert (record["name"], record["accountnumber"], record["telephone1"]) == (
        "SDK Contoso",
        number,
        "555-0100",
    )

    sdk.records.update("account", account_id, {"telephone1": "555-0199", "description": "updated"})
    updated = sdk.records.retrieve("account", account_id, select=["telephone1", "description", "name"])
    assert (updated["telephone1"], updated["description"], updated["name"]) == (
        "555-0199",
        "updated",
        "SDK Contoso",
    )

    found = sdk.records.list("account", filter=f"accountnumber eq '{number}'", select=["accountid", "name"])
    assert [r["accountid"] for r in found] == [account_id]

    sdk.records.delete("account", account_id)
    assert sdk.records.retrieve("account", account_id) is None  # the SDK maps 404 to None
    with pytest.raises(HttpError) as gone:
        sdk.records.delete("account", account_id)
    assert gone.value.status_code == 404
    assert len(sdk.records.list("account", filter=f"accountnumber eq '{number}'")) == 0


def test_sdk_update_of_missing_record_is_404(sdk: DataverseClient) -> None:
    with pytest.raises(HttpError) as missing:
        sdk.records.update("account", str(uuid.uuid4()), {"name": "ghost"})
    assert missing.value.status_code == 404


def test_sdk_upsert_by_alternate_key(sdk: DataverseClient) -> None:
    number = _run_id("U")
    sdk.records.upsert(
        "account", [UpsertItem(alternate_key={"accountnumber": number}, record={"name": "First"})]
    )
    created = sdk.records.list("account", filter=f"accountnumber eq '{number}'", select=["accountid", "name"])
    assert [r["name"] for r in created] == ["First"]

    sdk.records.upsert(
        "account",
        [{"alternate_key": {"accountnumber": number}, "record": {"name": "Second", "telephone1": "1"}}],
    )
    again = sdk.records.list(
        "account", filter=f"accountnumber eq '{number}'", select=["accountid", "name", "telephone1"]
    )
    assert [(r["accountid"], r["name"], r["telephone1"]) for r in again] == [
        (created[0]["accountid"], "Second", "1")
    ]


def test_sdk_upsert_multiple_and_create_multiple(sdk: DataverseClient) -> None:
    run = _run_id("M")
    ids = sdk.records.create(
        "account", [{"name": f"Bulk {i}", "accountnumber": f"{run}-c{i}"} for i in range(3)]
    )
    assert len(ids) == 3 and len(set(ids)) == 3

    sdk.records.upsert(
        "account",
        [
            UpsertItem(alternate_key={"accountnumber": f"{run}-c0"}, record={"name": "Bulk 0 renamed"}),
            UpsertItem(alternate_key={"accountnumber": f"{run}-n1"}, record={"name": "New via upsert"}),
        ],
    )
    rows = sdk.records.list(
        "account",
        filter=f"startswith(accountnumber,'{run}-')",
        select=["accountid", "accountnumber", "name"],
        orderby=["accountnumber asc"],
    )
    assert [(r["accountnumber"], r["name"]) for r in rows] == [
        (f"{run}-c0", "Bulk 0 renamed"),
        (f"{run}-c1", "Bulk 1"),
        (f"{run}-c2", "Bulk 2"),
        (f"{run}-n1", "New via upsert"),
    ]
    assert rows[0]["accountid"] == ids[0]


def test_sdk_query_builder(sdk: DataverseClient) -> None:
    run = _run_id("Q")
    sdk.records.create(
        "account",
        [{"name": f"Query {i}", "accountnumber": f"{run}-{i}", "telephone1": str(i % 2)} for i in range(5)],
    )
    result = (
        sdk.query.builder("account")
        .select("name", "accountnumber")
        .where(col("accountnumber").startswith(f"{run}-") & (col("telephone1") == "1"))
        .order_by("accountnumber", descending=True)
        .top(5)
        .execute()
    )
    assert [r["name"] for r in result] == ["Query 3", "Query 1"]


def test_sdk_pages_through_more_than_5000_rows(sdk: DataverseClient) -> None:
    run = _run_id("P")
    total = 5_200
    created: list[str] = []
    for start in range(0, total, 1000):
        chunk = [
            {"name": f"Paged {i}", "accountnumber": f"{run}-{i:05d}"}
            for i in range(start, min(start + 1000, total))
        ]
        created.extend(sdk.records.create("account", chunk))
    assert len(created) == total

    where = f"startswith(accountnumber,'{run}-')"
    default_pages = list(
        sdk.records.list_pages("account", filter=where, select=["accountid", "accountnumber"])
    )
    assert [len(p) for p in default_pages] == [5000, 200]  # Dataverse default page size is 5,000
    seen = [r["accountnumber"] for page in default_pages for r in page]
    assert sorted(seen) == [f"{run}-{i:05d}" for i in range(total)]

    sized = list(sdk.records.list_pages("account", filter=where, select=["accountid"], page_size=2000))
    assert [len(p) for p in sized] == [2000, 2000, 1200]
    assert {r["accountid"] for page in sized for r in page} == set(created)

    everything = sdk.records.list("account", filter=where, select=["accountid"], page_size=1500)
    assert len(everything) == total


def test_sdk_batch_with_changeset(sdk: DataverseClient) -> None:
    run = _run_id("B")
    doomed = sdk.records.create("account", {"name": "Doomed", "accountnumber": f"{run}-d"})

    batch = sdk.batch.new()
    batch.records.create("account", {"name": "Batch plain", "accountnumber": f"{run}-p"})
    with batch.changeset() as changeset:
        ref = changeset.records.create("account", {"name": "Batch cs", "accountnumber": f"{run}-cs"})
        changeset.records.update("account", ref, {"telephone1": "555-0142"})
    batch.records.upsert(
        "account", [UpsertItem(alternate_key={"accountnumber": f"{run}-u"}, record={"name": "Up"})]
    )
    batch.records.delete("account", doomed)
    batch.records.list("account", filter=f"startswith(accountnumber,'{run}-')", select=["name"])
    result = batch.execute()

    assert not result.has_errors, [(r.status_code, r.error_message) for r in result.failed]
    # create, changeset create + update ($1), upsert, delete -> 204 each; the list GET -> 200
    assert [r.status_code for r in result.responses] == [204, 204, 204, 204, 204, 200]
    assert len(result.responses[5].data["value"]) == 3  # type: ignore[index]  # p, cs, u (d deleted)
    created_plain, created_cs = result.responses[0].entity_id, result.responses[1].entity_id
    assert created_plain and created_cs
    assert [r.content_id for r in result.responses[1:3]] == ["1", "2"]

    rows = sdk.records.list(
        "account",
        filter=f"startswith(accountnumber,'{run}-')",
        select=["accountid", "accountnumber", "name", "telephone1"],
        orderby=["accountnumber asc"],
    )
    by_number = {r["accountnumber"]: r for r in rows}
    assert set(by_number) == {f"{run}-p", f"{run}-cs", f"{run}-u"}
    assert by_number[f"{run}-p"]["accountid"] == created_plain
    assert (by_number[f"{run}-cs"]["accountid"], by_number[f"{run}-cs"]["telephone1"]) == (
        created_cs,
        "555-0142",
    )
    assert by_number[f"{run}-u"]["name"] == "Up"


def test_sdk_batch_continue_on_error_reports_each_failure(sdk: DataverseClient) -> None:
    run = _run_id("E")
    batch = sdk.batch.new()
    batch.records.create("account", {"name": "Before", "accountnumber": f"{run}-1"})
    batch.records.update("account", str(uuid.uuid4()), {"name": "ghost"})
    batch.records.create("account", {"name": "After", "accountnumber": f"{run}-2"})
    result = batch.execute(continue_on_error=True)

    assert [r.status_code for r in result.responses][1] == 404
    assert len(result.succeeded) == 2 and len(result.failed) == 1
    assert result.failed[0].error_message
    names = sdk.records.list("account", filter=f"startswith(accountnumber,'{run}-')", select=["name"])
    assert sorted(r["name"] for r in names) == ["After", "Before"]


def test_sdk_atomic_changeset_rolls_back(sdk: DataverseClient) -> None:
    run = _run_id("R")
    batch = sdk.batch.new()
    with batch.changeset() as changeset:
        changeset.records.create("account", {"name": "Rolled back", "accountnumber": f"{run}-1"})
        changeset.records.update("account", str(uuid.uuid4()), {"name": "ghost"})
    result = batch.execute()
    assert result.has_errors
    assert result.failed[0].status_code == 404
    assert len(sdk.records.list("account", filter=f"accountnumber eq '{run}-1'")) == 0


def test_sdk_binds_a_lookup_by_content_id_expands_it_and_filters_with_in(sdk: DataverseClient) -> None:
    run = _run_id("L")
    numbers = [f"{run}-1", f"{run}-2", f"{run}-3"]
    accounts = sdk.records.create("account", [{"name": f"Lookup {n}", "accountnumber": n} for n in numbers])

    batch = sdk.batch.new()
    with batch.changeset() as changeset:
        contact_ref = changeset.records.create("contact", {"firstname": "Grace", "lastname": run})
        changeset.records.update("account", accounts[0], {"primarycontactid@odata.bind": contact_ref})
    result = batch.execute()
    assert not result.has_errors, [(r.status_code, r.error_message) for r in result.failed]
    assert [r.status_code for r in result.responses] == [204, 204]
    contact = result.responses[0].entity_id
    assert contact and len(contact) == GUID_LEN

    account = sdk.records.retrieve(
        "account", accounts[0], select=["name", "_primarycontactid_value"], expand=["primarycontactid"]
    )
    assert account["_primarycontactid_value"] == contact
    assert (account["primarycontactid"]["contactid"], account["primarycontactid"]["fullname"]) == (
        contact,
        f"Grace {run}",
    )

    listed = sdk.records.list(
        "account",
        filter=col("accountnumber").in_(numbers[:2]),
        select=["accountnumber", "_primarycontactid_value"],
        expand=["primarycontactid"],
        orderby=["accountnumber asc"],
        include_annotations="*",
    )
    assert [(r["accountnumber"], r["_primarycontactid_value"]) for r in listed] == [
        (numbers[0], contact),
        (numbers[1], None),
    ]
    first, second = listed[0], listed[1]
    assert first["primarycontactid"]["fullname"] == f"Grace {run}" and second["primarycontactid"] is None
    assert first["_primarycontactid_value@OData.Community.Display.V1.FormattedValue"] == f"Grace {run}"
    assert first["_primarycontactid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"


# --------------------------------------------------------------------------------------------
# A generic OData v4 client: requests + xml.etree, discovering everything from metadata
# --------------------------------------------------------------------------------------------


def _csdl(odata: requests.Session, api: str) -> ET.Element:
    response = odata.get(f"{api}/$metadata", headers={"Accept": "application/xml"}, timeout=60)
    assert response.status_code == 200, response.text[:500]
    assert "xml" in response.headers.get("Content-Type", "")
    return ET.fromstring(response.content)


def _entity_sets_and_keys(csdl: ET.Element) -> dict[str, tuple[str, list[str]]]:
    """entity set name -> (entity type name, key property names), straight from CSDL."""
    types: dict[str, list[str]] = {}
    for schema in csdl.iter(f"{EDM}Schema"):
        namespace = schema.get("Namespace", "")
        alias = schema.get("Alias")
        for entity_type in schema.findall(f"{EDM}EntityType"):
            keys = [ref.get("Name", "") for ref in entity_type.findall(f"{EDM}Key/{EDM}PropertyRef")]
            for prefix in filter(None, (namespace, alias)):
                types[f"{prefix}.{entity_type.get('Name')}"] = keys
    result: dict[str, tuple[str, list[str]]] = {}
    for entity_set in csdl.iter(f"{EDM}EntitySet"):
        type_name = entity_set.get("EntityType", "")
        result[entity_set.get("Name", "")] = (type_name, types.get(type_name, []))
    return result


def test_generic_odata_discovers_entity_sets_keys_and_alternate_keys(
    sandbox: DataverseSandbox, odata: requests.Session
) -> None:
    api = _api(sandbox)
    service = odata.get(f"{api}/", timeout=30)
    assert service.status_code == 200, service.text[:500]
    service_sets = {
        entry["name"] for entry in service.json()["value"] if entry.get("kind", "EntitySet") == "EntitySet"
    }
    assert {
        "accounts",
        "contacts",
        "salesorders",
        "invoices",
        "products",
        "transactioncurrencies",
    } <= service_sets

    csdl = _csdl(odata, api)
    assert csdl.tag == f"{EDMX}Edmx"
    sets = _entity_sets_and_keys(csdl)
    assert sets["accounts"] == ("Microsoft.Dynamics.CRM.account", ["accountid"])
    assert sets["contacts"] == ("Microsoft.Dynamics.CRM.contact", ["contactid"])
    assert sets["salesorders"][1] == ["salesorderid"]

    definitions = odata.get(
        f"{api}/EntityDefinitions",
        params={
            "$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
            "$expand": "Keys($select=SchemaName,KeyAttributes)",
        },
        timeout=60,
    )
    assert definitions.status_code == 200, definitions.text[:500]
    by_name = {d["LogicalName"]: d for d in definitions.json()["value"]}
    assert by_name["account"]["EntitySetName"] == "accounts"
    assert ["accountnumber"] in [k["KeyAttributes"] for k in by_name["account"]["Keys"]]
    assert ["productnumber"] in [k["KeyAttributes"] for k in by_name["product"]["Keys"]]

    # Every entity set the service document advertises must be declared in $metadata, or a
    # generic client cannot type it (real Dataverse declares EntityDefinitions, for example).
    assert service_sets <= set(sets), sorted(service_sets - set(sets))


def test_generic_odata_crud_upsert_and_paging(sandbox: DataverseSandbox, odata: requests.Session) -> None:
    api = _api(sandbox)
    sets = _entity_sets_and_keys(_csdl(odata, api))
    entity_set = next(name for name, (type_name, _) in sets.items() if type_name.endswith(".account"))
    (key_property,) = sets[entity_set][1]
    run = _run_id("G")

    created = odata.post(
        f"{api}/{entity_set}",
        json={"name": "Generic", "accountnumber": f"{run}-1"},
        headers={"Prefer": "return=representation"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    row = created.json()
    record_id = row[key_property]
    assert row["name"] == "Generic" and row["@odata.etag"].startswith('W/"')

    plain = odata.post(f"{api}/{entity_set}", json={"name": "Plain", "accountnumber": f"{run}-2"}, timeout=30)
    assert plain.status_code == 204
    assert plain.headers["OData-EntityId"].startswith(f"{api}/{entity_set}(")

    fetched = odata.get(
        f"{api}/{entity_set}({record_id})", params={"$select": "name,accountnumber"}, timeout=30
    )
    assert fetched.status_code == 200
    assert (fetched.json()["name"], fetched.json()["accountnumber"]) == ("Generic", f"{run}-1")

    by_key = f"{api}/{entity_set}(accountnumber='{run}-1')"
    patched = odata.patch(by_key, json={"telephone1": "42"}, timeout=30)
    assert patched.status_code == 204
    assert odata.get(f"{api}/{entity_set}({record_id})", timeout=30).json()["telephone1"] == "42"

    upsert_new = odata.patch(
        f"{api}/{entity_set}(accountnumber='{run}-3')",
        json={"name": "Upserted"},
        headers={"Prefer": "return=representation"},
        timeout=30,
    )
    assert upsert_new.status_code == 201, upsert_new.text
    assert upsert_new.json()["accountnumber"] == f"{run}-3"

    no_create = odata.patch(
        f"{api}/{entity_set}(accountnumber='{run}-4')",
        json={"name": "x"},
        headers={"If-Match": "*"},
        timeout=30,
    )
    assert no_create.status_code == 404

    rows: list[dict[str, Any]] = []
    pages = 0
    url: str | None = f"{api}/{entity_set}?$select=accountnumber&$filter=startswith(accountnumber,'{run}-')"
    while url:
        page = odata.get(url, headers={"Prefer": "odata.maxpagesize=2"}, timeout=30)
        assert page.status_code == 200, page.text
        body = page.json()
        rows.extend(body["value"])
        pages += 1
        url = body.get("@odata.nextLink")
    assert pages == 2
    assert sorted(r["accountnumber"] for r in rows) == [f"{run}-1", f"{run}-2", f"{run}-3"]

    deleted = odata.delete(f"{api}/{entity_set}({record_id})", timeout=30)
    assert deleted.status_code == 204
    assert odata.get(f"{api}/{entity_set}({record_id})", timeout=30).status_code == 404
    assert odata.delete(f"{api}/{entity_set}({record_id})", timeout=30).status_code == 404


def _navigation_to(csdl: ET.Element, entity_type: str, target_type: str) -> tuple[str, str]:
    """(navigation property, the property holding its key) from ``entity_type`` to ``target_type``."""
    for schema in csdl.iter(f"{EDM}Schema"):
        prefixes = [p for p in (schema.get("Namespace"), schema.get("Alias")) if p]
        for declared in schema.findall(f"{EDM}EntityType[@Name='{entity_type}']"):
            for nav in declared.findall(f"{EDM}NavigationProperty"):
                constraint = nav.find(f"{EDM}ReferentialConstraint")
                if constraint is not None and nav.get("Type") in {f"{p}.{target_type}" for p in prefixes}:
                    return nav.get("Name", ""), constraint.get("Property", "")
    raise AssertionError(f"no navigation property from {entity_type} to {target_type}")


def test_generic_odata_binds_and_expands_a_navigation_property_found_in_metadata(
    sandbox: DataverseSandbox, odata: requests.Session
) -> None:
    api = _api(sandbox)
    nav, value_property = _navigation_to(_csdl(odata, api), "account", "contact")
    run = _run_id("N")
    contact = odata.post(
        f"{api}/contacts", json={"firstname": "Dorothy", "lastname": run}, timeout=30
    ).headers["OData-EntityId"]
    created = odata.post(
        f"{api}/accounts",
        json={"name": "Navigated", "accountnumber": f"{run}-1", f"{nav}@odata.bind": contact},
        headers={"Prefer": "return=representation"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    account = f"{api}/accounts(accountnumber='{run}-1')"
    assert f"{api}/contacts({created.json()[value_property]})" == contact

    expanded = odata.get(
        account, params={"$select": "name", "$expand": f"{nav}($select=fullname)"}, timeout=30
    )
    assert expanded.status_code == 200, expanded.text
    assert expanded.json()[nav]["fullname"] == f"Dorothy {run}"

    assert odata.delete(f"{account}/{nav}/$ref", timeout=30).status_code == 204
    assert odata.get(account, params={"$expand": nav}, timeout=30).json()[nav] is None


def _http_parts(content_type: str, body: bytes) -> list[tuple[int, str | None, bytes]]:
    """(status, Content-ID, body) of each embedded HTTP response, via the stdlib MIME parser."""
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    parts: list[tuple[int, str | None, bytes]] = []
    for part in message.walk():
        if part.get_content_type() != "application/http":
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        status_line, _, rest = payload.partition(b"\n")
        _, _, inner_body = rest.replace(b"\r\n", b"\n").partition(b"\n\n")
        parts.append((int(status_line.split()[1]), part.get("Content-ID"), inner_body.strip()))
    return parts


def test_generic_odata_batch_with_changeset_and_content_id(
    sandbox: DataverseSandbox, odata: requests.Session
) -> None:
    api = _api(sandbox)
    run = _run_id("H")
    path = api.split("://", 1)[1].split("/", 1)[1]  # "api/data/v9.2", as the docs write part URLs
    body = (
        "--batch_T1\r\n"
        "Content-Type: multipart/mixed; boundary=changeset_T2\r\n\r\n"
        "--changeset_T2\r\n"
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n"
        f"POST /{path}/accounts HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n"
        f'{{"name":"Hand batch","accountnumber":"{run}-1"}}\r\n'
        "--changeset_T2\r\n"
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n"
        "PATCH $1 HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n"
        '{"telephone1":"555-0123"}\r\n'
        "--changeset_T2--\r\n\r\n"
        "--batch_T1\r\n"
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"GET {api}/accounts?$select=name,telephone1&$filter=accountnumber%20eq%20'{run}-1' HTTP/1.1\r\n"
        "Accept: application/json\r\n\r\n\r\n"
        "--batch_T1--\r\n"
    ).encode()
    response = odata.post(
        f"{api}/$batch",
        data=body,
        headers={"Content-Type": 'multipart/mixed; boundary="batch_T1"'},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("multipart/mixed")
    parts = _http_parts(response.headers["Content-Type"], response.content)
    assert [(status, content_id) for status, content_id, _ in parts] == [(204, "1"), (204, "2"), (200, None)]
    rows = json.loads(parts[2][2])["value"]
    assert [(r["name"], r["telephone1"]) for r in rows] == [("Hand batch", "555-0123")]
