"""The banner after an action: a message *code* in the redirect, a fixed text on the page.

Why codes: the banner used to print ``?msg=`` / ``?error=`` verbatim, so anyone could send an
operator a link to a real page of this app saying whatever they liked ("call this number",
"choose ERP for all"). Now the query carries only a code from :data:`MESSAGES` and a few
arguments that are checked against :data:`ARGS` (integers or a fixed vocabulary); anything
else shows no banner. Details that cannot be put into a fixed text (an exception's message)
go to the log, not into the URL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from string import Formatter

CHOICES = ("dynamics", "erp", "value")
TYPES = ("int", "Decimal", "float", "bool", "datetime", "date", "dict", "list", "str")
_INT = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class Message:
    kind: str  # "msg" (ok) or "error"
    text: str


MESSAGES: dict[str, Message] = {
    "decided": Message("msg", "Review {id} decided ({choice})."),
    "bulk_decided": Message("msg", "{n} review item(s) decided ({choice})."),
    "bulk_failed": Message(
        "error", "{n} review item(s) decided ({choice}); {failed} could not be decided and stay open."
    ),
    "not_open": Message("error", "Review {id} is not open."),
    "bad_value": Message("error", "The value entered is not a valid {type}."),
    "bad_choice": Message("error", "Unknown choice: take Dynamics, ERP or an entered value."),
    "decide_failed": Message("error", "Review {id} could not be decided."),
    "nothing_selected": Message("error", "Nothing selected."),
    "replay_queued": Message("msg", "Replay of dead letter {id} queued."),
    "not_pending": Message("error", "Dead letter {id} is not pending."),
    "replay_refused": Message("error", "Airflow refused to trigger the replay DAG (HTTP {http})."),
    "replay_unreachable": Message("error", "The Airflow API could not be reached to trigger the replay."),
    "replay_unconfirmed": Message(
        "error", "Airflow did not confirm a replay run; dead letter {id} stays pending."
    ),
    "skipped": Message("msg", "Dead letter {id} skipped."),
    "group_replay_queued": Message("msg", "Replay of {n} dead letter(s) queued."),
    "group_replay_partial": Message(
        "msg", "Replay of {n} dead letter(s) queued; {rest} more in the group: replay it again for them."
    ),
    "group_skipped": Message("msg", "{n} dead letter(s) skipped."),
    "group_gone": Message("error", "No pending dead letters are left in that group."),
    "reason_required": Message("error", "A reason is required to skip a record."),
}

ARGS: dict[str, tuple[str, ...] | None] = {
    "id": None,  # None: a non-negative integer
    "n": None,
    "failed": None,
    "rest": None,
    "http": None,
    "choice": CHOICES,
    "type": TYPES,
}


def flash(code: str, **args: object) -> dict[str, str]:
    """The query parameters of a redirect that shows ``code`` (checked here, not on the page)."""
    message = MESSAGES[code]
    fields = {name for _, name, _, _ in Formatter().parse(message.text) if name}
    if fields - set(args) or set(args) - set(ARGS):
        raise ValueError(f"message {code!r} takes {sorted(fields)}, got {sorted(args)}")
    return {message.kind: code} | {k: str(v) for k, v in args.items()}


def banner(query: Mapping[str, str]) -> tuple[str, str]:
    """``(ok text, error text)`` for a page's query; unknown codes or arguments give ``""``."""
    return _render(query, "msg"), _render(query, "error")


def _render(query: Mapping[str, str], kind: str) -> str:
    message = MESSAGES.get(query.get(kind, ""))
    if message is None or message.kind != kind:
        return ""
    names = [name for _, name, _, _ in Formatter().parse(message.text) if name]
    args: dict[str, str] = {}
    for name in names:
        value = query.get(name, "")
        allowed = ARGS[name]
        if allowed is None and not _INT.fullmatch(value):
            return ""
        if allowed is not None and value not in allowed:
            return ""
        args[name] = value
    return message.text.format(**args)
