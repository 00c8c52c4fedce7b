# d365-erp-sync image for docker-compose.yaml: every Airflow component, the Dataverse sandbox and
# the init job run from it.
#
# Base: python:3.11-slim, not apache/airflow:3.3.2-python3.11. The project's dependency set is
# uv.lock (Airflow 3.3.2 + providers + GX + the sync engine), the same set CI tests. The official
# image ships its own Airflow installed against Airflow's constraints file plus ~60 providers;
# layering `uv sync --frozen` on it would install a second Airflow and make the image's versions
# differ from the tested ones. From slim we get one environment, exactly the lock, and a smaller
# image; what the official entrypoint adds (DB wait/migrate, user creation) is the airflow-init
# service of docker-compose.yaml.
FROM python:3.11-slim-bookworm

ARG UV_VERSION=0.13.8
ARG AIRFLOW_UID=50000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    AIRFLOW_HOME=/opt/airflow

# unixODBC + the ODBC drivers the ERP connection can use (PostgreSQL, SQLite, MariaDB);
# curl for the healthchecks, tini as PID 1 (signal propagation to celery workers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        unixodbc odbc-postgresql libsqliteodbc odbc-mariadb curl tini \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /opt/d365sync
# Dependencies first (cached while only the code changes), then the project itself.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY include ./include
COPY dags ./dags
COPY plugins ./plugins
COPY scripts ./scripts
RUN uv sync --frozen --no-dev

RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir /opt/airflow --no-create-home airflow \
    && mkdir -p /opt/airflow/logs /opt/airflow/auth /opt/d365sync/staging /opt/d365sync/dataverse \
    && chown -R "${AIRFLOW_UID}:0" /opt/airflow /opt/d365sync/staging /opt/d365sync/dataverse \
    && chmod -R g+rwX /opt/airflow /opt/d365sync/staging /opt/d365sync/dataverse

USER ${AIRFLOW_UID}
WORKDIR /opt/airflow
EXPOSE 8080 8765 8793 8794 8974 5555
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "version"]
