"""Transport-neutral request/response objects and small OData parsing helpers.

The dispatcher works on :class:`ApiRequest`/:class:`ApiResponse` rather than on Starlette
objects so that the very same code serves a plain HTTP call and an operation inside a
``$batch`` body.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.errors import DataverseError
from d365sync.sandbox.dataverse.identity import Caller

JSON_TYPE = "application/json; odata.metadata=minimal"
API_VERSIONS = ("v9.0", "v9.1", "v9.2")
# Request limits, from the reference (§2) and the OData library Dataverse runs on.
MAX_URL_LENGTH = 32 * 1024  # a GET URL (§2)
MAX_BATCH_URL_LENGTH = 64 * 1024  # a request URL inside $batch (§2)
MAX_JSON_DEPTH = 100  # Microsoft.OData ODataMessageQuotas.MaxNestingDepth default


@dataclass
class ApiRequest:
    """One Web API operation.  ``path`` is relative to ``/api/data/<version>/``."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    caller: Caller
    base_url: str
    version: str = "v9.2"
    in_batch: bool = False
    content_ids: dict[str, Any] = field(default_factory=dict)
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    """One per HTTP request, shared by its ``$batch`` parts and bulk targets (the webhook
    context's ``CorrelationId``)."""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/data/{self.version}"

    def param(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None

    def json_body(self) -> Any:
        """The body as JSON: ``Content-Type: application/json`` only (reference §2), nested at
        most :data:`MAX_JSON_DEPTH` levels (deeper input is refused before it is parsed)."""
        if not self.body.strip():
            raise errors.bad_request("The request body is empty; a JSON object is required.")
        media = (self.header("content-type") or "").split(";", 1)[0].strip().lower()
        if media != "application/json" and (media or not self.in_batch):
            raise errors.DataverseError(
                415,
                errors.PAYLOAD_ERROR,
                f"The media type '{media or '(none)'}' is not supported; the request body must be "
                "sent with Content-Type: application/json.",
            )
        if json_depth(self.body) > MAX_JSON_DEPTH:
            raise errors.bad_request(
                f"The JSON payload is nested deeper than the maximum of {MAX_JSON_DEPTH} levels.",
                errors.PAYLOAD_ERROR,
            )
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise errors.bad_request(f"Invalid JSON in the request body: {exc}.") from exc

    def json_object(self) -> dict[str, Any]:
        body = self.json_body()
        if not isinstance(body, dict):
            raise errors.bad_request("The request body must be a JSON object.")
        return body


@dataclass
class ApiResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(body: bytes) -> int:
    """How deep ``[`` / ``{`` nest in a JSON text (brackets inside strings do not count)."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the limit: skip the scan
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub(b'""', body)):
        depth += 1 if bracket in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> ApiResponse:
    merged = {"Content-Type": JSON_TYPE, "OData-Version": "4.0", **(headers or {})}
    return ApiResponse(status, merged, json.dumps(payload, separators=(",", ":")).encode())


def empty_response(status: int, headers: dict[str, str] | None = None) -> ApiResponse:
    return ApiResponse(status, {"OData-Version": "4.0", **(headers or {})}, b"")


def error_response(error: DataverseError) -> ApiResponse:
    return json_response(error.status, error.body(), error.headers)


def parse_query(raw: str) -> list[tuple[str, str]]:
    return parse_qsl(raw, keep_blank_values=True)


def parse_prefer(values: str | None) -> dict[str, str]:
    """``Prefer`` preferences as name → value (value "" when absent); quotes respected."""
    prefs: dict[str, str] = {}
    if not values:
        return prefs
    for item in _split_outside_quotes(values, ","):
        name, _, value = item.strip().partition("=")
        if name:
            prefs[name.strip().lower()] = value.strip().strip('"')
    return prefs


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside parentheses and single-quoted literals ($expand, keys)."""
    parts: list[str] = []
    depth, quoted, start = 0, False, 0
    for index, char in enumerate(text):
        if char == "'":
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        elif not quoted and depth == 0 and char == sep:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


_SEGMENT = re.compile(r"^(?P<name>[^()]+?)(?:\((?P<key>.*)\))?$", re.DOTALL)


def split_path(path: str) -> list[str]:
    """Path segments, keeping ``/`` inside quoted key values together."""
    segments: list[str] = []
    current: list[str] = []
    quoted = False
    for char in path.strip("/"):
        if char == "'":
            quoted = not quoted
        if char == "/" and not quoted:
            segments.append("".join(current))
            current = []
        else:
            current.append(char)
    segments.append("".join(current))
    return [s for s in segments if s]


def parse_segment(segment: str) -> tuple[str, str | None]:
    """``accounts(…)`` → (``accounts``, ``…``); raises 400 on unbalanced parentheses."""
    match = _SEGMENT.match(segment)
    if match is None:
        raise errors.bad_request(f"Bad Request - Error in query syntax in segment '{segment}'.")
    return match.group("name"), match.group("key")


def parse_key_values(key: str) -> dict[str, str | int | float]:
    """``name='x',other=5`` → dict; string values have ``''`` unescaped."""
    values: dict[str, str | int | float] = {}
    for part in split_top_level(key):
        name, sep, raw = part.partition("=")
        if not sep or not name.strip():
            raise errors.bad_request(f"Bad Request - Error in query syntax in key '{key}'.")
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == "'" and raw[-1] == "'":
            values[name.strip()] = raw[1:-1].replace("''", "'")
        else:
            try:
                values[name.strip()] = int(raw)
            except ValueError:
                try:
                    values[name.strip()] = float(raw)
                except ValueError:
                    values[name.strip()] = raw
    return values
