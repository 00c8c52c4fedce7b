"""Shared helpers of the ERP benchmarks: one private database per dialect, dropped afterwards."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyodbc

PG = "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=5432;DATABASE=test;UID=postgres;PWD=;"
MARIADB = "DRIVER={MariaDB Unicode};SERVER=127.0.0.1;PORT=3306;DATABASE=test;UID=root;PWD=;"


@contextlib.contextmanager
def target(dialect: str) -> Iterator[str]:
    """Yield an ODBC connection string to an empty, private database of ``dialect``."""
    tag = f"erp_bench_{uuid.uuid4().hex[:8]}"
    if dialect == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"DRIVER={{SQLite3}};Database={Path(tmp) / 'bench.db'};"
        return
    base = PG if dialect == "postgresql" else MARIADB
    admin = pyodbc.connect(base, autocommit=True)
    try:
        if dialect == "postgresql":
            admin.execute(f'CREATE SCHEMA "{tag}"')
            yield base + f"ConnSettings=SET search_path TO {tag};"
        else:
            admin.execute(f"CREATE DATABASE `{tag}` CHARACTER SET utf8mb4")
            yield base.replace("DATABASE=test;", f"DATABASE={tag};")
    finally:
        admin.execute(f'DROP SCHEMA "{tag}" CASCADE' if dialect == "postgresql" else f"DROP DATABASE `{tag}`")
        admin.close()
