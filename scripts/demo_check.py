"""Prove the demo works through the REST API: DAGs present and unpaused, a scheduled customers run succeeds.

Usage (after ``make demo``)::

    .venv/bin/python scripts/demo_check.py [--url http://127.0.0.1:8080] [--timeout 900]

Logs in with the SimpleAuthManager password ``airflow standalone`` generated (read from
``var/airflow/simple_auth_manager_passwords.json.generated``), lists the d365sync DAGs, then polls
``/api/v2/dags/sync_customers/dagRuns`` until a run of type ``scheduled`` has succeeded. Customers
ships with events, so runs the webhook or ERP polling started (``asset_triggered``) appear next to
the scheduled ones; a failed customers run among the latest ten, of any kind, fails the check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"sync_customers", "sync_orders", "sync_invoices", "sync_products", "sync_inventory", "reconcile"}


def token(url: str, password_file: Path) -> str:
    password = json.loads(password_file.read_text())["admin"]
    response = requests.post(
        f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=30
    )
    response.raise_for_status()
    return response.json()["access_token"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--passwords", type=Path, default=REPO / "var/airflow/simple_auth_manager_passwords.json.generated"
    )
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {token(args.url, args.passwords)}"}
    dags = requests.get(
        f"{args.url}/api/v2/dags", params={"tags": "d365sync", "limit": 100}, headers=headers, timeout=30
    ).json()["dags"]
    listed = {d["dag_id"]: d["is_paused"] for d in dags}
    print("DAGs:", ", ".join(f"{d}{' (paused)' if p else ''}" for d, p in sorted(listed.items())))
    missing = EXPECTED - set(listed)
    if missing or any(listed[d] for d in EXPECTED):
        print(f"missing or paused: {sorted(missing) or [d for d in EXPECTED if listed[d]]}")
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        runs = requests.get(
            f"{args.url}/api/v2/dags/sync_customers/dagRuns",
            params={"order_by": "-run_after", "limit": 10},
            headers=headers,
            timeout=30,
        ).json()["dag_runs"]
        scheduled = [r for r in runs if r["run_type"] == "scheduled"]
        events = [r for r in runs if r["run_type"] == "asset_triggered"]
        print(
            "sync_customers scheduled runs:", [(r["dag_run_id"], r["state"]) for r in scheduled] or "none yet"
        )
        print("sync_customers event-started runs:", [(r["dag_run_id"], r["state"]) for r in events] or "none")
        if failed := [r["dag_run_id"] for r in runs if r["state"] == "failed"]:
            print(f"failed: {failed}")
            return 1
        if any(r["state"] == "success" for r in scheduled):
            return 0
        time.sleep(10)
    print("timed out waiting for a successful scheduled run")
    return 1


if __name__ == "__main__":
    sys.exit(main())
