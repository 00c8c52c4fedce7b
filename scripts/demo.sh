#!/usr/bin/env bash
# The full stack on the embedded defaults: Dataverse sandbox, SQLite ERP over ODBC, SQLite state
# store, Airflow standalone (LocalExecutor, SQLite metadata) with AIRFLOW_HOME=var/airflow.
#   scripts/demo.sh start   sandbox + ERP + connections + pool + airflow standalone, DAGs unpaused
#   scripts/demo.sh stop    stop what start started, by the pids in var/demo/pids
#   scripts/demo.sh sync    every entity DAG once in-process (dag.test()), parents first, summary table
#   scripts/demo.sh env     print the environment (source it to use the airflow CLI on the demo)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-$REPO/.venv}
DEMO=${DEMO_DIR:-$REPO/var/demo}
PIDS=$DEMO/pids
DV_PORT=${DEMO_PORT:-8765}
UI_PORT=${AIRFLOW_PORT:-8080}
ROWS=${DEMO_ROWS:-1000}
mkdir -p "$DEMO" "$PIDS"

write_env() {
    local dv="http://127.0.0.1:$DV_PORT"
    cat > "$DEMO/airflow.env" <<ENV
export AIRFLOW_HOME=$REPO/var/airflow
export AIRFLOW__CORE__DAGS_FOLDER=$REPO/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$REPO/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM=4
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=30
export AIRFLOW__API__PORT=$UI_PORT
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=admin:admin
export D365SYNC_STAGING_ROOT=file://$REPO/var/staging
export AIRFLOW_CONN_DYNAMICS_DEFAULT='{"conn_type": "dynamics", "host": "$dv", "login": "51f81489-12ee-4a9e-aaae-a2591f45987d", "password": "sandbox-secret", "extra": {"tenant_id": "sandbox-tenant", "authority_host": "$dv"}}'
export AIRFLOW_CONN_ERP_DEFAULT='{"conn_type": "erp_odbc", "schema": "$DEMO/erp.db", "extra": {"driver": "SQLite3"}}'
export AIRFLOW_CONN_SYNC_STATE_DEFAULT='{"conn_type": "sqlite", "host": "$DEMO/state.db"}'
export PATH=$VENV/bin:\$PATH
ENV
}

alive() { [[ -f "$PIDS/$1.pid" ]] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

start_sandbox() {
    if alive dataverse; then echo "dataverse sandbox already running (pid $(cat "$PIDS/dataverse.pid"))"; return; fi
    setsid "$VENV/bin/d365sync" sandbox dataverse --host 127.0.0.1 --port "$DV_PORT" \
        --data "$DEMO/dataverse" --seed 200 > "$DEMO/dataverse.log" 2>&1 &
    echo $! > "$PIDS/dataverse.pid"
    for _ in $(seq 90); do grep -q '^ready ' "$DEMO/dataverse.log" 2>/dev/null && break; sleep 1; done
    grep -q '^ready ' "$DEMO/dataverse.log" || { tail "$DEMO/dataverse.log"; exit 1; }
    echo "dataverse sandbox: http://127.0.0.1:$DV_PORT (pid $(cat "$PIDS/dataverse.pid"))"
}

init_erp() {
    [[ -f "$DEMO/erp.db" ]] && { echo "ERP: $DEMO/erp.db (kept)"; return; }
    "$VENV/bin/d365sync" sandbox erp init --odbc "DRIVER={SQLite3};Database=$DEMO/erp.db;" --rows "$ROWS"
    "$VENV/bin/python" scripts/demo_tidy_erp.py "DRIVER={SQLite3};Database=$DEMO/erp.db;"
}

prepare() {
    write_env
    # shellcheck disable=SC1091
    source "$DEMO/airflow.env"
    start_sandbox
    init_erp
    airflow db migrate > "$DEMO/migrate.log" 2>&1 || { tail -20 "$DEMO/migrate.log"; exit 1; }
    airflow pools set dynamics_api 2 "Tasks that call the Dataverse Web API" > /dev/null
}

start() {
    prepare
    if alive airflow; then echo "airflow already running (pid $(cat "$PIDS/airflow.pid"))"; else
        setsid airflow standalone > "$AIRFLOW_HOME/standalone.log" 2>&1 &
        echo $! > "$PIDS/airflow.pid"
    fi
    echo -n "waiting for Airflow on :$UI_PORT "
    for _ in $(seq 180); do
        curl -fs "http://127.0.0.1:$UI_PORT/api/v2/monitor/health" > /dev/null 2>&1 && break
        echo -n "."; sleep 2
    done
    echo
    for dag in $(python -c 'from d365sync.airflow.dag_factory import *; print(*(dag_id_for(e) for e in entity_order(load_specs())), "reconcile")'); do
        for _ in $(seq 60); do airflow dags unpause "$dag" > /dev/null 2>&1 && break; sleep 2; done
    done
    local pw
    pw=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' \
        "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated" 2>/dev/null || echo "see $AIRFLOW_HOME/standalone.log")
    echo "Airflow UI: http://127.0.0.1:$UI_PORT   login: admin / $pw"
    echo "Dataverse sandbox: http://127.0.0.1:$DV_PORT   ERP: $DEMO/erp.db   state: $DEMO/state.db"
    echo "CLI on the demo: source $DEMO/airflow.env      stop: make stop"
}

stop() {
    for name in airflow dataverse; do
        if alive "$name"; then
            pid=$(cat "$PIDS/$name.pid")
            # started with setsid: the session holds every process it spawned (scheduler, triggerer…)
            members=$(ps -o pid= -s "$pid" 2>/dev/null | tr '\n' ' ')
            kill -TERM $members 2>/dev/null || true
            for _ in $(seq 30); do [[ -z "$(ps -o pid= -s "$pid" 2>/dev/null | tr -d ' \n')" ]] && break; sleep 1; done
            left=$(ps -o pid= -s "$pid" 2>/dev/null | tr '\n' ' ')
            [[ -n "${left// }" ]] && kill -KILL $left 2>/dev/null
            echo "stopped $name (pid $pid; session members: $members)"
        fi
        rm -f "$PIDS/$name.pid"
    done
}

sync() {
    prepare
    python -m d365sync.airflow.runner "$@"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    sync) shift; sync "$@" ;;
    env) write_env; cat "$DEMO/airflow.env" ;;
    *) echo "usage: $0 start|stop|sync|env" >&2; exit 2 ;;
esac
