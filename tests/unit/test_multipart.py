"""Tests for the OData ``$batch`` multipart codec shared by the sandbox server and the client."""

from __future__ import annotations

import json
import random

import pytest

from d365sync.dynamics.multipart import (
    BatchFormatError,
    BatchItem,
    BatchPart,
    Changeset,
    build_batch_request,
    build_batch_response,
    header,
    parse_batch_request,
    parse_batch_response,
    parse_boundary,
)

# Shaped like the "execute batch operations" example in Microsoft's docs (own text):
# a changeset creating a task and referencing it via Content-ID, then a GET outside it.
DOCS_LIKE_REQUEST = (
    b"--batch_AB12\r\n"
    b"Content-Type: multipart/mixed; boundary=changeset_CD34\r\n"
    b"\r\n"
    b"--changeset_CD34\r\n"
    b"Content-Type: application/http\r\n"
    b"Content-Transfer-Encoding:binary\r\n"
    b"Content-ID: 1\r\n"
    b"\r\n"
    b"POST https://org.example.com/api/data/v9.2/accounts HTTP/1.1\r\n"
    b"Content-Type: application/json; type=entry\r\n"
    b"\r\n"
    b'{"name":"Batch account","accountnumber":"B-1"}\r\n'
    b"--changeset_CD34\r\n"
    b"Content-Type: application/http\r\n"
    b"Content-Transfer-Encoding:binary\r\n"
    b"Content-ID: 2\r\n"
    b"\r\n"
    b"PATCH $1 HTTP/1.1\r\n"
    b"Content-Type: application/json; type=entry\r\n"
    b"\r\n"
    b'{"telephone1":"555-0100"}\r\n'
    b"--changeset_CD34--\r\n"
    b"\r\n"
    b"--batch_AB12\r\n"
    b"Content-Type: application/http\r\n"
    b"Content-Transfer-Encoding:binary\r\n"
    b"\r\n"
    b"GET /api/data/v9.2/accounts?$select=name&$filter=contains(name,'Batch') HTTP/1.1\r\n"
    b"Accept: application/json\r\n"
    b"\r\n"
    b"\r\n"
    b"--batch_AB12--\r\n"
)

DOCS_LIKE_RESPONSE = (
    b"--batchresponse_0f1e\r\n"
    b"Content-Type: multipart/mixed; boundary=changesetresponse_9a8b\r\n"
    b"\r\n"
    b"--changesetresponse_9a8b\r\n"
    b"Content-Type: application/http\r\n"
    b"Content-Transfer-Encoding: binary\r\n"
    b"Content-ID: 1\r\n"
    b"\r\n"
    b"HTTP/1.1 204 No Content\r\n"
    b"OData-Version: 4.0\r\n"
    b"Location: https://org.example.com/api/data/v9.2/accounts(11111111-0000-0000-0000-000000000001)\r\n"
    b"OData-EntityId: https://org.example.com/api/data/v9.2/accounts(11111111-0000-0000-0000-000000000001)\r\n"
    b"\r\n"
    b"\r\n"
    b"--changesetresponse_9a8b--\r\n"
    b"--batchresponse_0f1e\r\n"
    b"Content-Type: application/http\r\n"
    b"Content-Transfer-Encoding: binary\r\n"
    b"\r\n"
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json; odata.metadata=minimal; odata.streaming=true\r\n"
    b"OData-Version: 4.0\r\n"
    b"\r\n"
    b'{"value":[{"name":"Batch account"}]}\r\n'
    b"--batchresponse_0f1e--\r\n"
)


def _request_items() -> list[BatchItem]:
    return [
        Changeset(
            parts=[
                BatchPart(
                    method="POST",
                    url="/api/data/v9.2/accounts",
                    headers={"Content-Type": "application/json"},
                    body=b'{"name":"A"}',
                    content_id="1",
                ),
                BatchPart(
                    method="PATCH",
                    url="$1",
                    headers={"Content-Type": "application/json", "If-Match": "*"},
                    body=b'{"name":"B"}\r\n\r\n--not-a-boundary\n',
                    content_id="2",
                ),
            ]
        ),
        BatchPart(method="GET", url="accounts?$top=1", headers={"Accept": "application/json"}),
        BatchPart(method="DELETE", url="https://h/api/data/v9.2/accounts(1)", body=b""),
    ]


def _response_items() -> list[BatchItem]:
    return [
        Changeset(
            parts=[
                BatchPart(
                    status=204,
                    headers={"OData-EntityId": "https://h/api/data/v9.2/accounts(1)", "Location": "x"},
                    content_id="1",
                ),
                BatchPart(status=201, headers={"Content-Type": "application/json"}, body=b'{"a":1}'),
            ]
        ),
        BatchPart(status=200, headers={"Content-Type": "application/json"}, body=b'{"value":[]}'),
        BatchPart(status=404, body=json.dumps({"error": {"code": "0x80040217", "message": "m"}}).encode()),
        BatchPart(status=599, body=b"\x00\xff\r\n binary"),
    ]


