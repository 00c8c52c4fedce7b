"""Upsert 10,000 accounts by alternate key through the client, against one PATCH per record.

Figures per path: API requests used (the minimum for the bulk path is ceil(rows / 1000) plus token
calls), records/s, and time as a ratio to the baseline — the same number of new records sent as
one upsert ``PATCH accounts(accountnumber='…')`` each over a keep-alive session, in the same run.
The sandbox's request limit is raised for this run so the baseline is not throttled (against
real Dataverse 10,000 single requests would also hit the 6,000-per-5-minutes limit).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import requests

from _dataverse import account_records, api_requests, client_for, print_table, sandbox, timed


def one_patch_each(instance, rows: list[dict[str, Any]]) -> int:  # type: ignore[no-untyped-def]
    headers = instance.headers(**{"Content-Type": "application/json"})
    ok = 0
    with requests.Session() as session:
        for row in rows:
            body = {k: v for k, v in row.items() if k != "accountnumber"}
            url = f"{instance.api_url}/accounts(accountnumber='{row['accountnumber']}')"
            response = session.patch(url, data=json.dumps(body), headers=headers, verify=instance.verify)
            ok += response.status_code == 204
    return ok


def run_client(instance, rows: list[dict[str, Any]], strategy: str) -> tuple[list[Any], float, int, int]:  # type: ignore[no-untyped-def]
    instance.reset_counters()
    with client_for(instance) as client:
        outcomes, seconds = timed(
            lambda: client.upsert_many("accounts", "accountnumber", rows, strategy=strategy)
        )
        tokens = int(client.counters.snapshot()["token_acquisitions"])
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
    return outcomes, seconds, api_requests(instance), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    minimum = math.ceil(args.rows / 1000)
    table = []
    with sandbox(seed=0, limits={"requests": 10 * args.rows}) as instance:
        instance.token()
        instance.reset_counters()
        ok, base = timed(lambda: one_patch_each(instance, account_records("P", args.rows)))
        assert ok == args.rows, ok
        table.append(
            [
                "one PATCH per record (baseline)",
                api_requests(instance),
                args.rows,
                "-",
                f"{args.rows / base:,.0f}",
                "1.00",
            ]
        )
        for label, prefix, strategy in (
            ("UpsertMultiple, new records", "M", "multiple"),
            ("UpsertMultiple, same records again", "M", "multiple"),
            ("$batch of PATCHes, new records", "B", "batch"),
        ):
            _, seconds, used, tokens = run_client(instance, account_records(prefix, args.rows), strategy)
            table.append(
                [
                    f"client: {label}",
                    used,
                    minimum,
                    tokens,
                    f"{args.rows / seconds:,.0f}",
                    f"{seconds / base:.2f}",
                ]
            )
    print_table(
        f"Upserting {args.rows:,} accounts by alternate key",
        ["path", "API requests", "minimum", "token calls", "records/s", "time vs baseline"],
        table,
    )


if __name__ == "__main__":
    main()
