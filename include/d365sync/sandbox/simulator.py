"""A background user of both systems, for soak tests: edits Dynamics and the ERP as people would.

:class:`Simulator` takes the product's own clients (a :class:`~d365sync.dynamics.DynamicsClient`
and an :class:`~d365sync.erp.ErpClient`) and makes one user-like edit per :meth:`step`:

* Dynamics (the Web API, as the model-driven app would): an account's name, e-mail, phone or
  address; a new account; a new sales order for a synced customer; an account deactivated;
* ERP (SQL, as the legacy screens would; the ERP's own triggers stamp ``LAST_UPD`` and bump
  ``ROW_VER``): a customer's credit limit or payment terms; an item's price in ``ITEM_MASTER``; a
  stock move in ``ITEM_STOCK``; a posted invoice in ``INV_HEADER``; a partial shipment
  (``SHIP_STATUS = 'P'``) on an open order that both systems hold.

Edits only touch records both systems already hold (a synced customer, order, item), except the
creates, and never a key the caller asked to ``avoid`` (records already dead-lettered before the
soak) or a key that carries an injected bad value until :meth:`fix` repaired it.

Bad values (:data:`BAD_KINDS`), each recorded as a :class:`BadValue` (entity, key, side, field):

=================  =========  ==============================================================
kind               side       what a user typed
=================  =========  ==============================================================
``long_name``      Dynamics   an account name of 150 characters (``CUST_NAME`` holds 60)
``invalid_email``  Dynamics   ``first.last@@example`` as the account's e-mail
``bad_date``       ERP        ``'20231399'`` in the CHAR(8) ``INV_HEADER.INV_DATE``
``text_in_decimal`` ERP       ``'N/A'`` in the DECIMAL ``CUST_MASTER.CREDIT_LIMIT`` (SQLite keeps
                              text in a numeric column; other servers refuse it: not injected)
=================  =========  ==============================================================

:meth:`fix` repairs every bad value at its source, with a new valid value, and
:meth:`landed` tells whether that value reached the other system. :meth:`run` drives edits at a
rate for a duration and spreads the bad values over its first 60 %. Airflow-free.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from d365sync.erp.spec import TableSpec
from d365sync.sandbox.erp import tables as t

log = logging.getLogger(__name__)

BAD_KINDS = ("long_name", "invalid_email", "bad_date", "text_in_decimal")
DYNAMICS_EDITS = (
    "account_name",
    "account_email",
    "account_phone",
    "account_address",
    "new_account",
    "new_order",
    "deactivate_account",
)
ERP_EDITS = ("credit_limit", "payment_terms", "item_price", "stock_move", "invoice", "partial_shipment")
# How often each edit is picked (relative): mostly field edits, a few creates, rare deactivations.
WEIGHTS = {
    "account_name": 3,
    "account_email": 3,
    "account_phone": 3,
    "account_address": 3,
    "new_account": 2,
    "new_order": 2,
    "deactivate_account": 1,
    "credit_limit": 3,
    "payment_terms": 2,
    "item_price": 3,
    "stock_move": 3,
    "invoice": 2,
    "partial_shipment": 2,
}
LONG_NAME = ("Consolidated Northern Industrial Supplies and Logistics Holdings " * 3)[:149] + "."  # 150
CURRENCY = "EUR"  # ISO code of the sandbox currency new Dynamics records get (ERP legacy: EURO)
_WORDS = ("Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Wonka", "Tyrell", "Cyberdyne")
_FORMS = ("Ltd", "GmbH", "AB", "S.A.", "Trading", "& Co")
_CITIES = (("Leeds", "GB"), ("Hamburg", "DE"), ("Lyon", "FR"), ("Basel", "CH"), ("Malmö", "SE"))
_TERMS = ("N30", "N60", "N14", "COD")


@dataclass(frozen=True)
class Edit:
    """One user edit the simulator made (``ok`` False: the system refused it, ``error`` says why)."""

    at: dt.datetime
    kind: str
    entity: str
    side: str
    key: str
    ok: bool = True
    error: str = ""


@dataclass
class BadValue:
    """A bad value injected at its source, and its repair."""

    kind: str
    entity: str
    key: str
    side: str  # where it was typed: "dynamics" or "erp"
    field: str  # the column on that side
    value: Any
    injected_at: dt.datetime
    fixed_value: Any = None
    fixed_at: dt.datetime | None = None

    def describe(self) -> str:
        return f"{self.kind}: {self.entity} {self.key} {self.side}.{self.field}={self.value!r:.40}"


@dataclass
class _Serial:
    n: int = 0

    def next(self) -> int:
        self.n += 1
        return self.n


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Simulator:
    """User-like edits on both systems; see the module docstring. Not thread-safe: one thread."""

    def __init__(
        self,
        dynamics: Any,
        erp: Any,
        *,
        seed: int = 0,
        avoid: Iterable[tuple[str, str]] = (),
        kinds: Sequence[str] = (*DYNAMICS_EDITS, *ERP_EDITS),
    ) -> None:
        self.dynamics, self.erp = dynamics, erp
        self.rng = random.Random(seed)
        self.avoid = {(e, k.strip()) for e, k in avoid}
        self.kinds = [k for k in kinds if k in WEIGHTS]
        self.edits: list[Edit] = []
        self.bad: list[BadValue] = []
        self.skipped: list[str] = []  # bad kinds this ERP cannot hold (text in DECIMAL off SQLite)
        self.unqualified: dict[str, int] = {}  # edits drawn but no record qualified (kind → count)
        self._first_round: list[str] | None = None
        self._serial = _Serial()

    # ------------------------------------------------------------------------------ driving
    def run(
        self,
        duration: float,
        rate_per_minute: float,
        bad_per_kind: int = 1,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        """Edit at ``rate_per_minute`` for ``duration`` seconds; ``bad_per_kind`` of each bad kind,
        spread over 10 %..60 % of the duration (so the runs after them see them before the end)."""
        stop = stop or threading.Event()
        sleep = sleep or stop.wait
        start = clock()
        planned = [kind for _ in range(bad_per_kind) for kind in BAD_KINDS]
        bad_at = [start + duration * (0.1 + 0.5 * i / max(1, len(planned))) for i in range(len(planned))]
        interval = 60.0 / rate_per_minute if rate_per_minute > 0 else duration + 1
        next_edit = start + self.rng.uniform(0, interval)
        while not stop.is_set():
            now = clock()
            if now >= start + duration:
                break
            if bad_at and now >= bad_at[0]:
                bad_at.pop(0)
                kind = planned.pop(0)
                self._guarded(f"bad:{kind}", lambda k=kind: self.inject(k))
                continue
            if now >= next_edit:
                kind = self.draw()
                self._guarded(kind, lambda k=kind: self.edit(k))
                next_edit += interval * self.rng.uniform(0.5, 1.5)
                continue
            sleep(min(1.0, max(0.05, min([next_edit, *bad_at[:1]]) - now)))
        if not stop.is_set():
            for kind in planned:  # a short run: whatever was not injected yet goes in now
                self._guarded(f"bad:{kind}", lambda k=kind: self.inject(k))

    def _guarded(self, kind: str, action: Callable[[], Any]) -> None:
        """A refused edit is recorded (``Edit.ok`` False), never fatal: users see errors too."""
        try:
            action()
        except Exception as exc:  # the systems may refuse an edit; the soak reports it
            log.warning("simulator: %s failed: %s: %s", kind, type(exc).__name__, exc)
            self.edits.append(Edit(_now(), kind, "", "", "", False, f"{type(exc).__name__}: {exc}"[:300]))

    def draw(self) -> str:
        """The next edit kind: every kind once first (in random order, so even a short soak makes
        each kind of edit), then at random by :data:`WEIGHTS`."""
        if self._first_round is None:
            self._first_round = self.rng.sample(self.kinds, len(self.kinds))
        if self._first_round:
            return self._first_round.pop()
        return self.rng.choices(self.kinds, weights=[WEIGHTS[k] for k in self.kinds])[0]

    def step(self) -> Edit | None:
        """One random user edit (weighted); None when no record qualifies for the drawn kind."""
        return self.edit(self.draw())

    def edit(self, kind: str) -> Edit | None:
        entity, side, key = getattr(self, f"_{kind}")()
        if key is None:
            self.unqualified[kind] = self.unqualified.get(kind, 0) + 1
            return None
        edit = Edit(_now(), kind, entity, side, key)
        self.edits.append(edit)
        return edit

    # ------------------------------------------------------------------------------ reading
    def _dv(self, entity_set: str, select: Sequence[str], filter: str | None = None) -> list[dict[str, Any]]:
        return list(self.dynamics.iter_rows(entity_set, select, filter=filter))

    def _erp_rows(self, spec: TableSpec, *columns: str) -> list[dict[str, Any]]:
        """Rows of the key and ``columns`` only: a bad value elsewhere in the row (text in a DECIMAL,
        a CHAR(8) non-date) must not stop a user from working on other fields."""
        wanted = {*spec.key, *columns}
        narrow = TableSpec(
            name=spec.name, columns=[c for c in spec.columns if c.name in wanted], key=spec.key
        )
        return [row for chunk in self.erp.iter_rows(narrow) for row in chunk]

    def _busy(self, entity: str, key: str) -> bool:
        bad = {(b.entity, b.key) for b in self.bad if b.fixed_at is None}
        return (entity, key) in self.avoid or (entity, key) in bad

    def synced_customers(self) -> list[str]:
        """Active accounts that the ERP holds as active customers too (sorted keys)."""
        accounts = {
            str(a["accountnumber"]).strip()
            for a in self._dv("accounts", ["accountnumber"], "statecode eq 0")
            if a.get("accountnumber")
        }
        erp = {
            str(r["CUST_NO"]).strip() for r in self._erp_rows(t.CUST_MASTER, "STATUS") if r["STATUS"] == "A"
        }
        return sorted(k for k in accounts & erp if not self._busy("customers", k))

    def _synced_orders(self) -> list[dict[str, Any]]:
        """Open ERP orders that Dynamics holds as active orders, of synced customers."""
        numbers = {
            str(o["ordernumber"]).strip()
            for o in self._dv("salesorders", ["ordernumber"], "statecode eq 0")
            if o.get("ordernumber")
        }
        customers = set(self.synced_customers())
        return [
            r
            for r in self._erp_rows(
                t.SO_HEADER, "CUST_NO", "NET_AMOUNT", "TAX_AMOUNT", "CURR_CODE", "STATUS", "SHIP_STATUS"
            )
            if r["SO_NO"] in numbers
            and r["STATUS"] == "O"
            and r["CUST_NO"] in customers
            and not self._busy("orders", r["SO_NO"])
        ]

    def _pick(self, items: Sequence[Any]) -> Any:
        return self.rng.choice(items) if items else None

    # ------------------------------------------------------------------- Dynamics user edits
    def _patch_account(self, key: str, changes: dict[str, Any]) -> None:
        self._upsert("accounts", "accountnumber", {"accountnumber": key, **changes})

    def _upsert(self, entity_set: str, key: str, record: dict[str, Any]) -> None:
        (outcome,) = self.dynamics.upsert_many(entity_set, key, [record], strategy="batch")
        if not outcome.ok:
            raise RuntimeError(f"Dataverse refused {entity_set} {record[key]}: {outcome.message}")

    def _account_edit(self, changes: Callable[[], dict[str, Any]]) -> tuple[str, str, str | None]:
        key = self._pick(self.synced_customers())
        if key is not None:
            self._patch_account(key, changes())
        return "customers", "dynamics", key

    def _account_name(self) -> tuple[str, str, str | None]:
        return self._account_edit(lambda: {"name": self._name()})

    def _account_email(self) -> tuple[str, str, str | None]:
        return self._account_edit(lambda: {"emailaddress1": self._email()})

    def _account_phone(self) -> tuple[str, str, str | None]:
        return self._account_edit(lambda: {"telephone1": f"+44 20 7946 {self.rng.randrange(10**4):04d}"})

    def _account_address(self) -> tuple[str, str, str | None]:
        city, country = self.rng.choice(_CITIES)
        street = f"{self.rng.randint(1, 400)} {self.rng.choice(_WORDS)} Road"
        return self._account_edit(
            lambda: {
                "address1_line1": street,
                "address1_city": city,
                "address1_postalcode": f"{self.rng.randint(1000, 99999)}",
                "address1_country": country,
            }
        )

    def _new_account(self) -> tuple[str, str, str | None]:
        key = f"SIM{self._serial.next():07d}"
        city, country = self.rng.choice(_CITIES)
        self._upsert(
            "accounts",
            "accountnumber",
            {
                "accountnumber": key,
                "name": self._name(),
                "emailaddress1": self._email(),
                "telephone1": f"+46 8 {self.rng.randrange(10**6):06d}",
                "address1_line1": f"{self.rng.randint(1, 99)} Soak Street",
                "address1_city": city,
                "address1_postalcode": f"{self.rng.randint(1000, 99999)}",
                "address1_country": country,
                "transactioncurrencyid@odata.bind": f"/transactioncurrencies(isocurrencycode='{CURRENCY}')",
            },
        )
        return "customers", "dynamics", key

    def _new_order(self) -> tuple[str, str, str | None]:
        customer = self._pick(self.synced_customers())
        if customer is None:
            return "orders", "dynamics", None
        key = f"SO{self._serial.next():08d}"
        net = Decimal(self.rng.randrange(1000, 500_000)) / 100
        tax = (net * Decimal("0.19")).quantize(Decimal("0.01"))
        self._upsert(
            "salesorders",
            "ordernumber",
            {
                "ordernumber": key,
                "name": f"Soak order {key}",
                "customerid_account@odata.bind": f"/accounts(accountnumber='{customer}')",
                "totalamount": float(net + tax),
                "totaltax": float(tax),
                "transactioncurrencyid@odata.bind": f"/transactioncurrencies(isocurrencycode='{CURRENCY}')",
            },
        )
        return "orders", "dynamics", key

    def _deactivate_account(self) -> tuple[str, str, str | None]:
        key = self._pick(self.synced_customers())
        if key is not None:
            self.dynamics.deactivate("accounts", {"accountnumber": key})
        return "customers", "dynamics", key

    # ------------------------------------------------------------------------ ERP user edits
    def _sql(self, sql: str, *params: Any) -> None:
        self.erp.execute([sql], list(params))

    def _decimal(self, value: Decimal) -> Any:
        return str(value) if self.erp.dialect.decimal_as_text else value

    def _credit_limit(self) -> tuple[str, str, str | None]:
        key = self._pick(self.synced_customers())
        if key is not None:
            limit = Decimal(self.rng.randrange(0, 500_000, 50)) / 10
            self._sql(
                'UPDATE "CUST_MASTER" SET "CREDIT_LIMIT" = ? WHERE "CUST_NO" = ?', self._decimal(limit), key
            )
        return "customers", "erp", key

    def _payment_terms(self) -> tuple[str, str, str | None]:
        key = self._pick(self.synced_customers())
        if key is not None:
            self._sql(
                'UPDATE "CUST_MASTER" SET "PAY_TERMS" = ? WHERE "CUST_NO" = ?', self.rng.choice(_TERMS), key
            )
        return "customers", "erp", key

    def _item_price(self) -> tuple[str, str, str | None]:
        items = {r["ITEM_NO"] for r in self._erp_rows(t.ITEM_MASTER)}
        key = self._pick(sorted(k for k in items if not self._busy("products", k)))
        if key is not None:
            price = Decimal(self.rng.randrange(100, 5_000_000)) / 10_000
            self._sql(
                'UPDATE "ITEM_MASTER" SET "UNIT_PRICE" = ? WHERE "ITEM_NO" = ?', self._decimal(price), key
            )
        return "products", "erp", key

    def _stock_move(self) -> tuple[str, str, str | None]:
        """Goods taken out of (or received into) one warehouse; never below zero."""
        rows = self._erp_rows(t.ITEM_STOCK, "QTY_ON_HAND")
        row = self._pick([r for r in rows if not self._busy("inventory", r["ITEM_NO"])])
        if row is None:
            return "inventory", "erp", None
        delta = Decimal(self.rng.randrange(-50_000, 50_000)) / 1000
        qty = max(Decimal(0), (row["QTY_ON_HAND"] or Decimal(0)) + delta)
        self._sql(
            'UPDATE "ITEM_STOCK" SET "QTY_ON_HAND" = ? WHERE "ITEM_NO" = ? AND "WHSE" = ?',
            self._decimal(qty),
            row["ITEM_NO"],
            row["WHSE"],
        )
        return "inventory", "erp", row["ITEM_NO"]

    def _invoice(self, date8: str | None = None) -> tuple[str, str, str | None]:
        """An invoice posted for an open order of a synced customer."""
        order = self._pick(self._synced_orders())
        if order is None:
            return "invoices", "erp", None
        key = f"I9{self._serial.next():08d}"
        net, tax = order["NET_AMOUNT"] or Decimal(0), order["TAX_AMOUNT"] or Decimal(0)
        self._sql(
            'INSERT INTO "INV_HEADER" ("INV_NO", "SO_NO", "CUST_NO", "INV_DATE", "NET_AMOUNT", '
            '"TAX_AMOUNT", "GROSS_AMOUNT", "CURR_CODE", "PAID_FLAG") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
            key,
            order["SO_NO"],
            order["CUST_NO"],
            date8 or _now().strftime("%Y%m%d"),
            self._decimal(net),
            self._decimal(tax),
            self._decimal(net + tax),
            order["CURR_CODE"],
            "N",
        )
        return "invoices", "erp", key

    def _partial_shipment(self) -> tuple[str, str, str | None]:
        open_ = [o for o in self._synced_orders() if o["SHIP_STATUS"] == "N"]
        order = self._pick(open_)
        if order is None:
            return "orders", "erp", None
        self._sql(
            'UPDATE "SO_HEADER" SET "SHIP_STATUS" = ? WHERE "SO_NO" = ? AND "STATUS" = ?',
            "P",
            order["SO_NO"],
            "O",
        )
        return "orders", "erp", order["SO_NO"]

    # ------------------------------------------------------------------------- bad values
    def inject(self, kind: str) -> BadValue | None:
        """Type one bad value of ``kind`` into its source system; None if nothing qualifies."""
        bad = getattr(self, f"_bad_{kind}")()
        if bad is None:
            if not any(s.startswith(f"{kind}:") for s in self.skipped):
                self.skipped.append(f"{kind}: no record qualifies")
            return None
        self.bad.append(bad)
        self.edits.append(Edit(bad.injected_at, f"bad:{kind}", bad.entity, bad.side, bad.key))
        log.info("simulator: injected %s", bad.describe())
        return bad

    def _bad_long_name(self) -> BadValue | None:
        key = self._pick(self.synced_customers())
        if key is None:
            return None
        self._patch_account(key, {"name": LONG_NAME})
        return BadValue("long_name", "customers", key, "dynamics", "name", LONG_NAME, _now())

    def _bad_invalid_email(self) -> BadValue | None:
        key = self._pick(self.synced_customers())
        if key is None:
            return None
        value = f"{key.lower()}@@example"
        self._patch_account(key, {"emailaddress1": value})
        return BadValue("invalid_email", "customers", key, "dynamics", "emailaddress1", value, _now())

    def _bad_bad_date(self) -> BadValue | None:
        """An existing synced invoice's date mistyped; a new invoice if none is synced yet."""
        synced = {
            str(i["invoicenumber"]).strip()
            for i in self._dv("invoices", ["invoicenumber"], "statecode eq 0")
            if i.get("invoicenumber")
        }
        customers = set(self.synced_customers())
        candidates = sorted(
            r["INV_NO"]
            for r in self._erp_rows(t.INV_HEADER, "CUST_NO")
            if r["INV_NO"] in synced and r["CUST_NO"] in customers and not self._busy("invoices", r["INV_NO"])
        )
        value = "20231399"
        key = self._pick(candidates)
        if key is not None:
            self._sql('UPDATE "INV_HEADER" SET "INV_DATE" = ? WHERE "INV_NO" = ?', value, key)
        else:
            _, _, key = self._invoice(date8=value)
            if key is None:
                return None
        return BadValue("bad_date", "invoices", key, "erp", "INV_DATE", value, _now())

    def _bad_text_in_decimal(self) -> BadValue | None:
        if self.erp.dialect.name != "sqlite":
            self.skipped.append(f"text_in_decimal: {self.erp.dialect.name} refuses text in a DECIMAL column")
            return None
        key = self._pick(self.synced_customers())
        if key is None:
            return None
        self._sql('UPDATE "CUST_MASTER" SET "CREDIT_LIMIT" = ? WHERE "CUST_NO" = ?', "N/A", key)
        return BadValue("text_in_decimal", "customers", key, "erp", "CREDIT_LIMIT", "N/A", _now())

    def fix(self) -> list[BadValue]:
        """Repair every unfixed bad value at its source with a new valid value; the fixed ones."""
        fixed = []
        for bad in self.bad:
            if bad.fixed_at is not None:
                continue
            value = self._repair(bad)
            bad.fixed_value, bad.fixed_at = value, _now()
            fixed.append(bad)
        return fixed

    def _repair(self, bad: BadValue) -> Any:
        if bad.kind == "long_name":
            value: Any = f"{self.rng.choice(_WORDS)} Fixed {bad.key}"
            self._patch_account(bad.key, {"name": value})
        elif bad.kind == "invalid_email":
            value = f"fixed.{bad.key.lower()}@example.com"
            self._patch_account(bad.key, {"emailaddress1": value})
        elif bad.kind == "bad_date":
            value = "20231229"
            self._sql('UPDATE "INV_HEADER" SET "INV_DATE" = ? WHERE "INV_NO" = ?', value, bad.key)
        elif bad.kind == "text_in_decimal":
            value = Decimal("4321.00")
            self._sql(
                'UPDATE "CUST_MASTER" SET "CREDIT_LIMIT" = ? WHERE "CUST_NO" = ?',
                self._decimal(value),
                bad.key,
            )
        else:  # pragma: no cover - BAD_KINDS is closed
            raise ValueError(bad.kind)
        return value

    def landed(self, bad: BadValue) -> tuple[bool, Any]:
        """(the fixed value is in the other system, what the other system holds)."""
        if bad.fixed_at is None:
            return False, None
        if bad.kind in ("long_name", "invalid_email"):
            column = {"long_name": "CUST_NAME", "invalid_email": "CUST_EMAIL_ID"}[bad.kind]
            rows = [r for r in self._erp_rows(t.CUST_MASTER, column) if r["CUST_NO"] == bad.key]
            held = rows[0][column] if rows else None
            want = str(bad.fixed_value).lower() if bad.kind == "invalid_email" else bad.fixed_value
            return (held or "").strip() == want, held
        if bad.kind == "bad_date":
            row = self.dynamics.get("invoices", {"invoicenumber": bad.key}, ["duedate"])
            held = (row or {}).get("duedate")
            return str(held or "").startswith("2023-12-29"), held
        row = self.dynamics.get("accounts", {"accountnumber": bad.key}, ["creditlimit"])
        held = (row or {}).get("creditlimit")
        return held is not None and Decimal(str(held)) == bad.fixed_value, held

    # ------------------------------------------------------------------------------ values
    def _name(self) -> str:
        return f"{self.rng.choice(_WORDS)} {self.rng.choice(_FORMS)} {self.rng.randrange(1000):03d}"

    def _email(self) -> str:
        return f"{self.rng.choice(_WORDS).lower()}.{self._serial.next()}@example.org"

    def summary(self) -> dict[str, Any]:
        """Edits made by kind, refused by kind (with the first error), drawn with no record to edit,
        bad values, and bad kinds not injected."""
        made: dict[str, int] = {}
        refused: dict[str, dict[str, Any]] = {}
        for edit in self.edits:
            if edit.ok:
                made[edit.kind] = made.get(edit.kind, 0) + 1
            else:
                entry = refused.setdefault(edit.kind, {"count": 0, "error": edit.error})
                entry["count"] += 1
        return {
            "edits": dict(sorted(made.items())),
            "refused": dict(sorted(refused.items())),
            "no_record": dict(sorted(self.unqualified.items())),
            "bad": [b.describe() for b in self.bad],
            "skipped": list(self.skipped),
        }


@dataclass
class SimulatorThread:
    """:meth:`Simulator.run` in a daemon thread; :meth:`stop` ends it and waits."""

    simulator: Simulator
    duration: float
    rate_per_minute: float
    bad_per_kind: int = 1
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self) -> SimulatorThread:
        self._thread = threading.Thread(target=self._main, name="soak-simulator", daemon=True)
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self.simulator.run(self.duration, self.rate_per_minute, self.bad_per_kind, self._stop)
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self.join(60)
