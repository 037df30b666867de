#!/usr/bin/env bash
# See Spiegel work, on a fresh machine with Rust, Node.js and npm:
#
#   scripts/demo.sh               runs until Ctrl-C
#   scripts/demo.sh --seconds N   writes for N seconds, then checks and stops
#   scripts/demo.sh --short       CI: 6 documents, checks, `demo: ok (...)`
#
# It installs the test CouchDB's npm packages when needed, builds Spiegel
# (release; debug with --short; neither when SPIEGEL_BIN names a binary),
# starts the test CouchDB (testing/couchdb/server.js) with an admin and a
# webhook receiver (scripts/demo-receiver.js) on free ports, installs
# Spiegel, creates users/alice, users/bob, users/carol and all_users, and
# writes two documents to the spiegel database:
#
#   - a templated fan-in replicator: every ^users/ database into all_users;
#   - an on_change rule: each ^users/ document of type "note" is POSTed to
#     the receiver.
#
# Then it runs `spiegel run` (its logs go to a file) and writes a document
# to one of the user databases in turn, every second (every half second
# with --short; every fourth one is a "draft", which is replicated but not
# delivered), and prints what happens:
#
#   [write]      a document written to a user database
#   [replicated] a document that appeared in all_users
#   [webhook]    a request the receiver got from Spiegel
#
# With --short or --seconds, it waits (60 s at most) until every document
# written was replicated and every note delivered, and exits 0, or 1 with
# what is missing. At the end it prints `spiegel status`, and it stops
# everything it started when it ends, fails or is interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,6s/^# \{0,1\}//p' "$0"
  echo "Environment: SPIEGEL_BIN=path/to/spiegel uses that binary instead of building one."
}

short=0
seconds=0
while [ $# -gt 0 ]; do
  case $1 in
    --short) short=1 ;;
    --seconds)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      seconds=$2
      shift
      ;;
    --seconds=*) seconds=${1#--seconds=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "demo: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case $seconds in
  '' | *[!0-9]*) echo "demo: --seconds needs a whole number of seconds" >&2; exit 2 ;;
