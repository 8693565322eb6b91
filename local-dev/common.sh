# shellcheck shell=bash
# Helpers shared by the local-dev scripts. Sources env.sh. Not meant for
# interactive shells (source env.sh there instead).

# shellcheck source=local-dev/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

# Colour only on a terminal.
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then
  _bold=$'\e[1m' _red=$'\e[31m' _yellow=$'\e[33m' _reset=$'\e[0m'
else
  _bold='' _red='' _yellow='' _reset=''
fi

# Prefix for messages, e.g. "[stack]"; each script sets it.
DARKROOM_LOG_PREFIX="${DARKROOM_LOG_PREFIX:-[local-dev]}"

say() { printf '%s %s\n' "$DARKROOM_LOG_PREFIX" "$*"; }
warn() { printf '%s %swarning:%s %s\n' "$DARKROOM_LOG_PREFIX" "$_yellow" "$_reset" "$*" >&2; }
die() {
  printf '%s %serror:%s %s\n' "$DARKROOM_LOG_PREFIX" "$_red" "$_reset" "$*" >&2
  exit 1
}
heading() { printf '%s %s==> %s%s\n' "$DARKROOM_LOG_PREFIX" "$_bold" "$*" "$_reset"; }

# Microseconds since the epoch.
now_us() {
  local t=$EPOCHREALTIME
  printf '%s\n' "${t/[.,]/}"
}

# Seconds since a now_us value, e.g. "1.23s".
secs_since() {
  local d=$(($(now_us) - $1))
  printf '%d.%02ds' $((d / 1000000)) $((d % 1000000 / 10000))
}

# Prints the last lines of a log file's latest run (logs are appended to, each
# run after a "===== <date>: ..." line) with a header; silent if it is missing.
show_log_tail() {
  local file=$1 lines=${2:-30} start
  [ -s "$file" ] || return 0
  start=$(grep -n '^===== ' "$file" | tail -n 1 | cut -d: -f1)
  printf '%s ----- last %s lines of %s -----\n' "$DARKROOM_LOG_PREFIX" "$lines" "$file" >&2
  tail -n +"${start:-1}" "$file" | tail -n "$lines" >&2
  printf '%s ----- end of %s -----\n' "$DARKROOM_LOG_PREFIX" "$file" >&2
}

# curl for local endpoints: never through a proxy, short timeouts.
local_curl() {
  curl --noproxy '*' --silent --show-error --connect-timeout 1 --max-time 2 "$@"
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_in_use() {
  (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Makes the NATS clients of this (sub)shell connect as role $1 (ingest, preprocess,
# notifier, inference, operator, provisioner; see infra/nats): exports
# DARKROOM_NATS_NKEY_FILE, the role's NKey seed file in DARKROOM_NATS_SECRETS_DIR (the
# seed itself never enters the environment), and drops other NATS credentials; every
# role but the provisioner only checks the JetStream topology, which it may not change.
use_nats_user() {
  local file="$DARKROOM_NATS_SECRETS_DIR/$1.nk"
  [ -r "$file" ] || die "no NATS seed for '$1' in $DARKROOM_NATS_SECRETS_DIR (run 'local-dev/stack start')"
  unset DARKROOM_NATS_USER DARKROOM_NATS_PASSWORD DARKROOM_NATS_NKEY_SEED
  export DARKROOM_NATS_NKEY_FILE=$file
  if [ "$1" = provisioner ]; then
    export DARKROOM_JETSTREAM_PROVISION=true
  else
    export DARKROOM_JETSTREAM_PROVISION=false
  fi
}
