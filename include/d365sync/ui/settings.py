"""Settings of the operations UI, read from the environment when the app is created.

Why environment variables: the app is built when the Airflow API server loads the plugin, before
any request, and ``Variable.get`` there would be a metadata-DB query at import. Every setting
has a default that makes the embedded demo work with nothing set.

==================================  ===============================================================
``D365SYNC_UI_STATE_URL``           SQLAlchemy URL of the sync state store; else the connection
                                    ``AIRFLOW_CONN_SYNC_STATE_DEFAULT`` (URI or JSON, ``sqlite`` or
                                    ``postgres``); else ``sqlite:///var/demo/state.db``
``D365SYNC_UI_STATE_SCHEMA``        PostgreSQL schema of the state tables (else the connection's
                                    ``schema`` extra)
``D365SYNC_UI_PAGE_SIZE``           rows per page (50)
``D365SYNC_UI_BULK_LIMIT``          most review items one bulk decision touches (500)
``D365SYNC_AIRFLOW_API_URL``        Airflow API base the "replay now" button calls with the
                                    user's token (``http://host:8080``); else Airflow's
                                    ``[api] base_url``; else the API server on loopback
                                    (``http://127.0.0.1:<[api] port>``). Never the request's
                                    ``Host``: that would send the token wherever it points
``D365SYNC_UI_REPLAY_DAG``          DAG triggered by "replay now" (``replay_dead_letters``)
``D365SYNC_UI_DAG_PREFIX``          entity DAG id prefix (``sync_``)
``D365SYNC_UI_DATA_DOCS_DIR``       directory holding GX Data Docs sites (served read-only)
``D365SYNC_UI_DRIFT_DIR``           directory of reconcile drift reports (``*.json``) for the
                                    dashboard and the health report
``D365SYNC_UI_SECRET``              HMAC key of the CSRF tokens; default Airflow's
                                    ``[api] secret_key`` (the same on every API server worker)
``D365SYNC_UI_ROLE_MAP``            extra auth-manager role names, ``"SyncOps:op,Auditors:viewer"``
                                    (:mod:`d365sync.roles`; the operations DAGs read it too, so
                                    set it on the workers as well)
``D365SYNC_UI_STALE_REVIEW_DAYS``   open reviews older than this are flagged (7)
``D365SYNC_WEBHOOK_KEY``            key(s) of the Dataverse webhook receiver, comma-separated for
                                    rotation (each at least 16 characters); else the Airflow
                                    Variable ``d365sync_webhook_key``; neither: the receiver answers
                                    503 (:mod:`d365sync.ui.events`)
``D365SYNC_APP_USER_IDS``           the sync's Dataverse application user id(s), comma-separated:
                                    notifications of their writes are stored ``ignored``; else
                                    ``WhoAmI`` of the Dynamics connection, asked once
``D365SYNC_DYNAMICS_CONN_ID``       that connection (``dynamics_default``), as for the DAGs
==================================  ===============================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from d365sync.engine.intake import APP_USER_IDS_ENV, parse_app_user_ids
from d365sync.roles import ROLE_MAP_ENV, parse_role_map

DEFAULT_STATE_URL = "sqlite:///var/demo/state.db"


@dataclass(frozen=True)
class UiSettings:
    """Everything the app needs besides the request: where the state is and how to act."""

    state_url: str = DEFAULT_STATE_URL
    state_schema: str | None = None
    page_size: int = 50
    bulk_limit: int = 500
    airflow_api_url: str | None = None
    replay_dag_id: str = "replay_dead_letters"
    dag_prefix: str = "sync_"
    data_docs_dir: Path | None = None
    drift_dir: Path | None = None
    secret: str | None = None
    role_map: Mapping[str, str] = field(default_factory=dict)
    stale_review_days: int = 7
    # names of the pii: true fields and columns, masked for readers who may not reveal (None: read
    # from the entity files, D365SYNC_ENTITIES_DIR or the shipped ones, when the app is built)
    personal_fields: frozenset[str] | None = None
    # the webhook receiver: its keys (never in a repr) and the sync's own application users
    webhook_keys: tuple[str, ...] = field(default=(), repr=False)
    app_user_ids: frozenset[str] | None = None
    dynamics_conn_id: str = "dynamics_default"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> UiSettings:
        """Settings from ``D365SYNC_UI_*`` variables; keyword arguments win over the environment."""
        env = os.environ if environ is None else environ
        url, schema = state_location(env)
        values: dict[str, object] = {
            "state_url": url,
            "state_schema": env.get("D365SYNC_UI_STATE_SCHEMA") or schema,
            "page_size": _int(env, "D365SYNC_UI_PAGE_SIZE", 50),
            "bulk_limit": _int(env, "D365SYNC_UI_BULK_LIMIT", 500),
            "airflow_api_url": env.get("D365SYNC_AIRFLOW_API_URL") or None,
            "replay_dag_id": env.get("D365SYNC_UI_REPLAY_DAG") or "replay_dead_letters",
            "dag_prefix": env.get("D365SYNC_UI_DAG_PREFIX") or "sync_",
            "data_docs_dir": Path(d) if (d := env.get("D365SYNC_UI_DATA_DOCS_DIR")) else None,
            "drift_dir": Path(d) if (d := env.get("D365SYNC_UI_DRIFT_DIR")) else None,
            "secret": env.get("D365SYNC_UI_SECRET") or None,
            "role_map": parse_role_map(env.get(ROLE_MAP_ENV, "")),
            "stale_review_days": _int(env, "D365SYNC_UI_STALE_REVIEW_DAYS", 7),
            "webhook_keys": _items(env.get("D365SYNC_WEBHOOK_KEY", "")),
            "app_user_ids": parse_app_user_ids(env.get(APP_USER_IDS_ENV, "")),
            "dynamics_conn_id": env.get("D365SYNC_DYNAMICS_CONN_ID") or "dynamics_default",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _items(raw: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def state_location(env: Mapping[str, str]) -> tuple[str, str | None]:
    """(SQLAlchemy URL, schema) of the state store: the explicit URL, else the connection.

    The connection is parsed by the engine's own reader (shared with the CLI and the DAGs), so
    ``sync_state_default`` means the same store everywhere.
    """
    if url := env.get("D365SYNC_UI_STATE_URL"):
        return url, None
    from d365sync.engine import connections

    return connections.state_url(connections.from_env(connections.STATE_CONN, env))
