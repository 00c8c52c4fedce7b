"""Dataverse-shaped errors.

Every failure the sandbox reports travels as :class:`DataverseError` so that all routes, the
``$batch`` handler and the bulk actions render the same ``{"error":{"code","message"}}`` body
that real Dataverse clients parse.  Codes come from the reference (§6, §7); where Dataverse
documents no code we reuse the closest documented one.
"""

from __future__ import annotations

# Codes from the web service error-code reference.
OBJECT_DOES_NOT_EXIST = "0x80040217"
DUPLICATE_RECORD = "0x80040237"
DUPLICATE_RECORD_ENTITY_KEY = "0x80060892"
CONCURRENCY_VERSION_MISMATCH = "0x80060882"
VALIDATION = "0x80044331"
OPTION_OUT_OF_RANGE = "0x8004431a"
REQUIRED_MISSING = "0x80040203"
INVALID_ARGUMENT = "0x80040203"  # the same code: "Invalid argument." (e.g. a condition's values)
QUERY_BUILDER_NO_ATTRIBUTE = "0x80041103"  # a query names an attribute the table lacks
ODATA_BAD_REQUEST = "0x80060888"
RESOURCE_NOT_FOUND = "0x8006088a"
PAYLOAD_ERROR = "0x80048d19"
CHANGE_TRACKING_EXPIRED = "0x80044352"
CHANGE_TRACKING_NOT_ENABLED = "0x80072491"
REQUEST_LIMIT = "0x80072322"
EXECUTION_TIME_LIMIT = "0x80072321"
CONCURRENCY_LIMIT = "0x80072326"
AUTH_FAILED = "0x80072560"
METHOD_NOT_ALLOWED = "0x80060889"
SERVICE_UNAVAILABLE = "0x80040216"
UNEXPECTED = "0x80040216"


class DataverseError(Exception):
    """An error answer: HTTP status, Dataverse hex code and message, plus extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON error body Dataverse sends."""
        return {"error": {"code": self.code, "message": self.message}}


def bad_request(message: str, code: str = ODATA_BAD_REQUEST) -> DataverseError:
    """A 400 with the generic OData error code unless told otherwise."""
    return DataverseError(400, code, message)


def url_too_long(limit: int) -> DataverseError:
    """A request URL over the documented limit (reference §2: 32 KB, 64 KB inside $batch)."""
    return DataverseError(
        414,
        ODATA_BAD_REQUEST,
        f"The request URL is longer than {limit // 1024} KB; send the query in a $batch.",
    )


def not_found(message: str, code: str = OBJECT_DOES_NOT_EXIST) -> DataverseError:
    """A 404 (missing row or resource)."""
    return DataverseError(404, code, message)


def segment_not_found(segment: str) -> DataverseError:
    """Unknown entity set or path segment, worded like Dataverse."""
    return DataverseError(404, RESOURCE_NOT_FOUND, f"Resource not found for the segment '{segment}'.")


def record_missing(logical_name: str, record_id: str) -> DataverseError:
    """The 404 Dataverse answers for a missing row."""
    return not_found(f"{logical_name} With Id = {record_id} Does Not Exist")
