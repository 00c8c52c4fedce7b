"""Deterministic demo/benchmark data.

``--seed N`` creates N accounts plus the reference currencies (USD, EUR, GBP, CHF, JPY, SEK, CAD;
always present, even without ``--seed``, like the ``systemusers`` of the application users and a
"Sandbox Administrator"), N/10 contacts, up to 200 products,
N/5 sales orders and N/10 invoices.  Ids derive from row numbers (uuid5) and values from a
fixed-seed RNG, so two sandboxes seeded with the same N hold identical data.  Rows go in with
``executemany`` inside one transaction, which keeps 100k accounts to a couple of seconds.
Seeding runs once per data directory (recorded in ``_meta``), so restarts keep the data as is.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from d365sync.sandbox.dataverse.config import AppUser, stable_id
from d365sync.sandbox.dataverse.records import now_iso
from d365sync.sandbox.dataverse.schema import TABLES, type_column
from d365sync.sandbox.dataverse.store import Store

CURRENCIES = (
    ("USD", "US Dollar", "$", 1.0),
    ("EUR", "Euro", "€", 0.92),
    ("GBP", "Pound Sterling", "£", 0.79),
    ("CHF", "Swiss Franc", "CHF", 0.88),
    ("JPY", "Yen", "¥", 151.0),
    ("SEK", "Swedish Krona", "kr", 10.6),
    ("CAD", "Canadian Dollar", "CA$", 1.37),
)
_CITIES = ("Seattle", "Redmond", "London", "Berlin", "Paris", "Madrid", "Oslo", "Dublin", "Austin", "Boston")
_COUNTRIES = ("US", "US", "GB", "DE", "FR", "ES", "NO", "IE", "US", "US")
_WORDS = ("Contoso", "Fabrikam", "Northwind", "Litware", "Adventure", "Tailspin", "Woodgrove", "Proseware")


def record_id(table: str, index: int) -> str:
    """The id seeding gives row ``index`` of ``table`` (tests can predict ids)."""
    return stable_id(f"seed:{table}", str(index))


def currency_id(code: str) -> str:
    return stable_id("seed:transactioncurrency", code)


ADMINISTRATOR_ID = stable_id("systemuser", "administrator")
"""The ``systemuserid`` of the sandbox's interactive administrator (besides the app users)."""


