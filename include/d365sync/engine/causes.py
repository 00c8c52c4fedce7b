"""The cause of a dead letter: its error text without what is particular to one record.

Why: after a first sync of real legacy data the queue holds hundreds of letters, most of them
the same few rules. An operator needs the causes with counts, and acts on a whole cause at once
(the UI's dead-letter groups). A letter stores one error text; the stages write it in a few
fixed shapes, and this module takes out the parts that differ from record to record:

* validation: ``validation: <rule>(…): <COLUMN>=<value>; <rule>(…): <COLUMN>=<value>``
  (:meth:`d365sync.engine.validation.Failure.describe`);
* transform: ``transform: record '<key>': field '<f>': rule '<r>': <message> (value <value>)``
  (:class:`d365sync.engine.transforms.TransformError`);
* anything else (load, resolve, reconcile): record keys, GUIDs and numbers of six digits or more.

The values in these texts are already masked when the letter is written; the sample kept here
is the first of them, shown beside the group as "e.g.".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
_VALUE = rf"Decimal\('[^']*'\)|datetime\.[a-z]+\([^)]*\)|{_QUOTED}|[^;()]*"
# ": CUST_EMAIL_ID='j***@e***.com'" after a validation rule (up to the next "; " or the end)
_COLUMN_VALUE = re.compile(rf"(\): [A-Za-z0-9_.\[\] ]+=)({_VALUE})(?=; |$)")
_RECORD = re.compile(rf"record (?:{_QUOTED}|\S+): ")
_VALUE_SUFFIX = re.compile(rf" \(value ({_QUOTED}|[^()]*)\)")
_GUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
_NUMBER = re.compile(r"(?<![\w.])\d{6,}(?![\w.])")  # ids and counters; not HTTP codes
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Cause:
    """``text``: the error with per-record parts replaced by ``…``; ``sample``: the first value."""

    text: str
    sample: str | None


def cause_of(error: str, record_key: str | None = None) -> Cause:
    """The cause of one letter's ``error`` (``record_key`` is taken out where it appears)."""
    text = _SPACES.sub(" ", error or "").strip()
    samples: list[str] = []

    def keep(match: re.Match[str], group: int, replacement: str) -> str:
        samples.append(match.group(group))
        return replacement

    text = _COLUMN_VALUE.sub(lambda m: keep(m, 2, m.group(1) + "…"), text)
    text = _VALUE_SUFFIX.sub(lambda m: keep(m, 1, ""), text)
    text = _RECORD.sub("", text)
    if record_key and record_key.strip() and len(record_key.strip()) > 2:
        text = text.replace(record_key.strip(), "<record>")
    text = _GUID.sub("<id>", text)
    if not text.startswith("validation:"):  # a rule's own parameters stay as they are
        text = _NUMBER.sub("<n>", text)
    return Cause(text, samples[0] if samples else None)
