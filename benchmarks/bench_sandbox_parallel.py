"""Parallel bulk writes against the sandbox with a per-record server cost, as on real Dataverse.

With the sandbox's ``record_cost_ms`` knob set, every record written costs that much server time,
spent outside the write lock (a real tenant spreads requests over many application servers).  The
figures compare, in the same run and on new records each time:

* R ``UpsertMultiple`` requests of N records sent one after another (the baseline; R = 4 unless
  ``--requests``),
* the same R sent in parallel,
* one ``UpsertMultiple`` of R x N records,

and the same three with the cost knob off (the sandbox's own SQLite and Python time only). The
speed-up is the sequential time divided by the row's time; the server columns come from the
sandbox's counters: measured server time (what the execution-time limit charges), the most
requests in the dispatcher at once, and the most spending simulated server time at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from _dataverse import account_records, print_table, sandbox, timed


def upsert_many(instance, rows: list[dict[str, Any]]) -> None:  # type: ignore[no-untyped-def]
    response = requests.post(
        f"{instance.api_url}/accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
        json={"Targets": rows},
        headers=instance.headers(),
        verify=instance.verify,
        timeout=600,
    )
    assert response.status_code == 204, response.text


def sequential(instance, chunks: list[list[dict[str, Any]]]) -> None:  # type: ignore[no-untyped-def]
    for chunk in chunks:
        upsert_many(instance, chunk)


def parallel(instance, chunks: list[list[dict[str, Any]]]) -> None:  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(len(chunks)) as pool:
        list(pool.map(lambda chunk: upsert_many(instance, chunk), chunks))


def scenarios(instance, tag: str, r: int, n: int) -> list[tuple[str, Callable[[], None]]]:  # type: ignore[no-untyped-def]
    """(label, run) per shape; every run writes new records (``tag`` keeps the keys apart)."""

    def chunks(shape: str) -> list[list[dict[str, Any]]]:
        return [account_records(f"{tag}{shape}{c}", n, typed=True) for c in range(r)]

    return [
        (f"{r} x {n:,} sequential (baseline)", lambda: sequential(instance, chunks("S"))),
        (f"{r} x {n:,} parallel", lambda: parallel(instance, chunks("P"))),
        (f"1 x {r * n:,}", lambda: upsert_many(instance, account_records(f"{tag}B", r * n, typed=True))),
    ]


def measure(instance, run: Callable[[], None]) -> tuple[float, dict[str, Any]]:  # type: ignore[no-untyped-def]
    instance.reset_counters()
    _, seconds = timed(run)
    return seconds, instance.counters()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1000, help="records per request (N)")
    parser.add_argument("--requests", type=int, default=4, help="requests per shape (R)")
    parser.add_argument("--record-cost-ms", type=float, default=1.0)
    args = parser.parse_args()
    n, r = args.rows, args.requests
    table: list[list[Any]] = []
    with sandbox(seed=0, record_cost_ms=args.record_cost_ms) as instance:
        instance.token()
        upsert_many(
            instance, account_records("WARM", 10, typed=True)
        )  # first-request costs out of the figures
        for cost in (args.record_cost_ms, 0.0):
            instance.set_knobs(record_cost_ms=cost, reset_limits=True)
            base = 0.0
            for label, run in scenarios(instance, f"C{int(cost * 1000)}", r, n):
                seconds, counters = measure(instance, run)
                base = base or seconds
                table.append(
                    [
                        f"{cost:g} ms" if cost else "off",
                        label,
                        f"{seconds:.2f}",
                        f"{r * n / seconds:,.0f}",
                        f"{counters['execution_ms'] / 1000:.2f}",
                        counters["max_in_flight"],
                        counters["max_parallel_cost"],
                        f"{base / seconds:.2f}",
                    ]
                )
    print_table(
        f"UpsertMultiple of {r * n:,} new accounts, record cost {args.record_cost_ms:g} ms",
        [
            "record cost",
            "requests",
            "seconds",
            "records/s",
            "server s",
            "max in flight",
            "max spending cost",
            "speed-up (sequential / this)",
        ],
        table,
    )


if __name__ == "__main__":
    main()
