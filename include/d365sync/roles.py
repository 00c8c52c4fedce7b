"""Who may act on the sync: the one role map of the operations UI and the operations DAGs.

Both ask the same question — may this Airflow user decide review items and replay dead letters?
— and must answer it the same way (security issue 11, finding 2: a read-only ``user`` triggered
``apply_review_decisions`` over the REST API). So the map lives here, importable without FastAPI
(the DAGs' tasks import it) and without Airflow (imported lazily, only to read the auth
manager's users).

=====================  ===========  =======================================================
auth manager           role         level
=====================  ===========  =======================================================
SimpleAuthManager      viewer       read
                       user         read (may run DAGs in Airflow, but not act on the sync)
                       op, admin    read, act (decide, replay, skip), reveal
FAB                    Viewer/User  read
                       Op/Admin     read, act, reveal; Public: nothing
any (extra names)      ``D365SYNC_UI_ROLE_MAP="SyncOps:op"`` maps custom role names
=====================  ===========  =======================================================

The UI has the caller's token, hence the user object (:func:`role_of_user`). A task only has the
name of the user who triggered its run (``dag_run.triggering_user_name``, set by Airflow from the
authenticated caller of the REST API or UI, never from the run's conf): :func:`role_of_name`
reads that user's role where the auth manager keeps it, and :func:`acting_user` decides.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

LEVELS: dict[str, int] = {"none": 0, "viewer": 1, "user": 2, "op": 3, "admin": 4}
ACT_ROLE = "op"
ACT_LEVEL = LEVELS[ACT_ROLE]
FAB_ROLES: dict[str, str] = {
    "public": "none",
    "viewer": "viewer",
    "user": "user",
    "op": "op",
    "admin": "admin",
}
ROLE_MAP_ENV = "D365SYNC_UI_ROLE_MAP"
SIMPLE_AUTH_MANAGER = "SimpleAuthManager"
FAB_AUTH_MANAGER = "FabAuthManager"


class AccessDenied(PermissionError):
    """The user may not do this; raised before anything changed."""


def parse_role_map(raw: str) -> dict[str, str]:
    """``"SyncOps:op, Auditors:viewer"`` -> ``{"syncops": "op", "auditors": "viewer"}``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        name, _, level_name = part.partition(":")
        out[name.strip().lower()] = level_name.strip().lower()
    return out


