"""Fixtures shared by the pipeline tests; each module defines its own ``env``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from d365sync.dynamics import DynamicsClient
from tests.integration.pipeline_env import Env, person_client


@pytest.fixture
def person(env: Env) -> Iterator[DynamicsClient]:
    """A person editing in Dynamics (:data:`~tests.integration.pipeline_env.PERSON`), on the
    sandbox of the module's ``env``."""
    with person_client(env) as client:
        yield client