def seed(store: Store, user: AppUser, accounts: int) -> bool:
    """Seed once; returns False when the data directory was already seeded."""
    if store.meta("seeded") is not None:
        return False
    rng = random.Random(365)
    with store.atomic():
        ensure_currencies(store, user)
        _insert(store, user, "account", accounts, lambda i: _account(i, rng))
        _insert(store, user, "contact", accounts // 10, lambda i: _contact(i, rng, accounts))
        _insert(store, user, "product", min(200, accounts), lambda i: _product(i, rng))
        _insert(store, user, "salesorder", accounts // 5, lambda i: _order(i, rng, accounts))
        _insert(store, user, "invoice", accounts // 10, lambda i: _invoice(i, rng, accounts))
        store.set_meta("seeded", str(accounts))
    return True


def ensure_currencies(store: Store, user: AppUser) -> int:
    """Add the reference currencies an environment always has (the ERP's ISO codes); idempotent.

    Real Dataverse environments carry their currencies before any sync, so the sandbox does too,
    even when started without ``--seed``: otherwise every currency lookup would park its record.
    """
    table = TABLES["transactioncurrency"]
    missing = [i for i, c in enumerate(CURRENCIES) if store.get(table, currency_id(c[0])) is None]
    with store.atomic():
        _insert(store, user, "transactioncurrency", len(missing), lambda i: _currency(missing[i]))
    return len(missing)


def ensure_users(store: Store, users: Sequence[AppUser], tenant: str) -> int:
    """Add the ``systemusers`` rows behind the application users (the ids ``WhoAmI`` returns and
    records are owned by) and one interactive administrator, whom records can be assigned to;
    idempotent, so users added to ``sandbox.json`` later appear on the next start."""
    table = TABLES["systemuser"]
    people = [_app_user(u, tenant) for u in users] + [_administrator(tenant)]
    missing = [p for p in people if store.get(table, p["systemuserid"]) is None]
    with store.atomic():
        _insert(store, users[0], "systemuser", len(missing), lambda i: missing[i])
    return len(missing)


def _app_user(user: AppUser, tenant: str) -> dict[str, Any]:
    address = f"{user.client_id.lower()}@{tenant}"
    return {
        "systemuserid": user.systemuserid,
        "fullname": f"# {user.name}",
        "domainname": address,
        "internalemailaddress": address,
        "applicationid": user.client_id.lower(),
        "azureactivedirectoryobjectid": user.object_id,
        "isdisabled": 0,
        "accessmode": 4,  # non-interactive
    }


def _administrator(tenant: str) -> dict[str, Any]:
    return {
        "systemuserid": ADMINISTRATOR_ID,
        "fullname": "Sandbox Administrator",
        "domainname": f"admin@{tenant}",
        "internalemailaddress": f"admin@{tenant}",
        "applicationid": None,
        "azureactivedirectoryobjectid": stable_id("user", "administrator"),
        "isdisabled": 0,
        "accessmode": 0,  # read-write
    }


def _insert(
    store: Store, user: AppUser, name: str, count: int, make: Callable[[int], dict[str, Any]]
) -> None:
    """Insert ``count`` rows built by ``make`` (which may set the primary id; else :func:`record_id`)."""
    if count <= 0:
        return
    table = TABLES[name]
    now = now_iso()
    first = store.reserve_versions(count)
    columns: Sequence[str] | None = None
    rows: list[tuple[Any, ...]] = []
    for index in range(count):
        values = {
            table.primary_id: record_id(name, index),
            "createdon": now,
            "modifiedon": now,
            "versionnumber": first + index,
            "createdby": user.systemuserid,
            "modifiedby": user.systemuserid,
            "ownerid": user.systemuserid,
            "statecode": 0,
            "statuscode": table.default_status[0],
            **make(index),
        }
        if columns is None:
            columns = list(values)
        rows.append(tuple(values[c] for c in columns))
    store.bulk_insert(table, columns or [], rows)


def _currency(index: int) -> dict[str, Any]:
    code, name, symbol, rate = CURRENCIES[index]
    return {
        "transactioncurrencyid": currency_id(code),
        "isocurrencycode": code,
        "currencyname": name,
        "currencysymbol": symbol,
        "exchangerate": rate,
        "currencyprecision": 2,
    }


def _account(index: int, rng: random.Random) -> dict[str, Any]:
    city = rng.randrange(len(_CITIES))
    return {
        "name": f"{rng.choice(_WORDS)} {index:06d}",
        "accountnumber": f"ACC-{index:06d}",
        "emailaddress1": f"account{index}@example.com",
        "telephone1": f"+1-555-{index % 10000:04d}",
        "address1_line1": f"{rng.randrange(1, 999)} Main Street",
        "address1_city": _CITIES[city],
        "address1_postalcode": f"{rng.randrange(10000, 99999)}",
        "address1_country": _COUNTRIES[city],
        "creditlimit": float(rng.randrange(0, 100) * 1000),
        "paymenttermscode": rng.choice((1, 2, 3, 4)),
        "transactioncurrencyid": currency_id(CURRENCIES[index % 3][0]),
    }


def _contact(index: int, rng: random.Random, accounts: int) -> dict[str, Any]:
    first, last = rng.choice(("Ana", "Ben", "Chen", "Dara", "Eli")), f"Person{index:05d}"
    return {
        "firstname": first,
        "lastname": last,
        "fullname": f"{first} {last}",
        "emailaddress1": f"contact{index}@example.com",
        "new_contactnumber": f"D{index:09d}",  # numbered by the integration, as the ERP numbers its own
        "parentcustomerid": record_id("account", index * 10 % max(accounts, 1)),
        type_column(TABLES["contact"].column("parentcustomerid")): "account",  # type: ignore[arg-type]
    }


def _product(index: int, rng: random.Random) -> dict[str, Any]:
    return {
        "name": f"Product {index:04d}",
        "productnumber": f"PRD-{index:04d}",
        "price": round(rng.uniform(1, 500), 2),
        "quantityonhand": float(rng.randrange(0, 1000)),
        "quantitydecimal": 2,
        "productstructure": 1,
        "transactioncurrencyid": currency_id("USD"),
    }


def _order(index: int, rng: random.Random, accounts: int) -> dict[str, Any]:
    total = round(rng.uniform(10, 10000), 2)
    return {
        "name": f"Order {index:06d}",
        "ordernumber": f"ORD-{index:06d}",
        "customerid": record_id("account", index * 5 % max(accounts, 1)),
        "customerid__type": "account",
        "totalamount": total,
        "totaltax": round(total * 0.2, 2),
        "transactioncurrencyid": currency_id(CURRENCIES[index % 3][0]),
    }


def _invoice(index: int, rng: random.Random, accounts: int) -> dict[str, Any]:
    total = round(rng.uniform(10, 10000), 2)
    return {
        "name": f"Invoice {index:06d}",
        "invoicenumber": f"INV-{index:06d}",
        "customerid": record_id("account", index * 10 % max(accounts, 1)),
        "customerid__type": "account",
        "salesorderid": record_id("salesorder", index * 2),
        "totalamount": total,
        "totaltax": round(total * 0.2, 2),
        "transactioncurrencyid": currency_id(CURRENCIES[index % 3][0]),
    }
