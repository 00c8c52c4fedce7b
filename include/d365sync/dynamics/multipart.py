"""OData ``$batch`` multipart codec (``multipart/mixed`` with ``application/http`` parts).

Used on both sides of the wire: the Dataverse sandbox parses batch requests and builds batch
responses, the client builds requests and parses responses. It is deliberately stdlib-only and
does not use the ``email`` package: that parser normalises line endings, guesses charsets and
tolerates garbage silently, whereas a batch codec must keep bodies byte-exact and must reject
malformed input with a precise message (always :class:`BatchFormatError`, never anything else).

Wire format (see ``dataverse-web-api.md`` §5)::

    --batch_<id>
    Content-Type: application/http
    Content-Transfer-Encoding: binary
    Content-ID: 1                     (optional MIME part header)

    PATCH /api/data/v9.2/accounts(...) HTTP/1.1      (or "HTTP/1.1 204 No Content")
    Content-Type: application/json

    {"name": "x"}
    --batch_<id>
    Content-Type: multipart/mixed; boundary=changeset_<id>

    --changeset_<id>
    ...
    --changeset_<id>--
    --batch_<id>--

Input may use CRLF or bare LF line endings; output always uses CRLF. Per RFC 2046 the line
break before a delimiter belongs to the delimiter, so bodies round-trip exactly.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

__all__ = [
    "BatchFormatError",
    "BatchItem",
    "BatchPart",
    "Changeset",
    "build_batch_request",
    "build_batch_response",
    "header",
    "parse_batch_request",
    "parse_batch_response",
    "parse_boundary",
]

CRLF = b"\r\n"
_HTTP_VERSION = re.compile(r"HTTP/\d\.\d\Z")
_METHOD = re.compile(r"[A-Za-z]+\Z")
_STATUS_LINE = re.compile(r"(HTTP/\d\.\d) (\d{3})(?: (.*))?\Z")
# End of a header block: an empty line, or the end of the data right after a header line
# (writers such as the Dataverse Python SDK end a body-less part with "headers CRLF" only).
_BLANK_LINE = re.compile(rb"(?:\A|\r?\n)(?:\r?\n|\Z)")
_LINE_BREAK = re.compile(rb"\r?\n")
_BOUNDARY_CHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]\Z")


class BatchFormatError(ValueError):
    """A ``$batch`` payload or Content-Type is malformed; the message names the part."""


@dataclass
class BatchPart:
    """One HTTP request (method/url set) or response (status set) inside a batch."""

    method: str | None = None
    url: str | None = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_id: str | None = None


@dataclass
class Changeset:
    """An atomic group of requests (or their responses) sharing one nested boundary."""

    parts: list[BatchPart] = field(default_factory=list)


BatchItem = BatchPart | Changeset


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup: HTTP header names are case-insensitive, dicts are not."""
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def parse_batch_request(content_type: str, body: bytes) -> list[BatchItem]:
    """Parse a ``$batch`` request body into request parts and changesets."""
    return _parse_batch(content_type, body, expect_request=True)


def parse_batch_response(content_type: str, body: bytes) -> list[BatchItem]:
    """Parse a ``$batch`` response body into response parts and changeset responses."""
    return _parse_batch(content_type, body, expect_request=False)


def parse_boundary(content_type: str) -> str:
    """Return the boundary of a ``multipart/mixed`` Content-Type (quoted or unquoted)."""
    if not isinstance(content_type, str) or not content_type.strip():
        raise BatchFormatError("missing Content-Type; expected multipart/mixed with a boundary")
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != "multipart/mixed":
        raise BatchFormatError(f"Content-Type must be multipart/mixed, got {media_type.strip()!r}")
    boundary = _content_type_params(params).get("boundary")
    if boundary is None:
        raise BatchFormatError(f"Content-Type {content_type!r} has no boundary parameter")
    if not _BOUNDARY_CHARS.match(boundary):
        raise BatchFormatError(f"invalid multipart boundary {boundary!r}")
    return boundary


def _content_type_params(params: str) -> dict[str, str]:
    """Parse ``; key=value; key="quoted value"`` parameters (keys lower-cased)."""
    result: dict[str, str] = {}
    for match in re.finditer(r'\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', params):
        key, value = match.group(1).lower(), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        result.setdefault(key, value)
    return result


def _parse_batch(content_type: str, body: bytes, *, expect_request: bool) -> list[BatchItem]:
    if not isinstance(body, bytes | bytearray | memoryview):
        raise BatchFormatError(f"batch body must be bytes, got {type(body).__name__}")
    boundary = parse_boundary(content_type)
    items: list[BatchItem] = []
    for index, raw in enumerate(_split_multipart(bytes(body), boundary, "batch"), start=1):
        items.append(_parse_item(raw, str(index), expect_request=expect_request, nested=False))
    return items


