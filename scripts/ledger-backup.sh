#!/usr/bin/env bash
# Back up the agentq usage ledger: one pg_dump (custom format) of
#   usage_ledger and every partition of it (usage_ledger_YYYY_MM, usage_ledger_default),
#   usage_daily, tenants, tiers,
#   and api_keys (the HTTP API's hashed tenant keys) where the schema has it,
# taken in one snapshot, so the rollup matches the ledger rows in the file.
#
#   scripts/ledger-backup.sh DATABASE_URL OUT_FILE
#
#   LEDGER_SCHEMA   schema holding the ledger (default: public)
#
# The file is written next to OUT_FILE under a temporary name, checked with
# pg_restore --list and only then renamed, so a failed backup never leaves a
# file that looks complete. pg_dump must be of the server's major version or
# newer (with docker/compose.yml, run it inside the postgres container: see
# docs/runbook.md#back-up-the-ledger). Restore with scripts/ledger-restore.sh.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $(basename "$0") DATABASE_URL OUT_FILE
  Dump the agentq ledger tables (usage_ledger and its partitions, usage_daily,
  tenants, tiers) of schema \$LEDGER_SCHEMA (default: public) with pg_dump -Fc.
  example: LEDGER_SCHEMA=public $(basename "$0") postgres://postgres@127.0.0.1:5432/agentq ledger-\$(date +%F).dump
USAGE
}

if [ "$#" -eq 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then
  usage
  exit 0
fi
if [ "$#" -ne 2 ] || [ -z "$1" ] || [ -z "$2" ]; then
  echo "ledger-backup: expected DATABASE_URL and OUT_FILE" >&2
  usage >&2
  exit 2
fi
url=$1
out=$2
schema=${LEDGER_SCHEMA:-public}
if ! [[ "$schema" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
  echo "ledger-backup: LEDGER_SCHEMA=\"$schema\" is not a plain schema name (letters, digits, _)" >&2
  exit 2
fi
if [ -d "$out" ]; then
  echo "ledger-backup: OUT_FILE \"$out\" is a directory; give a file name" >&2
  exit 2
fi
for tool in pg_dump pg_restore psql; do
  command -v "$tool" >/dev/null || { echo "ledger-backup: $tool not found (install postgresql-client)" >&2; exit 1; }
done

# api_keys lives in PostgreSQL too: without it a restored database would lock
# every tenant out of the HTTP API. Included when present.
extra=()
has_keys=$(psql --dbname="$url" --no-psqlrc --quiet --tuples-only --no-align -v ON_ERROR_STOP=1 \
  -v schema="$schema" <<'SQL'
SELECT to_regclass(format('%I.api_keys', :'schema')) IS NOT NULL;
SQL
)
if [ "$has_keys" = "t" ]; then
  extra+=(--table="\"$schema\".api_keys")
fi

tmp="$out.partial.$$"
trap 'rm -f "$tmp"' EXIT

# --strict-names: a wrong schema fails instead of writing an empty backup.
# --load-via-partition-root: rows are restored through usage_ledger, so they
# land in the right partition whatever partitions the target has.
pg_dump --dbname="$url" --format=custom --file="$tmp" --strict-names \
  --load-via-partition-root \
  --table="\"$schema\".usage_ledger*" \
  --table="\"$schema\".usage_daily" \
  --table="\"$schema\".tenants" \
  --table="\"$schema\".tiers" \
  "${extra[@]}"

tables=$(pg_restore --list "$tmp" | awk '$4 == "TABLE" && $5 != "DATA" && $5 != "ATTACH" { print $6 }' | sort | tr '\n' ' ')
mv -f "$tmp" "$out"
trap - EXIT
echo "ledger-backup: wrote $out ($(wc -c <"$out" | tr -d ' ') bytes) from schema $schema: $tables"
