"""Event-driven latency (issue 13): how long a committed edit takes to reach the other system.

One run, one machine, the same data: a Dataverse sandbox with ``--accounts`` accounts and a
person (an application user of its own) who edits them, a SQLite ERP over ODBC, a SQLite sync
state store, and Airflow on LocalExecutor as four processes (``tests/airflow_local.py``), with
only ``sync_customers`` unpaused. Two passes over that data:

1. **events**: ``customers`` with its shipped ``events:`` (webhook + ERP poll; the receiver's
   webhook registered through the Web API). Measured:
   * Dataverse → ERP for ``--edits`` single edits spread over time (one every 1-5 s);
   * a burst of ``--burst`` edits in ten seconds (UpsertMultiple of ten, ten requests a second),
     each edit timed on its own, plus the time until the last one arrived;
   * ERP → Dataverse for ``--erp-edits`` ERP updates spread over time;
   * a quiet ``--quiet`` seconds afterwards: runs started, Dataverse requests, ERP writes.
2. **cron** (the baseline): ``customers`` without events on the tightest cron (``* * * * *``),
   ``--cron-edits`` Dataverse edits spread over time.

Latency = from just before the edit's request was sent (an upper bound of its commit) to the
first time a watcher, polling the other system every 0.2 s, sees the new value. Prints markdown
tables; ratios are against the cron pass of the same run.

Run: ``.venv/bin/python benchmarks/bench_event_latency.py [--edits 50 --burst 1000 --erp-edits 20]``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "include"))

DAG_ID = "sync_customers"
KEY = "bench-event-latency-webhook-key-0123456789"
WARM, COLD = "d365sync.airflow.executor.WarmLocalExecutor", "LocalExecutor"  # make demo runs WARM
BASELINE = "Dataverse → ERP, cron * * * * * (baseline)"


class Watcher:
    """Polls one system every 0.2 s for pending (key, value) pairs and stamps when each appears."""

    def __init__(self, read: Callable[[list[str]], dict[str, str | None]]) -> None:
        self._read = read
        self._pending: dict[str, tuple[str, float]] = {}
        self.latencies: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def expect(self, key: str, value: str, sent: float) -> None:
        with self._lock:
            self._pending[key] = (value, sent)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                keys = list(self._pending)
            if keys:
                seen = self._read(keys)
                now = time.monotonic()
                with self._lock:
                    for key in keys:
                        value, sent = self._pending[key]
                        if seen.get(key) == value:
                            self.latencies[f"{key}={value}"] = now - sent
                            del self._pending[key]
            self._stop.wait(0.2)

    def wait_all(self, timeout: float) -> int:
        """Until nothing is pending or ``timeout``; the number still pending."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return 0
            time.sleep(0.2)
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def stats(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)

    if not ordered:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "max": float("nan")}

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "p50": statistics.median(ordered),
        "p95": pct(95),
        "max": ordered[-1],
    }


def _in(numbers: list[str]) -> str:
    values = ",".join(f"'{n}'" for n in numbers)
    return f"Microsoft.Dynamics.CRM.In(PropertyName='accountnumber',PropertyValues=[{values}])"


@contextmanager
def data(folder: Path, accounts: int) -> Iterator[Any]:
    from tests.integration.pipeline_env import Env

    from d365sync.sandbox.dataverse.config import PERSON_USER
    from d365sync.sandbox.dataverse.process import DataverseSandbox

    (folder / "dataverse").mkdir()
    sandbox = DataverseSandbox(folder / "dataverse", seed=accounts, extra_users=[PERSON_USER])
    env = Env.create(sandbox, folder, rows=20)
    try:
        yield env
    finally:
        env.close()
        sandbox.stop()


@contextmanager
def airflow(
    env: Any, folder: Path, name: str, events: str | None, executor: str, cron: str | None = None
) -> Iterator[Any]:
    from tests.airflow_local import components, entity_files, ready_for_events, sync_settings

    home = folder / name
    home.mkdir()
    entities = entity_files(home / "entities", {"customers": events})
    extra = {
        **sync_settings(env, folder, entities, KEY),
        "AIRFLOW__CORE__EXECUTOR": executor,
        **({"D365SYNC_SCHEDULE_OVERRIDE": cron} if cron else {}),
    }
    state = (env.store, f"sqlite:///{folder / 'state.db'}")
    with components(home, state, extra) as stack:
        ready_for_events(stack, env, KEY)
        yield stack


