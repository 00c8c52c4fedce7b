#!/usr/bin/env bash
# The full stack on the embedded defaults: Dataverse sandbox, SQLite ERP over ODBC, SQLite state
# store, Airflow standalone (LocalExecutor, SQLite metadata) with AIRFLOW_HOME=var/airflow.
#   scripts/demo.sh start   sandbox + ERP + connections + pool + airflow standalone, DAGs unpaused
#   scripts/demo.sh stop    stop what start (or sync) started, by the pids in var/demo/pids
#   scripts/demo.sh sync    every entity DAG once, parents first, summary table:
#                           demo running  -> manual runs through its REST API, run by its scheduler
#                           demo stopped  -> dag.test() in a separate AIRFLOW_HOME (var/demo/airflow-sync)
#                           Never dag.test() against var/airflow/airflow.db.
#   scripts/demo.sh env     print the environment (source it to use the airflow CLI on the demo)
# Ports: DEMO_PORT (Dataverse sandbox, 8765), AIRFLOW_PORT (api-server and UI, 8080),
# AIRFLOW_WORKER_LOG_PORT (8793) and AIRFLOW_TRIGGER_LOG_PORT (8794), the log servers.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-$REPO/.venv}
DEMO=${DEMO_DIR:-$REPO/var/demo}
PIDS=$DEMO/pids
DV_PORT=${DEMO_PORT:-8765}
UI_PORT=${AIRFLOW_PORT:-8080}
WORKER_LOG_PORT=${AIRFLOW_WORKER_LOG_PORT:-8793}
TRIGGER_LOG_PORT=${AIRFLOW_TRIGGER_LOG_PORT:-8794}
ROWS=${DEMO_ROWS:-1000}
# user:role for SimpleAuthManager (roles viewer, user, op, admin); passwords are generated on the
# first start into $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated
USERS=${DEMO_USERS:-admin:admin,operator:op,viewer:viewer}
LIVE_HOME=$REPO/var/airflow
SYNC_HOME=$DEMO/airflow-sync
mkdir -p "$DEMO" "$PIDS"

# pii_key: the demo's personal-data encryption key, generated once into $DEMO/pii.key (mode 600);
# the customers entity has pii fields, so runs refuse to start without one (docs/security.md).
pii_key() {
    [[ -s "$DEMO/pii.key" ]] || PYTHONPATH="$REPO/include" "$VENV/bin/python" -m d365sync.cli privacy generate-key --out "$DEMO/pii.key"
}

# webhook_key: the key Dataverse's webhook sends to the operations app's receiver
# (/d365sync/events/dataverse), generated once into $DEMO/webhook.key (mode 600).
webhook_key() {
    [[ -s "$DEMO/webhook.key" ]] || (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$DEMO/webhook.key")
}

# write_env FILE AIRFLOW_HOME: the demo's settings as a sourceable file.
write_env() {
    local file=$1 home=$2 dv="http://127.0.0.1:$DV_PORT"
    pii_key
    webhook_key
    cat > "$file" <<ENV
export AIRFLOW_HOME=$home
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///$home/airflow.db
export AIRFLOW__CORE__DAGS_FOLDER=$REPO/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$REPO/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM=4
export AIRFLOW__CORE__EXECUTOR=d365sync.airflow.executor.WarmLocalExecutor
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=30
export AIRFLOW__API__PORT=$UI_PORT
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$UI_PORT/execution/
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=$WORKER_LOG_PORT
export AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=$TRIGGER_LOG_PORT
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=$USERS
export D365SYNC_STAGING_ROOT=file://$REPO/var/staging
export D365SYNC_DATA_DOCS_DIR=$DEMO/data-docs
export D365SYNC_UI_DATA_DOCS_DIR=$DEMO/data-docs
export D365SYNC_UI_DRIFT_DIR=$REPO/var/staging/reconcile/reports
export AIRFLOW_CONN_DYNAMICS_DEFAULT='{"conn_type": "dynamics", "host": "$dv", "login": "51f81489-12ee-4a9e-aaae-a2591f45987d", "password": "sandbox-secret", "extra": {"tenant_id": "sandbox-tenant", "authority_host": "$dv"}}'
export AIRFLOW_CONN_ERP_DEFAULT='{"conn_type": "erp_odbc", "schema": "$DEMO/erp.db", "extra": {"driver": "SQLite3"}}'
export AIRFLOW_CONN_SYNC_STATE_DEFAULT='{"conn_type": "sqlite", "host": "$DEMO/state.db"}'
export D365SYNC_PII_KEYS=\$(cat "$DEMO/pii.key")
export D365SYNC_WEBHOOK_KEY=\$(cat "$DEMO/webhook.key")
export PATH=$VENV/bin:\$PATH
ENV
}

# expected NAME: what the command line of a recorded pid must contain (guards against pid reuse).
expected() {
    case $1 in airflow) echo "airflow" ;; dataverse) echo "sandbox dataverse" ;; conflicts) echo "sandbox conflicts" ;; esac
}

