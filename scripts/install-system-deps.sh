#!/usr/bin/env bash
# Install the system ODBC packages the project needs (unixODBC and the SQLite, PostgreSQL and
# MariaDB drivers). Idempotent: does nothing when they are present. As root it uses apt-get;
# otherwise it prints the exact command to run and fails, because nothing works without them.
set -euo pipefail

PACKAGES=(unixodbc libsqliteodbc odbc-postgresql odbc-mariadb chromium chromium-driver)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
  done
else
  echo "system-deps: dpkg not found; install unixODBC plus the SQLite3, PostgreSQL and MariaDB ODBC drivers" \
       "with your package manager, then rerun." >&2
  command -v odbcinst >/dev/null 2>&1 && exit 0 || exit 1
fi

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "system-deps: ODBC packages present (${PACKAGES[*]})"
  exit 0
fi

cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
if [[ $(id -u) -eq 0 ]]; then
  echo "system-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "system-deps: missing ${missing[*]}. Run as root:" >&2
  echo "  sudo sh -c '$cmd'" >&2
  exit 1
fi
