#!/bin/sh
# Alertmanager's entrypoint in docker/compose.yml: writes the receivers'
# secrets from the environment into the files docker/alertmanager/alertmanager.yml
# names (*_file fields), then runs Alertmanager with the arguments given.
#
# Why files and not a config rendered with sed/envsubst: Alertmanager does
# not expand environment variables in its config, and substituting a value
# into YAML breaks on what webhook URLs and keys may hold (& / | " #, a
# newline). Written with printf '%s', a value reaches Alertmanager byte for
# byte, the config stays static (amtool checks it as deployed), and the
# secrets live on a tmpfs, not in a rendered file on disk.
#
#   SLACK_WEBHOOK_URL        -> $ALERTMANAGER_SECRETS_DIR/slack_api_url
#   PAGERDUTY_ROUTING_KEY    -> $ALERTMANAGER_SECRETS_DIR/pagerduty_routing_key
#   ALERTMANAGER_SECRETS_DIR    default /run/alertmanager (the path the config names)
set -eu
dir=${ALERTMANAGER_SECRETS_DIR:-/run/alertmanager}
umask 077
mkdir -p "$dir"
printf '%s' "${SLACK_WEBHOOK_URL:-}" > "$dir/slack_api_url"
printf '%s' "${PAGERDUTY_ROUTING_KEY:-}" > "$dir/pagerduty_routing_key"
[ -n "${SLACK_WEBHOOK_URL:-}" ] ||
  echo "entrypoint: SLACK_WEBHOOK_URL is not set: Slack notifications will fail" >&2
[ -n "${PAGERDUTY_ROUTING_KEY:-}" ] ||
  echo "entrypoint: PAGERDUTY_ROUTING_KEY is not set: critical alerts will not page" >&2
exec alertmanager "$@"