alive() {
    [[ -f "$PIDS/$1.pid" ]] || return 1
    local pid args
    pid=$(cat "$PIDS/$1.pid")
    kill -0 "$pid" 2>/dev/null || return 1
    args=$(ps -ww -o args= -p "$pid" 2>/dev/null || true)
    [[ "$args" == *"$(expected "$1")"* ]]
}

# family PID: the pid, every process in its session (setsid), and all their descendants (a child
# that started its own session or group is still found through its parent). One ps snapshot.
family() {
    ps -eo pid=,ppid=,sid= | awk -v root="$1" '
        { pid[NR] = $1; ppid[NR] = $2; sid[NR] = $3 }
        END {
            keep[root] = 1
            for (i = 1; i <= NR; i++) if (sid[i] == root) keep[pid[i]] = 1
            do {
                changed = 0
                for (i = 1; i <= NR; i++)
                    if (!(pid[i] in keep) && (ppid[i] in keep)) { keep[pid[i]] = 1; changed = 1 }
            } while (changed)
            for (p in keep) printf "%s ", p
        }'
}

# running PID...: those still running (zombies, already dead but not reaped yet, do not count).
running() {
    [[ $# -gt 0 ]] || return 0
    ps -o pid=,stat= -p "$(echo "$@" | tr ' ' ',')" 2>/dev/null | awk '$2 !~ /^Z/ {printf "%s ", $1}' || true
}

plural() { local n; n=$(wc -w <<< "$1"); if [[ $n == 1 ]]; then echo "1 process"; else echo "$n processes"; fi; }

# stop_one NAME: TERM the process and its family, wait up to DEMO_STOP_GRACE (30) seconds, KILL
# what is left. Never fails.
stop_one() {
    local name=$1 pid members left grace=${DEMO_STOP_GRACE:-30}
    if [[ ! -f "$PIDS/$name.pid" ]]; then return 0; fi
    pid=$(cat "$PIDS/$name.pid")
    if ! alive "$name"; then
        echo "$name: not running (stale pid file for $pid removed)"
        rm -f "$PIDS/$name.pid"
        return 0
    fi
    members=$(family "$pid")
    # shellcheck disable=SC2086
    kill -TERM $members 2>/dev/null || true
    for _ in $(seq $((grace * 2))); do
        [[ -z "$(running $members)" ]] && break
        sleep 0.5
    done
    # shellcheck disable=SC2046  # and whatever the family started meanwhile (found by session)
    left=$(running $(printf '%s\n' $members $(family "$pid") | sort -u))
    if [[ -n "$left" ]]; then
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        echo "stopped $name (pid $pid): $(plural "$members"), $(plural "$left") killed after ${grace} s"
    else
        echo "stopped $name (pid $pid): $(plural "$members")"
    fi
    rm -f "$PIDS/$name.pid"
}

start_sandbox() {
    if alive dataverse; then echo "dataverse sandbox already running (pid $(cat "$PIDS/dataverse.pid"))"; return; fi
    # a second application user for people's edits (d365sync.sandbox.dataverse.config.PERSON_USER)
    mkdir -p "$DEMO/dataverse"
    [[ -f "$DEMO/dataverse/sandbox.json" ]] || PYTHONPATH="$REPO/include" "$VENV/bin/python" -c 'import json, sys
from d365sync.sandbox.dataverse.config import PERSON_USER
json.dump({"users": [PERSON_USER]}, open(sys.argv[1], "w"))' "$DEMO/dataverse/sandbox.json"
    setsid "$VENV/bin/d365sync" sandbox dataverse --host 127.0.0.1 --port "$DV_PORT" \
        --data "$DEMO/dataverse" --seed 200 > "$DEMO/dataverse.log" 2>&1 &
    echo $! > "$PIDS/dataverse.pid"
    for _ in $(seq 90); do grep -q '^ready ' "$DEMO/dataverse.log" 2>/dev/null && break; sleep 1; done
    grep -q '^ready ' "$DEMO/dataverse.log" || { tail "$DEMO/dataverse.log"; stop_one dataverse; exit 1; }
    echo "dataverse sandbox: http://127.0.0.1:$DV_PORT (pid $(cat "$PIDS/dataverse.pid"))"
}

init_erp() {
    [[ -f "$DEMO/erp.db" ]] && { echo "ERP: $DEMO/erp.db (kept)"; return; }
    "$VENV/bin/d365sync" sandbox erp init --odbc "DRIVER={SQLite3};Database=$DEMO/erp.db;" --rows "$ROWS"
    "$VENV/bin/python" scripts/demo_tidy_erp.py "DRIVER={SQLite3};Database=$DEMO/erp.db;"
}

migrate() {
    mkdir -p "$AIRFLOW_HOME"
    airflow db migrate > "$DEMO/migrate.log" 2>&1 || { tail -20 "$DEMO/migrate.log"; exit 1; }
}

# logins: one line per demo user with its role and password (generated by the api-server).
logins() {
    python - "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated" "$USERS" <<'PY'
import json, sys
try:
    passwords = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    passwords = {}
for entry in sys.argv[2].split(","):
    user, role = entry.split(":")
    print(f"  {user:<10} role {role:<7} password {passwords.get(user, '(not generated yet)')}")
PY
}

start() {
    write_env "$DEMO/airflow.env" "$LIVE_HOME"
    # shellcheck disable=SC1091
    source "$DEMO/airflow.env"
    start_sandbox
    init_erp
    migrate
    airflow pools set dynamics_api 2 "Tasks that call the Dataverse Web API" > /dev/null
    if alive airflow; then echo "airflow already running (pid $(cat "$PIDS/airflow.pid"))"; else
        setsid airflow standalone > "$AIRFLOW_HOME/standalone.log" 2>&1 &
        echo $! > "$PIDS/airflow.pid"
    fi
    echo -n "waiting for Airflow on :$UI_PORT "
    for _ in $(seq 180); do
        curl -fs "http://127.0.0.1:$UI_PORT/api/v2/monitor/health" > /dev/null 2>&1 && break
        alive airflow || { echo; tail -30 "$AIRFLOW_HOME/standalone.log"; exit 1; }
        echo -n "."; sleep 2
    done
    echo
    for dag in $(python -c 'from d365sync.airflow.dag_factory import *; print(*(dag_id_for(e) for e in entity_order(load_specs())), "reconcile")'); do
        for _ in $(seq 60); do airflow dags unpause "$dag" > /dev/null 2>&1 && break; sleep 2; done
    done
    # Dataverse notifies the receiver of changes to the event-driven entities' tables
    if d365sync events register --url "http://127.0.0.1:$UI_PORT/d365sync/events/dataverse" > "$DEMO/webhook.log" 2>&1; then
        if grep -q '^nothing to register' "$DEMO/webhook.log"; then echo "webhook: $(cat "$DEMO/webhook.log")"
        else echo "webhook: sandbox changes notify http://127.0.0.1:$UI_PORT/d365sync/events/dataverse"; fi
    else
        echo "webhook registration failed:"; tail -5 "$DEMO/webhook.log"
    fi
    # after the first invoices run, a few invoices edited on both sides: the review queue's examples
    if [[ "${DEMO_CONFLICTS:-3}" -gt 0 ]] && ! alive conflicts; then
        setsid "$VENV/bin/d365sync" sandbox conflicts --invoices "${DEMO_CONFLICTS:-3}" > "$DEMO/conflicts.log" 2>&1 &
        echo $! > "$PIDS/conflicts.pid"
        echo "review queue: ${DEMO_CONFLICTS:-3} invoices get edited on both sides after their first sync ($DEMO/conflicts.log)"
    fi
    echo "Airflow UI: http://127.0.0.1:$UI_PORT   logins (SimpleAuthManager):"
    logins
    echo "  passwords: $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
    echo "  viewer reads with e-mails and phones masked; operator and admin decide reviews and replay dead letters"
    echo "Dirty ERP rows become dead letters: D365 Sync (top of the navigation bar) -> Dead letters, grouped by cause"
    echo "Dataverse sandbox: http://127.0.0.1:$DV_PORT   ERP: $DEMO/erp.db   state: $DEMO/state.db"
    echo "CLI on the demo: source $DEMO/airflow.env      sync once: make sync      stop: make stop"
}

stop() {
    local any=""
    # the conflict seeder ends by itself once it has edited: its pid file is no sign of a live demo
    if [[ -f "$PIDS/conflicts.pid" ]] && ! alive conflicts; then rm -f "$PIDS/conflicts.pid"; fi
    for name in conflicts airflow dataverse; do
        [[ -f "$PIDS/$name.pid" ]] && any=1
        stop_one "$name"
    done
    [[ -n "$any" ]] || echo "nothing to stop: the demo is not running"
    return 0
}

sync() {
    if alive airflow; then
        # The demo is up: its scheduler runs the DAGs. Its settings (port, AIRFLOW_HOME) are the
        # ones start wrote; the runner only talks to its REST API, never to its metadata DB.
        # shellcheck disable=SC1091
        source "$DEMO/airflow.env"
        echo "demo running: triggering manual runs through http://127.0.0.1:$AIRFLOW__API__PORT (scheduler runs them)"
        python -m d365sync.airflow.runner --api "http://127.0.0.1:$AIRFLOW__API__PORT" \
            --passwords "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated" "$@"
        return
    fi
    # No demo: dag.test() in-process, against a metadata DB of its own.
    write_env "$DEMO/sync.env" "$SYNC_HOME"
    # shellcheck disable=SC1091
    source "$DEMO/sync.env"
    echo "demo not running: dag.test() in-process with AIRFLOW_HOME=$AIRFLOW_HOME"
    if ! alive dataverse; then
        start_sandbox
        trap 'stop_one dataverse' EXIT  # started for this sync only
    fi
    init_erp
    migrate
    python -m d365sync.airflow.runner "$@"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    sync) shift; sync "$@" ;;
    env) write_env "$DEMO/airflow.env" "$LIVE_HOME"; cat "$DEMO/airflow.env" ;;
    *) echo "usage: $0 start|stop|sync|env" >&2; exit 2 ;;
esac
