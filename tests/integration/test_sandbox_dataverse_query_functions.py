"""``Microsoft.Dynamics.CRM.*`` query functions in ``$filter`` against the sandbox, over real HTTP
(issue 12): In/NotIn, Between/NotBetween, the day and relative date functions, combined with
and/or/not, on lookups, while paging, and the 400s for bad calls."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import requests

from tests.sandbox_fixtures import DataverseSandbox

CRM = "Microsoft.Dynamics.CRM"
DAY, HOUR, MINUTE, SECOND = timedelta(days=1), timedelta(hours=1), timedelta(minutes=1), timedelta(seconds=1)


def _get(sandbox: DataverseSandbox, path: str, params: dict[str, str] | None = None, **headers: str):
    url = path if path.startswith("http") else f"{sandbox.api_url}/{path}"
    return requests.get(url, params=params, headers=sandbox.headers(**headers), timeout=60)


def _rows(sandbox: DataverseSandbox, entity_set: str, select: str, where: str, **headers: str) -> list[dict]:
    response = _get(sandbox, entity_set, {"$select": select, "$filter": where}, **headers)
    assert response.status_code == 200, response.text[:500]
    return response.json()["value"]


def _numbers(sandbox: DataverseSandbox, where: str) -> set[str]:
    return {row["accountnumber"] for row in _rows(sandbox, "accounts", "accountnumber", where)}


def _error(sandbox: DataverseSandbox, where: str, entity_set: str = "accounts") -> dict[str, str]:
    response = _get(sandbox, entity_set, {"$filter": where})
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    return error


@pytest.fixture(scope="module")
def currencies(dataverse_sandbox: DataverseSandbox) -> dict[str, str]:
    rows = _rows(dataverse_sandbox, "transactioncurrencies", "isocurrencycode", "isocurrencycode ne null")
    return {row["isocurrencycode"]: row["transactioncurrencyid"] for row in rows}


# --- In / NotIn / Between / NotBetween, each against the comparison operators' answer -------------


def _functions_and_equivalents(currencies: dict[str, str]) -> list[tuple[str, str, int]]:
    usd, eur = currencies["USD"], currencies["EUR"]
    return [
        (
            f"{CRM}.In(PropertyName='accountnumber',PropertyValues=['ACC-000001','acc-000002','NONE'])",
            "accountnumber eq 'ACC-000001' or accountnumber eq 'ACC-000002'",
            2,
        ),
        (
            f'{CRM}.In(PropertyName=\'accountnumber\',PropertyValues=["ACC-000003", "ACC-000004"])',
            "accountnumber eq 'ACC-000003' or accountnumber eq 'ACC-000004'",
            2,
        ),
        (
            f"{CRM}.NotIn(PropertyName='accountnumber',PropertyValues=['ACC-000001','ACC-000002'])",
            "not (accountnumber eq 'ACC-000001' or accountnumber eq 'ACC-000002')",
            48,
        ),
        (  # a lookup, by its logical name; GUIDs in upper case or braces are the same GUIDs
            f"{CRM}.In(PropertyName='transactioncurrencyid',PropertyValues=['{usd.upper()}','{{{eur}}}'])",
            f"_transactioncurrencyid_value eq {usd} or _transactioncurrencyid_value eq {eur}",
            34,
        ),
        (
            f"{CRM}.NotIn(PropertyName='transactioncurrencyid',PropertyValues=['{usd}'])",
            f"_transactioncurrencyid_value ne {usd}",
            33,
        ),
        (f"{CRM}.In(PropertyName='statecode',PropertyValues=['0'])", "statecode eq 0", 50),
        (f"{CRM}.In(PropertyName='paymenttermscode',PropertyValues=[1,'2'])", "paymenttermscode le 2", -1),
        (
            f"{CRM}.Between(PropertyName='creditlimit',PropertyValues=['10000','50000'])",
            "creditlimit ge 10000 and creditlimit le 50000",
            -1,
        ),
        (
            f'{CRM}.NotBetween(PropertyName=\'creditlimit\',PropertyValues=["10000","50000"])',
            "creditlimit lt 10000 or creditlimit gt 50000",
            -1,
        ),
        (  # strings compare case-insensitively, bounds included
            f"{CRM}.Between(PropertyName='accountnumber',PropertyValues=['acc-000010','ACC-000019'])",
            "accountnumber ge 'ACC-000010' and accountnumber le 'ACC-000019'",
            10,
        ),
        (
            f"{CRM}.Between(PropertyName='modifiedon',PropertyValues=['2000-01-01','2999-01-01T00:00:00Z'])",
            "modifiedon ge 2000-01-01T00:00:00Z",
            50,
        ),
    ]


def test_value_functions_match_the_comparison_operators(
    dataverse_sandbox: DataverseSandbox, currencies: dict[str, str]
) -> None:
    everything = _numbers(dataverse_sandbox, "accountnumber ne null")
    for function, equivalent, count in _functions_and_equivalents(currencies):
        found = _numbers(dataverse_sandbox, function)
        assert found == _numbers(dataverse_sandbox, equivalent), function
        assert (found and found != everything) or count == len(everything), function
        assert count in (-1, len(found)), (function, len(found))


def test_value_functions_combine_with_and_or_not(
    dataverse_sandbox: DataverseSandbox, currencies: dict[str, str]
) -> None:
    first_five = ",".join(f'"ACC-00000{i}"' for i in range(1, 6))
    in_1_to_5 = f"{CRM}.In(PropertyName='accountnumber',PropertyValues=[{first_five}])"
    usd = f"{CRM}.In(PropertyName='transactioncurrencyid',PropertyValues=['{currencies['USD']}'])"
    low = f"{CRM}.Between(PropertyName='accountnumber',PropertyValues=['ACC-000000','ACC-000009'])"
    cases = {
        f"{in_1_to_5} and {usd}": {"ACC-000003"},
        f"{in_1_to_5} and not {usd}": {"ACC-000001", "ACC-000002", "ACC-000004", "ACC-000005"},
        f"({usd} or {in_1_to_5}) and {low}": {f"ACC-00000{i}" for i in (0, 1, 2, 3, 4, 5, 6, 9)},
        f"not ({low} or {usd}) and statecode eq 0 and accountnumber lt 'ACC-000014'": {
            "ACC-000010",
            "ACC-000011",
            "ACC-000013",
        },
        f"{CRM}.NotIn(PropertyName='accountnumber',PropertyValues=['ACC-000000']) and {low}": {
            f"ACC-00000{i}" for i in range(1, 10)
        },
    }
    for where, expected in cases.items():
        assert _numbers(dataverse_sandbox, where) == expected, where


def test_in_pages_with_next_links(dataverse_sandbox: DataverseSandbox) -> None:
    wanted = {f"ACC-{i:06d}" for i in range(0, 50, 2)} | {"ACC-999999"}
    values = ",".join(f"'{n}'" for n in sorted(wanted))
    url, params = (
        "accounts",
        {
            "$select": "accountnumber,name",
            "$filter": f"{CRM}.In(PropertyName='accountnumber',PropertyValues=[{values}]) and statecode eq 0",
            "$orderby": "name desc",
        },
    )
    rows, pages = [], 0
    while url:
        body = _get(dataverse_sandbox, url, params, Prefer="odata.maxpagesize=7").json()
        rows += body["value"]
        pages += 1
        url, params = body.get("@odata.nextLink", ""), None
    numbers = [row["accountnumber"] for row in rows]
    assert pages == 4 and len(numbers) == len(set(numbers)) == 25
    assert set(numbers) == wanted - {"ACC-999999"}
    names = [row["name"].lower() for row in rows]
    assert names == sorted(names, reverse=True)


def test_in_takes_more_values_than_an_or_chain_may_have_terms(dataverse_sandbox: DataverseSandbox) -> None:
    """2,000 values are one condition (the 32 KB URL limit is what bounds them); 900 ``eq`` terms
    nest deeper than the 800 the $filter limit allows."""

    def get(where: str) -> requests.Response:  # as typed, spaces as "+": both fit in 32 KB that way
        url = f"{dataverse_sandbox.api_url}/accounts?$select=accountnumber&$filter={where.replace(' ', '+')}"
        return requests.get(url, headers=dataverse_sandbox.headers(), timeout=60)

    numbers = [f"ACC-{i:06d}" for i in range(2000)]
    found = get(f"{CRM}.In(PropertyName='accountnumber',PropertyValues=[{','.join(map(repr, numbers))}])")
    assert found.status_code == 200, found.text[:300]
    assert len(found.json()["value"]) == 50
    chain = get(" or ".join(f"accountnumber eq '{n}'" for n in numbers[:900]))
    assert chain.status_code == 400 and "800" in chain.json()["error"]["message"]


def test_values_with_apostrophes_go_in_double_quotes(dataverse_sandbox_factory) -> None:
    sandbox = dataverse_sandbox_factory(seed=3)
    body = {"name": "O'Brien & Sons", "accountnumber": "O'B-1"}
    created = requests.post(f"{sandbox.api_url}/accounts", json=body, headers=sandbox.headers(), timeout=60)
    assert created.status_code == 204, created.text
    found = _rows(
        sandbox, "accounts", "name", f'{CRM}.In(PropertyName=\'name\',PropertyValues=["o\'brien & sons","x"])'
    )
    assert [row["name"] for row in found] == ["O'Brien & Sons"]
    escaped = f"{CRM}.In(PropertyName='accountnumber',PropertyValues=[\"O\\u0027B-1\"])"
    assert _numbers(sandbox, escaped) == {"O'B-1"}
    doubled = _error(sandbox, f"{CRM}.In(PropertyName='accountnumber',PropertyValues=['O''B-1'])")
    assert doubled["code"] == "0x80060888"
    assert doubled["message"].startswith("Invalid JSON. A comma character ',' was expected in scope 'Array'.")


def test_in_on_a_polymorphic_lookup(dataverse_sandbox: DataverseSandbox) -> None:
    orders = _rows(dataverse_sandbox, "salesorders", "ordernumber,_customerid_value", "ordernumber ne null")
    customers = sorted({row["_customerid_value"] for row in orders})[:3]
    function = f"{CRM}.In(PropertyName='customerid',PropertyValues=[{','.join(repr(c) for c in customers)}])"
    found = _rows(dataverse_sandbox, "salesorders", "ordernumber,_customerid_value", function)
    assert found and {row["ordernumber"] for row in found} == {
        row["ordernumber"] for row in orders if row["_customerid_value"] in customers
    }


# --- date functions -----------------------------------------------------------------------------

# datefulfilled of the orders the date tests create, relative to the time the fixture runs.
_AROUND_NOW = {
    "-40d": -40 * DAY,
    "-5d": -5 * DAY,
    "-1d": -DAY,
    "-3h": -3 * HOUR,
    "-90min": -90 * MINUTE,
    "-20min": -20 * MINUTE,
    "+20min": 20 * MINUTE,
    "+90min": 90 * MINUTE,
    "+3h": 3 * HOUR,
    "+1d": DAY,
    "+5d": 5 * DAY,
    "+40d": 40 * DAY,
}
_AROUND_MIDNIGHT = {
    "yesterday-noon": -DAY + 12 * HOUR,
    "today-noon": 12 * HOUR,
    "tomorrow-noon": DAY + 12 * HOUR,
}


def _clear_of_an_hour_boundary() -> None:
    """The expectations use the test's clock, the filters the server's: keep both in one hour (and
    so in one day) by waiting out the last 30 seconds before a full hour."""
    now = datetime.now(UTC)
    left = HOUR - timedelta(minutes=now.minute, seconds=now.second, microseconds=now.microsecond)
    if left < 30 * SECOND:
        time.sleep(left.total_seconds() + 1)


@pytest.fixture(scope="module")
def dated(dataverse_sandbox_factory) -> tuple[DataverseSandbox, dict[str, datetime]]:
    """A sandbox whose orders ``T-<label>`` were fulfilled at the times above (the seeded order has
    no date, so no date function may return it, NotOn included)."""
    sandbox = dataverse_sandbox_factory(seed=5)
    _clear_of_an_hour_boundary()
    now = datetime.now(UTC).replace(microsecond=0)
    midnight = now.replace(hour=0, minute=0, second=0)
    moments = {label: now + delta for label, delta in _AROUND_NOW.items()}
    moments |= {label: midnight + delta for label, delta in _AROUND_MIDNIGHT.items()}
    account = _rows(sandbox, "accounts", "accountnumber", "accountnumber eq 'ACC-000000'")[0]["accountid"]
    for label, moment in moments.items():
        body = {
            "name": label,
            "ordernumber": f"T-{label}",
            "datefulfilled": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "customerid_account@odata.bind": f"/accounts({account})",
        }
        response = requests.post(
            f"{sandbox.api_url}/salesorders", json=body, headers=sandbox.headers(), timeout=60
        )
        assert response.status_code == 204, response.text
    return sandbox, moments


Rule = Callable[[datetime, datetime, datetime, datetime], bool]  # (value, now, midnight, this hour)

DATE_CASES: list[tuple[str, str, Rule]] = [
    ("Today", "", lambda v, n, d, h: d <= v < d + DAY),
    ("Yesterday", "", lambda v, n, d, h: d - DAY <= v < d),
    ("Tomorrow", "", lambda v, n, d, h: d + DAY <= v < d + 2 * DAY),
    ("Last7Days", "", lambda v, n, d, h: d - 7 * DAY <= v <= n),
    ("Next7Days", "", lambda v, n, d, h: n <= v < d + 8 * DAY),
    ("LastXDays", "3", lambda v, n, d, h: d - 3 * DAY <= v <= n),
    ("NextXDays", "1", lambda v, n, d, h: n <= v < d + 2 * DAY),
    ("LastXHours", "1", lambda v, n, d, h: h - HOUR <= v <= n),
    ("NextXHours", "2", lambda v, n, d, h: n <= v <= n + 2 * HOUR),
    ("OlderThanXMinutes", "30", lambda v, n, d, h: v < n - 30 * MINUTE),
    ("OlderThanXHours", "2", lambda v, n, d, h: v < n - 2 * HOUR),
    ("OlderThanXDays", "2", lambda v, n, d, h: v < n - 2 * DAY),
    ("On", "{yesterday}", lambda v, n, d, h: d - DAY <= v < d),
    ("NotOn", "'{yesterday}'", lambda v, n, d, h: not d - DAY <= v < d),
    ("OnOrAfter", "{today}", lambda v, n, d, h: v >= d),
    ("OnOrBefore", "'{today}T23:00:00-05:00'", lambda v, n, d, h: v < d + 2 * DAY),  # 04:00 UTC the next day
]


@pytest.mark.parametrize(("name", "value", "rule"), DATE_CASES, ids=[c[0] for c in DATE_CASES])
def test_date_functions(
    dated: tuple[DataverseSandbox, dict[str, datetime]], name: str, value: str, rule: Rule
) -> None:
    sandbox, moments = dated
    _clear_of_an_hour_boundary()
    now = datetime.now(UTC).replace(microsecond=0)
    midnight, this_hour = now.replace(hour=0, minute=0, second=0), now.replace(minute=0, second=0)
    value = value.format(today=midnight.date(), yesterday=(midnight - DAY).date())
    argument = f",PropertyValue={value}" if value else ""
    where = f"{CRM}.{name}(PropertyName='datefulfilled'{argument})"
    found = {row["ordernumber"] for row in _rows(sandbox, "salesorders", "ordernumber", where)}
    expected = {f"T-{label}" for label, moment in moments.items() if rule(moment, now, midnight, this_hour)}
    assert found == expected
    assert expected and len(expected) < len(moments)  # the case tells rows apart


def test_date_functions_combine_and_negate(dated: tuple[DataverseSandbox, dict[str, datetime]]) -> None:
    sandbox = dated[0]
    today = f"{CRM}.Today(PropertyName='datefulfilled')"
    older = f"{CRM}.OlderThanXDays(PropertyName='datefulfilled',PropertyValue=4)"
    orders = "ordernumber ne null and datefulfilled ne null"

    def numbers(where: str) -> set[str]:
        return {row["ordernumber"] for row in _rows(sandbox, "salesorders", "ordernumber", where)}

    assert numbers(f"{older} or {today}") == numbers(older) | numbers(today)
    assert numbers(f"not {older} and {orders}") == numbers(orders) - numbers(older)
    assert numbers(
        f"{older} and {CRM}.In(PropertyName='ordernumber',PropertyValues=['T-+40d','T--40d'])"
    ) == {"T--40d"}


# --- bad calls ----------------------------------------------------------------------------------

IN = f"{CRM}.In(PropertyName='accountnumber',PropertyValues=['A'])"
BAD_CALLS = [
    (
        f"{CRM}.Unheard(PropertyName='name')",
        "0x80060888",
        f"An unknown function with name '{CRM}.Unheard' was found.",
    ),
    (
        "Other.Namespace.In(PropertyName='name',PropertyValues=['A'])",
        "0x80060888",
        "An unknown function with name 'Other.Namespace.In' was found.",
    ),
    (f"{CRM}.ThisMonth(PropertyName='createdon')", "0x80060888", "is not supported by the sandbox"),
    (
        f"{CRM}.In(PropertyValues=['A'])",
        "0x80060888",
        f"No function signature for the function with name '{CRM}.In' matches the specified arguments. "
        "The function signatures considered are: In(PropertyName Edm.String, PropertyValues "
        "Collection(Edm.String)).",
    ),
    (f"{CRM}.In(Property='accountnumber',PropertyValues=['A'])", "0x80060888", "No function signature"),
    (f"{CRM}.Today(PropertyName='createdon',PropertyValue=1)", "0x80060888", "No function signature"),
    (IN[:-1] + ",Extra=1)", "0x80060888", "at most two named parameters"),
    (
        f"{CRM}.In(PropertyName='_transactioncurrencyid_value',PropertyValues=['A'])",
        "0x80041103",
        "'Account' entity doesn't contain attribute with Name = '_transactioncurrencyid_value' and "
        "NameMapping = 'Logical'.",
    ),
    (
        f"{CRM}.In(PropertyName='transactioncurrencyid/isocurrencycode',PropertyValues=['USD'])",
        "0x80041103",
        "doesn't contain attribute",
    ),
    (
        f"{CRM}.Between(PropertyName='creditlimit',PropertyValues=['1'])",
        "0x80040203",
        "Condition for attribute 'account.creditlimit': the operator 'Between' takes exactly 2 values, "
        "not 1.",
    ),
    (
        f"{CRM}.NotBetween(PropertyName='creditlimit',PropertyValues=['1','2','3'])",
        "0x80040203",
        "takes exactly 2 values, not 3",
    ),
    (f"{CRM}.In(PropertyName='accountnumber',PropertyValues=[])", "0x80040203", "at least 1 value"),
    (
        f"{CRM}.In(PropertyName='creditlimit',PropertyValues=['lots'])",
        "0x80040203",
        "Condition for attribute 'account.creditlimit': expected argument(s) of type 'System.Decimal' but "
        "received 'System.String'.",
    ),
    (
        f"{CRM}.In(PropertyName='transactioncurrencyid',PropertyValues=['USD'])",
        "0x80040203",
        "expected argument(s) of type 'System.Guid'",
    ),
    (
        f"{CRM}.In(PropertyName='accountnumber',PropertyValues=('A','B'))",
        "0x80060888",
        "Cannot convert the literal '('A','B')' to the expected type 'Collection(Edm.String)'.",
    ),
    (
        f"{CRM}.In(PropertyName='accountnumber',PropertyValues='A')",
        "0x80060888",
        "Cannot convert the literal ''A'' to the expected type 'Collection(Edm.String)'.",
    ),
    (f"{CRM}.In(PropertyName='accountnumber',PropertyValues=[null])", "0x80060888", "'Edm.String'"),
    (f"{CRM}.In(PropertyName=accountnumber,PropertyValues=['A'])", "0x80060888", "'Edm.String'"),
    (f"{CRM}.In(PropertyName='accountnumber',PropertyValues=['A',])", "0x80060888", "Invalid JSON."),
    (f"{CRM}.In(PropertyName='accountnumber',PropertyValues=['A'", "0x80060888", "Invalid JSON."),
    (f"{CRM}.In(PropertyName='accountnumber',PropertyValues=[,'A'])", "0x80060888", "unexpected comma"),
    (f"{CRM}.In(PropertyName='accountnumber',PropertyValues=[\"A])", "0x80060888", "JSON string value"),
    (
        f"{CRM}.LastXDays(PropertyName='createdon',PropertyValue='3')",
        "0x80060888",
        "Cannot convert the literal ''3'' to the expected type 'Edm.Int64'.",
    ),
    (
        f"{CRM}.Today(PropertyName='name')",
        "0x80040203",
        "Condition for attribute 'account.name': expected argument(s) of type 'System.String' but received "
        "'System.DateTime'.",
    ),
    (f"{CRM}.On(PropertyName='createdon',PropertyValue='someday')", "0x80040203", "'System.DateTime'"),
    (f"{CRM}.LastXMinutes(PropertyName='createdon',PropertyValue=5)", "0x80060888", "unknown function"),
]


@pytest.mark.parametrize(("where", "code", "fragment"), BAD_CALLS)
def test_bad_calls_are_400s_in_dataverse_words(
    dataverse_sandbox: DataverseSandbox, where: str, code: str, fragment: str
) -> None:
    error = _error(dataverse_sandbox, where)
    assert error["code"] == code
    assert fragment in error["message"]


def test_a_huge_x_is_clamped_not_a_500(dataverse_sandbox: DataverseSandbox) -> None:
    for name in ("LastXDays", "NextXDays", "OlderThanXDays", "LastXHours", "OlderThanXMinutes"):
        for x in ("99999999999999999999", "-99999999999999999999"):
            where = f"{CRM}.{name}(PropertyName='createdon',PropertyValue={x})"
            response = _get(dataverse_sandbox, "accounts", {"$filter": where, "$select": "name"})
            assert response.status_code == 200, (where, response.text[:300])
