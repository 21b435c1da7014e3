#!/usr/bin/env bash
# OpenAPI conformance: runs schemathesis with every check (`--checks all`) against a running
# fwrepo and fails on any finding (not only server errors). Builds nothing: give it the path of
# a built binary (default target/debug/fwrepo). The server runs on free loopback ports with a
# temporary data directory and is stopped on exit. Installs schemathesis (4.x) when missing.
#
#   bash scripts/schemathesis.sh [path/to/fwrepo]
#
# Environment: SCHEMATHESIS_MAX_EXAMPLES (default 50 per operation and phase: about a minute on
# 2 cores), SCHEMATHESIS_SEED (a fixed seed reproduces a run; default random), SCHEMATHESIS_ARGS
# (extra arguments, e.g. --workers 4).
set -euo pipefail

# A relative path is taken from the current directory; the default from the repository's root.
bin=${1:-$(dirname "$0")/../target/debug/fwrepo}
if [ ! -x "$bin" ]; then
  echo "schemathesis.sh: no fwrepo binary at $bin (build it first: cargo build)" >&2
  exit 2
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

if ! command -v schemathesis >/dev/null || ! schemathesis --version 2>/dev/null | grep -Eq ' 4\.'; then
  python3 -m pip install -q 'schemathesis>=4,<5'
fi
schemathesis --version

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# One fuzzer is one client sending thousands of requests: without `--api-rate-limit 0` the
# per-token budget would answer most of them 429 (documented, but it would test nothing else).
NO_COLOR=1 "$bin" serve --listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --data-dir "$work/data" \
  --api-rate-limit 0 >"$work/stdout" 2>"$work/server.log" &
server_pid=$!

url=
for _ in $(seq 1 100); do
  url=$(sed -n 's/^HTTP listening on \(http:\/\/[^ ]*\).*/\1/p' "$work/stdout" | head -n1)
  [ -n "$url" ] && [ -s "$work/data/admin.token" ] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "schemathesis.sh: the server exited:" >&2
    cat "$work/stdout" "$work/server.log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ -z "$url" ]; then
  echo "schemathesis.sh: the server did not report its address" >&2
  cat "$work/stdout" "$work/server.log" >&2
  exit 1
fi
token=$(cat "$work/data/admin.token")

# What the document cannot say, each for a reason:
# - `cursor` is opaque: only a `next_cursor` the server issued is valid (anything else is a
#   documented 400 `invalid_request`), so it is drawn from the first page ("") and well-formed
#   cursors (a record key; an offset for a rollout's devices) instead of arbitrary strings.
# - 410 `firmware_deleted` is how a deleted firmware (kept as a tombstone) answers: the 404 of
#   a resource that existed, which the stateful phase creates and deletes.
# - 422 is the answer to a well-formed request that breaks a rule no JSON Schema can state,
#   so a schema-valid request may get it on these operations only: an upload's model and
#   version may be omitted only when the file name carries them, and checksums are compared
#   with the bytes; an OTA task's devices must differ and be the gateway and its current
#   aircraft; a rollout's stages must increase strictly up to 100 with one package per model,
#   and it starts only with a gateway whose device has a package; a token's expiry must be in
#   the future.
# - Some limits are in bytes of UTF-8 (an upload's file_name 255, model 128, release_note 16 KiB;
#   a device's serial number 128): the document gives them as maxLength, which counts
#   characters, so strings for those operations are ASCII, where the two agree.
# - An event stream (SSE) is read for its first event, the snapshot sent at once; later ones
#   come only on changes.
cat >"$work/schemathesis.toml" <<'TOML'
max-stream-events = 1

[dictionaries.cursors]
values = ["", "N1paWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo", "MDFNOTZZRENKTkU0S0hRR1dNQkMyWVk5Wlc"]

[dictionaries.offset-cursors]
values = ["", "MA", "Mg"]

[parameters]
"query.cursor" = { dictionary = "cursors" }

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "410", "429", "5xx"]

[[operations]]
include-operation-id = "rollouts_devices"
parameters = { "query.cursor" = { dictionary = "offset-cursors" } }

[[operations]]
include-operation-id = ["firmware_upload", "firmware_upload_put", "ota_create", "rollouts_create", "rollouts_action", "auth_create"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "410", "422", "429", "5xx"]

[[operations]]
include-operation-id = ["firmware_upload", "firmware_upload_put", "devices_put"]
generation.codec = "ascii"
TOML
echo "fwrepo at $url (log: server.log in a temporary directory, shown on failure)"

args=(
  --config-file "$work/schemathesis.toml"
  run "$url/api/v1/openapi.json"
  --checks all
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-50}"
  --request-timeout 10
  --generation-database none
  --no-color
  -H "Authorization: Bearer $token"
  # Revoking a token ends every later call made with it: schemathesis authenticates with the
  # one admin token there is, and its stateful phase links DELETE /api/v1/tokens/{id} to the
  # ids GET /api/v1/tokens lists (that token's among them), so revoking it would turn every
  # following request into 401. The operation is covered by the API tests instead.
  --exclude-operation-id auth_revoke
)
[ -n "${SCHEMATHESIS_SEED:-}" ] && args+=(--seed "$SCHEMATHESIS_SEED")
# shellcheck disable=SC2206
[ -n "${SCHEMATHESIS_ARGS:-}" ] && args+=($SCHEMATHESIS_ARGS)

status=0
# From the temporary directory: schemathesis keeps a cache (.schemathesis/) in the current one.
(cd "$work" && schemathesis "${args[@]}") || status=$?
if [ "$status" -ne 0 ]; then
  echo "schemathesis.sh: failures (exit $status); the server's log follows" >&2
  grep -E 'ERROR|WARN' "$work/server.log" | grep -v 'Error encountered while processing' | tail -n 50 >&2 || true
fi
exit "$status"
