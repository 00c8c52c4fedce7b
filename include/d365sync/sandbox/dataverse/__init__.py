"""A local Dataverse Web API sandbox (FastAPI + uvicorn + SQLite).

Run it with ``d365sync sandbox dataverse --data DIR [--port 0] [--seed N] [--tls-cert F --tls-key F]``.
Real clients (MSAL, azure-identity, Microsoft's ``powerplatform-dataverse-client``, plain OData
HTTP) work against it unchanged; see ``/work/shared/reference/dataverse-web-api.md`` for the
behaviour it follows.

Defaults: tenant ``sandbox-tenant``, client id ``51f81489-12ee-4a9e-aaae-a2591f45987d``, secret
``sandbox-secret``, environment URL = the server's own ``scheme://host:port`` (token audience;
scope ``<env-url>/.default``).  ``DIR/sandbox.json`` can add users and settings (see
:mod:`.config`).

Endpoints
---------
Identity (Entra-compatible): ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (also without
``v2.0``), ``GET /{tenant}/discovery/v2.0/keys``, ``GET /common/discovery/instance``,
``POST /{tenant}/oauth2/v2.0/token`` (client credentials).

Web API: ``/api/data/v9.0|v9.1|v9.2/…`` — service document, ``$metadata``, ``WhoAmI``,
``EntityDefinitions``, the tables in :mod:`.schema` (with ``…(id)/<navigation property>`` and its
``/$ref``), ``$batch``, and the bound actions ``CreateMultiple``/``UpdateMultiple``/``UpsertMultiple``.

Admin (not Dataverse; for tests and benchmarks). Reads need no auth. Writes (``POST``)
need ``Content-Type: application/json`` (else 415) and either a bearer token the sandbox issued
or an ``X-Sandbox-Admin-Secret: <client secret of an app>`` header (else 401), so a web page the
developer visits cannot change the sandbox; :class:`.process.DataverseSandbox` sends the header:

``GET /_sandbox/health``
    ``{"status": "ok", "version": <current rowversion>, "env_url": …, "tenant": …}``
``GET /_sandbox/counters``
    ``requests`` (HTTP calls to the Web API), ``operations`` ($batch parts and bulk targets counted
    one by one), ``throttled``, ``auth_failures``, ``statuses`` / ``routes`` (HTTP level, e.g.
    ``"GET accounts"``, ``"PATCH accounts()"``, ``"POST $batch"``), ``operation_routes`` /
    ``operation_statuses``, ``token_requests``, ``token_failures``, ``tokens_issued``.
``POST /_sandbox/counters/reset``
    Zero all counters (send ``{}`` as the body).
``GET /_sandbox/knobs`` / ``POST /_sandbox/knobs``
    JSON object, any subset of: ``latency_ms`` (added per API request), ``error_rate`` (0..1 share
    of injected 5xx) and ``error_status`` (default 503), ``throttle_next`` (the next N API requests
    get 429) with ``throttle_retry_after`` seconds, ``random_seed``, ``expire_tokens_now: true``
    (every token issued so far becomes expired), ``limits: {"requests", "window_seconds",
    "concurrency"}``, ``reset_limits: true`` (clear the sliding windows), ``retention_seconds``
    (change-tracking retention), ``token_lifetime``.  Returns the resulting settings.

Module layout: :mod:`.schema` (declarative tables), :mod:`.store` (SQLite), :mod:`.records`
(value validation/rendering), :mod:`.filters` ($filter → SQL), :mod:`.query` (reads, paging,
change tracking), :mod:`.projection` ($select, $expand, lookup annotations), :mod:`.writes`
(create/update/upsert/delete/bulk, lookup binds), :mod:`.metadata`, :mod:`.service` (the
dispatcher shared by HTTP and ``$batch``), :mod:`.identity` (tokens), :mod:`.limits` (service
protection, knobs, counters), :mod:`.app` (FastAPI), :mod:`.seed`, :mod:`.cli`.  Nothing here imports Airflow.
"""
