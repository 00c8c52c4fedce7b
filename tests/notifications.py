"""A Dataverse change notification (``RemoteExecutionContext``) as the webhook and Service Bus
carry it, for the tests of everything that takes one in: the receiver, the Service Bus intake."""

from __future__ import annotations

import uuid
from typing import Any

from tests.ui.conftest import EMAIL, PHONE

APP_USER = "51f81489-0000-4a9e-aaae-a2591f45987d"
PERSON = "a1b2c3d4-0000-4000-8000-000000000001"
ACCOUNT = "6F9619FF-8B86-D011-B42D-00C04FC964FF"
STREET = "221B Baker Street"


def context(message: str = "Update", table: str = "account", **overrides: Any) -> dict[str, Any]:
    """A RemoteExecutionContext as Dataverse posts it, with personal data in the Target."""
    target: dict[str, Any] = {
        "__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts",
        "Attributes": [
            {"key": "emailaddress1", "value": EMAIL},
            {"key": "telephone1", "value": PHONE},
            {"key": "address1_line1", "value": STREET},
        ],
        "Id": ACCOUNT,
        "LogicalName": table,
    }
    if message == "Delete":
        target = {"__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts"}
        target |= {"Id": ACCOUNT, "LogicalName": table, "Name": None}
    body = {
        "MessageName": message,
        "PrimaryEntityName": table,
        "PrimaryEntityId": ACCOUNT,
        "InputParameters": [{"key": "Target", "value": target}],
        "PreEntityImages": [
            {"key": "pre", "value": {"Attributes": [{"key": "emailaddress1", "value": EMAIL}]}}
        ],
        "UserId": PERSON,
        "InitiatingUserId": PERSON,
        "CorrelationId": str(uuid.uuid4()),
        "OperationId": str(uuid.uuid4()),
        "RequestId": str(uuid.uuid4()),
        "Depth": 1,
        "Stage": 40,
        "Mode": 1,
        "OperationCreatedOn": "/Date(1506409448000-0700)/",
        "OrganizationName": "contoso",
    }
    return body | overrides
