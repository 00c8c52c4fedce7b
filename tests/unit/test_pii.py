"""Issue 11, finding 4: the one masking module finds e-mails, phones and credentials inside any text.

Error texts, XCom, task logs, CLI output, alerts, Data Docs and the UI's viewer pages all go
through :mod:`d365sync.engine.pii`; these cases are the shapes that used to slip through: quoted
local parts, addresses and phones inside longer text, and credential fragments.
"""

from __future__ import annotations

import pytest

from d365sync.engine.pii import mask_any, mask_text, redact_secrets


@pytest.mark.parametrize(
    ("text", "leak", "shown"),
    [
        ('"john doe"@example.com', "john doe", "j***@e***.com"),
        ("value \"'a.b'@x.org\"", "a.b'@x.org", "a***@x***.org"),
        ("(value '\"q.bert\"@example.org')", "q.bert", "q***@e***.org"),
        ("Anna <anna.smith@example.com>, call back", "anna.smith@example.com", "a***@e***.com"),
        ("mail o'brien@example.ie now", "o'brien@example.ie", "o***@e***.ie"),
        ("x john.smith+tag@mail.example.co.uk.", "john.smith+tag", "j***@m***.uk."),
        ("ola.nordmann@exa_mple.com", "ola.nordmann@exa_mple.com", "o***@e***.com"),
    ],
)
def test_emails_inside_text_are_masked(text: str, leak: str, shown: str) -> None:
    masked = mask_text(text)
    assert leak not in masked and shown in masked, masked


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("call +44 20 7946 0958 today", "7946 0958"),
        ("Call +44 (0)20 7946 0222 ext. 999", "7946 0222"),
        ("0044 20 7946 0958", "7946 0958"),
        ("Berlin 030 1234567", "1234567"),
        ("(030) 123-4567", "123-4567"),
        ("us 555-123-4567", "123-4567"),
        ("dv +1-555-0042", "555-0042"),
    ],
)
def test_phones_inside_text_are_masked(text: str, leak: str) -> None:
    masked = mask_text(text)
    assert leak not in masked and "***" in masked, masked


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("DRIVER={SQLite3};UID=erp;PWD=hunter2;", "hunter2"),
        ("PWD={hun;ter2}};x};SERVER=db", "ter2"),
        ("login failed, Password: s3cr3t-Pw", "s3cr3t-Pw"),
        ("password=x9Zq&user=ada", "x9Zq"),
        ('{"client_secret": "abc def"}', "abc def"),
        ("{'client_secret': 'cs-123'}", "cs-123"),
        ("token=t0k3n-value", "t0k3n-value"),
        ("access_token: eyJhbGciOi.x.y", "eyJhbGciOi"),
        (
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFy==;EndpointSuffix=x",
            "Zm9vYmFy",
        ),
        (
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey=abc123=",
            "abc123",
        ),
        ("https://blob/c?sv=2024&sig=s1gN4ture%3D", "s1gN4ture"),
        ("https://user:pa55w0rd@org.crm.dynamics.com/api", "pa55w0rd"),
        ("postgresql://sync:pa55w0rd@db:5432/state", "pa55w0rd"),
        ("connect admin:pa55w0rd@localhost failed", "pa55w0rd"),
        ("Authorization: Bearer eyJabc.def", "eyJabc"),
        # case-insensitive matching folds the Kelvin sign to "k" and the long s to "s": such
        # texts must not skip a pattern because their lower case lacks its words
        ("login failed: Account\u212aey=Zm9vYmFy; retry", "Zm9vYmFy"),
        ("Authorization: Ba\u017fic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ],
)
def test_credential_fragments_are_redacted(text: str, secret: str) -> None:
    assert secret not in redact_secrets(text)
    assert secret not in mask_text(text)


@pytest.mark.parametrize(
    "text",
    [
        "record 'C000000042': field 'credit_limit': rule 'decimal': not a number (value 'N/A')",
        "CUST_MASTER key=C000000042 column INV_DATE: month must be in 1..12 (value '20231399')",
        "stale: dynamics modified 2024-05-01 10:00:00+00:00 is older than 2024-05-01T10:00:00+00:00",
        "01.05.2024 10:00, 2024/05/01, host 192.168.100.20, 10.0.0.1:5432",
        "ACC-000042 S000001234 ITM000000012 guid=3f2a1b9c-1234-5678-9abc-def012345678",
        "1 of 30 rows invalid (3.33%, threshold 15.00%); amount 1234567.89",
        r"expect_column_values_to_match_regex(column=CUST_EMAIL_ID, regex='^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$')",
        "load/erp/b00001.parquet file:///tmp/staging/sync_customers/manual__2024-05-01T10:00:00+00:00",
    ],
)
def test_keys_fields_rules_dates_and_amounts_stay_readable(text: str) -> None:
    assert mask_text(text) == text


def test_masking_is_idempotent() -> None:
    text = 'mail "john doe"@example.com, +44 20 7946 0958, PWD=x; https://u:p@h.example.com/'
    once = mask_text(text)
    assert mask_text(once) == once


def test_mask_any_masks_by_field_name_by_shape_and_inside_text() -> None:
    row = {"emailaddress1": "not-an-address", "phone": "12", "name": "Call +44 20 7946 0958", "n": 7}
    assert mask_any("", row) == {
        "emailaddress1": "***",
        "phone": "***",
        "name": "Call +44 *** *** 58",
        "n": 7,
    }
    assert mask_any("note", "4420794609") == "*** *** 09"  # phone-shaped whole value
    assert mask_any("note", "4420794609", by_shape=False) == "4420794609"  # a bare number in an error text
    assert mask_any("items", ("a@b.example.com", None)) == ["a***@b***.com", None]
