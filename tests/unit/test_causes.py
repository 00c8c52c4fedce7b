"""A dead letter's cause: its error text as the stages write it, without per-record parts."""

from __future__ import annotations

from d365sync.engine.causes import cause_of
from d365sync.engine.transforms import TransformError
from d365sync.engine.validation import Failure

EMAIL_RULE = r"expect_column_values_to_match_regex(column=CUST_EMAIL_ID, regex='^[^@]+@([a-z]+\.)+[a-z]+$')"
LIMIT_RULE = "expect_column_values_to_be_between(column=CREDIT_LIMIT, min_value=0, max_value=1000000)"


def _validation(*failures: Failure) -> str:
    """The error the validate stage stores (stages/prepare.py): ``validation: <reason>``."""
    return "validation: " + "; ".join(f.describe() for f in failures)


def test_validation_errors_of_one_rule_share_a_cause_and_keep_a_sample() -> None:
    first = cause_of(_validation(Failure(EMAIL_RULE, "x", "CUST_EMAIL_ID", "j***@e***.com")), "C000001")
    second = cause_of(_validation(Failure(EMAIL_RULE, "x", "CUST_EMAIL_ID", "n***")), "C000002")
    assert first.text == second.text == f"validation: {EMAIL_RULE}: CUST_EMAIL_ID=…"
    assert (first.sample, second.sample) == ("'j***@e***.com'", "'n***'")


def test_two_rules_failing_is_a_cause_of_its_own_and_rule_parameters_stay() -> None:
    both = _validation(
        Failure(EMAIL_RULE, "x", "CUST_EMAIL_ID", "n***"), Failure(LIMIT_RULE, "x", "CREDIT_LIMIT", "-500")
    )
    cause = cause_of(both, "C000003")
    assert cause.text == f"validation: {EMAIL_RULE}: CUST_EMAIL_ID=…; {LIMIT_RULE}: CREDIT_LIMIT=…"
    assert "max_value=1000000" in cause.text
    assert cause.text != cause_of(_validation(Failure(LIMIT_RULE, "x", "CREDIT_LIMIT", "-1"))).text


def test_transform_errors_lose_the_record_and_the_value() -> None:
    def error(key: str, value: str) -> str:
        exc = TransformError("not a valid e-mail address", value=value, rule="email", field="email", key=key)
        return f"transform: {exc}"

    one, other = cause_of(error("C000010", "john@@x"), "C000010"), cause_of(error("C000011", "x@"), "C000011")
    assert one.text == other.text == "transform: field 'email': rule 'email': not a valid e-mail address"
    assert one.sample is not None and "john" not in one.sample, "the sample is the masked value"


def test_other_errors_lose_keys_guids_and_long_numbers_but_keep_http_codes() -> None:
    guid = "3f2a9c1e-1111-2222-3333-444455556666"
    exists = "412 A record with matching key values already exists"
    text = f"load dynamics create: {exists}: C000123 ({guid}, 8812345)"
    cause = cause_of(text, "C000123")
    assert cause.text == (
        "load dynamics create: 412 A record with matching key values already exists: <record> (<id>, <n>)"
    )
    assert cause.sample is None
