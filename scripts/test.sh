#!/usr/bin/env bash
# Runs Spiegel's whole test suite. On a fresh machine it installs the npm
# packages of the test CouchDB and of the webhook signature check (pinned by
# their package-lock.json), then builds and runs every test, which start
# the servers they need themselves.
#
# The server the tests run against (SPIEGEL_TEST_SERVER):
#   test-server  PouchDB Server with CouchDB 3's _db_updates (the default)
#   kit          a real Apache CouchDB from the kit (SPIEGEL_TEST_KIT, else
#                ../shared/couchdb), single node
#   cluster      a 3-node cluster of the kit
#   external     the CouchDB 3.x at SPIEGEL_TEST_COUCHDB_URL (an admin URL;
#                setting it alone also selects it)
# Tests the chosen server cannot host are reported as ignored (skipped).
# The last line sums up every test binary: "<server>: N passed, N failed,
# N skipped".
set -euo pipefail
cd "$(dirname "$0")/.."

# The npm packages of the test CouchDB and of the webhook signature check,
# each pinned by its package-lock.json.
for dir in testing/couchdb testing/webhooks; do
  stamp=$dir/node_modules/.spiegel-installed
  if [ ! -f "$stamp" ] || [ "$dir/package-lock.json" -nt "$stamp" ]; then
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
    touch "$stamp"
  fi
done

server=${SPIEGEL_TEST_SERVER:-}
if [ -z "$server" ]; then
  if [ -n "${SPIEGEL_TEST_COUCHDB_URL:-}" ]; then server=external; else server=test-server; fi
fi
export SPIEGEL_TEST_SERVER=$server

log=$(mktemp "${TMPDIR:-/tmp}/spiegel-test.XXXXXX")
trap 'rm -f "$log"' EXIT
status=0
cargo test --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# cargo prints one "test result:" line per test binary.
awk -v server="$server" '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^passed;?$/) passed += $(i-1)
      if ($(i) ~ /^failed;?$/) failed += $(i-1)
      if ($(i) ~ /^ignored;?$/) skipped += $(i-1)
    }
  }
  END { printf "%s: %d passed, %d failed, %d skipped\n", server, passed, failed, skipped }
' "$log"
exit "$status"
