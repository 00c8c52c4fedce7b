"""The RemoteExecutionContext parser (the receiver's HTTP tests cover the shapes end to end)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from d365sync.dynamics.notifications import NotificationError, parse_ms_date, parse_notification

RECORD = "6f9619ff-8b86-d011-b42d-00c04fc964ff"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/Date(1506409448000)/", datetime(2017, 9, 26, 7, 4, 8, tzinfo=UTC)),
        ("/Date(1506409448000-0700)/", datetime(2017, 9, 26, 7, 4, 8, tzinfo=UTC)),
        ("/Date(1506409448123+0530)/", datetime(2017, 9, 26, 7, 4, 8, 123000, tzinfo=UTC)),
        ("/Date(-86400000)/", datetime(1969, 12, 31, tzinfo=UTC)),
        ("2017-09-26T00:04:08-07:00", datetime(2017, 9, 26, 7, 4, 8, tzinfo=UTC)),
        ("2017-09-26T07:04:08", datetime(2017, 9, 26, 7, 4, 8, tzinfo=UTC)),
    ],
)
def test_ms_dates_are_utc_milliseconds_whatever_the_offset(text: str, expected: datetime) -> None:
    assert parse_ms_date(text) == expected


def body(**fields: object) -> bytes:
    context = {"MessageName": "Update", "PrimaryEntityName": "Account", "PrimaryEntityId": RECORD.upper()}
    return json.dumps(context | fields).encode()


def test_dedupe_key_is_the_operation_or_else_the_body() -> None:
    raw = body(OperationId="{11111111-2222-3333-4444-555555555555}")
    note = parse_notification(raw)
    assert (note.table, note.record_id) == ("account", RECORD)
    assert note.dedupe_key(raw) == f"op:11111111-2222-3333-4444-555555555555:{RECORD}:Update"
    nil = body(OperationId="00000000-0000-0000-0000-000000000000")
    assert parse_notification(nil).operation_id is None
    assert parse_notification(nil).dedupe_key(nil).startswith("sha256:")
    assert parse_notification(nil).dedupe_key(nil) != parse_notification(body()).dedupe_key(body())


def test_target_attributes_are_names_only_and_unknown_when_absent() -> None:
    pairs = [
        {"key": "Name", "value": "Contoso"},
        {"key": "name", "value": "x"},
        {"key": "revenue", "value": 1},
    ]
    target = [{"key": "Target", "value": {"Attributes": pairs}}]
    assert parse_notification(body(InputParameters=target)).attributes == ("name", "revenue")
    assert parse_notification(body()).attributes is None
    assert parse_notification(body(InputParameters=[])).attributes is None
    assert parse_notification(body(MessageName="Delete", InputParameters=target)).attributes == ()


def test_a_utf8_byte_order_mark_is_fine_and_a_bool_is_no_depth() -> None:
    assert parse_notification(b"\xef\xbb\xbf" + body(Depth=2)).depth == 2
    with pytest.raises(NotificationError, match="Depth"):
        parse_notification(body(Depth=True))
