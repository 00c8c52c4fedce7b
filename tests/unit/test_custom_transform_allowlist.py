"""Issue 11 #8: a ``custom`` transform may only come from a module the deployment declares.

Before, any dotted path was imported and then called on every ERP value, ``os:system``
included (even in ``--dry-run``). Now the spec fails to load, naming file, field and path;
declared modules (``D365SYNC_TRANSFORM_MODULES``, the ``d365sync.transforms`` entry-point group)
still work.
"""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest

from d365sync.spec import load_entity
from tests.unit.test_spec import entity_dir, error_of, variant, write

__all__ = ["entity_dir"]  # the fixture, imported for the tests below
TRANSFORM_MODULES_ENV = "D365SYNC_TRANSFORM_MODULES"


def shout(value: str, suffix: str = "!") -> str:
    return value.upper() + suffix


def unshout(value: str, suffix: str = "!") -> str:
    return value.removesuffix(suffix).lower()


def _custom(module: str) -> dict[str, object]:
    return {"custom": {"function": f"{module}:shout", "inverse": f"{module}:unshout"}}


@pytest.mark.parametrize("path", ["os:system", "subprocess:getoutput", "builtins:eval"])
def test_a_spec_naming_an_undeclared_callable_is_refused_at_load(
    entity_dir: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.delenv(TRANSFORM_MODULES_ENV, raising=False)
    doc = variant(fields__city__from_erp=[{"custom": {"function": path}}])
    message = error_of(entity_dir, doc)
    assert "clients.yaml" in message
    assert f"field 'city': custom transform {path!r} is not from an allowed module" in message
    assert TRANSFORM_MODULES_ENV in message


def test_a_module_in_the_environment_allow_list_works(
    entity_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = variant(fields__city__to_erp=[_custom(__name__)])
    monkeypatch.setenv(TRANSFORM_MODULES_ENV, "acme_other, tests.unit")
    assert load_entity(write(entity_dir, doc)).name == "clients"
    monkeypatch.setenv(TRANSFORM_MODULES_ENV, "tests.uni")  # prefixes match whole module names
    assert "is not from an allowed module" in error_of(entity_dir, doc)


def test_a_module_declared_by_an_entry_point_works(
    entity_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real installed distribution (a dist-info on sys.path) declaring its transforms module."""
    monkeypatch.delenv(TRANSFORM_MODULES_ENV, raising=False)
    module = f"acme_tx_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    (site / f"{module}-1.0.dist-info").mkdir(parents=True)
    (site / f"{module}-1.0.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n"
    )
    (site / f"{module}-1.0.dist-info" / "entry_points.txt").write_text(
        f"[d365sync.transforms]\nacme = {module}\n"
    )
    (site / f"{module}.py").write_text(
        textwrap.dedent(
            """
            def shout(value, suffix="!"):
                return value.upper() + suffix

            def unshout(value, suffix="!"):
                return value.removesuffix(suffix).lower()
            """
        )
    )
    doc = variant(fields__city__to_erp=[_custom(module)])
    assert "is not from an allowed module" in error_of(entity_dir, doc)  # not installed yet
    monkeypatch.syspath_prepend(str(site))
    assert load_entity(write(entity_dir, doc)).name == "clients"