def _split_multipart(body: bytes, boundary: str, what: str) -> list[bytes]:
    """Split a multipart body into raw parts (preamble and epilogue are discarded)."""
    delimiter = re.compile(
        rb"(?:\A|\r?\n)--" + re.escape(boundary.encode("ascii")) + rb"(?:(--)|[ \t]*(?:\r?\n|\Z))"
    )
    parts: list[bytes] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):
            if start is None:
                raise BatchFormatError(f"{what} has a closing delimiter but no parts")
            return parts
        start = match.end()
    if start is None:
        raise BatchFormatError(f"{what} body contains no delimiter line '--{boundary}'")
    raise BatchFormatError(f"{what} has no closing delimiter '--{boundary}--'")


def _parse_item(raw: bytes, where: str, *, expect_request: bool, nested: bool) -> BatchItem:
    mime_headers, content = _split_head(raw, f"part {where}", "MIME headers")
    content_type = header(mime_headers, "Content-Type")
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type == "multipart/mixed":
        if nested:
            raise BatchFormatError(f"part {where}: changesets cannot be nested inside a changeset")
        return _parse_changeset(content_type or "", content, where, expect_request=expect_request)
    if media_type != "application/http":
        raise BatchFormatError(
            f"part {where}: Content-Type must be application/http or multipart/mixed, got {content_type!r}"
        )
    encoding = header(mime_headers, "Content-Transfer-Encoding")
    if encoding is not None and encoding.strip().lower() not in {"binary", "8bit", "7bit"}:
        raise BatchFormatError(f"part {where}: unsupported Content-Transfer-Encoding {encoding!r}")
    part = _parse_http_message(content, where, expect_request=expect_request)
    part.content_id = header(mime_headers, "Content-ID") or header(part.headers, "Content-ID")
    return part


def _parse_changeset(content_type: str, content: bytes, where: str, *, expect_request: bool) -> Changeset:
    try:
        boundary = parse_boundary(content_type)
    except BatchFormatError as exc:
        raise BatchFormatError(f"part {where}: changeset {exc}") from None
    raw_parts = _split_multipart(content, boundary, f"part {where} (changeset)")
    parts: list[BatchPart] = []
    for index, raw in enumerate(raw_parts, start=1):
        item = _parse_item(raw, f"{where}.{index}", expect_request=expect_request, nested=True)
        assert isinstance(item, BatchPart)  # nested changesets raise above
        parts.append(item)
    return Changeset(parts=parts)


def _parse_http_message(content: bytes, where: str, *, expect_request: bool) -> BatchPart:
    """Parse the embedded ``request-line / status-line, headers, blank line, body``."""
    first_break = _LINE_BREAK.search(content)
    first_line_bytes = content[: first_break.start()] if first_break else content
    rest = content[first_break.end() :] if first_break else b""
    first_line = _decode(first_line_bytes).strip()
    if not first_line:
        kind = "request line" if expect_request else "status line"
        raise BatchFormatError(f"part {where}: missing HTTP {kind}")
    headers, body = _split_head(rest, f"part {where}", "HTTP headers", body_optional=True)
    part = BatchPart(headers=headers, body=_trim_body(body, headers))
    if expect_request:
        part.method, part.url = _parse_request_line(first_line, where)
    else:
        part.status = _parse_status_line(first_line, where)
    return part


def _parse_request_line(line: str, where: str) -> tuple[str, str]:
    pieces = line.split()
    if len(pieces) < 3 or not _HTTP_VERSION.match(pieces[-1]) or not _METHOD.match(pieces[0]):
        raise BatchFormatError(
            f"part {where}: bad request line {line[:200]!r}; expected 'METHOD URL HTTP/1.1'"
        )
    return pieces[0].upper(), " ".join(pieces[1:-1])


def _parse_status_line(line: str, where: str) -> int:
    match = _STATUS_LINE.match(line)
    if match is None:
        raise BatchFormatError(
            f"part {where}: bad status line {line[:200]!r}; expected 'HTTP/1.1 <code> <reason>'"
        )
    status = int(match.group(2))
    if not 100 <= status <= 599:
        raise BatchFormatError(f"part {where}: status code {status} out of range")
    return status


def _split_head(
    data: bytes, where: str, what: str, *, body_optional: bool = False
) -> tuple[dict[str, str], bytes]:
    """Split ``headers CRLF CRLF body``; headers may be empty (data starts with a blank line)."""
    match = _BLANK_LINE.search(data)
    if match is None:
        if not body_optional:
            raise BatchFormatError(f"{where}: no blank line after {what}")
        head, body = data, b""
    else:
        head, body = data[: match.start()], data[match.end() :]
    return _parse_header_lines(head, where), body


