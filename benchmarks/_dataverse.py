"""Shared set-up for the Dataverse benchmarks: a private sandbox and a client pointed at it."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from d365sync.dynamics import DynamicsClient
from d365sync.sandbox.dataverse.process import DataverseSandbox

T = TypeVar("T")


@contextmanager
def sandbox(seed: int, **options: Any) -> Iterator[DataverseSandbox]:
    """A sandbox in a throw-away directory, stopped (by pid) on exit."""
    with tempfile.TemporaryDirectory(prefix="d365sync-bench-") as folder:
        instance = DataverseSandbox(Path(folder), seed=seed, **options)
        try:
            yield instance
        finally:
            instance.stop()


def client_for(instance: DataverseSandbox, **overrides: Any) -> DynamicsClient:
    return instance.client(**overrides)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def api_requests(instance: DataverseSandbox) -> int:
    """Requests the sandbox served outside the identity endpoints."""
    counters = instance.counters()
    return int(counters["requests"])


@dataclass
class Cpu:
    """CPU seconds spent during a timed step: this process (all threads), its calling thread,
    and the sandbox server process (read from ``/proc``, so Linux only)."""

    process: float = 0.0
    thread: float = 0.0
    sandbox: float = 0.0


@contextmanager
def cpu_spent(instance: DataverseSandbox) -> Iterator[Cpu]:
    """Measure the CPU a step costs on each side: the engine (or client) and the sandbox."""
    spent = Cpu()
    started = (time.process_time(), time.thread_time(), _process_cpu(instance.pid))
    try:
        yield spent
    finally:
        spent.process = time.process_time() - started[0]
        spent.thread = time.thread_time() - started[1]
        spent.sandbox = _process_cpu(instance.pid) - started[2]


def _process_cpu(pid: int | None) -> float:
    """User plus system CPU seconds of a process so far (0 when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def append_ratio(rows: list[list[Any]], column: int, *, speed_up: bool = False) -> None:
    """Append to each row its ``column`` against the first row's: time / baseline time, or with
    ``speed_up`` baseline time / time (ratios measured in the same run)."""
    base = float(rows[0][column])
    for row in rows:
        value = float(row[column])
        row.append(f"{(base / value if speed_up else value / base):.2f}")


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def ensure_pii_key() -> None:
    """Benchmarks run with personal data encrypted, as a deployment does (a fresh key per run)."""
    from cryptography.fernet import Fernet

    from d365sync.engine.privacy import KEYS_ENV

    os.environ.setdefault(KEYS_ENV, Fernet.generate_key().decode())


def account_records(prefix: str, count: int, *, typed: bool = False) -> list[dict[str, Any]]:
    """``count`` accounts keyed ``<prefix>-000000…``; ``typed`` adds the ``@odata.type`` that
    bulk-action targets carry."""
    kind = {"@odata.type": "Microsoft.Dynamics.CRM.account"} if typed else {}
    return [
        {
            **kind,
            "accountnumber": f"{prefix}-{i:06d}",
            "name": f"Bench {prefix} {i}",
            "emailaddress1": f"bench{i}@example.com",
            "address1_city": "Lyon",
            "creditlimit": 1000 + i % 50,
        }
        for i in range(count)
    ]
