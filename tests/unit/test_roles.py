"""The one role map of the operations UI and the operations DAGs (security issue 11, finding 2).

A task knows only the name of the user who triggered its run; the UI has the user object from
the token. Both must give the same answer: roles are read from the real Airflow configuration
(``AIRFLOW__CORE__*`` variables, read by Airflow's own config parser) and compared with what the
UI's authenticator makes of the same users.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from d365sync import roles
from d365sync.roles import AccessDenied, acting_user, configured_role_map, role_of_name

SIMPLE = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
USERS = {"vera": "viewer", "ursula": "user", "oscar": "op", "ada": "admin", "sam": "SyncOps"}


@pytest.fixture
def simple(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """SimpleAuthManager with the users above; no extra role names."""
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", SIMPLE)
    monkeypatch.setenv(
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", ",".join(f"{u}:{r}" for u, r in USERS.items())
    )
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    monkeypatch.delenv(roles.ROLE_MAP_ENV, raising=False)
    return monkeypatch


def test_a_simple_auth_manager_user_has_the_configured_role(simple: pytest.MonkeyPatch) -> None:
    found = {name: role_of_name(name, configured_role_map()) for name in [*USERS, "mallory"]}
    assert found == {
        "vera": "viewer",
        "ursula": "user",
        "oscar": "op",
        "ada": "admin",
        "sam": "syncops",  # not a level: acts like no role
        "mallory": "none",  # not an Airflow user at all
    }
    simple.setenv(roles.ROLE_MAP_ENV, "SyncOps:op")
    assert role_of_name("sam", configured_role_map()) == "op"


def test_all_admins_mode_makes_every_caller_an_admin_as_airflow_does(simple: pytest.MonkeyPatch) -> None:
    simple.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
    assert role_of_name("anyone", configured_role_map()) == "admin"


def test_the_ui_and_the_operations_dags_give_every_user_the_same_role(simple: pytest.MonkeyPatch) -> None:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    from d365sync.ui.auth import AirflowAuthenticator

    for extra in ("", "SyncOps:op"):
        simple.setenv(roles.ROLE_MAP_ENV, extra)
        ui = AirflowAuthenticator(roles.parse_role_map(extra))
        for name, role in USERS.items():
            user = SimpleAuthManagerUser(username=name, role=role)
            assert ui.role_of(None, user) == role_of_name(name, configured_role_map()), (name, extra)


def test_fab_users_take_their_highest_mapped_role() -> None:
    def fab_user(*names: str) -> SimpleNamespace:
        return SimpleNamespace(roles=[SimpleNamespace(name=n) for n in names])

    mapping = roles.role_map({"syncops": "op"})
    assert roles.role_of_user(fab_user("Viewer", "User"), mapping) == "user"
    assert roles.role_of_user(fab_user("Public"), mapping) == "none"
    assert roles.role_of_user(fab_user("Viewer", "SyncOps"), mapping) == "op"
    assert roles.role_of_user(fab_user(), mapping) == "none"
    assert roles.role_of_user(SimpleNamespace(), mapping) is None  # neither: the UI asks by permission


@pytest.mark.skipif(
    importlib.util.find_spec("airflow.providers.fab") is not None, reason="FAB provider installed"
)
def test_fab_roles_that_cannot_be_read_are_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", FAB)
    with pytest.raises(AccessDenied, match=r"the FAB roles of 'oscar' cannot be read here"):
        role_of_name("oscar", configured_role_map())


def test_an_auth_manager_without_a_user_directory_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", "corp.auth.KeycloakAuthManager")
    with pytest.raises(AccessDenied, match=r"'corp.auth.KeycloakAuthManager'"):
        role_of_name("oscar", configured_role_map())


def _lookup(name: str) -> str:
    return {"ursula": "user", "vera": "viewer", "oscar": "op", "ada": "admin"}.get(name, "none")


@pytest.mark.parametrize("user", ["oscar", "ada"])
def test_an_operator_or_admin_acts_as_themself(user: str) -> None:
    assert acting_user("apply_review_decisions", user, "manual", _lookup) == user


@pytest.mark.parametrize(("user", "role"), [("ursula", "user"), ("vera", "viewer"), ("mallory", "none")])
def test_a_lower_role_is_refused_naming_user_role_and_role_needed(user: str, role: str) -> None:
    with pytest.raises(AccessDenied) as refused:
        acting_user("apply_review_decisions", user, "manual", _lookup)
    assert str(refused.value) == (
        f"apply_review_decisions: refused: user {user!r} has the role {role!r}; apply_review_decisions "
        "needs the role op or admin (the same roles as the d365sync operations UI). Nothing was changed."
    )


def test_a_run_without_a_triggering_user_is_refused_unless_airflow_scheduled_it() -> None:
    with pytest.raises(
        AccessDenied, match=r"replay_dead_letters: refused: this manual run has no triggering"
    ):
        acting_user("replay_dead_letters", None, "manual", _lookup)
    with pytest.raises(AccessDenied, match=r"this scheduled run has no triggering user"):
        acting_user("replay_dead_letters", "", "scheduled", _lookup)  # a manual-only DAG: never
    assert acting_user("reconcile", None, "scheduled", _lookup, system_run_types=("scheduled",)) == (
        "airflow:reconcile"
    )
    with pytest.raises(AccessDenied, match=r"this asset_triggered run"):
        acting_user("reconcile", None, "asset_triggered", _lookup, system_run_types=("scheduled",))
    with pytest.raises(AccessDenied, match=r"user 'ursula' has the role 'user'"):  # a user is checked
        acting_user("reconcile", "ursula", "scheduled", _lookup, system_run_types=("scheduled",))


def test_a_role_that_cannot_be_read_is_a_refusal_naming_the_user() -> None:
    def unreadable(name: str) -> str:
        raise AccessDenied("the role of 'oscar' cannot be read under the auth manager 'x.Y'")

    with pytest.raises(AccessDenied, match=r"user 'oscar' triggered this run, but the role of 'oscar'"):
        acting_user("replay_dead_letters", "oscar", "manual", unreadable)


def test_the_role_module_imports_neither_fastapi_nor_airflow() -> None:
    code = (
        "import json, sys, d365sync.roles, d365sync.airflow.tasks\n"
        "heavy = {'fastapi', 'starlette', 'airflow'}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & heavy)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
