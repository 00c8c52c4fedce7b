"""Identity against the sandbox: MSAL over TLS, Entra-style token errors, API 401s."""

from __future__ import annotations

import time

import jwt
import msal
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.sandbox_fixtures import DataverseSandbox


def test_msal_acquires_token_over_tls(
    dataverse_sandbox_tls: DataverseSandbox, monkeypatch: pytest.MonkeyPatch
):
    sandbox = dataverse_sandbox_tls
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", sandbox.ca_bundle or "")
    with requests.Session() as http:
        http.verify = sandbox.ca_bundle
        app = msal.ConfidentialClientApplication(
            sandbox.client_id,
            client_credential=sandbox.client_secret,
            authority=sandbox.authority,
            instance_discovery=False,
            http_client=http,
        )
        result = app.acquire_token_for_client(scopes=[sandbox.scope])
    assert "access_token" in result, result
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["aud"] == sandbox.base_url
    assert claims["appid"] == sandbox.client_id
    assert {"exp", "iat", "nbf", "iss", "oid", "tid"} <= set(claims)
    whoami = requests.get(
        f"{sandbox.api_url}/WhoAmI",
        headers={"Authorization": f"Bearer {result['access_token']}"},
        verify=sandbox.ca_bundle,
        timeout=30,
    )
    assert whoami.status_code == 200
    assert set(whoami.json()) >= {"UserId", "BusinessUnitId", "OrganizationId"}


def test_azure_identity_credential_over_tls(
    dataverse_sandbox_tls: DataverseSandbox, monkeypatch: pytest.MonkeyPatch
):
    from azure.identity import ClientSecretCredential

    sandbox = dataverse_sandbox_tls
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", sandbox.ca_bundle or "")
    credential = ClientSecretCredential(
        sandbox.tenant,
        sandbox.client_id,
        sandbox.client_secret,
        authority=sandbox.base_url,
        disable_instance_discovery=True,
    )
    try:
        token = credential.get_token(sandbox.scope)
    finally:
        credential.close()
    assert token.token and token.expires_on > time.time()


def _token_request(sandbox: DataverseSandbox, **overrides: str) -> requests.Response:
    form = {
        "grant_type": "client_credentials",
        "client_id": sandbox.client_id,
        "client_secret": sandbox.client_secret,
        "scope": sandbox.scope,
        **overrides,
    }
    return requests.post(sandbox.token_url, data=form, verify=sandbox.verify, timeout=30)


def test_token_errors_are_entra_shaped(dataverse_sandbox: DataverseSandbox):
    wrong_secret = _token_request(dataverse_sandbox, client_secret="nope")
    assert wrong_secret.status_code == 401
    assert wrong_secret.json()["error"] == "invalid_client"
    assert wrong_secret.json()["error_description"].startswith("AADSTS7000215")
    unknown = _token_request(dataverse_sandbox, client_id="00000000-0000-0000-0000-000000000001")
    assert unknown.status_code == 400
    assert unknown.json()["error"] == "unauthorized_client"
    assert 700016 in unknown.json()["error_codes"]
    bad_scope = _token_request(dataverse_sandbox, scope="https://elsewhere.example/.default")
    assert bad_scope.status_code == 400
    assert bad_scope.json()["error"] == "invalid_scope"
    assert "AADSTS70011" in bad_scope.json()["error_description"]


def test_openid_configuration(dataverse_sandbox: DataverseSandbox):
    config = requests.get(
        f"{dataverse_sandbox.authority}/v2.0/.well-known/openid-configuration", timeout=30
    ).json()
    for key in (
        "issuer",
        "token_endpoint",
        "authorization_endpoint",
        "jwks_uri",
        "device_authorization_endpoint",
    ):
        assert key in config
    keys = requests.get(config["jwks_uri"], timeout=30).json()["keys"]
    token = dataverse_sandbox.token()
    public = jwt.PyJWK(keys[0]).key
    assert jwt.decode(token, public, algorithms=["RS256"], audience=dataverse_sandbox.base_url)


def _api_401(sandbox: DataverseSandbox, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.get(f"{sandbox.api_url}/accounts?$top=1", headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
    assert response.json()["error"]["code"].startswith("0x")
    return response


def test_api_rejects_bad_tokens(dataverse_sandbox: DataverseSandbox):
    sandbox = dataverse_sandbox
    assert "missing" in _api_401(sandbox, None).json()["error"]["message"]
    good = jwt.decode(sandbox.token(), options={"verify_signature": False})
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(good, other_key, algorithm="RS256")
    assert "signature" in _api_401(sandbox, forged).json()["error"]["message"]
    assert "malformed" in _api_401(sandbox, "not-a-jwt").json()["error"]["message"]


def _resign(sandbox: DataverseSandbox, **changes: object) -> str:
    """Re-sign a real token with the sandbox's own key (from its data dir) after changing claims."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((sandbox.data_dir / "signing-key.pem").read_bytes(), None)
    header = jwt.get_unverified_header(sandbox.token())
    claims = {**jwt.decode(sandbox.token(), options={"verify_signature": False}), **changes}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": header["kid"]})


def test_api_rejects_expired_and_wrong_audience(dataverse_sandbox: DataverseSandbox):
    sandbox = dataverse_sandbox
    now = int(time.time())
    expired = _resign(sandbox, iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    assert "expired" in _api_401(sandbox, expired).json()["error"]["message"]
    foreign = _resign(sandbox, aud="https://other.crm.dynamics.com")
    assert "audience" in _api_401(sandbox, foreign).json()["error"]["message"]


def test_short_token_lifetime(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory(token_lifetime=1)
    token = sandbox.token()
    time.sleep(2.2)
    assert "expired" in _api_401(sandbox, token).json()["error"]["message"]


def test_expire_tokens_now_knob(dataverse_sandbox_factory):
    sandbox = dataverse_sandbox_factory()
    token = sandbox.token()
    ok = requests.get(f"{sandbox.api_url}/WhoAmI", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert ok.status_code == 200
    sandbox.set_knobs(expire_tokens_now=True)
    assert "expired" in _api_401(sandbox, token).json()["error"]["message"]
    fresh = sandbox.token(fresh=True)
    again = requests.get(
        f"{sandbox.api_url}/WhoAmI", headers={"Authorization": f"Bearer {fresh}"}, timeout=30
    )
    assert again.status_code == 200


def test_a_second_application_user_writes_as_itself(dataverse_sandbox_factory):
    """``extra_users``: the demo's and the soak's simulated people are not the sync's app user."""
    from d365sync.sandbox.dataverse.config import PERSON_USER

    sandbox = dataverse_sandbox_factory(extra_users=[PERSON_USER])
    with sandbox.client() as sync, sandbox.client_as(PERSON_USER) as person:
        ours, theirs = sync.whoami()["UserId"], person.whoami()["UserId"]
        assert ours != theirs
        created = person.create("accounts", {"name": "Edited by a person", "accountnumber": "PERSON-1"})
        (row,) = sync.iter_rows(
            "accounts", ["_modifiedby_value", "_createdby_value"], filter="accountnumber eq 'PERSON-1'"
        )
        assert row["_modifiedby_value"] == row["_createdby_value"] == theirs.lower()
        assert created
    sandbox.stop()