esac
seconds=$((10#$seconds))

# Spiegel reads its options from these variables too: keep the caller's
# environment out of the demo.
unset TYPE URL LOG_LEVEL LOG_FORMAT DB_NAME NAMESPACE PASSWORDS_FILE BATCH_SIZE \
  CONCURRENCY ASSUME_DELETED_AFTER SAVE_SEQ_AFTER BACKOFF_STRATEGY BACKOFF_DELAY \
  BACKOFF_MULTIPLIER BACKOFF_LIMIT BATCH_TIMEOUT RETRY_AFTER CHECK_STALLED \
  PARTITIONS WORKER_ID LEASE_TIME SINCE SHUTDOWN_TIMEOUT SWEEP_INTERVAL \
  REQUEST_TIMEOUT ADMIN_ADDR

say() { printf 'demo: %s\n' "$*"; }
die() {
  printf 'demo: FAILED: %s\n' "$*" >&2
  exit 1
}

for tool in node npm; do
  command -v "$tool" >/dev/null || die "$tool is not installed (the demo needs Node.js and npm)"
done
if [ -z "${SPIEGEL_BIN:-}" ]; then
  command -v cargo >/dev/null || die "cargo is not installed (or set SPIEGEL_BIN to a spiegel binary)"
fi

ADMIN_USER="admin"
ADMIN_PASSWORD=demo-secret
users=(alice bob carol)
AGGREGATE=all_users

# --- Small Node.js helpers (no packages) -----------------------------------

# node -e "$http_js" METHOD PATH-OR-URL [BODY]: one request, relative paths
# against $DEMO_COUCH_URL (whose credentials become Basic auth). Prints the
# body; exits 1 (with the status and body on stderr) unless 2xx.
http_js=$(
  cat <<'JS'
const http = require('http');
const [method, target, body] = process.argv.slice(1);
const u = new URL(target, process.env.DEMO_COUCH_URL || 'http://127.0.0.1');
const headers = { accept: 'application/json' };
if (u.username) {
  const creds = `${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`;
  headers.authorization = `Basic ${Buffer.from(creds).toString('base64')}`;
}
if (body !== undefined) headers['content-type'] = 'application/json';
const fail = (msg) => { process.stderr.write(`${method} ${u.pathname}: ${msg}\n`); process.exit(1); };
const req = http.request(
  { method, hostname: u.hostname, port: u.port, path: u.pathname + u.search, headers },
  (res) => {
    let data = '';
    res.setEncoding('utf8');
    res.on('data', (c) => { data += c; });
    res.on('end', () => {
      if (res.statusCode < 200 || res.statusCode > 299) fail(`HTTP ${res.statusCode} ${data.trim()}`);
      process.stdout.write(data);
    });
  });
req.setTimeout(10000, () => req.destroy(new Error('no answer within 10 s')));
req.on('error', (e) => fail(e.message));
req.end(body);
JS
)

# node -e "$watch_js" DB: follows DB's _changes (longpoll) and prints
# `replicated: users/<author>/<id> -> DB` for each document that appears.
# Exits when the demo does.
watch_js=$(
  cat <<'JS'
const http = require('http');
const db = process.argv[1];
const base = new URL(process.env.DEMO_COUCH_URL);
const creds = `${decodeURIComponent(base.username)}:${decodeURIComponent(base.password)}`;
const headers = { accept: 'application/json', authorization: `Basic ${Buffer.from(creds).toString('base64')}` };
const parent = process.ppid;
setInterval(() => { if (process.ppid !== parent) process.exit(0); }, 500).unref();
const get = (path) => new Promise((resolve, reject) => {
  const req = http.get({ hostname: base.hostname, port: base.port, path, headers }, (res) => {
    let data = '';
    res.setEncoding('utf8');
    res.on('data', (c) => { data += c; });
    res.on('end', () => {
      if (res.statusCode !== 200) return reject(new Error(`HTTP ${res.statusCode}`));
      try { resolve(JSON.parse(data)); } catch (e) { reject(e); }
    });
  });
  req.setTimeout(30000, () => req.destroy(new Error('timeout')));
  req.on('error', reject);
});
(async () => {
  let since = '0';
  for (;;) {
    try {
      const r = await get(`/${encodeURIComponent(db)}/_changes?feed=longpoll&timeout=10000` +
        `&include_docs=true&since=${encodeURIComponent(since)}`);
      for (const c of r.results) {
        if (c.deleted || c.id.startsWith('_')) continue;
        const author = c.doc && c.doc.author;
        console.log(`replicated: ${author ? `users/${author}/` : ''}${c.id} -> ${db}`);
      }
      since = r.last_seq;
    } catch (e) {
      process.stderr.write(`watch ${db}: ${e.message}\n`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
})();
JS
)

free_port_js='const s = require("net").createServer();
s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });'

couch() { node -e "$http_js" "$@"; }
quietly() { "$@" >/dev/null 2>&1; }

# --- Writing documents, and showing what happens -------------------------

write_doc() {
  local n=$((written + 1)) user kind id doc
  user=${users[$(((n - 1) % ${#users[@]}))]}
  if [ $((n % 4)) = 0 ]; then
    kind=draft
    doc='{"type":"draft","author":"'$user'","text":"draft '$n' by '$user'"}'
  else
    kind=note
    doc='{"type":"note","author":"'$user'","text":"note '$n' by '$user'"}'
  fi
  id=$kind-$n
  quietly couch PUT "/users%2F$user/$id" "$doc" || die "cannot write users/$user/$id"
  written=$n
  printf '%s %s\n' "users/$user/$id" "$kind" >>"$work/written"
  if [ "$kind" = draft ]; then
    printf '[write]      users/%s/%s %s  (not a note: replicated, no webhook)\n' "$user" "$id" "$doc"
  else
    printf '[write]      users/%s/%s %s\n' "$user" "$id" "$doc"
  fi
}

# Prints the complete lines that FILE got since line START.
new_lines() { tail -n "+$(($2 + 1))" "$1" 2>/dev/null; }

db_re=' db=([^ ]+)'
id_re=' id=([^ ]+)'
show_events() {
  local line db
  while IFS= read -r line; do
    rep_lines=$((rep_lines + 1))
    line=${line#replicated: }
    printf '[replicated] %s\n' "$line"
    printf '%s\n' "${line%% -> *}" >>"$work/replicated.ids"
  done < <(new_lines "$work/replicated.out" "$rep_lines")
  while IFS= read -r line; do
    hook_lines=$((hook_lines + 1))
    [ "$hook_lines" = 1 ] && continue # the URL line
    printf '[webhook]    %s\n' "${line#webhook: }"
    if [[ $line =~ $db_re ]]; then
      db=${BASH_REMATCH[1]}
      [[ $line =~ $id_re ]] && printf '%s/%s\n' "$db" "${BASH_REMATCH[1]}" >>"$work/delivered.ids"
    fi
  done < <(new_lines "$work/receiver.out" "$hook_lines")
}

count_replicated() { sort -u "$work/replicated.ids" | grep -c . || true; }
count_delivered() { sort -u "$work/delivered.ids" | grep -c . || true; }

# What is not observed yet, one per line (nothing when all is).
missing() {
  local path kind
  while read -r path kind; do
    grep -qxF "$path" "$work/replicated.ids" || echo "$path not replicated to $AGGREGATE"
    if [ "$kind" = note ]; then
      grep -qxF "$path" "$work/delivered.ids" || echo "$path not delivered to the webhook"
    elif grep -qxF "$path" "$work/delivered.ids"; then
      echo "$path delivered to the webhook, but the rule's \"if\" excludes it"
    fi
  done <"$work/written"
}

summary() {
  show_events
}

check_children() {
  alive "$spiegel_pid" || die "spiegel stopped: $(log_tail "$spiegel_log")"
  alive "$couch_pid" || die "the test CouchDB stopped: $(log_tail "$work/couchdb.log")"
  alive "$receiver_pid" || die "the webhook receiver stopped: $(log_tail "$work/receiver.log")"
  alive "$watcher_pid" || die "the $AGGREGATE watcher stopped: $(log_tail "$work/watch.log")"
}

# --- Processes, and stopping them ------------------------------------------

couch_pid=
receiver_pid=
watcher_pid=
spiegel_pid=
watchdog_pid=
work=
spiegel_log=
finished=0
written=0
rep_lines=0
hook_lines=0

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# log_tail FILE...: their last lines, without the colours of human logs.
esc=$(printf '\033')
log_tail() { tail -n 8 "$@" 2>/dev/null | sed "s/$esc\[[0-9;]*m//g"; }

# stop PID SECONDS: SIGTERM to PID's process group (PID itself when it has
# none), up to SECONDS for PID to exit, then SIGKILL.
stop() {
  local pid=$1 limit=$(($2 * 10)) i=0
  [ -n "$pid" ] || return 0
  if alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid" && [ $i -lt "$limit" ]; do
      sleep 0.1
      i=$((i + 1))
    done
    if alive "$pid"; then
      echo "demo: pid $pid did not stop within $2 s; killing it" >&2
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

# with_deadline SECONDS COMMAND...: runs COMMAND, killed after SECONDS.
with_deadline() {
  local limit=$(($1 * 10)) i=0 pid rc=0
  shift
  "$@" &
  pid=$!
  while alive "$pid" && [ $i -lt "$limit" ]; do
    sleep 0.1
    i=$((i + 1))
  done
  if alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "demo: \`$*\` took more than $((limit / 10)) s; stopped it" >&2
    return 124
  fi
  wait "$pid" || rc=$?
  return "$rc"
}

# watchdog DEMO_PID PID: stops PID once DEMO_PID is gone.
watchdog() {
  while kill -0 "$1" 2>/dev/null; do
    sleep 1
  done
  stop "$2" 15
}

print_status() {
  alive "$spiegel_pid" && alive "$couch_pid" || return 0
  say "spiegel status:"
  with_deadline 20 "$bin" status --url "$couch_url" 2>>"$spiegel_log" | sed 's/^/  /' || true
}

# True once `spiegel status` counts as many successful webhook calls as the
# receiver got.
status_counts_deliveries() {
  with_deadline 10 "$bin" status --json --url "$couch_url" 2>>"$spiegel_log" |
    node -e '
      let text = "";
      process.stdin.on("data", (c) => { text += c; });
      process.stdin.on("end", () => {
        let n = 0;
        try {
          for (const s of JSON.parse(text).documents["notes-to-webhook"] || []) n += s.succeeded || 0;
        } catch (_) { process.exit(1); }
        process.exit(n >= Number(process.argv[1]) ? 0 : 1);
      });' "$(count_delivered)"
}

cleanup() {
  local rc=$?
  trap - EXIT
  trap '' INT TERM HUP PIPE
  set +eu
  if [ "$finished" = 0 ] && alive "$spiegel_pid"; then
    # Interrupted, or failed: show what was seen.
    [ "$rc" -gt 128 ] && echo
    summary
    say "stopped after $written documents ($(count_replicated) replicated, $(count_delivered) delivered)"
    print_status
  fi
  # Spiegel first: it saves its checkpoints in the CouchDB as it stops.
  stop "$watchdog_pid" 5
  stop "$spiegel_pid" 20
  for pid in "$watcher_pid" "$receiver_pid" "$couch_pid"; do
    alive "$pid" && kill -TERM -- "-$pid" 2>/dev/null
  done
  stop "$watcher_pid" 5
  stop "$receiver_pid" 5
  stop "$couch_pid" 10
  if [ -n "$work" ]; then
    if [ "$rc" = 0 ]; then
      rm -rf "$work"
    else
      say "logs kept in $work"
    fi
  fi
  [ -z "$work" ] || say "stopped: spiegel, the test CouchDB and the webhook receiver"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE

# start_bg OUT ERR COMMAND...: starts COMMAND in the background, its output
# appended to OUT and ERR, in its own process group (so that Ctrl-C reaches
# the demo alone, which then stops everything in order), and sets $bg_pid.
start_bg() {
  local out=$1 err=$2
  shift 2
  set -m
  "$@" >>"$out" 2>>"$err" </dev/null &
  bg_pid=$!
  set +m
}

# wait_url FILE PID WHAT SECONDS: the URL of FILE's first line,
# {"url":"http://..."}, once PID has printed it.
wait_url() {
  local file=$1 pid=$2 what=$3 deadline=$((SECONDS + $4)) line=
  while :; do
    if [ -s "$file" ] && IFS= read -r line <"$file"; then
      break
    fi
    alive "$pid" || die "$what exited before it was ready: $(log_tail "$file" "${file%.out}.log")"
    [ $SECONDS -lt "$deadline" ] || die "$what was not ready within $4 s"
    sleep 0.1
  done
  case $line in
    '{"url":"'*'"}') line=${line#'{"url":"'}; printf '%s\n' "${line%'"}'}" ;;
    *) die "unexpected first line from $what: $line" ;;
  esac
}

# --- Install and build -----------------------------------------------------

lock=testing/couchdb/package-lock.json
stamp=testing/couchdb/node_modules/.spiegel-installed
if [ ! -f "$stamp" ] || [ "$lock" -nt "$stamp" ]; then
  say "installing the test CouchDB's npm packages (npm ci --prefix testing/couchdb)"
  npm ci --prefix testing/couchdb --no-audit --no-fund --loglevel=error
  touch "$stamp"
fi

if [ -n "${SPIEGEL_BIN:-}" ]; then
  bin=$SPIEGEL_BIN
  [ -x "$bin" ] || die "SPIEGEL_BIN=$bin is not an executable"
else
  if [ "$short" = 1 ]; then
    say "building spiegel (cargo build)"
    profile=()
  else
    say "building spiegel (cargo build --release; the first build takes a few minutes)"
    profile=(--release)
  fi
  # cargo's progress goes to stderr; stdout carries the JSON messages.
  bin=$(cargo build ${profile[@]+"${profile[@]}"} --bin spiegel \
    --message-format=json-render-diagnostics |
    node -e '
      let text = "";
      process.stdin.on("data", (c) => { text += c; });
      process.stdin.on("end", () => {
        for (const line of text.split("\n")) {
          let m;
          try { m = JSON.parse(line); } catch (_) { continue; }
          if (m.reason === "compiler-artifact" && m.target.name === "spiegel" && m.executable) {
            console.log(m.executable);
          }
        }
      });') || die "cargo build failed"
  bin=${bin##*$'\n'}
  if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    die "cargo build did not name the spiegel binary"
  fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/spiegel-demo.XXXXXX")
spiegel_log=$work/spiegel.log
: >"$work/written"
: >"$work/replicated.ids"
: >"$work/delivered.ids"

# --- Start the test CouchDB and the receiver --------------------------------

start_bg "$work/couchdb.out" "$work/couchdb.log" \
  node testing/couchdb/server.js --port 0 --admin "$ADMIN_USER:$ADMIN_PASSWORD"
couch_pid=$bg_pid
start_bg "$work/receiver.out" "$work/receiver.log" node scripts/demo-receiver.js --port 0
receiver_pid=$bg_pid

plain_couch_url=$(wait_url "$work/couchdb.out" "$couch_pid" "the test CouchDB" 30)
couch_url=${plain_couch_url/#http:\/\//http://$ADMIN_USER:$ADMIN_PASSWORD@}
couch_host_port=${plain_couch_url#http://}
export DEMO_COUCH_URL=$couch_url
receiver_url=$(wait_url "$work/receiver.out" "$receiver_pid" "the webhook receiver" 10)
say "test CouchDB:     $plain_couch_url (user $ADMIN_USER, password $ADMIN_PASSWORD)"
say "webhook receiver: $receiver_url"

# --- Install Spiegel, create the databases and the documents ---------------

with_deadline 30 "$bin" install --url "$couch_url" --log-format human >>"$spiegel_log" 2>&1 ||
  die "spiegel install failed: $(log_tail "$spiegel_log")"
say "spiegel install: done (the spiegel database, _global_changes)"

for user in "${users[@]}"; do
  quietly couch PUT "/users%2F$user" || die "cannot create users/$user"
done
quietly couch PUT "/$AGGREGATE" || die "cannot create $AGGREGATE"
say "databases: users/alice, users/bob, users/carol (one per user) and $AGGREGATE"

# Passwords stay out of the documents: `admin@127.0.0.1` gets its password
# from the passwords file.
printf '{"127.0.0.1": {"%s": "%s"}}\n' "$ADMIN_USER" "$ADMIN_PASSWORD" >"$work/passwords.json"
# shellcheck disable=SC2016 # ${db_name} is Spiegel's placeholder, not the shell's
replicator_doc='{"type": "replicator", "db_name": "^users/",
  "source": "http://'$ADMIN_USER@$couch_host_port'/${db_name}",
  "target": "http://'$ADMIN_USER@$couch_host_port/$AGGREGATE'"}'
# shellcheck disable=SC2016 # $db_name and $change are Spiegel's placeholders
on_change_doc='{"type": "on_change", "db_name": "^users/", "if": {"type": "^note$"},
  "url": "'$receiver_url'/changed", "method": "POST",
  "params": {"db": "$db_name", "id": "$change.id", "doc": "$change"}}'
quietly couch PUT /spiegel/users-into-all_users "$replicator_doc" ||
  die "cannot write the replicator document"
quietly couch PUT /spiegel/notes-to-webhook "$on_change_doc" ||
  die "cannot write the on_change document"
say "replicator document users-into-all_users (in the spiegel database):"
printf '  %s\n' "$replicator_doc"
say "on_change document notes-to-webhook:"
printf '  %s\n' "$on_change_doc"

start_bg "$work/replicated.out" "$work/watch.log" node -e "$watch_js" "$AGGREGATE"
watcher_pid=$bg_pid

# --- Run Spiegel -----------------------------------------------------------

admin_port=$(node -e "$free_port_js")
admin_url=http://127.0.0.1:$admin_port
say "starting: spiegel run --url http://$ADMIN_USER:***@$couch_host_port --admin-addr 127.0.0.1:$admin_port"
say "spiegel's logs:   $spiegel_log"
started_at=$SECONDS
start_bg "$spiegel_log" "$spiegel_log" "$bin" run --url "$couch_url" \
  --passwords-file "$work/passwords.json" --admin-addr "127.0.0.1:$admin_port" \
  --log-format human --log-level info --save-seq-after 1 --shutdown-timeout 10
spiegel_pid=$bg_pid
# The other processes stop by themselves when the demo dies, even by
# SIGKILL; this makes Spiegel do the same.
start_bg /dev/null /dev/null watchdog "$$" "$spiegel_pid"
watchdog_pid=$bg_pid

ready_deadline=$((SECONDS + 30))
until quietly couch GET "$admin_url/readyz"; do
  alive "$spiegel_pid" || die "spiegel stopped: $(log_tail "$spiegel_log")"
  [ $SECONDS -lt "$ready_deadline" ] ||
    die "spiegel was not ready within 30 s ($admin_url/readyz): $(couch GET "$admin_url/readyz" 2>&1)"
  sleep 0.2
done
say "spiegel is ready: $admin_url/readyz, metrics at $admin_url/metrics"

# --- Write documents and show what happens ---------------------------------

if [ "$short" = 1 ]; then
  total=6 ticks_per_write=2 # a document every 0.5 s
  say "writing $total documents, then waiting (60 s at most) for each to be replicated and delivered"
elif [ "$seconds" -gt 0 ]; then
  total=$seconds ticks_per_write=4
  say "writing a document every second for $seconds s (Ctrl-C stops)"
else
  total=0 ticks_per_write=4
  say "writing a document every second; Ctrl-C stops"
fi

# The loop ticks every 0.25 s: writes on schedule, shows events as they come.
deadline=$((started_at + 60))
tick=0
while :; do
  if [ $((tick % ticks_per_write)) = 0 ] && { [ "$total" = 0 ] || [ "$written" -lt "$total" ]; }; then
    write_doc
    [ "$total" = 0 ] || deadline=$((SECONDS + 60))
  fi
  show_events
  check_children
  if [ "$total" != 0 ] && [ "$written" = "$total" ]; then
    [ -n "$(missing | head -n 1)" ] || break
    if [ $SECONDS -ge "$deadline" ]; then
      missing | sed 's/^/demo: missing: /' >&2
      die "not everything was observed within 60 s (see $spiegel_log)"
    fi
  fi
  sleep 0.25
  tick=$((tick + 1))
done

bad=$(missing)
[ -z "$bad" ] || die "$bad"
summary
# Workers save their status every second here (--save-seq-after 1): give
# `spiegel status` a moment to count the last deliveries too.
status_deadline=$((SECONDS + 5))
until status_counts_deliveries || [ $SECONDS -ge $status_deadline ]; do
  sleep 0.25
done
print_status
finished=1
say "ok ($(count_replicated) replicated, $(count_delivered) delivered, in $((SECONDS - started_at)) s)"
