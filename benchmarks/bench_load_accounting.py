"""Where the seconds of an initial sync's resolve + load go, thread by thread (issue 14).

``run_entity`` overlaps resolve with both loads: the main thread merges a bucket, hands its plan
to the loads (reserving the keys of its creates) and books what came back (bases, audit rows,
dead letters), while writer threads send the plan files to Dataverse. This script runs the same
100,000-customer initial sync as ``bench_throughput.py`` (same sandbox, SQLite ERP over ODBC,
SQLite state store, encrypted personal data) with timers around those steps, and prints:

* the stage timings of the run;
* per step, the seconds the main thread spent in it, and the writer threads' seconds in
  requests (two threads, so they may add up to more than the wall time);
* the main thread's share of the two stages' wall time: near 100 % means the run is bound by
  the engine's own book-keeping on one core (Python runs one thread at a time), not by Dataverse;
* per step, its wall time, the CPU time of the thread that ran it, and the difference: waiting,
  for Dataverse or for the interpreter lock while another thread holds it.

The timers wrap private functions of ``d365sync.engine.stages.load`` and public ones of the state
store; they cost microseconds per plan file, not per record.

    .venv/bin/python benchmarks/bench_load_accounting.py --rows 100000
"""

from __future__ import annotations

import argparse
import collections
import importlib
import time
from collections.abc import Callable
from typing import Any

from _dataverse import ensure_pii_key, print_table
from bench_throughput import environment

MAIN = {
    "hand over a plan file (reserve keys)": ("load", "_prepare_file"),
    "  of which reserve_keys": ("state", "StateStore.reserve_keys"),
    "book a written file": ("load", "_Tally.book"),
    "  of which save_base": ("state", "StateStore.save_base"),
    "  of which audit": ("state", "StateStore.audit"),
}
WRITERS = {"writer threads: requests to Dataverse": ("load", "_load_chunk")}
AROUND = {
    "validate and transform": ("pipeline", "validate_and_transform"),
    "resolve and both loads (all of the above)": ("pipeline", "resolve"),
    "commit (token-advance read included)": ("pipeline", "commit"),
}


class Spent:
    """Seconds per step: wall time, and CPU time of the thread that ran it. The difference is
    waiting: for Dataverse, or for the interpreter lock another thread holds."""

    def __init__(self) -> None:
        self.wall: collections.Counter[str] = collections.Counter()
        self.cpu: collections.Counter[str] = collections.Counter()

    def row(self, label: str) -> list[str]:
        wall, cpu = self.wall[label], self.cpu[label]
        return [label, f"{wall:.2f}", f"{cpu:.2f}", f"{wall - cpu:.2f}"]


def _timed(spent: Spent, label: str, module: Any, dotted: str) -> None:
    owner: Any = module
    *path, name = dotted.split(".")
    for part in path:
        owner = getattr(owner, part)
    real: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return real(*args, **kwargs)
        finally:
            spent.wall[label] += time.perf_counter() - started
            spent.cpu[label] += time.thread_time() - cpu

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="ERP customers")
    args = parser.parse_args()
    ensure_pii_key()
    modules = {
        name: importlib.import_module(f"d365sync.engine.{path}")
        for name, path in (("load", "stages.load"), ("state", "state"), ("pipeline", "pipeline"))
    }
    spent = Spent()
    for label, (module, dotted) in {**MAIN, **WRITERS, **AROUND}.items():
        _timed(spent, label, modules[module], dotted)
    with environment(args.rows, 5000) as env:
        cpu = time.thread_time()
        result, seconds, _, _ = env.run()
        cpu = time.thread_time() - cpu
    t = result.timings
    both = t["resolve"] + t["load_erp"] + t["load_dynamics"]
    main_thread = t["resolve"] + spent.wall[next(iter(MAIN))] + spent.wall["book a written file"]
    print(f"\nengine {seconds:.1f} s; stages: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    rows = [["resolve (merging, building payloads)", f"{t['resolve']:.2f}"]]
    rows += [[label, f"{spent.wall[label]:.2f}"] for label in MAIN]
    rows += [[label, f"{spent.wall[label]:.2f}"] for label in WRITERS]
    rows += [["main thread, all of the above", f"{main_thread:.2f}"]]
    rows += [["resolve + loads, wall", f"{both:.2f}"]]
    rows += [["main thread's share of that wall time", f"{main_thread / both:.0%}"]]
    print_table(f"Resolve and load of {args.rows:,} customers, by thread", ["step", "s"], rows)
    steps = [*AROUND, *MAIN, *WRITERS]
    print_table(
        "Wall time, CPU time and waiting, per step (CPU of the thread that ran it)",
        ["step", "wall s", "CPU s", "waiting s"],
        [spent.row(label) for label in steps]
        + [["the whole run, main thread", f"{seconds:.2f}", f"{cpu:.2f}", f"{seconds - cpu:.2f}"]],
    )


if __name__ == "__main__":
    main()
