#!/usr/bin/env bash
# Runs Spiegel's whole test suite on a fresh machine: installs the test
# CouchDB's npm packages (pinned by testing/couchdb/package-lock.json), then
# builds and runs every test. The tests start the test CouchDB themselves;
# set SPIEGEL_TEST_COUCHDB_URL=http://admin:pw@host:5984 to run them against
# a real CouchDB 3.x instead.
set -euo pipefail
cd "$(dirname "$0")/.."

lock=testing/couchdb/package-lock.json
stamp=testing/couchdb/node_modules/.spiegel-installed
if [ ! -f "$stamp" ] || [ "$lock" -nt "$stamp" ]; then
  npm ci --prefix testing/couchdb --no-audit --no-fund --loglevel=error
  touch "$stamp"
fi

cargo test "$@"