def settle(stack: Any, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = stack.runs(DAG_ID)
        if runs and all(r["state"] in ("success", "failed") for r in runs):
            return
        time.sleep(1)
    raise TimeoutError(f"{DAG_ID} did not settle\n{stack.log_tail()}")


def watch_erp(env: Any) -> Watcher:
    def read(numbers: list[str]) -> dict[str, str | None]:
        marks = ",".join("?" * len(numbers))
        rows = env.erp_rows(
            f"SELECT CUST_NO, RTRIM(CITY) FROM CUST_MASTER WHERE CUST_NO IN ({marks})", *numbers
        )
        return {r[0].strip(): r[1] for r in rows}

    return Watcher(read)


def watch_dynamics(env: Any) -> Watcher:
    def read(numbers: list[str]) -> dict[str, str | None]:
        rows = env.dynamics_rows("accounts", ["accountnumber", "address1_city"], _in(numbers))
        return {r["accountnumber"]: r["address1_city"] for r in rows}

    return Watcher(read)


def person_edits(env: Any, numbers: list[str], tag: str, watcher: Watcher, gap: Callable[[], float]) -> None:
    from d365sync.sandbox.dataverse.config import PERSON_USER

    with env.sandbox.client_as(PERSON_USER) as person:
        for i, number in enumerate(numbers):
            city = f"{tag} {i}"
            sent = time.monotonic()
            person.upsert_many(
                "accounts",
                "accountnumber",
                [{"accountnumber": number, "address1_city": city}],
                logical_name="account",
            )
            watcher.expect(number, city, sent)
            time.sleep(gap())


def burst(env: Any, numbers: list[str], tag: str, watcher: Watcher, seconds: float = 10.0) -> float:
    from d365sync.sandbox.dataverse.config import PERSON_USER

    chunks = [numbers[i : i + 10] for i in range(0, len(numbers), 10)]
    began = time.monotonic()
    with env.sandbox.client_as(PERSON_USER) as person:
        for n, chunk in enumerate(chunks):
            sent = time.monotonic()
            rows = [{"accountnumber": k, "address1_city": f"{tag} {k[-4:]}"} for k in chunk]
            person.upsert_many("accounts", "accountnumber", rows, logical_name="account")
            for row in rows:
                watcher.expect(row["accountnumber"], row["address1_city"], sent)
            pause = began + (n + 1) * seconds / len(chunks) - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    return time.monotonic() - began


def erp_edits(env: Any, numbers: list[str], tag: str, watcher: Watcher, gap: Callable[[], float]) -> None:
    for i, number in enumerate(numbers):
        city = f"{tag} {i}"
        sent = time.monotonic()
        env.erp.execute([f"UPDATE CUST_MASTER SET CITY = '{city}' WHERE CUST_NO = '{number}'"])
        watcher.expect(number, city, sent)
        time.sleep(gap())


def measure(
    label: str, watcher: Watcher, send: Callable[[Watcher], None], timeout: float, out: dict[str, Any]
) -> None:
    """Send the edits, wait for them on the other side; figures into ``out[label]``, a note into
    ``out["notes"]``."""
    began = time.monotonic()
    send(watcher)
    sent = time.monotonic() - began
    left = watcher.wait_all(timeout)
    watcher.close()
    out[label] = stats(list(watcher.latencies.values()))
    out["notes"].append(
        f"{label}: sent in {sent:.1f} s, the last arrived {time.monotonic() - began:.1f} s after the "
        f"first was sent; not arrived: {left}"
    )


def row(label: str, figures: dict[str, float], goal: str, base: float | None) -> list[Any]:
    ratio = f"{base / figures['p50']:.1f}x faster" if base else "baseline"
    return [
        label,
        figures["n"],
        f"{figures['p50']:.1f}",
        f"{figures['p95']:.1f}",
        f"{figures['max']:.1f}",
        goal,
        ratio,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1100)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--erp-edits", type=int, default=20)
    parser.add_argument("--cron-edits", type=int, default=8)
    parser.add_argument("--quiet", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--cold", action="store_true", help="plain LocalExecutor (tasks import GX themselves)"
    )
    args = parser.parse_args()
    if args.accounts < args.edits + args.burst + args.cron_edits:
        parser.error("--accounts must cover the single edits, the burst and the cron edits")

    from benchmarks._dataverse import ensure_pii_key, print_table
    from tests.integration.pipeline_env import ENTITIES

    from d365sync.spec import load_entities

    shipped = load_entities(ENTITIES)["customers"].events
    events = json.dumps(
        {
            "dynamics": "webhook",
            "erp": "poll",
            "poll_seconds": shipped.poll_seconds,
            "inbox_poll_seconds": shipped.inbox_poll_seconds,
        }
    )
    executor = COLD if args.cold else WARM
    ensure_pii_key()  # personal data encrypted in the state store, as deployed (Airflow inherits it)
    rng = random.Random(args.seed)
    results: dict[str, Any] = {"notes": []}
    notes: list[str] = results["notes"]
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        folder = Path(tmp)
        with data(folder, args.accounts) as env:
            numbers = sorted(r["accountnumber"] for r in env.dynamics_rows("accounts", ["accountnumber"]))
            numbers = [n for n in numbers if n.startswith("ACC-")]
            singles, rest = numbers[: args.edits], numbers[args.edits :]
            bursts, crons = rest[: args.burst], rest[args.burst : args.burst + args.cron_edits]
            erp_numbers = [
                r[0].strip() for r in env.erp_rows("SELECT CUST_NO FROM CUST_MASTER ORDER BY CUST_NO")
            ]
            erp_numbers = [n for n in erp_numbers if not n.startswith("ACC-")][: args.erp_edits]

            began = time.monotonic()
            with airflow(env, folder, "events", events, executor) as stack:
                stack.unpause(DAG_ID)
                time.sleep(5)
                settle(stack)  # the first run creates every account in the ERP
                print(f"initial sync and start-up: {time.monotonic() - began:.0f} s", flush=True)

                def spread() -> float:
                    return rng.uniform(1, 5)

                measure(
                    "Dataverse → ERP, single edits",
                    watch_erp(env),
                    lambda w: person_edits(env, singles, "single", w, spread),
                    300,
                    results,
                )
                settle(stack)
                measure(
                    f"Dataverse → ERP, burst of {len(bursts)} in 10 s",
                    watch_erp(env),
                    lambda w: burst(env, bursts, "burst", w),
                    900,
                    results,
                )
                settle(stack)
                measure(
                    "ERP → Dataverse, single edits",
                    watch_dynamics(env),
                    lambda w: erp_edits(env, erp_numbers, "polled", w, spread),
                    300,
                    results,
                )
                settle(stack)

                time.sleep(10)  # the echo notifications of the last writes come back and are ignored
                settle(stack)
                runs_before = len(stack.runs(DAG_ID))
                audit_before = max((a["id"] for a in env.store.audit_log("customers", limit=1)), default=0)
                env.sandbox.reset_counters()
                time.sleep(args.quiet)
                quiet_runs = len(stack.runs(DAG_ID)) - runs_before
                quiet_requests = env.sandbox.counters().get("requests", 0)
                quiet_writes = len(
                    [a for a in env.store.audit_log("customers", limit=100) if a["id"] > audit_before]
                )
                notes.append(
                    f"quiet {args.quiet:.0f} s: {quiet_runs} runs, {quiet_requests} Dataverse requests, "
                    f"{quiet_writes} writes on either side"
                )
                failed = [r["dag_run_id"] for r in stack.runs(DAG_ID) if r["state"] != "success"]
                notes.append(f"event pass runs: {len(stack.runs(DAG_ID))}, not green: {failed}")

            with airflow(env, folder, "cron", None, executor, "* * * * *") as stack:
                stack.unpause(DAG_ID)
                time.sleep(5)
                settle(stack)
                measure(
                    BASELINE,
                    watch_erp(env),
                    lambda w: person_edits(env, crons, "cron", w, lambda: rng.uniform(5, 25)),
                    300,
                    results,
                )

    results.pop("notes")
    base = results[BASELINE]["p50"]
    goals = {"ERP → Dataverse": "p95 ≤ 15 s", "Dataverse → ERP, single": "p95 ≤ 10 s"}
    table = []
    for label, figures in results.items():
        goal = next((g for k, g in goals.items() if k in label), "—")
        table.append(row(label, figures, goal, None if "baseline" in label else base))
    print_table(
        f"Event-driven latency (s), {executor.rsplit('.', 1)[-1]}, one scheduler/triggerer/api-server",
        ["path", "edits", "p50", "p95", "max", "goal", "p50 vs cron"],
        table,
    )
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
