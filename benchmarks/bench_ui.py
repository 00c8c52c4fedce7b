"""Review page with 10,000 open items: server time per page (paginated), viewer and operator.

Seeds a temporary SQLite state store with ``--items`` open review items over five entities (a
third of them e-mails and phones, so masking runs), builds the UI app and times GET requests
in-process through the ASGI stack (routing, guard, queries, Jinja2 rendering, masking; no
network). Authentication is a fixed principal here: token validation is Airflow's and is
measured by Airflow, not by this page. Baseline: the two SQL queries of a page alone (count
and slice), so the table shows what rendering adds.

    .venv/bin/python benchmarks/bench_ui.py [--items 10000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from d365sync.engine.state import ReviewItem, StateStore
from d365sync.ui import queries
from d365sync.ui.app import create_app
from d365sync.ui.auth import Principal
from d365sync.ui.settings import UiSettings

ENTITIES = ("customers", "products", "orders", "invoices", "inventory")
PREFIX = "/d365sync"


def seed(store: StateStore, n: int) -> None:
    items: dict[str, list[ReviewItem]] = {e: [] for e in ENTITIES}
    for i in range(n):
        entity = ENTITIES[i % len(ENTITIES)]
        if i % 3 == 0:
            item = ReviewItem(
                f"K{i:06d}", "emailaddress1", f"o{i}@example.com", f"d{i}@example.com", f"e{i}@x.org"
            )
        elif i % 3 == 1:
            item = ReviewItem(
                f"K{i:06d}", "telephone1", "+44 20 7946 0000", f"+44 20 7946 {i % 10000:04d}", None
            )
        else:
            item = ReviewItem(
                f"K{i:06d}", "creditlimit", Decimal(100), Decimal(i), Decimal(i + 1), "both changed"
            )
        items[entity].append(item)
    for entity, batch in items.items():
        store.open_reviews(entity, "bench", batch)


class FixedUser:
    def __init__(self, role: str) -> None:
        self.principal = Principal("bench", role, "bearer", "-")

    async def __call__(self, request: Request) -> Principal:
        return self.principal


def client_for(url: str, role: str) -> TestClient:
    app = create_app(settings=UiSettings(state_url=url), authenticator=FixedUser(role))
    outer = FastAPI()
    outer.mount(PREFIX, app)
    return TestClient(outer)


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm-up: templates compiled, store opened
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def row(label: str, ms: list[float]) -> str:
    p95 = sorted(ms)[max(0, int(len(ms) * 0.95) - 1)]
    return f"| {label} | {statistics.median(ms):.1f} | {p95:.1f} | {max(ms):.1f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'state.db'}"
        with StateStore.open(url) as store:
            seed(store, args.items)
            engine = store.engine
            size = UiSettings().page_size
            last = -(-args.items // size)
            lines = [
                f"Review queue, {args.items} open items, {size} per page ({last} pages), ms per request:",
                "",
                "| request | median | p95 | max |",
                "|---|---|---|---|",
                row(
                    "SQL only: count + page 1 (baseline)",
                    timed(lambda: queries.review_page(engine, queries.ReviewFilter(), 1, size), args.repeat),
                ),
            ]
            for role in ("viewer", "op"):
                client = client_for(url, role)
                for label, path in (
                    ("page 1", "/reviews"),
                    (f"page {last} (last)", f"/reviews?page={last}"),
                    ("entity filter, page 10", "/reviews?entity=orders&page=10"),
                ):
                    ms = timed(lambda p=path, c=client: _ok(c.get(PREFIX + p)), args.repeat)
                    lines.append(row(f"{role}: {label}", ms))
                client.close()
    print("\n".join(lines))
    return 0


def _ok(response: object) -> None:
    assert response.status_code == 200, response.status_code  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