def test_header_lookup_is_case_insensitive() -> None:
    headers = {"Content-Type": "application/json", "odata-entityid": "x"}
    assert header(headers, "content-type") == "application/json"
    assert header(headers, "OData-EntityId") == "x"
    assert header(headers, "Location") is None


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ('multipart/mixed; boundary="batch_1"', "batch_1"),
        ("multipart/mixed;boundary=batch_1", "batch_1"),
        ("Multipart/Mixed; charset=utf-8; BOUNDARY=batch_x-y", "batch_x-y"),
    ],
)
def test_parse_boundary_accepts_quoted_and_unquoted(content_type: str, boundary: str) -> None:
    assert parse_boundary(content_type) == boundary


def test_request_round_trip() -> None:
    items = _request_items()
    content_type, body = build_batch_request(items)
    assert content_type.startswith("multipart/mixed; boundary=batch_")
    assert b"\r\n" in body and b"\n" not in body.replace(b"\r\n", b"").replace(b"--not-a-boundary\n", b"")
    assert parse_batch_request(content_type, body) == items


def test_response_round_trip() -> None:
    items = _response_items()
    content_type, body = build_batch_response(items)
    assert content_type.startswith("multipart/mixed; boundary=batchresponse_")
    assert b"--changesetresponse_" in body
    assert b"HTTP/1.1 204 No Content\r\n" in body
    assert parse_batch_response(content_type, body) == items


def test_built_request_wire_format() -> None:
    content_type, body = build_batch_request([BatchPart(method="GET", url="accounts", content_id="7")])
    boundary = parse_boundary(content_type)
    assert (
        body
        == (
            f"--{boundary}\r\n"
            "Content-Type: application/http\r\n"
            "Content-Transfer-Encoding: binary\r\n"
            "Content-ID: 7\r\n"
            "\r\n"
            "GET accounts HTTP/1.1\r\n"
            "\r\n"
            "\r\n"
            f"--{boundary}--\r\n"
        ).encode()
    )


def test_docs_like_request() -> None:
    items = parse_batch_request('multipart/mixed; boundary="batch_AB12"', DOCS_LIKE_REQUEST)
    assert len(items) == 2
    changeset, get = items
    assert isinstance(changeset, Changeset)
    create, patch = changeset.parts
    assert (create.method, create.url, create.content_id) == (
        "POST",
        "https://org.example.com/api/data/v9.2/accounts",
        "1",
    )
    assert header(create.headers, "content-type") == "application/json; type=entry"
    assert json.loads(create.body) == {"name": "Batch account", "accountnumber": "B-1"}
    assert (patch.method, patch.url, patch.content_id) == ("PATCH", "$1", "2")
    assert json.loads(patch.body) == {"telephone1": "555-0100"}
    assert isinstance(get, BatchPart)
    assert get.method == "GET"
    assert get.url == "/api/data/v9.2/accounts?$select=name&$filter=contains(name,'Batch')"
    assert get.body == b""
    assert get.content_id is None


def test_docs_like_response() -> None:
    items = parse_batch_response("multipart/mixed; boundary=batchresponse_0f1e", DOCS_LIKE_RESPONSE)
    changeset, get = items
    assert isinstance(changeset, Changeset)
    (created,) = changeset.parts
    assert created.status == 204
    assert created.content_id == "1"
    assert (header(created.headers, "odata-entityid") or "").endswith(
        "accounts(11111111-0000-0000-0000-000000000001)"
    )
    assert created.body == b""
    assert isinstance(get, BatchPart)
    assert get.status == 200
    assert json.loads(get.body) == {"value": [{"name": "Batch account"}]}


def test_lf_only_input() -> None:
    lf_request = DOCS_LIKE_REQUEST.replace(b"\r\n", b"\n")
    crlf = parse_batch_request("multipart/mixed; boundary=batch_AB12", DOCS_LIKE_REQUEST)
    lf = parse_batch_request("multipart/mixed; boundary=batch_AB12", lf_request)
    assert lf == crlf
    lf_response = DOCS_LIKE_RESPONSE.replace(b"\r\n", b"\n")
    ct = "multipart/mixed; boundary=batchresponse_0f1e"
    assert parse_batch_response(ct, lf_response) == parse_batch_response(ct, DOCS_LIKE_RESPONSE)


