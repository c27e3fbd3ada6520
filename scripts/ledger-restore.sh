#!/usr/bin/env bash
# Restore an agentq ledger backup made by scripts/ledger-backup.sh.
#
#   scripts/ledger-restore.sh DATABASE_URL IN_FILE
#   then: agentq migrate   (against the same database)
#
# One documented approach: restore into a database whose ledger schema holds
# no ledger tables yet (a fresh PostgreSQL, or one where the schema was
# dropped), BEFORE the workers' ledger writers reach it. The tables are
# restored whole (definitions, partitions, indexes, row-level security, rows;
# api_keys too when the backup has it) in ONE transaction: on any error
# nothing is left behind. The schema is the one the backup was taken from
# (pg_restore cannot rename it); it is created if missing. Owners and grants
# are not restored: the restoring user owns the tables, and `agentq migrate`
# afterwards re-applies the grants, recreates the partition helper function
# and records the migrations (every migration is idempotent, so it leaves the
# restored rows alone). A target that already has ledger tables is refused
# (exit 1): see docs/runbook.md#restore-the-ledger for merging rows written
# after the loss.
#
#   LEDGER_SCHEMA   optional: the schema you expect the backup to hold; the
#                   restore stops (exit 2) if the backup holds another one
set -euo pipefail

usage() {
  cat <<USAGE
usage: $(basename "$0") DATABASE_URL IN_FILE
  Restore a backup from scripts/ledger-backup.sh into a database that has no
  ledger tables in the backup's schema yet; then run \`agentq migrate\`.
  example: $(basename "$0") postgres://postgres@127.0.0.1:5432/agentq ledger-2026-11-28.dump
USAGE
}

if [ "$#" -eq 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then
  usage
  exit 0
fi
if [ "$#" -ne 2 ] || [ -z "$1" ] || [ -z "$2" ]; then
  echo "ledger-restore: expected DATABASE_URL and IN_FILE" >&2
  usage >&2
  exit 2
fi
url=$1
in=$2
if [ ! -f "$in" ] || [ ! -r "$in" ]; then
  echo "ledger-restore: IN_FILE \"$in\" is not a readable file" >&2
  exit 2
fi
for tool in pg_restore psql; do
  command -v "$tool" >/dev/null || { echo "ledger-restore: $tool not found (install postgresql-client)" >&2; exit 1; }
done

if ! list=$(pg_restore --list "$in" 2>/dev/null); then
  echo "ledger-restore: \"$in\" is not a pg_dump custom-format file (make backups with scripts/ledger-backup.sh)" >&2
  exit 2
fi
# TOC lines read "<id>; <tableoid> <oid> TABLE <schema> <name> <owner>".
schemas=$(awk '$4 == "TABLE" && $5 != "DATA" && $5 != "ATTACH" { print $5 }' <<<"$list" | sort -u)
tables=$(awk '$4 == "TABLE" && $5 != "DATA" && $5 != "ATTACH" { print $6 }' <<<"$list" | sort -u)
if [ "$(wc -w <<<"$schemas")" -ne 1 ]; then
  echo "ledger-restore: \"$in\" should hold the ledger tables of one schema; found schemas: ${schemas:-none}" >&2
  exit 2
fi
schema=$schemas
for t in usage_ledger usage_daily tenants tiers; do
  if ! grep -qx "$t" <<<"$tables"; then
    echo "ledger-restore: \"$in\" has no table $t: not a ledger backup from scripts/ledger-backup.sh" >&2
    exit 2
  fi
done
if [ -n "${LEDGER_SCHEMA:-}" ] && [ "$LEDGER_SCHEMA" != "$schema" ]; then
  echo "ledger-restore: the backup holds schema $schema, not LEDGER_SCHEMA=$LEDGER_SCHEMA; pg_restore cannot rename a schema: restore into a database where $schema is free" >&2
  exit 2
fi

psql_q() { psql --dbname="$url" --no-psqlrc --quiet --tuples-only --no-align -v ON_ERROR_STOP=1 "$@"; }

existing=$(psql_q -v schema="$schema" <<'SQL'
SELECT string_agg(c.relname, ', ' ORDER BY c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :'schema' AND c.relkind IN ('r', 'p')
  AND c.relname IN ('usage_ledger', 'usage_daily', 'tenants', 'tiers', 'api_keys');
SQL
)
if [ -n "$existing" ]; then
  echo "ledger-restore: schema $schema already has ledger tables ($existing); restore into an empty schema (or rename this one away first: see docs/runbook.md#restore-the-ledger); nothing was changed" >&2
  exit 1
fi

# The schema (a --table dump does not create it) and the role the row-level
# security policies name (cluster-wide; `agentq migrate` creates it too).
psql_q -v schema="$schema" >/dev/null <<'SQL'
SELECT format('CREATE SCHEMA IF NOT EXISTS %I', :'schema') \gexec
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentq_tenant') THEN
        CREATE ROLE agentq_tenant NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END $$;
SQL

pg_restore --dbname="$url" --single-transaction --exit-on-error --no-owner --no-privileges "$in"

counts=$(psql_q -v schema="$schema" <<'SQL'
SELECT format('SELECT ''usage_ledger rows: '' || (SELECT count(*) FROM %1$I.usage_ledger)
               || '', usage_daily rows: '' || (SELECT count(*) FROM %1$I.usage_daily)
               || '', tenants: '' || (SELECT count(*) FROM %1$I.tenants)
               || '', tiers: '' || (SELECT count(*) FROM %1$I.tiers)', :'schema') \gexec
SQL
)
echo "ledger-restore: restored schema $schema from $in: $counts"
echo "ledger-restore: next, run \`agentq migrate\` against this database before the workers write to it"
