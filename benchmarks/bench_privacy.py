"""What encrypting personal data at rest costs: the state store's merge-base writes and reads of
customers with their ``pii: true`` fields sealed (Fernet), against the same store storing them in
clear (``insecure-none``), measured in the same run on the same rows.

    .venv/bin/python benchmarks/bench_privacy.py [--rows 20000] [--repeat 3]

Prints a Markdown table (BENCHMARKS.md, "Personal data at rest"): seconds per pass (median of
``--repeat``), rows/s and the ratio sealed / clear. SQLite state store in a temp directory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _dataverse import print_table
from d365sync import ENTITIES_DIR
from d365sync.engine.merge import Base
from d365sync.engine.privacy import INSECURE, Privacy, generate_key
from d365sync.engine.state import BaseRow, StateStore
from d365sync.spec import load_entities


def rows(n: int) -> list[BaseRow]:
    out = []
    for i in range(n):
        values = {
            "number": f"C{i:09d}",
            "name": f"Customer {i} Handels GmbH",
            "email": f"first.last.{i}@example.com",
            "phone": f"+49 30 {i:07d}",
            "address_line1": f"{i} Berg Street",
            "address_line2": None,
            "city": "Berlin",
            "postcode": "10115",
            "country": "DE",
            "credit_limit": "15000.00",
            "payment_terms": "N30",
            "currency": "EUR",
        }
        out.append(BaseRow(f"00000000-0000-0000-0000-{i:012d}", values["number"], Base(values, "1", "1")))
    return out


def timed(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def measure(keys: str, batch: list[BaseRow], repeat: int, pii: frozenset[str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        privacy = Privacy.from_keys(keys, "benchmark")
        privacy.register("customers", pii)
        store = StateStore.open(f"sqlite:///{Path(tmp) / 'state.db'}", privacy=privacy)
        try:
            keys_of = [r.erp_key for r in batch if r.erp_key]
            store.save_base("customers", batch, "warm")
            write = timed(lambda: store.save_base("customers", batch, "bench"), repeat)
            read = timed(lambda: store.load_base("customers", "erp", keys_of), repeat)
        finally:
            store.close()
    return write, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pii = load_entities(ENTITIES_DIR)["customers"].pii_fields
    batch = rows(args.rows)
    clear = measure(INSECURE, batch, args.repeat, pii)
    sealed = measure(generate_key(), batch, args.repeat, pii)
    table = []
    for i, what in enumerate(("save_base (write)", "load_base (read)")):
        table.append(
            [
                what,
                args.rows,
                f"{clear[i]:.2f}",
                f"{sealed[i]:.2f}",
                f"{args.rows / clear[i]:,.0f}",
                f"{args.rows / sealed[i]:,.0f}",
                f"{sealed[i] / clear[i]:.2f}",
            ]
        )
    print_table(
        f"Personal data at rest: {len(pii)} pii fields of customers, SQLite state store",
        ["pass", "rows", "clear s", "sealed s", "clear rows/s", "sealed rows/s", "sealed / clear"],
        table,
    )


if __name__ == "__main__":
    main()
