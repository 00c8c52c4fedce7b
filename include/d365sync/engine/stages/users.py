"""Who changed a record, by name: Dataverse user ids of review items → the users' full names.

The extract reads ``_modifiedby_value`` with every Dynamics record; only the few records parked for
review need a name, so they are looked up once per run (``systemusers``, 20 ids per request). A
name that cannot be read leaves the id: a display name never fails a run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from d365sync.engine.state import ReviewItem, chunks

log = logging.getLogger(__name__)
PER_REQUEST = 20


class UserNames:
    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    def name(self, ctx: Any, items: Sequence[ReviewItem]) -> list[ReviewItem]:
        """The items with each side's user id replaced by the user's full name."""
        wanted = {g.lower() for i in items for g in (i.changed_by or {}).values()} - set(self._names)
        client = getattr(ctx, "dynamics", None)
        if wanted and client is not None:
            try:
                for part in chunks(sorted(wanted), PER_REQUEST):
                    flt = " or ".join(f"systemuserid eq {guid}" for guid in part)
                    for row in client.iter_rows("systemusers", ["systemuserid", "fullname"], filter=flt):
                        self._names[str(row["systemuserid"]).lower()] = (
                            row.get("fullname") or row["systemuserid"]
                        )
            except Exception as exc:  # a display name must never fail a run
                log.warning("review queue: Dataverse user names not read (%s); ids kept", type(exc).__name__)
        return [
            replace(i, changed_by={s: self._names.get(g.lower(), g) for s, g in i.changed_by.items()})
            if i.changed_by
            else i
            for i in items
        ]