def test_preamble_epilogue_transport_padding_and_content_length() -> None:
    body = (
        b"this is a preamble\r\n"
        b"--b1  \r\n"
        b"Content-Type: application/http\r\n\r\n"
        b"POST accounts HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}\r\n\r\n"
        b"--b1--\r\nepilogue"
    )
    (part,) = parse_batch_request("multipart/mixed; boundary=b1", body)
    assert isinstance(part, BatchPart)
    assert part.body == b"{}"


def test_get_inside_changeset_parses() -> None:
    content_type, body = build_batch_request([Changeset(parts=[BatchPart(method="GET", url="accounts")])])
    (changeset,) = parse_batch_request(content_type, body)
    assert isinstance(changeset, Changeset)
    assert changeset.parts[0].method == "GET"


def _wrap(inner: str, boundary: str = "b") -> bytes:
    return f"--{boundary}\r\n{inner}\r\n--{boundary}--\r\n".encode()


HTTP_PART = "Content-Type: application/http\r\n\r\n"


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("multipart/mixed", _wrap(HTTP_PART + "GET a HTTP/1.1"), "no boundary"),
        ("application/json", b"{}", "must be multipart/mixed"),
        ("", b"", "missing Content-Type"),
        (
            "multipart/mixed; boundary=b",
            b"--b\r\n" + HTTP_PART.encode() + b"GET a HTTP/1.1\r\n",
            "no closing",
        ),
        ("multipart/mixed; boundary=b", b"no delimiters here", "no delimiter"),
        ("multipart/mixed; boundary=b", b"--b--\r\n", "no parts"),
        ("multipart/mixed; boundary=b", _wrap(HTTP_PART), "part 1: missing HTTP request line"),
        ("multipart/mixed; boundary=b", _wrap(HTTP_PART + "GET a HTTP/x"), "part 1: bad request line"),
        ("multipart/mixed; boundary=b", _wrap(HTTP_PART + "HTTP/1.1 200 OK"), "part 1: bad request line"),
        ("multipart/mixed; boundary=b", _wrap("Content-Type: text/plain\r\n\r\nGET a HTTP/1.1"), "part 1"),
        ("multipart/mixed; boundary=b", _wrap(HTTP_PART + "GET a HTTP/1.1\r\nbroken header"), "malformed"),
        ("multipart/mixed; boundary=b", _wrap("Content-Type: application/http"), "part 1: no blank line"),
        ("multipart/mixed; boundary=b", _wrap(HTTP_PART + "GET a HTTP/1.1"), None),
    ],
)
def test_malformed_requests(content_type: str, body: bytes, message: str | None) -> None:
    if message is None:  # control case: the wrapper itself is well-formed
        assert len(parse_batch_request(content_type, body)) == 1
        return
    with pytest.raises(BatchFormatError, match=message):
        parse_batch_request(content_type, body)


def test_nested_changeset_is_rejected() -> None:
    inner = (
        "Content-Type: multipart/mixed; boundary=c1\r\n\r\n"
        "--c1\r\nContent-Type: multipart/mixed; boundary=c2\r\n\r\n"
        "--c2\r\n" + HTTP_PART + "GET a HTTP/1.1\r\n--c2--\r\n"
        "--c1--"
    )
    with pytest.raises(BatchFormatError, match=r"part 1\.1: changesets cannot be nested"):
        parse_batch_request("multipart/mixed; boundary=b", _wrap(inner))


def test_error_names_the_changeset_part() -> None:
    inner = (
        "Content-Type: multipart/mixed; boundary=c1\r\n\r\n"
        "--c1\r\n" + HTTP_PART + "GET a HTTP/1.1\r\n"
        "--c1\r\n" + HTTP_PART + "NOT A REQUEST\r\n--c1--"
    )
    body = (
        b"--b\r\n" + (HTTP_PART + "GET a HTTP/1.1").encode() + b"\r\n--b\r\n" + inner.encode() + b"\r\n--b--"
    )
    with pytest.raises(BatchFormatError, match=r"part 2\.2: bad request line"):
        parse_batch_request("multipart/mixed; boundary=b", body)


@pytest.mark.parametrize(
    "status_line",
    ["HTTP/1.1 20 No", "HTTP/1.1 abc OK", "HTTPS/1.1 200 OK", "GET a HTTP/1.1", "HTTP/1.1 999 Big"],
)
def test_malformed_status_lines(status_line: str) -> None:
    with pytest.raises(BatchFormatError, match=r"part 1: (bad status line|status code)"):
        parse_batch_response("multipart/mixed; boundary=b", _wrap(HTTP_PART + status_line))


