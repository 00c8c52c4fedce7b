"""Chunk files between pipeline stages: Parquet under one staging root.

Why one tiny helper: the stages never touch files directly, so the Airflow DAGs can swap the
local ``pathlib.Path`` root for an ``ObjectStoragePath`` (``file://``, ``abfs://``) without any
stage changing. The root only needs ``/``, ``mkdir`` and ``open`` — both types have them.

Why each row is one JSON text cell (``state.encode``) and not typed Parquet columns: extracted
rows are heterogeneous (Decimal with varying scales, aware datetimes, lists for grouped rows,
nulls everywhere) and the merge compares canonical values with ``==``; a typed schema would
have to be inferred per chunk and could change a Decimal's scale, which turns every echo into
a false change. The ``key`` column stays a real column, so files remain inspectable.
pyarrow is imported lazily: DAG files import this package at parse time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from d365sync.engine.state import decode, encode


class PathLike(Protocol):
    """What a staging root must offer (pathlib.Path and Airflow's ObjectStoragePath do)."""

    def __truediv__(self, other: str) -> PathLike: ...

    def mkdir(self, parents: bool = ..., exist_ok: bool = ...) -> None: ...

    def open(self, mode: str = ...) -> Any: ...

    @property
    def parent(self) -> PathLike: ...


class Staging:
    """Writes and reads the chunk files of one entity run under ``root/run_id/entity``."""

    def __init__(self, root: PathLike | str, run_id: str, entity: str) -> None:
        base: Any = Path(root) if isinstance(root, str) else root
        self.root = base / _safe(run_id) / entity

    def write(
        self,
        name: str,
        rows: Iterable[Mapping[str, Any]],
        tags: Callable[[Mapping[str, Any]], str] | None = None,
    ) -> str:
        """Write one chunk; returns the name to put in a manifest (relative to the run root).

        ``tags`` gives each row a short text kept in a column of its own, so a reader that needs
        only some rows (:meth:`read` with ``tag``) decodes only those.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = list(rows)
        columns = {
            "key": pa.array([_text(r.get("key")) for r in rows], pa.string()),
            "data": pa.array([encode(dict(r)) for r in rows], pa.string()),
        }
        if tags is not None:
            columns["tags"] = pa.array([tags(r) for r in rows], pa.string())
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            pq.write_table(pa.table(columns), handle, compression="zstd")
        return name

    def read(self, name: str, tag: str | None = None) -> list[dict[str, Any]]:
        """One chunk back, values exactly as written (Decimal scale, aware datetimes).

        With ``tag``: only the rows whose tags contain it (every row of a file written without
        tags), the others are never decoded.
        """
        import pyarrow.parquet as pq

        with (self.root / name).open("rb") as handle:
            table = pq.read_table(handle)
        data = table.column("data").to_pylist()
        if tag is not None and "tags" in table.column_names:
            marks = table.column("tags").to_pylist()
            return [decode(text) for text, mark in zip(data, marks, strict=True) if tag in (mark or "")]
        return [decode(text) for text in data]

    def iter(self, names: Iterable[str]) -> Iterator[list[dict[str, Any]]]:
        """Chunks in manifest order, one in memory at a time."""
        for name in names:
            yield self.read(name)

    def remove(self) -> None:
        """Drop this run's files (after commit, unless kept for debugging)."""
        import shutil

        if isinstance(self.root, Path):
            shutil.rmtree(self.root, ignore_errors=True)
        else:  # ObjectStoragePath
            self.root.rmdir(recursive=True)  # type: ignore[attr-defined]


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _safe(run_id: str) -> str:
    """Airflow run ids hold ':' and '+', which object stores and Windows dislike."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
