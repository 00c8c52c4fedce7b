"""Chunk files between pipeline stages: Parquet under one staging root.

Why one tiny helper: the stages never touch files directly, so the Airflow DAGs can swap the
local ``pathlib.Path`` root for an ``ObjectStoragePath`` (``file://``, ``abfs://``) without any
stage changing. The root only needs ``/``, ``mkdir`` and ``open`` — both types have them.

The file layout: one Parquet row per *group* of rows that share the same tags (a chunk written
without tags is one group), with the columns ``tags``, ``keys`` (the rows' keys, so a file stays
inspectable with any Parquet reader), ``index`` (each row's place in the chunk) and ``data``:
the group's rows pickled as one list. Why not JSON in a text cell per row, as before: rows are
heterogeneous (Decimal with varying scales, aware datetimes, lists for grouped rows, nulls
everywhere) and the merge compares canonical values with ``==``, so only an exact round trip
will do, and decoding JSON with an object hook on every value cost a third of a plan's time
(issue 14). A pickled list is exact and decodes in a few microseconds a row.

Pickle executes what it is told to build, so :func:`_loads` refuses every global but the few
value types rows hold (Decimal, date, datetime, time, timedelta, timezone): a file planted in
the staging root cannot make a reader run code. pyarrow is imported lazily: DAG files import
this package at parse time.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol


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

        ``tags`` gives each row a short text, and rows are grouped by it, so a reader that needs
        only some rows (:meth:`read` with ``tag``) decodes only those groups.
        """
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            write_groups(handle, group_rows(list(rows), tags))
        return name

    def read(self, name: str, tag: str | None = None) -> list[dict[str, Any]]:
        """One chunk back in written order, values exactly as written (Decimal scale, aware
        datetimes). With ``tag``: only the rows whose tags contain it (every row of a file
        written without tags); the other groups are never decoded."""
        with (self.root / name).open("rb") as handle:
            groups = read_groups(handle)
        wanted = [g for g in groups if tag is None or g.tags is None or tag in g.tags]
        if len(wanted) == 1:
            return wanted[0].rows()
        placed = sorted((i, row) for g in wanted for i, row in zip(g.index, g.rows(), strict=True))
        return [row for _, row in placed]

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


class Group:
    """Rows of one chunk file that share their tags; ``data`` is decoded only when asked."""

    def __init__(self, tags: str | None, keys: list[str | None], index: list[int], data: bytes) -> None:
        self.tags, self.keys, self.index, self.data = tags, keys, index, data

    @classmethod
    def of(cls, tags: str | None, placed: list[tuple[int, Mapping[str, Any]]]) -> Group:
        rows = [row if type(row) is dict else dict(row) for _, row in placed]
        keys = [_text(row.get("key")) for row in rows]
        return cls(tags, keys, [i for i, _ in placed], pickle.dumps(rows, protocol=5))

    def rows(self) -> list[dict[str, Any]]:
        return _loads(self.data)


def group_rows(
    rows: list[Mapping[str, Any]], tags: Callable[[Mapping[str, Any]], str] | None = None
) -> list[Group]:
    """Rows grouped by their tags (one group when there are none), each keeping its place."""
    if tags is None:
        return [Group.of(None, list(enumerate(rows)))]
    by_tag: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    for i, row in enumerate(rows):
        by_tag.setdefault(tags(row), []).append((i, row))
    return [Group.of(tag, placed) for tag, placed in by_tag.items()] or [Group.of("", [])]


def write_groups(handle: Any, groups: list[Group]) -> None:
    """One Parquet file of ``groups`` (an empty chunk is one empty group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "tags": pa.array([g.tags for g in groups], pa.string()),
            "keys": pa.array([g.keys for g in groups], pa.list_(pa.string())),
            "index": pa.array([g.index for g in groups], pa.list_(pa.int32())),
            "data": pa.array([g.data for g in groups], pa.binary()),
        }
    )
    # No dictionary pages or statistics: each column holds one value per group, so they would
    # only cost time (a 1M run writes thousands of small bucket files).
    pq.write_table(table, handle, compression="zstd", use_dictionary=False, write_statistics=False)


def read_groups(handle: Any) -> list[Group]:
    """The groups of one chunk file, undecoded."""
    import pyarrow.parquet as pq

    columns = pq.read_table(handle).to_pydict()
    return [
        Group(*fields)
        for fields in zip(columns["tags"], columns["keys"], columns["index"], columns["data"], strict=True)
    ]


def drop_rows(path: Any, drop: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite one chunk file without the rows ``drop`` picks; returns how many went.

    Used to erase a data subject from files a run left behind. A file that loses no row is left
    as it is; one that loses every row stays, empty, so a manifest naming it still reads.
    """
    with path.open("rb") as handle:
        groups = read_groups(handle)
    kept_groups, dropped = [], 0
    for group in groups:
        rows = group.rows()
        kept = [(i, row) for i, row in zip(group.index, rows, strict=True) if not drop(row)]
        dropped += len(rows) - len(kept)
        kept_groups.append(group if len(kept) == len(rows) else Group.of(group.tags, kept))
    if dropped:
        with path.open("wb") as handle:
            write_groups(handle, kept_groups)
    return dropped


#: The only globals a staging file may name: the value types extracted rows hold.
_ALLOWED = {
    ("decimal", "Decimal"),
    ("datetime", "date"),
    ("datetime", "datetime"),
    ("datetime", "time"),
    ("datetime", "timedelta"),
    ("datetime", "timezone"),
}


class _RowUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"staging file names {module}.{name}: only plain containers and the row value types "
                "(Decimal, date, datetime, time, timedelta, timezone) may load"
            )
        return super().find_class(module, name)


def _loads(data: bytes) -> Any:
    return _RowUnpickler(io.BytesIO(data)).load()


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _safe(run_id: str) -> str:
    """Airflow run ids hold ':' and '+', which object stores and Windows dislike."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
