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
Webhooks are registered in ``serviceendpoints`` and ``sdkmessageprocessingsteps`` and delivered
after each committed write (:mod:`.webhooks`, :mod:`.delivery`).

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
    ``operation_statuses``, ``token_requests``, ``token_failures``, ``tokens_issued``,
    ``throttled_codes`` (429s by error code), ``execution_ms`` (measured server time of all API
    requests), ``execution_time_window_ms`` (per user id: server time in the current
    execution-time window), ``in_flight`` / ``max_in_flight`` (API requests the server worked on at
    once) and ``max_parallel_cost`` (requests spending simulated server time at once);
    ``webhook_delivered``, ``webhook_failed_attempts``, ``webhook_abandoned`` (notifications
    given up after ``webhook_max_attempts``) and ``webhook_pending`` (queued now).
``POST /_sandbox/counters/reset``
    Zero all counters (send ``{}`` as the body).
``GET /_sandbox/knobs`` / ``POST /_sandbox/knobs``
    JSON object, any subset of: ``latency_ms`` (added per API request, like network latency: not
    server time), ``record_cost_ms`` (server time per record written: a bulk action of N targets
    costs N times it) and ``request_cost_ms`` (server time per API request) — both spent outside
    any lock, so parallel requests overlap, and charged to the execution-time limit —
    ``error_rate`` (0..1 share of injected 5xx) and ``error_status`` (default 503),
    ``throttle_next`` (the next N API requests get 429) with ``throttle_retry_after`` seconds,
    ``random_seed``, ``expire_tokens_now: true`` (every token issued so far becomes expired),
    ``limits: {"requests", "window_seconds", "concurrency", "execution_time_ms",
    "execution_window_seconds"}``, ``reset_limits: true`` (clear the sliding windows),
    ``retention_seconds`` (change-tracking retention), ``token_lifetime``; for webhooks
    ``webhook_delay_ms`` (extra wait before a notification's first attempt),
    ``webhook_fail_next`` (fail the next N attempts without sending: ``webhook_fail_status``, 503
    by default, or 0 for a connection error), ``webhook_max_attempts`` (default 10) and
    ``webhook_backoff_ms`` (wait after the first failure, doubling; default 1000).  Returns the
    resulting settings.
``GET /_sandbox/webhooks[?status=pending|delivered|failed|cancelled&limit=N]``
    Webhook deliveries by status, and the newest N (default 100): step, endpoint, message,
    record, ``OperationId``, attempts, last HTTP status and error (query strings redacted),
    timings.

Service protection (reference §6), per application user, all answering 429 with ``Retry-After``
and the Dataverse error body: requests per sliding window (``0x80072322``; each ``$batch``
operation counts), combined execution time per sliding window (``0x80072321``; every API
request's measured server time, cost knobs included, default 1,200,000 ms per 300 s), and
concurrent requests (``0x80072326``).  Requests run in parallel up to the concurrency limit; only
SQLite's write transaction is serialised (see :mod:`.store`).

Module layout: :mod:`.schema` (declarative tables), :mod:`.store` (SQLite), :mod:`.records`
(value validation/rendering), :mod:`.filters` ($filter → SQL), :mod:`.query` (reads, paging,
change tracking), :mod:`.projection` ($select, $expand, lookup annotations), :mod:`.writes`
(create/update/upsert/delete/bulk, lookup binds), :mod:`.webhooks` (registrations, the
notification queue, the execution context), :mod:`.delivery` (sending it), :mod:`.metadata`,
:mod:`.service` (the dispatcher shared by HTTP and ``$batch``), :mod:`.identity` (tokens),
:mod:`.limits` (service protection, knobs, counters), :mod:`.app` (FastAPI), :mod:`.seed`,
:mod:`.cli`.  Nothing here imports Airflow.
"""
