"""Personal data at rest (issue 11): keys, sealing, the spec flag, the refusal to run without a key."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from d365sync.engine.privacy import (
    INSECURE,
    KEYS_ENV,
    Cipher,
    Privacy,
    PrivacyConfigError,
    PrivacyError,
    erased_key,
    key_hash,
    sealed,
)
from d365sync.engine.stages.context import RunContext
from d365sync.engine.state import StateStore
from d365sync.spec import SpecError, load_entities, load_entity, load_privacy_settings

ENTITIES = Path(__file__).resolve().parents[2] / "include" / "entities"


def _key() -> str:
    return Fernet.generate_key().decode()


def test_sealed_values_round_trip_and_hide_only_the_pii_fields() -> None:
    privacy = Privacy(Cipher([_key()]))
    privacy.register("customers", {"name", "email"})
    values = {"number": "C1", "name": "Anna Muller", "email": "anna@example.com", "limit": Decimal("10.50")}
    stored = privacy.seal_values("customers", values)
    assert set(stored) == {"number", "limit", "$pii"} and "Anna" not in str(stored)
    assert privacy.reveal(stored) == values
    assert privacy.seal_values("orders", values) == values  # no pii fields: clear
    assert privacy.reveal(privacy.seal_field("customers", "email", "a@b.c")) == "a@b.c"
    assert privacy.seal_field("customers", "number", "C1") == "C1"
    whole = privacy.seal_whole("customers", {"rows": [{"side": "erp", "row": {"CUST_NAME": "Anna"}}]})
    assert sealed(whole) and privacy.reveal(whole)["rows"][0]["row"]["CUST_NAME"] == "Anna"


def test_multifernet_decrypts_with_any_key_and_encrypts_with_the_first() -> None:
    old, new = _key(), _key()
    token = Cipher([old]).seal("Anna")["$pii"]
    both = Cipher([new, old])
    assert both.open(token) == "Anna"
    assert Cipher([new]).open(both.seal("Anna")["$pii"]) == "Anna"
    with pytest.raises(PrivacyError, match="none of the 1 key"):
        Cipher([new]).open(token)


def test_tokens_are_aes_gcm_and_fernet_tokens_written_before_still_open() -> None:
    """New tokens: version byte 0x91, a 12-byte nonce, ciphertext and tag (AES-256-GCM under a
    key derived from the configured one); the same value seals differently each time; a changed
    byte is refused, not decrypted to something else; Fernet tokens of earlier versions open."""
    import base64

    key = _key()
    cipher = Cipher([key])
    token = cipher.seal({"email": "anna@example.com"})["$pii"]
    raw = base64.urlsafe_b64decode(token)
    assert raw[0] == 0x91 and len(raw) == 1 + 12 + len('{"email":"anna@example.com"}') + 16
    assert b"anna" not in raw and cipher.seal({"email": "anna@example.com"})["$pii"] != token
    assert cipher.open(token) == {"email": "anna@example.com"}
    tampered = base64.urlsafe_b64encode(raw[:-1] + bytes([raw[-1] ^ 1])).decode()
    with pytest.raises(PrivacyError, match="none of the 1 key"):
        cipher.open(tampered)
    legacy = Fernet(key).encrypt(b'{"email":"anna@example.com"}').decode()
    assert Cipher([_key(), key]).open(legacy) == {"email": "anna@example.com"}
    with pytest.raises(PrivacyError, match="none of the 1 key"):
        Cipher([_key()]).open(legacy)


def test_keys_come_from_the_connection_then_the_variable_and_bad_keys_say_so() -> None:
    key = _key()
    conn = f'{{"conn_type": "generic", "password": "{key}"}}'
    assert Privacy.from_env({"AIRFLOW_CONN_D365SYNC_PII": conn}).cipher is not None
    assert Privacy.from_env({KEYS_ENV: f" {_key()} , {key} "}).cipher.key_count == 2  # type: ignore[union-attr]
    assert Privacy.from_env({KEYS_ENV: INSECURE}).insecure
    assert Privacy.from_env({}).cipher is None
    with pytest.raises(PrivacyConfigError, match=r"key #2 is not a Fernet key.*generate-key"):
        Privacy.from_env({KEYS_ENV: f"{key},not-a-key"})


def test_without_a_key_pii_fields_are_refused_unless_clear_storage_is_explicit() -> None:
    with pytest.raises(PrivacyConfigError, match=r"customers has personal-data fields .*d365sync_pii"):
        Privacy().register("customers", {"name"})
    Privacy().register("orders", set())  # no pii fields: no key needed
    clear = Privacy(insecure=True)
    clear.register("customers", {"name"})
    assert clear.seal_values("customers", {"name": "Anna"}) == {"name": "Anna"}
    with pytest.raises(PrivacyError, match="no key is configured"):
        Privacy().reveal({"$pii": "x"})
    assert Privacy().display({"$pii": "x"}) == "[encrypted]"


def test_a_run_of_an_entity_with_pii_fields_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    spec = load_entities(ENTITIES)["customers"]
    with (
        StateStore.open(f"sqlite:///{tmp_path / 's.db'}", privacy=Privacy()) as store,
        pytest.raises(PrivacyConfigError, match="no encryption key is configured"),
    ):
        RunContext(spec, None, None, store, tmp_path / "staging")


def test_key_hash_is_a_stable_pseudonym() -> None:
    assert key_hash("customers", "C1") == key_hash("customers", "C1") != key_hash("orders", "C1")
    assert erased_key("customers", "C1").startswith("erased:") and "C1" not in erased_key("customers", "C1")


def test_the_spec_marks_customers_personal_fields_and_refuses_a_pii_key(tmp_path: Path) -> None:
    specs = load_entities(ENTITIES)
    assert specs["customers"].pii_fields == {
        "name",
        "email",
        "phone",
        "address_line1",
        "address_line2",
        "city",
        "postcode",
    }
    assert not specs["orders"].pii_fields
    text = (ENTITIES / "customers.yaml").read_text(encoding="utf-8")
    (tmp_path / "customers.yaml").write_text(
        text.replace("  number:\n", "  number:\n    pii: true\n", 1), encoding="utf-8"
    )
    (tmp_path / "_defaults.yaml").write_text((ENTITIES / "_defaults.yaml").read_text(encoding="utf-8"))
    with pytest.raises(SpecError, match="'number' is the key and marked pii: true"):
        load_entity(tmp_path / "customers.yaml")


def test_retention_settings_have_defaults_and_are_checked(tmp_path: Path) -> None:
    shipped = load_privacy_settings(ENTITIES).retention
    periods = (shipped.audit_days, shipped.dead_letter_days, shipped.run_days, shipped.staging_days)
    assert (*periods, shipped.inbox_days, shipped.review_days) == (90, 30, 90, 14, 7, 90)
    assert load_privacy_settings(tmp_path).retention == shipped  # no _defaults.yaml: the defaults
    (tmp_path / "_defaults.yaml").write_text("privacy: {retention: {audit_days: -1}}\n")
    with pytest.raises(SpecError, match=r"privacy: retention\.audit_days"):
        load_privacy_settings(tmp_path)
