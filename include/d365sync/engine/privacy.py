"""Personal data at rest: fields marked ``pii: true`` are encrypted in the sync state store.

What is encrypted, per entity with ``pii`` fields (see ``docs/security.md``):

* merge bases (``sync_record.base_json``) and audit values (``sync_audit.before_json`` /
  ``after_json``): the ``pii`` fields of a row are sealed together into one ``{"$pii": token}``
  entry of the JSON object; the other fields stay readable (operators query them);
* review items (``sync_review`` base / dynamics / erp / chosen values) of a ``pii`` field;
* dead-letter and parked-child payloads (the raw source rows) as a whole.

Keys (``erp_key``, ``dynamics_id``, ``record_key``) stay clear: every lookup needs them, and a
spec refuses ``pii: true`` on its key field.

Keys: one or more keys in Fernet's format, comma-separated, newest first. :class:`Cipher`
decrypts with any of them and encrypts with the first (AES-256-GCM), so rotation is "put a new key first,
run ``d365sync privacy rotate-keys``, then drop the old key". Where they come from is the
caller's business (the engine imports no Airflow): the DAGs read the ``d365sync_pii``
connection's password through any secrets backend, the CLI reads ``AIRFLOW_CONN_D365SYNC_PII``
or ``D365SYNC_PII_KEYS``. ``D365SYNC_PII_KEYS=insecure-none`` stores personal data in clear, on
purpose (a developer's laptop); with neither, a run of an entity with ``pii`` fields refuses to
start.

Airflow-free by rule; ``cryptography`` is imported lazily (DAG files import the spec layer).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from d365sync.engine.codec import decode, encode

KEYS_ENV: Final = "D365SYNC_PII_KEYS"
PII_CONN: Final = "d365sync_pii"
INSECURE: Final = "insecure-none"
SEALED: Final = "$pii"
ERASED: Final = "erased:"
HIDDEN: Final = "[encrypted]"


class PrivacyError(RuntimeError):
    """Personal data cannot be encrypted or decrypted as configured."""


class PrivacyConfigError(PrivacyError):
    """No usable key: missing where personal data must be encrypted, or malformed."""


def generate_key() -> str:
    """A new random Fernet key (url-safe base64 text of 32 bytes)."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def key_hash(entity: str, key: str) -> str:
    """A stable pseudonym of a record key: what erasure tombstones and audit rows keep.

    SHA-256 over entity and key, so ``d365sync privacy export`` can still say "this key was
    erased" when given the key, while the store holds no key of an erased subject.
    """
    return hashlib.sha256(f"{entity}\0{key}".encode()).hexdigest()


def erased_key(entity: str, key: str) -> str:
    """The ``erp_key`` / ``record_key`` an erased subject's rows keep instead of the key."""
    return ERASED + key_hash(entity, key)


class Cipher:
    """Seal with the first configured key, open with any of them.

    Tokens are AES-256-GCM (``cryptography``'s ``AESGCM``): a version byte, a random 96-bit
    nonce, then the ciphertext with its tag, in url-safe base64. The GCM key of each configured
    key is derived from it with HKDF-SHA256, so the key text stays a Fernet key (32 url-safe
    base64 bytes) and no key bytes serve two algorithms. Tokens written before (Fernet,
    AES-128-CBC with HMAC-SHA256) still open, and ``rotate-keys`` rewrites them.

    Why not Fernet any more: a Fernet token cost about 8 µs, an AES-GCM one about 2 µs, and an
    initial sync seals each record twice (merge base and audit row; issue 14). Random nonces
    keep a key safe for about 2**32 seals (NIST SP 800-38D); rotate keys well before that.
    """

    def __init__(self, keys: Sequence[str], source: str = "configured keys") -> None:
        from cryptography.fernet import Fernet, MultiFernet
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not keys:
            raise PrivacyConfigError(f"{source}: no key given")
        fernets = []
        for number, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError):
                raise PrivacyConfigError(
                    f"{source}: key #{number} is not a Fernet key (32 url-safe base64-encoded bytes); "
                    "make one with `d365sync privacy generate-key`"
                ) from None
        self._fernet = MultiFernet(fernets)
        self._aead = [AESGCM(_derive(key)) for key in keys]
        self.key_count = len(fernets)
        self.source = source

    def seal(self, value: Any) -> dict[str, str]:
        """``{"$pii": token}`` holding ``value`` (any value the state codec stores)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead[0].encrypt(nonce, encode(value).encode(), None)
        return {SEALED: base64.urlsafe_b64encode(TOKEN_VERSION + nonce + sealed).decode()}

    def open(self, token: str) -> Any:
        """The value a token holds; a token no configured key opens is an error, never a guess."""
        from cryptography.exceptions import InvalidTag
        from cryptography.fernet import InvalidToken

        try:
            raw = base64.urlsafe_b64decode(token)
        except (ValueError, TypeError):
            raw = b""
        if raw[:1] == TOKEN_VERSION:
            nonce, sealed = raw[1 : 1 + NONCE_BYTES], raw[1 + NONCE_BYTES :]
            for aead in self._aead:
                try:
                    return decode(aead.decrypt(nonce, sealed, None).decode())
                except InvalidTag:
                    continue
        else:
            try:
                return decode(self._fernet.decrypt(token.encode()).decode())
            except InvalidToken:
                pass
        raise PrivacyError(
            f"cannot decrypt personal data in the state store: none of the {self.key_count} key(s) "
            f"from {self.source} fits (was the key that encrypted it dropped before "
            "`d365sync privacy rotate-keys` ran?)"
        )


TOKEN_VERSION: Final = b"\x91"  # Fernet's tokens start with 0x80
NONCE_BYTES: Final = 12


def _derive(key: str) -> bytes:
    """The AES-256-GCM key of a configured (Fernet-format) key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    material = base64.urlsafe_b64decode(key)
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"d365sync state seal v2").derive(material)


