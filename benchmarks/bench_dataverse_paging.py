"""Page every account of a 100k-row sandbox through the client.

Figures: records/s, API requests used against the minimum ceil(rows / 5000), and the client's
time as a ratio to a bare ``requests`` loop following ``@odata.nextLink`` in the same run (the
baseline: no retries, no limiter, no token cache — just the HTTP a client cannot avoid).
"""

from __future__ import annotations

import argparse
import math

import requests

from _dataverse import api_requests, client_for, print_table, sandbox, timed

SELECT = ["accountid", "name", "accountnumber", "emailaddress1", "modifiedon"]


def raw_paging(instance, page_size: int) -> int:  # type: ignore[no-untyped-def]
    headers = instance.headers(Prefer=f"odata.maxpagesize={page_size}")
    url: str | None = f"{instance.api_url}/accounts?$select={','.join(SELECT)}"
    rows = 0
    with requests.Session() as session:
        while url:
            body = session.get(url, headers=headers, verify=instance.verify, timeout=120).json()
            rows += len(body["value"])
            url = body.get("@odata.nextLink")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=5000)
    args = parser.parse_args()
    minimum = math.ceil(args.rows / args.page_size)
    with sandbox(seed=args.rows) as instance:
        instance.token()
        instance.reset_counters()
        raw_rows, raw_seconds = timed(lambda: raw_paging(instance, args.page_size))
        raw_requests = api_requests(instance)
        instance.reset_counters()
        with client_for(instance, page_size=args.page_size) as client:
            rows, seconds = timed(lambda: sum(1 for _ in client.iter_rows("accounts", SELECT)))
            client_counters = client.counters.snapshot()
        used = api_requests(instance)
    assert rows == raw_rows == args.rows, (rows, raw_rows, args.rows)
    print_table(
        f"Paging {args.rows:,} accounts (page size {args.page_size})",
        ["reader", "rows", "seconds", "records/s", "API requests", "minimum", "time vs baseline"],
        [
            [
                "bare requests loop (baseline)",
                raw_rows,
                f"{raw_seconds:.2f}",
                f"{raw_rows / raw_seconds:,.0f}",
                raw_requests,
                minimum,
                "1.00",
            ],
            [
                "DynamicsClient.iter_rows",
                rows,
                f"{seconds:.2f}",
                f"{rows / seconds:,.0f}",
                used,
                minimum,
                f"{seconds / raw_seconds:.2f}",
            ],
        ],
    )
    print(f"\nclient counters: {client_counters}")


if __name__ == "__main__":
    main()
