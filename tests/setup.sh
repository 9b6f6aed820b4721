#!/usr/bin/env bash
# Installs and starts the real peers the tests run against, idempotently:
#   Alertmanager 0.25 and Prometheus (Debian), moto 5.2.5 (PyPI venv under target/peers),
#   PostgreSQL (Debian; started if stopped). Prints the environment the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
peers="$root/target/peers"
mkdir -p "$peers"

need_apt=()
command -v prometheus-alertmanager >/dev/null || need_apt+=(prometheus-alertmanager)
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v python3 >/dev/null || need_apt+=(python3 python3-venv)
# Headless Chromium opens the incident pages in tests/api/pages.rs.
[ -x /usr/bin/chromium ] || need_apt+=(chromium fonts-dejavu-core)
if ! command -v pg_ctlcluster >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  need_apt+=(postgresql)
elif ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  # The store fault tests start and stop a cluster of their own (initdb, pg_ctl).
  need_apt+=(postgresql)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (Debian)" >&2
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# PostgreSQL: start the cluster if it is installed but not running.
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null; then
    ver=$(ls /etc/postgresql | sort -V | tail -n1)
    echo "setup: starting PostgreSQL $ver" >&2
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    # A fresh Debian cluster wants a password over TCP: give postgres the one the tests use.
    su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
  fi
fi
pg_isready -q -h 127.0.0.1 -p 5432 || { echo "setup: PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }

# moto in a venv of its own (pinned: the tests were written against 5.2.5).
if [ ! -x "$peers/venv/bin/moto_server" ]; then
  echo "setup: installing moto 5.2.5 into $peers/venv" >&2
  python3 -m venv "$peers/venv"
  "$peers/venv/bin/pip" install -q 'moto[server]==5.2.5'
fi

cat <<ENV
export MOTO_SERVER=$peers/venv/bin/moto_server
export ALERTMANAGER_BIN=$(command -v prometheus-alertmanager)
export PROMETHEUS_BIN=$(command -v prometheus)
export CHROMIUM_BIN=/usr/bin/chromium
export PROMTOOL_BIN=$(command -v promtool)
export TEST_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres
ENV
