#!/usr/bin/env bash
# Self-check for the test CouchDB launcher (server.js), for humans.
# Usage: bash testing/couchdb/selftest.sh   (after npm ci --prefix testing/couchdb)
# Needs bash, curl and node. Starts its own servers on free loopback ports.
set -u -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TMP="$(mktemp -d)"
PASS=0
FAIL=0
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT

ok()   { PASS=$((PASS + 1)); echo "ok   $1"; }
fail() { FAIL=$((FAIL + 1)); echo "FAIL $1${2:+ -- $2}"; }

# js EXPR: evaluate a JS expression over the JSON on stdin (bound to `j`).
js() {
  node -e '
    let s = ""; process.stdin.on("data", d => s += d).on("end", () => {
      let j; try { j = JSON.parse(s); } catch (e) { j = s; }
      const v = eval(process.argv[1]);
      process.stdout.write(typeof v === "string" ? v : JSON.stringify(v));
    });' "$1"
}

# check NAME ACTUAL EXPECTED
check() {
  if [[ "$2" == "$3" ]]; then ok "$1"; else fail "$1" "expected [$3], got [$2]"; fi
}

# start_server VAR_PREFIX ARGS...: starts server.js, sets ${PREFIX}_URL and ${PREFIX}_PID
start_server() {
  local prefix=$1; shift
  local out="$TMP/$prefix.out"
  : > "$out"
  local t0; t0=$(date +%s%N)
  node "$HERE/server.js" "$@" > "$out" 2> "$TMP/$prefix.err" &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 200); do
    if [[ -s "$out" ]]; then break; fi
    sleep 0.02
  done
  local t1; t1=$(date +%s%N)
  local url; url=$(js 'j.url' < "$out")
  if [[ "$url" != http://127.0.0.1:* ]]; then
    fail "start $prefix" "no url line: $(cat "$out" "$TMP/$prefix.err")"
    exit 1
  fi
  printf -v "${prefix}_URL" '%s' "$url"
  printf -v "${prefix}_PID" '%s' "$pid"
  echo "     started $prefix at $url in $(( (t1 - t0) / 1000000 )) ms (pid $pid)"
}

# status METHOD URL [curl args...] -> prints the HTTP status code
status() { local m=$1 u=$2; shift 2; curl -s -o /dev/null -w '%{http_code}' -X "$m" "$u" "$@"; }
J=(-H 'Content-Type: application/json')

echo "== in-memory server, no admin"
start_server S
U=$S_URL

check "GET / is a CouchDB welcome" "$(curl -s "$U/" | js 'j.couchdb')" "Welcome"
check "_db_updates without _global_changes is 404" "$(status GET "$U/_db_updates")" "404"
check "PUT /_global_changes" "$(status PUT "$U/_global_changes")" "201"

check "PUT /a%2Fb" "$(status PUT "$U/a%2Fb")" "201"
check "PUT /a%2Fb again is 412" "$(status PUT "$U/a%2Fb")" "412"
for name in 'c%2Bd' 'e%24f' 'g(h)' 'i-j_k' 'x%2Fy%2Fz'; do
  check "PUT /$name" "$(status PUT "$U/$name")" "201"
done
check "PUT /Bad is 400" "$(status PUT "$U/Bad")" "400"
check "PUT /_nope is 400" "$(status PUT "$U/_nope")" "400"
check "_all_dbs lists special names" \
  "$(curl -s "$U/_all_dbs" | js '["a/b","c+d","e$f","g(h)","i-j_k","x/y/z"].every(n => j.includes(n)) && !j.includes("ab")')" "true"
check "GET /a%2Fb db_name" "$(curl -s "$U/a%2Fb" | js 'j.db_name')" "a/b"
check "GET /g(h) db_name" "$(curl -s "$U/g(h)" | js 'j.db_name')" "g(h)"
check "GET /missing is 404 not_found" "$(curl -s "$U/missing" | js 'j.error + "/" + j.reason')" "not_found/Database does not exist."
check "DELETE /missing is 404" "$(status DELETE "$U/missing")" "404"
check "update_seq is an opaque string" "$(curl -s "$U/a%2Fb" | js '/^0-g1AAAA/.test(j.update_seq)')" "true"

# _dbs_info counts, and the database list after a deletion
check "PUT /counts" "$(status PUT "$U/counts")" "201"
check "_dbs_info of an empty database" "$(curl -s "$U/_dbs_info?start_key=%22counts%22&limit=1" | js 'j[0].key + " " + j[0].info.doc_count + " " + j[0].info.doc_del_count')" "counts 0 0"
CREV=$(curl -s -X PUT "$U/counts/d" "${J[@]}" -d '{}' | js 'j.rev')
check "DELETE a document" "$(status DELETE "$U/counts/d?rev=$CREV")" "200"
check "_dbs_info counts the deleted document" "$(curl -s -X POST "$U/_dbs_info" "${J[@]}" -d '{"keys":["counts","nope"]}' | js 'j[0].info.doc_count + " " + j[0].info.doc_del_count + " " + j[1].error')" "0 1 not_found"
check "DELETE /counts" "$(status DELETE "$U/counts")" "200"
check "a deleted database is not listed" "$(curl -s "$U/_all_dbs" | js 'j.includes("counts")')" "false"
check "a deleted database is 404" "$(status GET "$U/counts")" "404"
check "PUT /counts again" "$(status PUT "$U/counts")" "201"
check "DELETE /counts again" "$(status DELETE "$U/counts")" "200"

# documents in a database with a slash
check "PUT doc" "$(status PUT "$U/a%2Fb/doc1" "${J[@]}" -d '{"v":1}')" "201"
REV1=$(curl -s "$U/a%2Fb/doc1" | js 'j._rev')
check "GET doc" "$(curl -s "$U/a%2Fb/doc1" | js 'j.v')" "1"
check "PUT doc without rev is 409" "$(status PUT "$U/a%2Fb/doc1" "${J[@]}" -d '{"v":2}')" "409"
check "PUT design doc" "$(status PUT "$U/a%2Fb/_design/d" "${J[@]}" -d '{"views":{"v":{"map":"function(doc){emit(doc._id)}"}}}')" "201"
check "GET design doc" "$(curl -s "$U/a%2Fb/_design/d" | js 'j._id')" "_design/d"
check "PUT _local doc" "$(status PUT "$U/a%2Fb/_local/l" "${J[@]}" -d '{"x":1}')" "201"
check "PUT _security" "$(status PUT "$U/a%2Fb/_security" "${J[@]}" -d '{"admins":{"names":[],"roles":[]},"members":{"names":[],"roles":[]}}')" "200"
check "GET _security" "$(curl -s "$U/a%2Fb/_security" | js 'typeof j.members')" "object"
check "_all_docs" "$(curl -s "$U/a%2Fb/_all_docs" | js 'j.rows.map(r => r.id).join(",")')" "_design/d,doc1"
BULK=$(curl -s -X POST "$U/a%2Fb/_bulk_docs" "${J[@]}" -d '{"docs":[{"_id":"doc1","v":3},{"_id":"doc2"}]}')
check "_bulk_docs conflict per doc" "$(echo "$BULK" | js 'j[0].error + "," + (j[1].ok === true)')" "conflict,true"
check "_bulk_docs new_edits:false" "$(status POST "$U/a%2Fb/_bulk_docs" "${J[@]}" \
  -d '{"new_edits":false,"docs":[{"_id":"doc1","_rev":"1-aaaa","v":"conflicting"}]}')" "201"
check "conflict visible" "$(curl -s "$U/a%2Fb/doc1?conflicts=true" | js '(j._conflicts || []).length')" "1"
check "DELETE doc" "$(status DELETE "$U/a%2Fb/doc2?rev=$(curl -s "$U/a%2Fb/doc2" | js 'j._rev')")" "200"
CH=$(curl -s "$U/a%2Fb/_changes?style=all_docs")
check "_changes normal seqs are strings" "$(echo "$CH" | js 'typeof j.last_seq + "," + j.results.every(r => typeof r.seq === "string")')" "string,true"
MID=$(echo "$CH" | js 'j.results[0].seq')
check "_changes since=<seq>" "$(curl -s "$U/a%2Fb/_changes?since=$MID" | js 'j.results.length')" "$(echo "$CH" | js 'j.results.length - 1')"
check "_changes limit + pending" "$(curl -s "$U/a%2Fb/_changes?limit=1" | js 'j.results.length + "," + j.pending')" "1,2"
check "_changes filter=_selector" "$(curl -s -X POST "$U/a%2Fb/_changes?filter=_selector" "${J[@]}" -d '{"selector":{"v":3}}' | js 'j.results.length')" "0"
check "_changes filter=_selector without selector is 400" "$(status GET "$U/a%2Fb/_changes?filter=_selector")" "400"
check "_changes filter=_doc_ids" "$(curl -s -X POST "$U/a%2Fb/_changes?filter=_doc_ids" "${J[@]}" -d '{"doc_ids":["doc1"]}' | js 'j.results.map(r => r.id).join()')" "doc1"
check "server alive after filters" "$(status GET "$U/")" "200"

# _changes feeds
T0=$(date +%s%N)
LP=$(curl -s "$U/a%2Fb/_changes?feed=longpoll&since=now&timeout=300")
T1=$(date +%s%N)
check "_changes longpoll honours timeout" "$(echo "$LP" | js 'j.results.length')/$(( (T1 - T0) / 1000000 < 2000 ))" "0/1"
curl -sN "$U/a%2Fb/_changes?feed=continuous&since=now&heartbeat=100&include_docs=true" > "$TMP/changes.cont" &
CURL=$!
sleep 0.4
curl -s -X PUT "$U/a%2Fb/live1" "${J[@]}" -d '{"live":true}' > /dev/null
sleep 0.4
kill $CURL 2>/dev/null; wait $CURL 2>/dev/null
check "_changes continuous streams docs" "$(grep -c '"live":true' "$TMP/changes.cont")" "1"
check "_changes continuous heartbeats" "$(grep -c '^$' "$TMP/changes.cont" | awk '{print ($1 > 0)}')" "1"
CT=$(curl -s "$U/a%2Fb/_changes?feed=continuous&since=0&timeout=200")
check "_changes continuous ends with last_seq on timeout" "$(echo "$CT" | tail -n 1 | js 'typeof j.last_seq')" "string"

# _db_updates
DU=$(curl -s "$U/_db_updates")
check "_db_updates lists updated a/b" "$(echo "$DU" | js 'j.results.some(r => r.db_name === "a/b" && r.type === "updated")')" "true"
check "_db_updates lists created c+d" "$(echo "$DU" | js 'j.results.some(r => r.db_name === "c+d" && r.type === "created")')" "true"
check "_db_updates has no _global_changes or internal events" \
  "$(echo "$DU" | js 'j.results.some(r => r.db_name === "_global_changes" || r.db_name.startsWith("pouch__") || r.db_name.includes("-mrview-"))')" "false"
check "_db_updates at most one event per type and db" \
  "$(echo "$DU" | js 'new Set(j.results.map(r => r.type + ":" + r.db_name)).size === j.results.length')" "true"
check "_db_updates seqs are opaque strings" "$(echo "$DU" | js 'j.results.every(r => /^\d+-g1AAAA/.test(r.seq)) && typeof j.last_seq')" "string"
check "_db_updates limit=1" "$(curl -s "$U/_db_updates?limit=1" | js 'j.results.length')" "1"
LAST=$(echo "$DU" | js 'j.last_seq')
check "_db_updates since=last is empty" "$(curl -s "$U/_db_updates?since=$LAST" | js 'j.results.length')" "0"
NOW=$(curl -s "$U/_db_updates?since=now")
check "_db_updates since=now" "$(echo "$NOW" | js 'j.results.length + "," + j.last_seq')" "0,$LAST"
check "_db_updates bad since is 400" "$(status GET "$U/_db_updates?since=garbage")" "400"
curl -s -X DELETE "$U/e%24f" > /dev/null
check "_db_updates deleted event" "$(curl -s "$U/_db_updates?since=$LAST" | js 'j.results.map(r => r.type + ":" + r.db_name).join()')" "deleted:e\$f"
LAST=$(curl -s "$U/_db_updates?since=now" | js 'j.last_seq')
curl -s -X PUT "$U/a%2Fb/_local/l2" "${J[@]}" -d '{"x":1}' > /dev/null
check "_local writes make no event" "$(curl -s "$U/_db_updates?since=$LAST" | js 'j.results.length')" "0"
curl -sN "$U/_db_updates?feed=continuous&since=now&heartbeat=100" > "$TMP/dbu.cont" &
CURL=$!
sleep 0.4
curl -s -X PUT "$U/live" > /dev/null
curl -s -X PUT "$U/live/d" "${J[@]}" -d '{}' > /dev/null
sleep 0.4
kill $CURL 2>/dev/null; wait $CURL 2>/dev/null
check "_db_updates continuous live events" \
  "$(grep '"db_name"' "$TMP/dbu.cont" | js 'j.split("\n").filter(Boolean).map(l => JSON.parse(l).type).join()' )" "created,updated"
check "_db_updates continuous heartbeats" "$(grep -c '^$' "$TMP/dbu.cont" | awk '{print ($1 > 0)}')" "1"
T0=$(date +%s%N)
CT=$(curl -s "$U/_db_updates?feed=continuous&since=now&timeout=300")
T1=$(date +%s%N)
check "_db_updates continuous timeout ends with last_seq" "$(echo "$CT" | js 'typeof j.last_seq')/$(( (T1 - T0) / 1000000 < 2000 ))" "string/1"
LAST=$(curl -s "$U/_db_updates?since=now" | js 'j.last_seq')
(sleep 0.3; curl -s -X PUT "$U/live/d2" "${J[@]}" -d '{}' > /dev/null) &
WRITER=$!
check "_db_updates longpoll waits for an event" "$(curl -s "$U/_db_updates?feed=longpoll&since=$LAST&timeout=5000" | js 'j.results.map(r => r.type + ":" + r.db_name).join()')" "updated:live"
wait $WRITER
check "_db_updates longpoll timeout" "$(curl -s "$U/_db_updates?feed=longpoll&since=now&timeout=200" | js 'j.results.length')" "0"

# local replication (no auth)
curl -s -X PUT "$U/src" > /dev/null
curl -s -X POST "$U/src/_bulk_docs" "${J[@]}" -d '{"docs":[{"_id":"r1"},{"_id":"r2"}]}' > /dev/null
REP=$(curl -s -X POST "$U/_replicate" "${J[@]}" -d "{\"source\":\"$U/src\",\"target\":\"$U/t%2Fgt\",\"create_target\":true}")
check "_replicate create_target" "$(echo "$REP" | js 'j.ok + "," + j.history[0].docs_written')" "true,2"
check "_replicate missing source is 404" "$(status POST "$U/_replicate" "${J[@]}" -d "{\"source\":\"$U/nosuch\",\"target\":\"$U/src\"}")" "404"
check "_replicate missing target without create_target is 404" \
  "$(status POST "$U/_replicate" "${J[@]}" -d "{\"source\":\"$U/src\",\"target\":\"$U/nosuch\"}")" "404"

kill -TERM "$S_PID"; wait "$S_PID"
check "SIGTERM exits 0" "$?" "0"

echo "== in-memory server with --admin"
start_server A --admin 'admin:s3cret'
U=$A_URL
HOSTPORT=${U#http://}
AU=(-u 'admin:s3cret')
check "GET / open" "$(status GET "$U/")" "200"
check "GET /_all_dbs without auth is 401" "$(status GET "$U/_all_dbs")" "401"
check "401 body" "$(curl -s "$U/_all_dbs" | js 'j.error')" "unauthorized"
check "401 WWW-Authenticate" "$(curl -s -o /dev/null -D - "$U/_all_dbs" | grep -ci '^www-authenticate: Basic realm="server"')" "1"
check "wrong password is 401" "$(status GET "$U/_all_dbs" -u admin:wrong)" "401"
check "PUT db without auth is 401" "$(status PUT "$U/x")" "401"
check "PUT db as admin" "$(status PUT "$U/x" "${AU[@]}")" "201"
check "PUT /_global_changes as admin" "$(status PUT "$U/_global_changes" "${AU[@]}")" "201"
check "_db_updates without auth is 401" "$(status GET "$U/_db_updates")" "401"
check "_db_updates as admin" "$(status GET "$U/_db_updates" "${AU[@]}")" "200"
check "_session knows the admin" "$(curl -s "${AU[@]}" "$U/_session" | js 'j.userCtx.name + ":" + j.userCtx.roles.join()')" "admin:_admin"
check "doc write as admin" "$(status PUT "$U/x/d1" "${AU[@]}" "${J[@]}" -d '{"a":1}')" "201"
curl -s "${AU[@]}" -X PUT "$U/s%2F1" > /dev/null
curl -s "${AU[@]}" -X POST "$U/s%2F1/_bulk_docs" "${J[@]}" -d '{"docs":[{"_id":"a"},{"_id":"b"},{"_id":"c"}]}' > /dev/null
REP=$(curl -s "${AU[@]}" -X POST "$U/_replicate" "${J[@]}" -d "{
  \"source\": {\"url\": \"$U/s%2F1\", \"auth\": {\"basic\": {\"username\": \"admin\", \"password\": \"s3cret\"}}},
  \"target\": {\"url\": \"$U/t%2F1\", \"auth\": {\"basic\": {\"username\": \"admin\", \"password\": \"s3cret\"}}},
  \"create_target\": true}")
check "_replicate with auth objects" "$(echo "$REP" | js 'j.ok + "," + j.history[0].docs_written')" "true,3"
check "replicated docs in t/1" "$(curl -s "${AU[@]}" "$U/t%2F1/_all_docs" | js 'j.rows.length')" "3"
check "_all_dbs has t/1 (not t1)" "$(curl -s "${AU[@]}" "$U/_all_dbs" | js 'j.includes("t/1") && !j.includes("t1")')" "true"
REP=$(curl -s "${AU[@]}" -X POST "$U/_replicate" "${J[@]}" \
  -d "{\"source\":\"http://admin:s3cret@$HOSTPORT/s%2F1\",\"target\":\"http://admin:s3cret@$HOSTPORT/x\"}")
check "_replicate with credentials in URLs" "$(echo "$REP" | js 'j.ok + "," + j.history[0].docs_written')" "true,3"
BASIC=$(printf 'admin:s3cret' | base64)
REP=$(curl -s "${AU[@]}" -X POST "$U/_replicate" "${J[@]}" -d "{
  \"source\": {\"url\": \"$U/s%2F1\", \"headers\": {\"Authorization\": \"Basic $BASIC\"}},
  \"target\": {\"url\": \"$U/u1\", \"headers\": {\"Authorization\": \"Basic $BASIC\"}},
  \"create_target\": true}")
check "_replicate with headers objects" "$(echo "$REP" | js 'j.ok + "," + j.history[0].docs_written')" "true,3"
check "_replicate with bad credentials fails with 401" "$(status POST "$U/_replicate" "${AU[@]}" "${J[@]}" \
  -d "{\"source\":\"http://admin:nope@$HOSTPORT/s%2F1\",\"target\":\"http://admin:s3cret@$HOSTPORT/x\"}")" "401"
check "_db_updates saw the replication target" \
  "$(curl -s "${AU[@]}" "$U/_db_updates" | js 'j.results.filter(r => r.db_name === "t/1").map(r => r.type).sort().join()')" "created,updated"
kill -TERM "$A_PID"; wait "$A_PID"

echo "== --data-dir: SIGKILL and restart on the same port"
DATA="$TMP/data"
start_server D --data-dir "$DATA"
U=$D_URL
PORT=${U##*:}
curl -s -X PUT "$U/_global_changes" > /dev/null
curl -s -X PUT "$U/p%2Fq" > /dev/null
curl -s -X PUT "$U/p%2Fq/keep" "${J[@]}" -d '{"kept":true}' > /dev/null
curl -s -X PUT "$U/other" > /dev/null
OLD=$(curl -s "$U/_db_updates" | js 'j.last_seq')
OLDCH=$(curl -s "$U/p%2Fq/_changes" | js 'j.last_seq')
curl -s -X PUT "$U/p%2Fq/after1" "${J[@]}" -d '{}' > /dev/null
MID=$(curl -s "$U/_db_updates" | js 'j.last_seq')
kill -KILL "$D_PID"; wait "$D_PID" 2>/dev/null
start_server D --data-dir "$DATA" --port "$PORT"
check "restart on the same port" "$D_URL" "$U"
check "data survives SIGKILL" "$(curl -s "$U/p%2Fq/keep" | js 'j.kept')" "true"
check "_all_dbs after restart" "$(curl -s "$U/_all_dbs" | js 'j.includes("p/q") && j.includes("other")')" "true"
check "old _db_updates seq still valid" "$(curl -s "$U/_db_updates?since=$OLD" | js 'j.results.map(r => r.type + ":" + r.db_name).join()')" "updated:p/q"
check "no events from the restart itself" "$(curl -s "$U/_db_updates?since=$MID" | js 'j.results.length')" "0"
check "old _changes seq still valid" "$(curl -s "$U/p%2Fq/_changes?since=$OLDCH" | js 'j.results.map(r => r.id).join()')" "after1"
curl -s -X PUT "$U/p%2Fq/after2" "${J[@]}" -d '{}' > /dev/null
NEW=$(curl -s "$U/_db_updates?since=$MID")
check "new events continue after restart" "$(echo "$NEW" | js 'j.results.map(r => r.type + ":" + r.db_name).join()')" "updated:p/q"
check "new seqs are higher than old ones" "$(( ${NEW_LAST:=$(echo "$NEW" | js 'parseInt(j.last_seq)')} > ${MID%%-*} ))" "1"
kill -TERM "$D_PID"; wait "$D_PID"

echo
echo "$PASS passed, $FAIL failed"
[[ $FAIL -eq 0 ]]