def _parse_header_lines(head: bytes, where: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for text in re.split(r"\r?\n", _decode(head)) if head else []:
        if text[:1] in (" ", "\t") and last is not None:  # obsolete line folding
            headers[last] = f"{headers[last]} {text.strip()}"
            continue
        name, colon, value = text.partition(":")
        name = name.strip()
        if not colon or not name or " " in name:
            raise BatchFormatError(f"{where}: malformed header line {text[:200]!r}")
        existing = next((key for key in headers if key.lower() == name.lower()), None)
        if existing is None:
            headers[name] = value.strip()
            last = name
        else:
            headers[existing] = f"{headers[existing]}, {value.strip()}"
            last = existing
    return headers


def _trim_body(body: bytes, headers: Mapping[str, str]) -> bytes:
    """Drop padding line breaks writers add after a body (or instead of an empty body)."""
    length = header(headers, "Content-Length")
    if length is not None and length.strip().isdigit():
        size = int(length)
        if size <= len(body) and not body[size:].strip():
            return body[:size]
    if not body.strip(b"\r\n"):
        return b""
    return body


def _decode(data: bytes) -> str:
    """Headers and request lines are UTF-8 in practice; fall back to Latin-1 (never fails)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_batch_request(items: list[BatchItem]) -> tuple[str, bytes]:
    """Build a ``$batch`` request; returns ``(Content-Type header value, body)``."""
    return _build_batch(items, "batch", "changeset", request=True)


def build_batch_response(items: list[BatchItem]) -> tuple[str, bytes]:
    """Build a ``$batch`` response; returns ``(Content-Type header value, body)``."""
    return _build_batch(items, "batchresponse", "changesetresponse", request=False)


def _build_batch(
    items: list[BatchItem], prefix: str, changeset_prefix: str, *, request: bool
) -> tuple[str, bytes]:
    boundary = _new_boundary(prefix, _all_bodies(items))
    chunks: list[bytes] = []
    for index, item in enumerate(items, start=1):
        chunks.append(b"--" + boundary.encode("ascii") + CRLF)
        if isinstance(item, Changeset):
            chunks.append(_build_changeset(item, changeset_prefix, str(index), request=request))
        elif isinstance(item, BatchPart):
            chunks.append(_build_part(item, str(index), request=request))
        else:
            raise BatchFormatError(
                f"part {index}: expected BatchPart or Changeset, got {type(item).__name__}"
            )
        chunks.append(CRLF)
    chunks.append(b"--" + boundary.encode("ascii") + b"--" + CRLF)
    return f"multipart/mixed; boundary={boundary}", b"".join(chunks)


def _build_changeset(changeset: Changeset, prefix: str, where: str, *, request: bool) -> bytes:
    boundary = _new_boundary(prefix, [part.body for part in changeset.parts])
    delimiter = b"--" + boundary.encode("ascii")
    chunks = [b"Content-Type: multipart/mixed; boundary=" + boundary.encode("ascii") + CRLF + CRLF]
    for index, part in enumerate(changeset.parts, start=1):
        if not isinstance(part, BatchPart):
            raise BatchFormatError(f"part {where}.{index}: changesets hold only BatchPart items")
        chunks.extend((delimiter, CRLF, _build_part(part, f"{where}.{index}", request=request), CRLF))
    chunks.extend((delimiter, b"--"))
    return b"".join(chunks)


def _build_part(part: BatchPart, where: str, *, request: bool) -> bytes:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if part.content_id is not None:
        lines.append(f"Content-ID: {part.content_id}")
    lines.extend(("", _start_line(part, where, request=request)))
    for name, value in part.headers.items():
        if part.content_id is None or name.lower() != "content-id":  # written once, as MIME header
            lines.append(f"{name}: {value}")
    head = "\r\n".join(lines).encode("utf-8")
    return head + CRLF + CRLF + bytes(part.body)


def _start_line(part: BatchPart, where: str, *, request: bool) -> str:
    if request:
        if (
            not part.method
            or not part.url
            or not _METHOD.match(part.method)
            or any(ch.isspace() for ch in part.url)
        ):
            raise BatchFormatError(f"part {where}: request needs a method and a URL without spaces")
        return f"{part.method.upper()} {part.url} HTTP/1.1"
    if part.status is None or not 100 <= part.status <= 599:
        raise BatchFormatError(f"part {where}: response needs a status code 100-599")
    try:
        reason = HTTPStatus(part.status).phrase
    except ValueError:
        reason = ""
    return f"HTTP/1.1 {part.status} {reason}".rstrip()


def _all_bodies(items: list[BatchItem]) -> list[bytes]:
    bodies: list[bytes] = []
    for item in items:
        if isinstance(item, Changeset):
            bodies.extend(part.body for part in item.parts if isinstance(part, BatchPart))
        elif isinstance(item, BatchPart):
            bodies.append(item.body)
    return bodies


def _new_boundary(prefix: str, bodies: list[bytes]) -> str:
    """A random boundary that provably does not occur in any body."""
    while True:
        boundary = f"{prefix}_{uuid.uuid4()}"
        marker = boundary.encode("ascii")
        if not any(marker in bytes(body) for body in bodies):
            return boundary
