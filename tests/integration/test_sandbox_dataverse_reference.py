"""Reference data every environment has before a sync: the ERP's currencies, even unseeded."""

from __future__ import annotations

import requests

from d365sync.sandbox.erp.tables import CURRENCIES as ERP_CURRENCIES
from tests.sandbox_fixtures import SandboxFactory


def _iso_codes(sandbox) -> list[str]:  # type: ignore[no-untyped-def]
    response = requests.get(
        f"{sandbox.api_url}/transactioncurrencies?$select=isocurrencycode",
        headers=sandbox.headers(),
        verify=sandbox.verify,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return sorted(row["isocurrencycode"] for row in response.json()["value"])


def test_unseeded_sandbox_has_every_currency_the_erp_maps_to_once_across_restarts(
    dataverse_sandbox_factory: SandboxFactory,
) -> None:
    sandbox = dataverse_sandbox_factory(seed=0)
    erp_iso = {iso for _legacy, iso, *_ in ERP_CURRENCIES}
    codes = _iso_codes(sandbox)
    assert erp_iso <= set(codes)
    assert len(codes) == len(set(codes))
    sandbox.restart()
    assert _iso_codes(sandbox) == codes