def parse_keys(text: str) -> list[str]:
    """Comma-separated keys, newest first; blanks ignored."""
    return [k.strip() for k in text.split(",") if k.strip()]


@dataclass
class Privacy:
    """How the state store treats personal data: the cipher and each entity's ``pii`` fields.

    ``fields`` is filled per entity by :meth:`register` (each run does it for its spec) or up
    front by the caller. With no cipher, nothing is sealed: :meth:`register` refuses an entity
    with ``pii`` fields unless ``insecure`` says clear storage is intended.
    """

    cipher: Cipher | None = None
    insecure: bool = False
    fields: dict[str, frozenset[str]] = field(default_factory=dict)
    source: str = "no key configured"

    @classmethod
    def from_keys(cls, text: str | None, source: str) -> Privacy:
        """From a key list (``insecure-none`` or empty: no cipher)."""
        text = (text or "").strip()
        if not text:
            return cls(source="no key configured")
        if text.lower() == INSECURE:
            return cls(insecure=True, source=f"{source}={INSECURE}")
        return cls(Cipher(parse_keys(text), source), source=source)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Privacy:
        """``AIRFLOW_CONN_D365SYNC_PII`` (its password), else ``D365SYNC_PII_KEYS``."""
        from d365sync.engine.connections import from_env

        env = os.environ if environ is None else environ
        conn = from_env(PII_CONN, env)
        if conn is not None and conn.password:
            return cls.from_keys(conn.password, f"connection {PII_CONN}")
        return cls.from_keys(env.get(KEYS_ENV), KEYS_ENV)

    # --- configuration --------------------------------------------------------------------
    def register(self, entity: str, pii_fields: Iterable[str]) -> None:
        """Encrypt these fields of ``entity`` from now on; refuse when there is no key for them."""
        wanted = frozenset(pii_fields)
        if wanted and self.cipher is None and not self.insecure:
            raise PrivacyConfigError(
                f"entity {entity} has personal-data fields ({', '.join(sorted(wanted))}) and no encryption "
                f"key is configured: set the password of the Airflow connection {PII_CONN!r} (or "
                f"AIRFLOW_CONN_{PII_CONN.upper()} / {KEYS_ENV}) to a Fernet key from "
                f"`d365sync privacy generate-key`; {KEYS_ENV}={INSECURE} stores them in clear "
                "(development only)"
            )
        self.fields[entity] = wanted

    def pii(self, entity: str) -> frozenset[str]:
        return self.fields.get(entity, frozenset())

    def sealing(self, entity: str) -> bool:
        """Whether values of ``entity`` are encrypted when written."""
        return self.cipher is not None and bool(self.pii(entity))

    # --- sealing --------------------------------------------------------------------------
    def seal_values(self, entity: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """A field → value mapping with its ``pii`` fields moved into one sealed entry."""
        out = dict(values)
        if not self.sealing(entity):
            return out
        secret = {name: out.pop(name) for name in sorted(self.pii(entity)) if name in out}
        if secret:
            assert self.cipher is not None
            out[SEALED] = self.cipher.seal(secret)[SEALED]
        return out

    def seal_field(self, entity: str, name: str, value: Any) -> Any:
        """One value of field ``name``: sealed when the field is ``pii``."""
        if self.sealing(entity) and name in self.pii(entity):
            assert self.cipher is not None
            return self.cipher.seal(value)
        return value

    def seal_whole(self, entity: str, value: Any) -> Any:
        """A raw payload (source rows in column names): sealed whole for an entity with ``pii`` fields."""
        if value is None or not self.sealing(entity):
            return value
        assert self.cipher is not None
        return self.cipher.seal(value)

    # --- revealing ------------------------------------------------------------------------
    def reveal(self, value: Any) -> Any:
        """The inverse of every ``seal_*``: sealed entries decrypted, anything else unchanged."""
        return _reveal(value, self._open)

    def display(self, value: Any) -> Any:
        """:meth:`reveal` for people (the UI): a value no key opens shows as ``[encrypted]``."""

        def opener(token: str) -> Any:
            try:
                return self._open(token)
            except PrivacyError:
                return HIDDEN

        return _reveal(value, opener)

    def _open(self, token: str) -> Any:
        if self.cipher is None:
            raise PrivacyError(
                f"the state store holds encrypted personal data and no key is configured ({self.source}): "
                f"set the connection {PII_CONN!r} or {KEYS_ENV}"
            )
        return self.cipher.open(token)


def sealed(value: Any) -> bool:
    """Whether a decoded value holds a sealed entry (at its top level)."""
    return isinstance(value, dict) and SEALED in value


def _reveal(value: Any, opener: Any) -> Any:
    if not sealed(value):
        return value
    rest = {k: v for k, v in value.items() if k != SEALED}
    opened = opener(value[SEALED])
    if not rest:
        return opened
    return rest | opened if isinstance(opened, dict) else rest | {SEALED: opened}
