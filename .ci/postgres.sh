#!/usr/bin/env bash
# Install PostgreSQL from Debian's packages, start it on localhost and create a database for the
# registry tests. Prints the connection URI on success; prints nothing (and explains on stderr)
# where PostgreSQL cannot be installed, so those tests skip with a message instead of failing.
set -uo pipefail
{
  if ! command -v pg_lsclusters >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  fi
} >&2 || { echo "PostgreSQL could not be installed" >&2; exit 0; }
version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
[ -n "$version" ] || { echo "no PostgreSQL cluster found" >&2; exit 0; }
pg_lsclusters -h | grep -q "^$version main .* online" || pg_ctlcluster "$version" main start >&2 || { echo "PostgreSQL did not start" >&2; exit 0; }
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
runuser -u postgres -- psql -q -v ON_ERROR_STOP=0 >&2 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow_clip') THEN
    CREATE ROLE mlflow_clip LOGIN CREATEDB PASSWORD 'mlflow_clip';
  END IF;
END $$;
SQL
runuser -u postgres -- createdb -O mlflow_clip mlflow_clip 2>/dev/null || true
echo "postgresql://mlflow_clip:mlflow_clip@127.0.0.1:5432/mlflow_clip"
