"""Deterministic, deliberately dirty seed data for the sandbox ERP.

The same ``seed`` and ``rows`` always give byte-identical tables: every table draws from its
own ``random.Random(f"{seed}:{table}")`` and timestamps come from a fixed epoch, never from
the clock. Rows are generated lazily and inserted in chunks, so 1,000,000 customers need no
more memory than 1,000.

Sizes for ``rows`` = N customers: N // 2 orders, ~70 % of orders invoiced, max(50, N // 100)
items, each stocked in 1 to 3 of 3 warehouses.

Dirty data, each drawn independently at the documented rate (see :class:`DirtyRates`):

========================  =====  =============================================================
kind                      rate   what it looks like
========================  =====  =============================================================
invalid e-mail            3 %    ``anna.smith@@example.com``, ``no-at-sign.example.com``, ``x@``
blank name                2 %    ``CUST_NAME`` empty or only spaces
duplicate customer        2 %    copy of an earlier customer, name differs only in case/spacing
trailing spaces           4 %    ``CUST_NAME`` / ``CITY`` with trailing blanks
unknown currency code     1 %    ``DM``, ``FF``, ``XX``, ``??`` (absent from ``CURR_CODE_MAP``)
negative stock            2 %    ``QTY_ON_HAND`` < 0
net + tax ≠ gross         1 %    invoice gross off by one cent
order → missing customer  1 %    ``SO_HEADER.CUST_NO`` that is in no ``CUST_MASTER`` row
========================  =====  =============================================================
"""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from d365sync.erp.client import ErpClient
from d365sync.erp.spec import TableSpec
from d365sync.sandbox.erp import tables as t
from d365sync.sandbox.erp.ddl import drop_statements, schema_statements

EPOCH = dt.datetime(2021, 1, 1)
SPAN_SECONDS = 3 * 365 * 24 * 3600
CENT = Decimal("0.01")
_FIRST = (
    "Anna",
    "Ben",
    "Chloe",
    "David",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Ida",
    "Jack",
    "Kara",
    "Liam",
    "Mia",
    "Noah",
    "Olga",
    "Paul",
    "Rosa",
    "Sven",
    "Tara",
    "Yusuf",
    "Zoë",
    "Seán",
    "Łukasz",
    "Renée",
)
_LAST = (
    "Smith",
    "Jones",
    "Müller",
    "O'Brien",
    "García",
    "Rossi",
    "Novak",
    "Berg",
    "Dubois",
    "Kowalski",
    "Nguyen",
    "Patel",
    "Schmidt",
    "Brown",
    "Jensen",
    "Silva",
    "Horvath",
    "Andersson",
)
_FORMS = ("Ltd", "GmbH", "S.A.", "& Sons", "Trading", "Holdings", "AB", "B.V.", "")
_CITIES = (
    ("London", "GB"),
    ("Manchester", "GB"),
    ("Berlin", "DE"),
    ("München", "DE"),
    ("Paris", "FR"),
    ("Zürich", "CH"),
    ("Stockholm", "SE"),
    ("New York", "US"),
    ("Toronto", "CA"),
    ("Osaka", "JP"),
)
_TERMS = ("N30", "N60", "N14", "COD")
_WAREHOUSES = ("W01", "W02", "W03")


@dataclass(frozen=True)
class DirtyRates:
    """Share of rows that get each defect; see the module docstring for examples."""

    invalid_email: float = 0.03
    blank_name: float = 0.02
    duplicate_customer: float = 0.02
    trailing_spaces: float = 0.04
    unknown_currency: float = 0.01
    negative_stock: float = 0.02
    gross_off_by_cent: float = 0.01
    orphan_order: float = 0.01


@dataclass
class SeedReport:
    """Rows written per table and defects actually injected per kind."""

    rows: dict[str, int] = field(default_factory=dict)
    dirty: Counter[str] = field(default_factory=Counter)


def init_sandbox(
    client: ErpClient,
    rows: int = 1000,
    seed: int = 42,
    rates: DirtyRates | None = None,
    only: tuple[str, ...] | None = None,
) -> SeedReport:
    """Drop and recreate the sandbox schema, then seed it (``only`` limits the tables seeded)."""
    client.execute(drop_statements(client.dialect))
    client.execute(schema_statements(client.dialect))
    return Seeder(rows, seed, rates or DirtyRates()).load(client, only)