def role_map(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Auth-manager role name (lower case) -> UI role: the FAB names plus ``extra``."""
    return {**FAB_ROLES, **(extra or {})}


def configured_role_map(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """:func:`role_map` with ``D365SYNC_UI_ROLE_MAP`` from the environment (the UI's setting)."""
    env = os.environ if environ is None else environ
    return role_map(parse_role_map(env.get(ROLE_MAP_ENV, "")))


def level(role: str) -> int:
    return LEVELS.get(role, 0)


def at_least(role: str) -> str:
    """``"op or admin"``: the roles that have ``role``'s level or more, for error messages."""
    return " or ".join(name for name, n in LEVELS.items() if n >= level(role))


def simple_role(name: str, roles: Mapping[str, str]) -> str:
    """The UI role of a SimpleAuthManager role name (``viewer``, ``user``, ``op``, ``admin``)."""
    key = name.strip().lower()
    return roles.get(key, key)


def best_role(names: Iterable[Any], roles: Mapping[str, str]) -> str:
    """The highest UI role among several auth-manager roles (FAB); unknown names give nothing."""
    mapped = [roles.get(str(getattr(r, "name", r)).lower(), "none") for r in names]
    return max(mapped, key=level, default="none")


def role_of_user(user: Any, roles: Mapping[str, str]) -> str | None:
    """The UI role of an auth-manager user object; None when it carries no role names."""
    if isinstance(role := getattr(user, "role", None), str):  # SimpleAuthManager
        return simple_role(role, roles)
    names = getattr(user, "roles", None)
    if names is not None:  # FAB: a list of Role objects
        return best_role(names, roles)
    return None


# --- a user known by name only (a DAG run's triggering user) --------------------------------


def role_of_name(name: str, roles: Mapping[str, str]) -> str:
    """The UI role of the Airflow user called ``name``, read where the configured auth manager
    keeps its users. An unknown user has the role ``none``.

    * SimpleAuthManager: ``[core] simple_auth_manager_users`` (``"alice:op,bob:viewer"``), the
      configuration every Airflow component shares; with ``simple_auth_manager_all_admins``
      Airflow itself treats every caller as an admin, and so does this.
    * FAB: the user's roles in the metadata DB. Airflow 3 blocks the metadata DB in task
      processes (the Task SDK), so there this raises :class:`AccessDenied`: refused, not guessed.
    * any other auth manager: :class:`AccessDenied` (no way to read a user's roles by name).
    """
    from airflow.sdk.configuration import conf

    manager = conf.get("core", "auth_manager", fallback="") or ""
    short = manager.rsplit(".", 1)[-1]
    if short == SIMPLE_AUTH_MANAGER:
        if conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False):
            return "admin"
        role = simple_users(conf.getlist("core", "simple_auth_manager_users", delimiter=",")).get(name)
        return simple_role(role, roles) if role else "none"
    if short == FAB_AUTH_MANAGER:
        return best_role(_fab_role_names(name), roles)
    raise AccessDenied(
        f"the role of {name!r} cannot be read under the auth manager {manager!r}: the operations "
        f"DAGs read roles from {SIMPLE_AUTH_MANAGER}'s users or FAB's user table"
    )


def simple_users(entries: Iterable[str]) -> dict[str, str]:
    """``["alice:op", "team:viewer:t1|t2"]`` -> ``{"alice": "op", "team": "viewer"}``."""
    users: dict[str, str] = {}
    for entry in entries:
        parts = [p.strip() for p in entry.split(":")]
        if len(parts) >= 2 and parts[0]:
            users[parts[0]] = parts[1]
    return users


def _fab_role_names(name: str) -> list[str]:
    """The FAB roles of ``name`` from the metadata DB (where the FAB auth manager keeps them)."""
    try:
        from airflow import settings
        from airflow.providers.fab.auth_manager.models import User
        from sqlalchemy import select

        with settings.Session() as session:
            user = session.scalar(select(User).where(User.username == name))
            return [str(role.name) for role in user.roles] if user is not None else []
    except (ImportError, RuntimeError, AttributeError) as exc:
        raise AccessDenied(
            f"the FAB roles of {name!r} cannot be read here ({type(exc).__name__}: {exc}); "
            "Airflow 3 blocks the metadata DB in task processes"
        ) from None


# --- the decision for one run of an operations DAG -------------------------------------------


def acting_user(
    dag_id: str,
    triggering_user: str | None,
    run_type: str,
    lookup: Callable[[str], str],
    *,
    needed: str = ACT_ROLE,
    system_run_types: Collection[str] = (),
) -> str:
    """Whom a run of ``dag_id`` acts for: the user who triggered it, when their role is ``needed``
    or higher; ``airflow:<dag_id>`` for a run Airflow started itself (``run_type`` in
    ``system_run_types`` and no triggering user: a scheduled run of a scheduled DAG). Anything
    else raises :class:`AccessDenied` naming the user, their role and the role needed; the caller
    has changed nothing yet.

    ``lookup`` turns a user name into a UI role (:func:`role_of_name` in a task).
    """
    if not triggering_user:
        if run_type in system_run_types:
            return f"airflow:{dag_id}"
        raise AccessDenied(
            f"{dag_id}: refused: this {run_type or 'unknown'} run has no triggering user. {dag_id} "
            f"changes the sync state, so it runs only for an authenticated Airflow user with the role "
            f"{at_least(needed)}: trigger it from the Airflow UI or REST API as that user. "
            "Nothing was changed."
        )
    try:
        role = lookup(triggering_user)
    except AccessDenied as exc:
        raise AccessDenied(
            f"{dag_id}: refused: user {triggering_user!r} triggered this run, but {exc}; it needs the role "
            f"{at_least(needed)}. Nothing was changed."
        ) from None
    if level(role) < level(needed):
        raise AccessDenied(
            f"{dag_id}: refused: user {triggering_user!r} has the role {role!r}; {dag_id} needs the role "
            f"{at_least(needed)} (the same roles as the d365sync operations UI). Nothing was changed."
        )
    return triggering_user
