#!/usr/bin/env bash
# Cron wrapper: one tick = one `batch-infer run` of /etc/batch-infer/job.yaml.
#
# Settings, all optional, as KEY=value lines in $BATCH_INFER_ENV_FILE (/etc/batch-infer/env):
#   RAY_ADDRESS         a cluster to join (host:port, ray://host:10001); unset: an embedded local Ray
#   RAY_AUTH_MODE       token, for a cluster with token auth (the token in ~/.ray/auth_token or
#                       RAY_AUTH_TOKEN_PATH; keep it out of this file and of job.yaml)
#   BATCH_INFER_VENV    the virtualenv batch-infer is installed in (/opt/batch-infer/venv)
#   BATCH_INFER_CONFIG  the job file (/etc/batch-infer/job.yaml)
#   PYICEBERG_CATALOG__DEFAULT__URI, ...__CREDENTIAL, ...  an Iceberg job's catalog when its job file
#                       leaves `catalog` unset (PyIceberg reads them from the environment); keep this
#                       file mode 0600 when it holds them
#
# Exit status, from batch-infer's:
#   0  success; also when another run still holds the output's lock (an overlapping tick)
#   1  the run finished but some shards failed (errors above); the next tick retries them
#   2  invalid config, input schema or model, or no virtualenv: nothing was written, a person
#      must fix it
#   any other (130 interrupted, ...) is passed through
set -euo pipefail

env_file="${BATCH_INFER_ENV_FILE:-/etc/batch-infer/env}"
if [[ -r "$env_file" ]]; then
  set -a
  # shellcheck source=/dev/null
  source "$env_file"
  set +a
fi
venv="${BATCH_INFER_VENV:-/opt/batch-infer/venv}"
config="${BATCH_INFER_CONFIG:-/etc/batch-infer/job.yaml}"

log() { printf '%s run-batch-infer[%d]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$$" "$*"; }

if [[ ! -r "$venv/bin/activate" ]]; then
  log "no virtualenv at $venv: install batch-infer there or set BATCH_INFER_VENV"
  exit 2
fi
set +u  # activate scripts may read unset variables
# shellcheck source=/dev/null
source "$venv/bin/activate"
set -u

if [[ -n "${RAY_ADDRESS:-}" ]]; then
  export RAY_ADDRESS
  log "start: $config on the Ray cluster at $RAY_ADDRESS"
else
  unset RAY_ADDRESS
  log "start: $config on an embedded local Ray"
fi

rc=0
batch-infer run "$config" || rc=$?

case "$rc" in
  0) log "done: every shard committed" ;;
  1) log "finished with failed shards (errors above); the next run retries them" ;;
  2) log "invalid config, input schema or model; nothing written: fix $config" ;;
  3) log "skipped: another run holds the output's lock"; rc=0 ;;
  *) log "batch-infer exited with status $rc" ;;
esac
exit "$rc"
