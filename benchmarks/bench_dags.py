"""DAG benchmarks: parse time, Airflow overhead per entity run, and a no-change incremental run.

* parse: ``DagBag`` over ``dags/`` in a fresh interpreter (median of 3), heavy modules checked;
* overhead: the same data synced twice from identical starting points — once through
  ``dag.test()`` (9 tasks, each rebuilding clients from connections, manifests through XCom; the
  event-driven customers and orders add ``route``, and a manual run skips their fast lane) and
  once by ``run_entity`` in one process; both initial and no-change incremental runs;
* Dataverse requests of the incremental run per entity (goal: at most 2, plus token calls).

Run: ``.venv/bin/python benchmarks/bench_dags.py [--rows 1000]``; prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _dataverse import ensure_pii_key

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENTITIES = ["customers", "orders", "invoices", "products", "inventory"]
HEAVY = ("pandas", "pyarrow", "great_expectations", "msal")


def parse_time() -> tuple[float, list[str]]:
    code = (
        "import json, sys, time\nfrom airflow.dag_processing.dagbag import DagBag\n"
        f"t = time.perf_counter(); bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        f"print(json.dumps([time.perf_counter() - t, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    results = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return statistics.median(r[0] for r in results), results[0][1]


def systems(folder: Path, rows: int) -> tuple[Any, str]:

    from d365sync.sandbox.dataverse.process import DataverseSandbox

    erp = folder / "erp.db"
    shutil.copy(folder.parent / "erp-template.db", erp)
    (folder / "dv").mkdir()
    return DataverseSandbox(folder / "dv", seed=200), f"DRIVER={{SQLite3}};Database={erp};"


def airflow_runs(folder: Path, rows: int) -> list[dict[str, Any]]:
    from tests.dags.conftest import airflow_base_env
    from tests.dags.sync_env import connections_env, sqlite_backend

    sandbox, _ = systems(folder, rows)
    backend = sqlite_backend(folder)
    env = airflow_base_env(folder / "home") | connections_env(sandbox, backend)
    env["D365SYNC_STAGING_ROOT"] = f"file://{folder / 'staging'}"
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        env=env,
        check=True,
        capture_output=True,
    )
    out = []
    try:
        for label in ("initial", "incremental"):
            proc = subprocess.run(
                [sys.executable, "-m", "d365sync.airflow.runner", "--json"],
                env=env,
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            for run in json.loads(proc.stdout.strip().splitlines()[-1])["runs"]:
                out.append({"label": label, **run})
    finally:
        sandbox.stop()
    return out


def direct_runs(folder: Path, rows: int) -> list[dict[str, Any]]:
    from d365sync.airflow.dag_factory import entity_order, load_specs
    from d365sync.engine.pipeline import run_entity
    from d365sync.engine.state import StateStore
    from d365sync.erp import ErpClient

    sandbox, odbc = systems(folder, rows)
    specs = load_specs()
    out = []
    try:
        with StateStore.open(f"sqlite:///{folder / 'state.db'}") as store, ErpClient(odbc) as erp:
            for label in ("initial", "incremental"):
                for name in entity_order(specs):
                    with sandbox.client() as dv:
                        t = time.perf_counter()
                        result = run_entity(
                            specs[name], dynamics=dv, erp=erp, store=store, staging=str(folder / "staging")
                        )
                        seconds = time.perf_counter() - t
                        snap = dv.counters.snapshot()
                    out.append(
                        {
                            "label": label,
                            "entity": name,
                            "seconds": seconds,
                            "counts": result.counts,
                            "requests": int(snap["requests"]),
                            "tokens": int(snap["token_acquisitions"]),
                        }
                    )
    finally:
        sandbox.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000, help="ERP customers seeded")
    args = parser.parse_args()
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    ensure_pii_key()
    logging.disable(logging.INFO)  # the direct runs log through Airflow's handlers onto stdout
    seconds, heavy = parse_time()
    files = len(list((REPO / "dags").glob("*.py")))
    print("## DAG parse time\n\n| DAG files | DAGs | median parse (s) | heavy modules imported |")
    print(f"|---|---|---|---|\n| {files} | {len(ENTITIES) + 3} | {seconds:.3f} | {heavy or 'none'} |\n")

    from tests.dags.sync_env import seed_erp

    from d365sync.erp import ErpClient
    from d365sync.sandbox.erp.seeder import tidy

    work = Path(tempfile.mkdtemp(prefix="bench-dags-"))
    template = work / "erp-template.db"
    seed_erp(f"DRIVER={{SQLite3}};Database={template};", args.rows)
    with ErpClient(f"DRIVER={{SQLite3}};Database={template};") as client:
        tidy(client)
    (work / "a").mkdir()
    (work / "b").mkdir()
    via_airflow = airflow_runs(work / "a", args.rows)
    direct = direct_runs(work / "b", args.rows)

    print(f"## Airflow overhead per entity run ({args.rows} ERP customers, 200 sandbox accounts)\n")
    print("| run | entity | dag.test() (s) | direct run_entity (s) | overhead (s) | writes equal |")
    print("|---|---|---|---|---|---|")
    for d in direct:
        a = next(r for r in via_airflow if r["label"] == d["label"] and r["dag_id"] == f"sync_{d['entity']}")
        counts = (a.get("report") or {}).get("counts") or {}
        same = all(counts.get(k, 0) == v for k, v in d["counts"].items() if "_create" in k or "_update" in k)
        print(
            f"| {d['label']} | {d['entity']} | {a['seconds']:.2f} | {d['seconds']:.2f} "
            f"| {a['seconds'] - d['seconds']:+.2f} | {'yes' if same else 'no'} |"
        )
    print("\n## Incremental run with no changes\n")
    print(
        "| entity | dag.test() wall (s) | Dataverse requests (Airflow, staged chain) | token calls | "
        "direct wall (s) | direct requests | direct token calls |"
    )
    print("|---|---|---|---|---|---|---|")
    for d in (x for x in direct if x["label"] == "incremental"):
        a = next(
            r for r in via_airflow if r["label"] == "incremental" and r["dag_id"] == f"sync_{d['entity']}"
        )
        counts = (a.get("report") or {}).get("counts") or {}
        print(
            f"| {d['entity']} | {a['seconds']:.2f} | {counts.get('dataverse_requests')} | "
            f"{counts.get('token_requests')} | {d['seconds']:.2f} | {d['requests']} | {d['tokens']} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
