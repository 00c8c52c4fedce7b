"""An Entra-compatible token service for the sandbox (client-credentials only).

MSAL and azure-identity, pointed at ``authority=<base>/<tenant>`` with instance discovery off,
fetch ``/<tenant>/v2.0/.well-known/openid-configuration`` and then post to the token endpoint
named there (reference §1).  Tokens are RS256 JWTs signed with a key pair generated once and
kept in the data directory, so tokens survive a restart like real ones survive a web-server
recycle.  Error bodies follow Entra's shape (``error``, ``error_description`` with an AADSTS
code, ``error_codes``, ``trace_id`` ...).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from d365sync.sandbox.dataverse.config import AppUser, SandboxConfig

KEY_FILE = "signing-key.pem"
_RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})


class TokenRequestError(Exception):
    """A failed token request: HTTP status and the Entra JSON body."""

    def __init__(self, status: int, error: str, aadsts: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.aadsts = aadsts
        self.description = description

    def body(self) -> dict[str, Any]:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": self.error,
            "error_description": (
                f"AADSTS{self.aadsts}: {self.description} Trace ID: {trace} "
                f"Correlation ID: {correlation} Timestamp: {stamp}"
            ),
            "error_codes": [self.aadsts],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"https://login.microsoftonline.com/error?code={self.aadsts}",
        }


class AuthError(Exception):
    """Why a bearer token was refused; the message is shown to the client."""


@dataclass(frozen=True)
class Caller:
    """The authenticated application user behind a request."""

    user: AppUser
    claims: dict[str, Any]


def _load_or_create_key(data_dir: Path) -> rsa.RSAPrivateKey:
    path = data_dir / KEY_FILE
    if path.exists():
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(loaded, rsa.RSAPrivateKey):
            return loaded
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return key


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenService:
    """Issues and verifies access tokens for the configured application users."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._key = _load_or_create_key(config.data_dir)
        public = self._key.public_key()
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = base64.urlsafe_b64encode(hashlib.sha1(der).digest()).rstrip(b"=").decode()
        self._public = public
        self._lock = threading.Lock()
        self._not_before = 0.0
        self.tokens_issued = 0
        self.env_url = config.env_url or ""

    # -- discovery -------------------------------------------------------------------------
    def issuer(self, base_url: str) -> str:
        return f"{base_url}/{self.config.tenant_id}/v2.0"

    def openid_configuration(self, base_url: str, tenant: str) -> dict[str, Any]:
        root = f"{base_url}/{tenant}"
        return {
            "issuer": self.issuer(base_url),
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{base_url}/{tenant}/discovery/v2.0/keys",
            "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "grant_types_supported": ["client_credentials"],
            "tenant_region_scope": "NA",
            "cloud_instance_name": "sandbox.local",
        }

    def jwks(self) -> dict[str, Any]:
        numbers = self._public.public_numbers()
        return {
            "keys": [
                {"kty": "RSA", "use": "sig", "kid": self.kid, "n": _b64(numbers.n), "e": _b64(numbers.e)}
            ]
        }

    def tenant_known(self, tenant: str) -> bool:
        return tenant.lower() in {self.config.tenant.lower(), self.config.tenant_id, "organizations"}

    # -- issuing ---------------------------------------------------------------------------
    def issue(self, form: dict[str, str], tenant: str, base_url: str, basic: tuple[str, str] | None) -> dict:
        """Handle a token request form; raises :class:`TokenRequestError` like Entra does."""
        if not self.tenant_known(tenant):
            raise TokenRequestError(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you "
                "have the correct tenant ID and are signing into the correct cloud.",
            )
        grant = form.get("grant_type", "")
        if grant != "client_credentials":
            raise TokenRequestError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant}'.",
            )
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if basic:
            client_id, secret = client_id or basic[0], secret or basic[1]
        user = self.config.user(client_id) if client_id else None
        if user is None:
            raise TokenRequestError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{self.config.tenant}'. This can happen if the application has not been installed by "
                "the administrator of the tenant or consented to by any user in the tenant.",
            )
        if secret != user.client_secret:
            raise TokenRequestError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the "
                f"client secret value, not the client secret ID, for a secret added to app '{client_id}'.",
            )
        audience = self._audience_from_scope(form.get("scope", ""), base_url)
        return self._mint(user, audience, base_url)

    def _audience_from_scope(self, scope: str, base_url: str) -> str:
        scopes = [s for s in scope.split() if s not in _RESERVED_SCOPES]
        env = (self.env_url or base_url).rstrip("/")
        valid = {f"{env}/.default", f"{env}//.default"}
        if len(scopes) != 1 or scopes[0] not in valid:
            raise TokenRequestError(
                400,
                "invalid_scope",
                70011,
                f"The provided request must include a 'scope' input parameter. The provided value for "
                f"the input parameter 'scope' is not valid. The scope {scope} is not valid. "
                f"Use '{env}/.default'.",
            )
        return env

    def _mint(self, user: AppUser, audience: str, base_url: str) -> dict[str, Any]:
        now = int(time.time())
        lifetime = self.config.token_lifetime
        claims = {
            "aud": audience,
            "iss": self.issuer(base_url),
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "appid": user.client_id,
            "azp": user.client_id,
            "appidacr": "1",
            "idtyp": "app",
            "oid": user.object_id,
            "sub": user.object_id,
            "tid": self.config.tenant_id,
            "ver": "2.0",
            "jti": str(uuid.uuid4()),
            "sbx_iat": time.time(),
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})
        with self._lock:
            self.tokens_issued += 1
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }

    # -- verifying -------------------------------------------------------------------------
    def expire_all(self) -> None:
        """Treat every token issued so far as expired (test knob ``expire_tokens_now``)."""
        with self._lock:
            self._not_before = time.time()

    def verify(self, authorization: str | None, base_url: str) -> Caller:
        """Check a bearer token; :class:`AuthError` says precisely what is wrong."""
        if not authorization:
            raise AuthError("Bearer token is missing from the Authorization header.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("The Authorization header must use the Bearer scheme.")
        env = (self.env_url or base_url).rstrip("/")
        try:
            claims = jwt.decode(
                token.strip(),
                self._public,
                algorithms=["RS256"],
                audience=[env, env + "/"],
                options={"require": ["exp", "iat", "aud", "appid"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("The access token has expired (ExpiredAuthTicket).") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError(f"The access token audience is not valid for this environment ({env}).") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("The access token signature is invalid (InvalidAuthTicket).") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"The access token is malformed or invalid (InvalidAuthTicket): {exc}.") from exc
        if float(claims.get("sbx_iat", 0)) <= self._not_before:
            raise AuthError("The access token has expired (ExpiredAuthTicket).")
        user = self.config.user(str(claims["appid"]))
        if user is None:
            raise AuthError("The application user behind this token does not exist in the environment.")
        return Caller(user, claims)