@pytest.mark.parametrize(
    "part",
    [
        BatchPart(method="GET"),
        BatchPart(method="GET", url="a b"),
        BatchPart(url="x"),
        BatchPart(method="1", url="x"),
    ],
)
def test_build_request_rejects_incomplete_parts(part: BatchPart) -> None:
    with pytest.raises(BatchFormatError, match="part 1"):
        build_batch_request([part])


def test_build_response_rejects_missing_status() -> None:
    with pytest.raises(BatchFormatError, match=r"part 1\.1"):
        build_batch_response([Changeset(parts=[BatchPart(method="GET", url="x")])])


def test_fuzz_only_batch_format_error_escapes() -> None:
    rng = random.Random(1234)
    request_ct, request_body = build_batch_request(_request_items())
    response_ct, response_body = build_batch_response(_response_items())
    seeds = [
        (parse_batch_request, request_ct, request_body),
        (parse_batch_request, "multipart/mixed; boundary=batch_AB12", DOCS_LIKE_REQUEST),
        (parse_batch_response, response_ct, response_body),
        (parse_batch_response, "multipart/mixed; boundary=batchresponse_0f1e", DOCS_LIKE_RESPONSE),
    ]
    alphabet = [b"\r", b"\n", b"-", b"--", b":", b" ", b"\x00", b"\xff", b"HTTP/1.1", b"multipart/mixed"]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        parse, content_type, body = rng.choice(seeds)
        data = bytearray(body)
        mutation = rng.randrange(4)
        if mutation == 0:
            data = data[: rng.randrange(len(data) + 1)]
        elif mutation == 1:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif mutation == 2:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = rng.choice(alphabet) * rng.randint(1, 3)
        else:
            start = rng.randrange(len(data))
            del data[start : start + rng.randint(1, 40)]
        if rng.random() < 0.1:
            content_type = content_type[: rng.randrange(len(content_type) + 1)]
        try:
            parse(content_type, bytes(data))
            outcomes["ok"] += 1
        except BatchFormatError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


def test_thousand_part_batch_round_trips() -> None:
    """Correctness at $batch's 1,000-part limit; its speed is measured in benchmarks, not asserted."""
    items: list[BatchItem] = [
        BatchPart(
            method="PATCH",
            url=f"/api/data/v9.2/accounts(accountnumber='A{i:05d}')",
            headers={"Content-Type": "application/json", "If-Match": "*"},
            body=json.dumps({"name": f"Account {i}", "telephone1": "555-0100"}).encode(),
            content_id=str(i),
        )
        for i in range(1000)
    ]
    content_type, body = build_batch_request(items)
    parsed = parse_batch_request(content_type, body)
    responses: list[BatchItem] = [
        BatchPart(status=204, headers={"OData-EntityId": f"https://h/api/data/v9.2/accounts({i})"})
        for i in range(1000)
    ]
    response_ct, response_body = build_batch_response(responses)
    parsed_responses = parse_batch_response(response_ct, response_body)
    assert parsed == items
    assert parsed_responses == responses


def test_sdk_shaped_request_with_trailing_headers_and_no_body() -> None:
    """The Dataverse Python SDK ends a body-less part with ``headers CRLF`` and no blank line."""
    body = (
        b"--batch_s1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        b"DELETE https://h/api/data/v9.2/accounts(11111111-2222-3333-4444-555555555555) HTTP/1.1\r\n"
        b"If-Match: *\r\n"
        b"\r\n"
        b'--batch_s1\r\nContent-Type: multipart/mixed; boundary="changeset_c1"\r\n\r\n'
        b"--changeset_c1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        b"Content-ID: 2\r\n\r\n"
        b"PATCH $1 HTTP/1.1\r\nContent-Type: application/json; type=entry\r\nIf-Match: *\r\n\r\n"
        b'{"telephone1": "1"}\r\n'
        b"--changeset_c1--\r\n"
        b"\r\n"
        b"--batch_s1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        b"GET https://h/api/data/v9.2/accounts?$select=name&$top=2 HTTP/1.1\r\n"
        b"\r\n"
        b"--batch_s1--\r\n"
    )
    delete, changeset, get = parse_batch_request('multipart/mixed; boundary="batch_s1"', body)
    assert isinstance(delete, BatchPart) and isinstance(changeset, Changeset) and isinstance(get, BatchPart)
    assert delete.method == "DELETE"
    assert delete.headers == {"If-Match": "*"}
    assert delete.body == b""
    (patch,) = changeset.parts
    assert (patch.url, patch.content_id, patch.headers["If-Match"]) == ("$1", "2", "*")
    assert json.loads(patch.body) == {"telephone1": "1"}
    assert (get.url, get.headers, get.body) == (
        "https://h/api/data/v9.2/accounts?$select=name&$top=2",
        {},
        b"",
    )