class Seeder:
    """Generates each table as a lazy stream of tuples in spec column order."""

    def __init__(self, customers: int, seed: int, rates: DirtyRates) -> None:
        self.customers, self.seed, self.rates = customers, seed, rates
        self.orders = max(10, customers // 2)
        self.items = max(50, customers // 100)
        self.report = SeedReport()

    def load(self, client: ErpClient, only: tuple[str, ...] | None = None) -> SeedReport:
        streams = {
            "CURR_CODE_MAP": self.currencies,
            "CUST_MASTER": self.customer_rows,
            "CUST_CONTACT": self.contact_rows,
            "ITEM_MASTER": self.item_rows,
            "ITEM_STOCK": self.stock_rows,
            "SO_HEADER": self.order_rows,
            "INV_HEADER": self.invoice_rows,
        }
        for spec in t.TABLES:
            if only is None or spec.name in only:
                written = client.insert_rows(spec, spec.column_names, streams[spec.name](spec))
                self.report.rows[spec.name] = written
        return self.report

    def _rng(self, table: str) -> random.Random:
        return random.Random(f"{self.seed}:{table}")

    def _hit(self, rng: random.Random, kind: str, tally: Counter[str] | None = None) -> bool:
        if rng.random() < getattr(self.rates, kind):
            (self.report.dirty if tally is None else tally)[kind] += 1
            return True
        return False

    def _stamp(self, rng: random.Random, i: int, n: int) -> dt.datetime:
        """Ascending timestamps with deliberate ties, like a batch job stamping many rows per second."""
        return EPOCH + dt.timedelta(seconds=SPAN_SECONDS * i // max(n, 1) + rng.choice((0, 0, 0, 1)))

    def _currency(self, rng: random.Random, tally: Counter[str] | None = None) -> str:
        if self._hit(rng, "unknown_currency", tally):
            return rng.choice(t.UNKNOWN_CURRENCIES)
        return rng.choice(t.CURRENCIES)[0]

    def currencies(self, spec: TableSpec) -> Iterator[tuple[Any, ...]]:
        yield from t.CURRENCIES

    def customer_rows(self, spec: TableSpec) -> Iterator[tuple[Any, ...]]:
        rng = self._rng(spec.name)
        recent: deque[tuple[Any, ...]] = deque(maxlen=50)
        for i in range(1, self.customers + 1):
            row = self._customer(rng, i)
            if recent and self._hit(rng, "duplicate_customer"):
                row = self._duplicate(rng, rng.choice(recent), row)
            recent.append(row)
            yield row

    def contact_rows(self, spec: TableSpec) -> Iterator[tuple[Any, ...]]:
        """A contact person for every tenth customer (clean rows: no entity syncs them yet)."""
        rng = self._rng(spec.name)
        n = self.customers // 10
        for i in range(1, n + 1):
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            phone = f"+44 20 7946 {rng.randrange(10_000):04d}" if rng.random() < 0.7 else None
            title = rng.choice(("Buyer", "Accounts payable", "Owner", None))
            yield (
                f"P{i:09d}",
                f"C{i * 10:09d}",
                first,
                last,
                f"{first}.{last}.{i}@example.com".lower(),
                phone,
                title,
                self._stamp(rng, i, n),
                1,
            )

    def _customer(self, rng: random.Random, i: int) -> tuple[Any, ...]:
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        name = f"{last} {rng.choice(_FORMS)}".strip() if rng.random() < 0.6 else f"{first} {last}"
        if self._hit(rng, "blank_name"):
            name = rng.choice(("", "   "))
        city, country = rng.choice(_CITIES)
        if self._hit(rng, "trailing_spaces"):
            name, city = name + "  ", city + " "
        stamp = self._stamp(rng, i, self.customers)
        return (
            f"C{i:09d}",
            name,
            self._email(rng, first, last, i),
            f"+{rng.randint(1, 99)} {rng.randint(10**6, 10**9)}",
            f"{rng.randint(1, 250)} {rng.choice(_LAST)} Street",
            None if rng.random() < 0.7 else "Building B",
            city,
            f"{rng.randint(1000, 99999)}",
            country,
            self._currency(rng),
            Decimal(rng.randrange(0, 5_000_000, 500)) / 100,
            rng.choice(_TERMS),
            "A" if rng.random() < 0.93 else rng.choice("IH"),
            None,
            stamp,
            1,
        )

    def _email(self, rng: random.Random, first: str, last: str, i: int) -> str:
        local = f"{first}.{last}".lower().replace("'", "").replace(" ", "")
        if self._hit(rng, "invalid_email"):
            return rng.choice((f"{local}@@example.com", f"{local}.example.com", f"{local}@", f"@{i}.example"))
        return f"{local}.{i}@example.com"

    def _duplicate(
        self, rng: random.Random, original: tuple[Any, ...], row: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        """Same customer again under a new number: name differs only in case or spacing."""
        name = str(original[1])
        variant = rng.choice((name.upper(), name.lower(), name.replace(" ", "  ", 1), f" {name}"))
        return (row[0], variant[:60], str(original[2]).upper(), *original[3:14], row[14], row[15])

    def item_rows(self, spec: TableSpec) -> Iterator[tuple[Any, ...]]:
        rng = self._rng(spec.name)
        for i in range(1, self.items + 1):
            price = Decimal(rng.randrange(100, 10_000_000)) / 10000
            descr = f"{rng.choice(('Bolt', 'Valve', 'Pump', 'Cable', 'Sensor', 'Gasket'))} type {i % 97}"
            yield (f"ITM{i:09d}", descr, price, self._currency(rng), self._stamp(rng, i, self.items))

    def stock_rows(self, spec: TableSpec) -> Iterator[tuple[Any, ...]]:
        rng = self._rng(spec.name)
        for i in range(1, self.items + 1):
            for whse in _WAREHOUSES[: rng.randint(1, 3)]:
                qty = Decimal(rng.randrange(0, 5_000_000)) / 1000
                if self._hit(rng, "negative_stock"):
                    qty = -qty - Decimal(1)
                yield (f"ITM{i:09d}", whse, qty)

    def order_rows(self, spec: TableSpec, tally: Counter[str] | None = None) -> Iterator[tuple[Any, ...]]:
        rng = self._rng(spec.name)
        for i in range(1, self.orders + 1):
            cust = rng.randint(1, self.customers)
            if self._hit(rng, "orphan_order", tally):
                cust = self.customers + rng.randint(1, 10**6)  # no such customer
            net = Decimal(rng.randrange(1000, 10_000_000)) / 100
            stamp = self._stamp(rng, i, self.orders)
            yield (
                f"S{i:09d}",
                f"C{cust:09d}",
                stamp.strftime("%Y%m%d"),
                net,
                (net * Decimal("0.19")).quantize(CENT),
                self._currency(rng, tally),
                rng.choice("OOOCCX"),
                rng.choice("NPS"),
                stamp,
                1,
            )

    def invoice_rows(self, spec: TableSpec) -> Iterator[tuple[Any, ...]]:
        """Invoices re-derive their order from the order stream's seed, so they agree with it."""
        rng = self._rng(spec.name)
        replay = self.order_rows(t.SO_HEADER, tally=Counter())  # replayed orders must not count twice
        for n, order in enumerate(replay, start=1):
            if rng.random() >= 0.7:
                continue
            net, tax = order[3], order[4]
            gross = net + tax + (CENT if self._hit(rng, "gross_off_by_cent") else 0)
            stamp = order[8] + dt.timedelta(days=rng.randint(0, 30))
            yield (
                f"I{n:09d}",
                order[0],
                order[1],
                stamp.strftime("%Y%m%d"),
                net,
                tax,
                gross,
                order[5],
                rng.choice("YN"),
                stamp,
            )


def tidy(client: ErpClient) -> None:
    """What a data steward does before the first sync of a freshly seeded ERP.

    The seeder makes ~11-12 % of CUST_MASTER dirty and ~5 % of the stock negative, above the
    customers' and inventory's invalid-share thresholds, so a first run would fail by design.
    This fixes blank names (the customer number stands in), unknown currency codes (EURO) and
    negative stock; invalid e-mails and duplicates stay, so quarantine is still exercised.
    Parameterised and dialect-neutral, like every statement the client sends.
    """
    q = client.dialect.q
    known = [legacy for legacy, _iso, _name in t.CURRENCIES]
    marks = ", ".join("?" for _ in known)
    cust, stock = q("CUST_MASTER"), q("ITEM_STOCK")
    name = q("CUST_NAME")
    client.execute([f"UPDATE {cust} SET {name} = {q('CUST_NO')} WHERE TRIM(COALESCE({name}, '')) = ''"])
    client.execute(
        [f"UPDATE {cust} SET {q('CURR_CODE')} = ? WHERE {q('CURR_CODE')} NOT IN ({marks})"], ["EURO", *known]
    )
    client.execute([f"UPDATE {stock} SET {q('QTY_ON_HAND')} = 0 WHERE {q('QTY_ON_HAND')} < 0"])
