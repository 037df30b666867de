#!/usr/bin/env node
// Test CouchDB for Spiegel's integration tests.
//
// PouchDB Server (express-pouchdb 4.2.0) in memory, or on disk with
// --data-dir, plus the parts of Apache CouchDB 3 that Spiegel depends on and
// that PouchDB Server lacks or gets wrong: GET /_db_updates, opaque string
// sequences, database names containing "/", a CouchDB-style POST /_replicate,
// _changes timeouts, and an admin that is required for every request.
//
// Usage: node server.js [--port N] [--host H] [--admin USER:PASS]
//                       [--data-dir DIR] [--verbose] [--no-parent-watch]
// Prints exactly one line to stdout once listening: {"url":"http://H:PORT"}.
// Everything else goes to stderr.

'use strict';

const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');
const EventEmitter = require('events');
const Module = require('module');

// ---------------------------------------------------------------------------
// Command line

function usage(code) {
  process.stderr.write(
    'usage: node server.js [--port N] [--host 127.0.0.1] [--admin USER:PASS]\n' +
    '                      [--data-dir DIR] [--verbose] [--no-parent-watch]\n');
  process.exit(code);
}

function parseArgs(argv) {
  const opts = { port: 0, host: '127.0.0.1', admin: null, dataDir: null, verbose: false, parentWatch: true };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq !== -1) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const take = () => {
      if (value !== undefined) return value;
      if (i + 1 >= argv.length) {
        process.stderr.write(`missing value for ${arg}\n`);
        usage(2);
      }
      return argv[++i];
    };
    switch (arg) {
      case '--port': {
        const v = take();
        opts.port = Number(v);
        if (!/^\d+$/.test(v) || opts.port > 65535) {
          process.stderr.write(`invalid port: ${v}\n`);
          usage(2);
        }
        break;
      }
      case '--host': opts.host = take(); break;
      case '--admin': {
        const v = take();
        const colon = v.indexOf(':');
        if (colon <= 0) {
          process.stderr.write('--admin expects USER:PASS\n');
          usage(2);
        }
        opts.admin = { name: v.slice(0, colon), password: v.slice(colon + 1) };
        break;
      }
      case '--data-dir': opts.dataDir = path.resolve(take()); break;
      case '--verbose': opts.verbose = true; break;
      case '--no-parent-watch': opts.parentWatch = false; break;
      case '-h': case '--help': usage(0); break;
      default:
        process.stderr.write(`unknown argument: ${arg}\n`);
        usage(2);
    }
  }
  return opts;
}

const args = parseArgs(process.argv.slice(2));

// stdout carries exactly one line, the URL; PouchDB and express-pouchdb log
// the odd message with console.log, which would otherwise end up there.
console.log = console.info = console.warn = console.error;

function logErr(...parts) {
  process.stderr.write(`[test-couchdb] ${parts.join(' ')}\n`);
}

// ---------------------------------------------------------------------------
// express-pouchdb passes every database name through sanitize-filename, which
// silently turns "a/b" into "ab" (and would mangle other legal CouchDB names).
// Its route modules capture the function at require time, so the identity
// function has to be in the module cache before express-pouchdb is loaded.
// Names are validated against CouchDB's rules in PUT /:db below instead, and
// the on-disk file names are derived with an injective encoding (diskDown).
{
  const file = require.resolve('express-pouchdb/lib/clean-filename');
  const identity = new Module(file, module);
  identity.filename = file;
  identity.loaded = true;
  identity.exports = (name) => name;
  require.cache[file] = identity;
}

const express = require('express');
const expressPouchDB = require('express-pouchdb');
const epUtils = require('express-pouchdb/lib/utils');
const { getOrCreateDB } = require('express-pouchdb/lib/create-or-delete-dbs');
const CoreLevelPouch = require('pouchdb-adapter-leveldb-core');

// ---------------------------------------------------------------------------
// CouchDB-ish helpers

const GLOBAL_CHANGES = '_global_changes';
const SYSTEM_DBS = new Set(['_users', '_replicator', GLOBAL_CHANGES]);
// CouchDB 3's rule for database names (system databases aside).
const DB_NAME_RE = /^[a-z][a-z0-9_$()+/-]*$/;

function isValidDbName(name) {
  return SYSTEM_DBS.has(name) || DB_NAME_RE.test(name);
}

// Route guard: "/_foo" is a server endpoint, not a database, unless it is one
// of the system databases.
function isDbSegment(name) {
  return !name.startsWith('_') || SYSTEM_DBS.has(name);
}

// Databases that PouchDB keeps for itself (the all-dbs registry, auth
// sessions, view indexes): they are not CouchDB databases, so they never
// produce _db_updates events.
function isInternalDb(name) {
  return name.startsWith('pouch__') || name.includes('-mrview-');
}

function sendJSON(res, status, body) {
  epUtils.sendJSON(res, status, body);
}

function sendError(res, err, fallbackStatus) {
  if (res.headersSent) {
    res.end();
    return;
  }
  epUtils.sendError(res, err, fallbackStatus || 500);
}

class HttpError extends Error {
  constructor(status, error, reason) {
    super(reason);
    this.status = status;
    this.name = error;
  }
}

// express 4 does not catch rejected promises from handlers.
function wrap(handler) {
  return (req, res, next) => {
    Promise.resolve().then(() => handler(req, res, next)).catch((err) => sendError(res, err));
  };
}

// CouchDB clusters return opaque sequence strings ("17-g1AAAA..."), PouchDB
// returns integers. Clients must treat them as opaque, so the launcher hands
// out CouchDB-looking strings: the integer, a dash, and a deterministic
// pseudo-random tail (deterministic so that a sequence stays valid across a
// restart with --data-dir).
function seqToken(n) {
  n = Number(n) || 0;
  const tail = crypto.createHash('sha256').update(`spiegel-test-couchdb:${n}`).digest('base64url');
  return `${n}-g1AAAA${tail.slice(0, 40)}`;
}

// Accepts what seqToken produces, plain integers, "0" and "now". Returns an
// integer or 'now'; throws a CouchDB-style 400 otherwise.
function parseSince(value) {
  if (value === undefined || value === '' || value === null) return 0;
  if (Array.isArray(value)) value = value[value.length - 1];
  if (typeof value === 'number' && Number.isInteger(value) && value >= 0) return value;
  value = String(value);
  if (value === 'now') return 'now';
  const m = /^"?(\d+)(?:-[A-Za-z0-9_-]*)?"?$/.exec(value);
  if (!m) {
    throw new HttpError(400, 'bad_request', "Malformed sequence supplied in 'since' parameter.");
  }
  return Number(m[1]);
}

function parseNonNegInt(value, name) {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(String(value))) {
    throw new HttpError(400, 'bad_request', `invalid_integer (${name})`);
  }
  return Number(value);
}

function isTrue(value) {
  return value === 'true' || value === true;
}

// CouchDB: "heartbeat=true" means 60000 ms; heartbeat overrides timeout.
// Timeouts are capped at httpd/changes_timeout (60000).
const MAX_FEED_TIMEOUT = 60000;
function parseFeedTiming(query) {
  let heartbeat = null;
  if (query.heartbeat !== undefined && query.heartbeat !== 'false') {
    heartbeat = query.heartbeat === 'true'
      ? MAX_FEED_TIMEOUT
      : Math.min(parseNonNegInt(query.heartbeat, 'heartbeat'), MAX_FEED_TIMEOUT);
    if (heartbeat === 0) heartbeat = 1;
  }
  let timeout = MAX_FEED_TIMEOUT;
  if (query.timeout !== undefined) {
    timeout = Math.min(parseNonNegInt(query.timeout, 'timeout'), MAX_FEED_TIMEOUT);
  }
  return { heartbeat, timeout: heartbeat ? null : timeout };
}

// Delays res.end() until `hook` has settled, so that side effects of a request
// (its _db_updates events) are visible before the client sees the response.
function holdEnd(res, hook) {
  const end = res.end;
  res.end = function (...endArgs) {
    res.end = end;
    Promise.resolve()
      .then(() => hook(res.statusCode))
      .catch((err) => logErr('response hook failed:', err && err.stack || err))
      .then(() => end.apply(res, endArgs));
    return res;
  };
}

// Sends the headers of a streaming response (continuous, longpoll and
// eventsource feeds) right away, as CouchDB does.
function startStream(res, contentType) {
  res.status(200);
  res.setHeader('Content-Type', contentType);
  res.setHeader('Cache-Control', 'must-revalidate');
  res.flushHeaders();
}

// ---------------------------------------------------------------------------
// Storage: a leveldb-core adapter over memdown (default) or leveldown
// (--data-dir), with a hook on _bulkDocs that reports document writes.

let dbUpdates; // the DbUpdates recorder, created below

function memDown() {
  const memdown = require('memdown');
  // The function name keys leveldb-core's store cache, so it must be unique.
  function spiegelMemDown(name) {
    return memdown(name);
  }
  spiegelMemDown.destroy = (name, cb) => memdown.destroy(name, cb);
  return spiegelMemDown;
}

function diskDown(dataDir) {
  // leveldown 5 loads its bundled prebuilt binary (prebuilds/linux-x64) via
  // node-gyp-build, so it works without install scripts.
  const leveldown = require('leveldown');
  const dbDir = path.join(dataDir, 'dbs');
  fs.mkdirSync(dbDir, { recursive: true });
  // One flat directory per database; encodeURIComponent keeps "a/b" and "ab"
  // apart and never yields a path separator. "." is encoded too, so no name
  // can become "." or "..".
  const location = (name) =>
    path.join(dbDir, encodeURIComponent(name).replace(/\./g, '%2E').replace(/\*/g, '%2A'));
  function spiegelDiskDown(name) {
    return leveldown(location(name));
  }
  spiegelDiskDown.destroy = (name, cb) => leveldown.destroy(location(name), cb);
  return spiegelDiskDown;
}

function storageAdapterPlugin(down) {
  function SpiegelLevelPouch(opts, callback) {
    CoreLevelPouch.call(this, Object.assign({ db: down }, opts), callback);
    const api = this;
    const name = opts.name;
    const bulkDocs = api._bulkDocs;
    // Every document write (put, post, delete, attachments, _bulk_docs,
    // replication) ends up here; _local documents do not, which matches
    // CouchDB, where they do not change update_seq and produce no event.
    api._bulkDocs = function (req, bulkOpts, cb) {
      bulkDocs.call(api, req, bulkOpts, (err, results) => {
        if (!err && Array.isArray(results) && results.some((r) => r && !r.error)) {
          dbUpdates.record('updated', name);
        }
        cb(err, results);
      });
    };
  }
  SpiegelLevelPouch.valid = () => true;
  SpiegelLevelPouch.use_prefix = false;
  return (PouchDB) => PouchDB.adapter('spiegel', SpiegelLevelPouch, true);
}

const PouchDB = require('pouchdb-core')
  .plugin(require('pouchdb-adapter-http'))
  .plugin(require('pouchdb-replication'))
  .plugin(require('pouchdb-mapreduce'))
  .plugin(storageAdapterPlugin(args.dataDir ? diskDown(args.dataDir) : memDown()));

// The names of the databases, kept in memory. pouchdb-all-dbs answers
// allDbs() with a new array of every name, through a task queue, which made
// each request O(number of databases): at 10,000 databases that cost, not the
// request, dominated the server's time. CouchDB opens a database by name
// without listing them all. The set follows the same 'created' and
// 'destroyed' events that pouchdb-all-dbs records.
const dbNames = new Set();
let dbNamesLoaded = null;

function trackedName(name) {
  // As pouchdb-all-dbs: not its own database, no remote (http) databases,
  // no view indexes.
  return name !== 'pouch__all_dbs__' && !/^https?:\/\//.test(name) && name.indexOf('-mrview-') === -1;
}

function loadDbNames() {
  if (!dbNamesLoaded) {
    PouchDB.on('created', (name) => {
      if (trackedName(name)) dbNames.add(name);
    });
    PouchDB.on('destroyed', (name) => {
      if (trackedName(name)) dbNames.delete(name);
    });
    dbNamesLoaded = PouchDB.allDbs().then((names) => {
      for (const name of names) dbNames.add(name);
    });
  }
  return dbNamesLoaded;
}

async function dbExists(name) {
  await loadDbNames();
  return dbNames.has(name);
}

async function allDbNames() {
  await loadDbNames();
  return Array.from(dbNames);
}

// ---------------------------------------------------------------------------
// _db_updates, the CouchDB 3 way: events are documents "<type>:<db name>" in
// the _global_changes database (one document per type and database, so a
// feed read from an old sequence has at most one event per type and
// database), and /_db_updates is that database's changes feed. As in
// CouchDB, events are dropped while _global_changes does not exist, and
// changes to _global_changes itself are not recorded. Because the events live
// in a real database, they persist with --data-dir like everything else.

class DbUpdates extends EventEmitter {
  constructor() {
    super();
    this.setMaxListeners(0);
    this.enabled = false; // set once listening: startup writes are not events
    this.deletions = 0; // of _global_changes, which end the open feeds
    this.dropping = new Map(); // db name -> "updated" events still to drop
    this.pending = new Set();
    this.scheduled = false;
    this.chain = Promise.resolve();
  }

  // Test hook: CouchDB documents _db_updates as best effort (an event can be
  // lost), which tests of Spiegel's sweep need to reproduce on demand.
  dropNext(dbName, count) {
    this.dropping.set(dbName, (this.dropping.get(dbName) || 0) + count);
  }

  record(type, dbName) {
    if (!this.enabled || dbName === GLOBAL_CHANGES || isInternalDb(dbName)) return;
    const drop = this.dropping.get(dbName) || 0;
    if (type === 'updated' && drop > 0) {
      this.dropping.set(dbName, drop - 1);
      return;
    }
    this.pending.add(`${type}:${dbName}`);
    if (!this.scheduled) {
      this.scheduled = true;
      // setImmediate coalesces the writes of one tick into one flush, a
      // (much shorter) stand-in for CouchDB's batching of events.
      this.chain = this.chain
        .then(() => new Promise((resolve) => setImmediate(resolve)))
        .then(() => {
          this.scheduled = false;
          return this.flush();
        })
        .catch((err) => logErr('recording _db_updates events failed:', err && err.stack || err));
    }
  }

  // Resolves once every event recorded so far is in _global_changes.
  settled() {
    return this.chain;
  }

  async flush() {
    if (!this.pending.size) return;
    const ids = [...this.pending];
    this.pending.clear();
    if (!(await dbExists(GLOBAL_CHANGES))) return;
    const db = await getOrCreateDB(PouchDB, GLOBAL_CHANGES);
    const existing = await db.allDocs({ keys: ids });
    const docs = ids.map((id, i) => {
      const row = existing.rows[i];
      const doc = { _id: id };
      if (row && row.value && !row.value.deleted) doc._rev = row.value.rev;
      return doc;
    });
    await db.bulkDocs(docs);
    this.emit('change');
  }
}

dbUpdates = new DbUpdates();

// ---------------------------------------------------------------------------
// express-pouchdb

const pouchApp = expressPouchDB({
  inMemoryConfig: true, // never write ./config.json
  logPath: os.devNull, // never write ./log.txt
  mode: 'fullCouchDB',
  overrideMode: {
    // Replaced below by CouchDB-compatible implementations, or unwanted.
    exclude: ['routes/db-updates', 'routes/replicate', 'routes/changes', 'routes/fauxton', 'routes/http-log'],
  },
});

// express-pouchdb's version of this also sanitizes the name and creates
// directories named after the database relative to the working directory.
epUtils.setDBOnReq = function (dbName, dbWrapper, req, res, next) {
  dbExists(dbName)
    .then((exists) => {
      if (!exists) {
        return sendJSON(res, 404, { error: 'not_found', reason: 'Database does not exist.' });
      }
      return getOrCreateDB(req.PouchDB, dbName)
        .then((db) => dbWrapper.wrap(dbName, db))
        .then((db) => {
          req.db = db;
          next();
        });
    })
    .catch((e) => sendError(res, e));
};

function withDb(req, res, next) {
  epUtils.setDBOnReq(req.params.db, pouchApp.dbWrapper, req, res, next);
}

// ---------------------------------------------------------------------------
// The outer app: auth, event bookkeeping, and the routes that replace
// express-pouchdb's, in front of express-pouchdb itself.

const app = express();
app.disable('x-powered-by');
app.enable('case sensitive routing');
app.set('etag', false);

if (args.verbose) {
  app.use((req, res, next) => {
    const start = Date.now();
    res.on('finish', () => logErr(req.method, req.originalUrl, res.statusCode, `${Date.now() - start}ms`));
    next();
  });
}

app.use((req, res, next) => {
  req.PouchDB = PouchDB;
  next();
});

// With --admin, behave like CouchDB 3 with require_valid_user = true: every
// request needs the admin's Basic credentials, except the welcome page,
// /_up and /_session (so that cookie login and introspection still answer).
function safeEqual(a, b) {
  const ha = crypto.createHash('sha256').update(String(a)).digest();
  const hb = crypto.createHash('sha256').update(String(b)).digest();
  return crypto.timingSafeEqual(ha, hb);
}

function basicCredentials(req) {
  const m = /^\s*basic\s+([A-Za-z0-9+/=._~-]+)\s*$/i.exec(req.headers.authorization || '');
  if (!m) return null;
  const decoded = Buffer.from(m[1], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon === -1) return null;
  return { name: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
}

if (args.admin) {
  app.use((req, res, next) => {
    const open = req.path === '/_session' ||
      ((req.method === 'GET' || req.method === 'HEAD') && (req.path === '/' || req.path === '/_up'));
    const creds = basicCredentials(req);
    if (!creds) {
      if (open) return next();
      res.setHeader('WWW-Authenticate', 'Basic realm="server"');
      return sendJSON(res, 401, { error: 'unauthorized', reason: 'Authentication required.' });
    }
    const ok = safeEqual(creds.name, args.admin.name) & safeEqual(creds.password, args.admin.password);
    if (!ok) {
      res.setHeader('WWW-Authenticate', 'Basic realm="server"');
      return sendJSON(res, 401, { error: 'unauthorized', reason: 'Name or password is incorrect.' });
    }
    next();
  });
}

// Database creation and deletion events are recorded here, when the response
// says they happened; document writes are recorded by the storage adapter.
// Either way the response waits until the event is stored.
app.use((req, res, next) => {
  let dbEvent = null;
  const segments = req.path.split('/').filter(Boolean);
  if (segments.length === 1 && (req.method === 'PUT' || req.method === 'DELETE')) {
    let name = segments[0];
    try {
      name = decodeURIComponent(name);
    } catch (e) {
      name = null;
    }
    if (name && isDbSegment(name)) {
      dbEvent = { type: req.method === 'PUT' ? 'created' : 'deleted', name };
    }
  }
  holdEnd(res, (status) => {
    if (dbEvent && status >= 200 && status < 300) {
      dbUpdates.record(dbEvent.type, dbEvent.name);
      // Open /_db_updates feeds end when the database behind them goes.
      if (dbEvent.type === 'deleted' && dbEvent.name === GLOBAL_CHANGES) {
        dbUpdates.deletions += 1;
        dbUpdates.emit('gone');
      }
    }
    return dbUpdates.settled();
  });
  next();
});

// Only database routes; "/_foo" server endpoints fall through.
function dbParam(req, res, next) {
  if (!isDbSegment(req.params.db)) return next('route');
  next();
}

let serverUuid = crypto.randomBytes(16).toString('hex');

app.get('/', (req, res) => {
  sendJSON(res, 200, {
    couchdb: 'Welcome',
    version: '3.5.0',
    git_sha: 'pouchdb-server-4.2.0',
    uuid: serverUuid,
    features: [],
    vendor: { name: 'spiegel-test-couchdb (PouchDB Server 4.2.0 + CouchDB 3 shims)' },
  });
});

app.get('/_up', (req, res) => sendJSON(res, 200, { status: 'ok', seeds: {} }));

// CouchDB pages _all_dbs and _dbs_info (3.2+) with JSON-encoded start_key/
// end_key (or startkey/endkey), limit, skip and descending; express-pouchdb
// has no _dbs_info and ignores the parameters of _all_dbs.
async function pagedDbNames(q) {
  const key = (name, alias) => {
    const raw = q[name] !== undefined ? q[name] : q[alias];
    if (raw === undefined) return undefined;
    try {
      return JSON.parse(raw);
    } catch (e) {
      throw new HttpError(400, 'bad_request', `invalid JSON in ${name}`);
    }
  };
  const descending = q.descending === 'true';
  const start = key('start_key', 'startkey');
  const end = key('end_key', 'endkey');
  let dbs = (await allDbNames()).sort();
  if (descending) dbs.reverse();
  const before = (a, b) => (descending ? a > b : a < b);
  if (start !== undefined) dbs = dbs.filter((d) => !before(d, start));
  if (end !== undefined) dbs = dbs.filter((d) => !before(end, d));
  const skip = Number(q.skip || 0);
  const limit = q.limit !== undefined ? Number(q.limit) : dbs.length;
  return dbs.slice(skip, skip + limit);
}

app.get('/_all_dbs', wrap(async (req, res) => {
  sendJSON(res, 200, await pagedDbNames(req.query));
}));

// PouchDB's info() has no doc_del_count: count the deleted documents (each
// document shows once in _changes, with its winning revision).
async function deletedCount(db, info) {
  if (!info.update_seq) return 0;
  const changes = await db.changes({ since: 0 });
  return changes.results.filter((row) => row.deleted).length;
}

async function dbsInfoRows(names) {
  const rows = [];
  for (const name of names) {
    if (!(await dbExists(name))) {
      rows.push({ key: name, error: 'not_found' });
      continue;
    }
    const db = await getOrCreateDB(PouchDB, name);
    const info = await db.info();
    rows.push({
      key: name,
      info: {
        db_name: name,
        update_seq: seqToken(info.update_seq),
        doc_count: info.doc_count,
        doc_del_count: await deletedCount(db, info),
      },
    });
  }
  return rows;
}

app.get('/_dbs_info', wrap(async (req, res) => {
  sendJSON(res, 200, await dbsInfoRows(await pagedDbNames(req.query)));
}));

app.post('/_dbs_info', epUtils.jsonParser, wrap(async (req, res) => {
  const keys = req.body && req.body.keys;
  if (!Array.isArray(keys)) throw new HttpError(400, 'bad_request', '`keys` member must exist.');
  sendJSON(res, 200, await dbsInfoRows(keys));
}));

// Test hook (not CouchDB): drop the next `count` "updated" events of `db`,
// as CouchDB may under load. Body: {"db": "<name>", "count": 1}.
app.post('/_spiegel_test/drop_db_updates', epUtils.jsonParser, wrap(async (req, res) => {
  const { db, count } = req.body || {};
  if (typeof db !== 'string') throw new HttpError(400, 'bad_request', '`db` must be a string');
  dbUpdates.dropNext(db, Number.isInteger(count) && count > 0 ? count : 1);
  sendJSON(res, 200, { ok: true });
}));

// No dbParam guard: there are no single-segment PUT endpoints, so "/_foo"
// is an attempt to create a database with an illegal name.
app.put('/:db', (req, res, next) => {
  if (!isValidDbName(req.params.db)) {
    return sendJSON(res, 400, {
      error: 'illegal_database_name',
      reason: `Name: '${req.params.db}'. Only lowercase characters (a-z), digits (0-9), and any of` +
        ' the characters _, $, (, ), +, -, and / are allowed. Must begin with a letter.',
    });
  }
  next(); // express-pouchdb creates it
});

// express-pouchdb answers 200 for a database that does not exist.
app.delete('/:db', dbParam, wrap(async (req, res, next) => {
  if (req.query.rev !== undefined) return next(); // express-pouchdb's 400
  if (!(await dbExists(req.params.db))) {
    return sendJSON(res, 404, { error: 'not_found', reason: 'Database does not exist.' });
  }
  next();
}));

// Database info with CouchDB 3's fields and an opaque update_seq.
app.get('/:db', dbParam, withDb, wrap(async (req, res) => {
  const db = req.db;
  const info = await db.info();
  let docDelCount = 0;
  // PouchDB does not track deleted documents; the test databases are small.
  const all = await db.changes({ since: 0, return_docs: true });
  for (const change of all.results) if (change.deleted) docDelCount++;
  sendJSON(res, 200, {
    instance_start_time: '0',
    db_name: req.params.db,
    purge_seq: seqToken(0),
    update_seq: seqToken(info.update_seq),
    sizes: { file: 0, external: 0, active: 0 },
    props: {},
    doc_del_count: docDelCount,
    doc_count: info.doc_count,
    disk_format_version: 8,
    compact_running: false,
    cluster: { q: 1, n: 1, w: 1, r: 1 },
  });
}));

// ---------------------------------------------------------------------------
// GET /:db/_changes, reimplemented because express-pouchdb's ignores timeout,
// never ends a continuous feed, leaks heartbeats after the client leaves,
// crashes the process on filter=_selector, and returns integer sequences.

function changesOptions(req) {
  const q = req.query;
  const body = (req.body && typeof req.body === 'object') ? req.body : {};
  const opts = {
    since: parseSince(q.since !== undefined ? q.since : body.since),
    descending: isTrue(q.descending),
    include_docs: isTrue(q.include_docs),
    conflicts: isTrue(q.conflicts),
    attachments: isTrue(q.attachments),
    return_docs: true,
  };
  if (q.style === 'all_docs') opts.style = 'all_docs';
  const limit = parseNonNegInt(q.limit, 'limit');
  if (limit !== undefined) opts.limit = limit;

  const filter = q.filter;
  if (filter === '_doc_ids') {
    let ids = body.doc_ids;
    if (ids === undefined && q.doc_ids !== undefined) {
      try {
        ids = JSON.parse(q.doc_ids);
      } catch (e) {
        ids = undefined;
      }
    }
    if (!Array.isArray(ids)) {
      throw new HttpError(400, 'bad_request', '`doc_ids` filter parameter is not a list of doc ids.');
    }
    opts.doc_ids = ids;
  } else if (filter === '_selector') {
    if (!body.selector || typeof body.selector !== 'object') {
      throw new HttpError(400, 'bad_request', 'Selector must be specified in POST payload');
    }
    opts.selector = body.selector;
  } else if (filter === '_design') {
    opts.filter = (doc) => typeof doc._id === 'string' && doc._id.startsWith('_design/');
  } else if (filter === '_view') {
    if (!q.view) throw new HttpError(400, 'bad_request', '`view` filter parameter is not provided.');
    opts.filter = '_view';
    opts.view = q.view;
  } else if (filter !== undefined && filter !== '') {
    if (!/^[^/]+\/[^/]+$/.test(filter)) {
      throw new HttpError(400, 'bad_request', '`filter` parameter is not a valid filter name.');
    }
    opts.filter = filter;
    opts.query_params = Object.assign({}, q);
  }
  return opts;
}

function changeRow(change) {
  const row = { seq: seqToken(change.seq), id: change.id, changes: change.changes };
  if (change.deleted) row.deleted = true;
  if (change.doc !== undefined) row.doc = change.doc;
  return row;
}

async function changesHandler(req, res) {
  const db = req.db;
  const feed = req.query.feed || 'normal';
  if (!['normal', 'longpoll', 'continuous', 'eventsource'].includes(feed)) {
    throw new HttpError(400, 'bad_request', 'Supported `feed` types: normal, continuous, longpoll, eventsource');
  }
  const opts = changesOptions(req);
  const timing = parseFeedTiming(req.query);
  if (opts.since === 'now') opts.since = (await db.info()).update_seq;

  if (feed === 'normal' || feed === 'longpoll') {
    // Everything up to `before` gets scanned by the query, so unless the
    // limit cut it short, last_seq is at least `before` even when a filter
    // matched nothing (CouchDB's last_seq is where the scan ended).
    const before = (await db.info()).update_seq;
    const result = await db.changes(opts);
    const cut = opts.limit !== undefined && result.results.length >= opts.limit;
    let lastSeq;
    if (opts.descending) lastSeq = result.results.length ? result.last_seq : 0;
    else if (cut) lastSeq = result.results.length ? result.last_seq : opts.since;
    else lastSeq = Math.max(opts.since, before, result.results.length ? result.last_seq : 0);
    let pending = 0;
    if (cut && !opts.descending) {
      const rest = await db.changes({ since: lastSeq });
      pending = rest.results.length;
    }
    // longpoll: anything already there is returned at once.
    if (feed === 'normal' || result.results.length || opts.limit === 0) {
      return sendJSON(res, 200, { results: result.results.map(changeRow), last_seq: seqToken(lastSeq), pending });
    }
    opts.since = lastSeq;
  }

  // longpoll (waiting), continuous and eventsource: a live PouchDB feed.
  const contentType = feed === 'eventsource' ? 'text/event-stream' : 'application/json';
  startStream(res, contentType);
  if (feed === 'longpoll') res.write('{"results":[\n');

  let lastSeq = opts.since;
  let sent = 0;
  let lastWrite = Date.now();
  let finished = false;
  let idleTimer = null;
  let heartbeatTimer = null;
  const collected = [];
  let longpollTimer = null;

  // return_docs: false, or PouchDB keeps every change of a live feed in memory.
  const live = db.changes(Object.assign({}, opts, { live: true, since: opts.since, return_docs: false }));

  function finish() {
    if (finished) return;
    finished = true;
    clearTimeout(idleTimer);
    clearTimeout(longpollTimer);
    clearInterval(heartbeatTimer);
    live.cancel();
    if (res.writableEnded || res.destroyed) return;
    if (feed === 'continuous') {
      res.write(JSON.stringify({ last_seq: seqToken(lastSeq), pending: 0 }) + '\n');
    } else if (feed === 'longpoll') {
      res.write(collected.map((c) => JSON.stringify(changeRow(c))).join(',\n') +
        `\n],\n"last_seq":${JSON.stringify(seqToken(lastSeq))},"pending":0}\n`);
    }
    res.end();
  }

  function armIdleTimer() {
    if (timing.timeout === null) return;
    clearTimeout(idleTimer);
    idleTimer = setTimeout(finish, timing.timeout);
  }

  res.on('close', () => {
    finished = true;
    clearTimeout(idleTimer);
    clearTimeout(longpollTimer);
    clearInterval(heartbeatTimer);
    live.cancel();
  });

  if (timing.heartbeat) {
    heartbeatTimer = setInterval(() => {
      if (finished || Date.now() - lastWrite < timing.heartbeat) return;
      res.write(feed === 'eventsource' ? 'event: heartbeat\ndata: \n\n' : '\n');
      lastWrite = Date.now();
    }, Math.max(10, Math.floor(timing.heartbeat / 2)));
  }
  armIdleTimer();

  live.on('change', (change) => {
    if (finished) return;
    lastSeq = change.seq;
    sent++;
    if (feed === 'longpoll') {
      // Like CouchDB, return the first batch: whatever arrives in this tick.
      collected.push(change);
      if (opts.limit !== undefined && sent >= opts.limit) finish();
      else if (!longpollTimer) longpollTimer = setTimeout(finish, 0);
      return;
    }
    const row = changeRow(change);
    res.write(feed === 'eventsource'
      ? `data: ${JSON.stringify(row)}\nid: ${JSON.stringify(row.seq)}\n\n`
      : JSON.stringify(row) + '\n');
    lastWrite = Date.now();
    armIdleTimer();
    if (opts.limit !== undefined && sent >= opts.limit) finish();
  });
  live.on('error', (err) => {
    if (!finished) logErr('_changes feed error:', err && err.message);
    finish();
  });
}

app.get('/:db/_changes', dbParam, withDb, wrap(changesHandler));
app.post('/:db/_changes', dbParam, epUtils.jsonParser, withDb, wrap(changesHandler));

// ---------------------------------------------------------------------------
// GET /_db_updates

function dbUpdateRow(change) {
  const colon = change.id.indexOf(':');
  return {
    db_name: change.id.slice(colon + 1),
    type: change.id.slice(0, colon),
    seq: seqToken(change.seq),
  };
}

app.get('/_db_updates', wrap(async (req, res) => {
  const q = req.query;
  const feed = q.feed || 'normal';
  if (!['normal', 'longpoll', 'continuous', 'eventsource'].includes(feed)) {
    throw new HttpError(400, 'bad_request', 'Supported `feed` types: normal, continuous, longpoll, eventsource');
  }
  let since = parseSince(q.since);
  const limit = parseNonNegInt(q.limit, 'limit');
  const descending = isTrue(q.descending);
  const timing = parseFeedTiming(q);
  // A deletion while this request is set up ends it as one before would.
  const deletions = dbUpdates.deletions;
  const gone = () => sendJSON(res, 404, { error: 'not_found', reason: 'Database does not exist.' });
  if (!(await dbExists(GLOBAL_CHANGES))) return gone();
  const db = await getOrCreateDB(PouchDB, GLOBAL_CHANGES);
  const currentSeq = async () => (await db.info()).update_seq;
  if (since === 'now') since = await currentSeq();

  // Events after `after`, at most `max` (undefined: all).
  async function query(after, max) {
    if (max === 0) return { rows: [], last: after };
    const before = await currentSeq();
    const opts = { since: after, descending: feed === 'normal' && descending };
    if (max !== undefined) opts.limit = max;
    const result = await db.changes(opts);
    const rows = result.results.filter((c) => c.id.indexOf(':') > 0).map(dbUpdateRow);
    // With no results there was nothing after `after` when the query ran.
    const last = result.results.length ? result.last_seq : Math.max(after, before);
    return { rows, last };
  }

  if (feed === 'normal') {
    const { rows, last } = await query(since, limit);
    return sendJSON(res, 200, { results: rows, last_seq: seqToken(last) });
  }

  let lastSeq = since;
  let remaining = limit;
  let finished = false;
  let lastWrite = Date.now();
  let idleTimer = null;
  let heartbeatTimer = null;
  let running = Promise.resolve();
  let started = false;

  const ensureStarted = () => {
    if (started) return;
    started = true;
    startStream(res, feed === 'eventsource' ? 'text/event-stream' : 'application/json');
  };

  function cleanup() {
    finished = true;
    clearTimeout(idleTimer);
    clearInterval(heartbeatTimer);
    dbUpdates.removeListener('change', onChange);
    dbUpdates.removeListener('gone', onGone);
  }

  function finish(rows) {
    if (finished) return;
    cleanup();
    if (res.writableEnded || res.destroyed) return;
    if (feed === 'longpoll') {
      const body = JSON.stringify({ results: rows || [], last_seq: seqToken(lastSeq) }) + '\n';
      if (started) res.end(body);
      else sendJSON(res, 200, { results: rows || [], last_seq: seqToken(lastSeq) });
      return;
    }
    ensureStarted();
    if (feed === 'continuous') res.write(JSON.stringify({ last_seq: seqToken(lastSeq) }) + '\n');
    res.end();
  }

  function armIdleTimer() {
    if (timing.timeout === null) return;
    clearTimeout(idleTimer);
    idleTimer = setTimeout(() => {
      running = running.then(() => finish());
    }, timing.timeout);
  }

  // Queries are serialized so rows are never sent twice or out of order.
  function poll() {
    running = running.then(async () => {
      if (finished) return;
      const { rows, last } = await query(lastSeq, remaining);
      if (finished) return;
      lastSeq = last;
      if (feed === 'longpoll') {
        if (rows.length || remaining === 0) finish(rows);
        return;
      }
      if (rows.length) {
        ensureStarted();
        for (const row of rows) {
          res.write(feed === 'eventsource'
            ? `data: ${JSON.stringify(row)}\nid: ${JSON.stringify(row.seq)}\n\n`
            : JSON.stringify(row) + '\n');
        }
        lastWrite = Date.now();
        armIdleTimer();
        if (remaining !== undefined) remaining -= rows.length;
      }
      if (remaining === 0) finish();
    }).catch((err) => {
      // _global_changes was deleted under the feed, most likely.
      if (!finished) logErr('_db_updates feed error:', err && err.message);
      finish();
    });
  }

  function onChange() {
    poll();
  }

  function onGone() {
    running = running.then(() => finish());
  }

  if (dbUpdates.deletions !== deletions) return gone();
  dbUpdates.on('change', onChange);
  dbUpdates.on('gone', onGone);
  res.on('close', cleanup);
  if (feed !== 'longpoll') ensureStarted();
  if (timing.heartbeat) {
    heartbeatTimer = setInterval(() => {
      if (finished || Date.now() - lastWrite < timing.heartbeat) return;
      ensureStarted();
      res.write(feed === 'eventsource' ? 'event: heartbeat\ndata: \n\n' : '\n');
      lastWrite = Date.now();
    }, Math.max(10, Math.floor(timing.heartbeat / 2)));
  }
  armIdleTimer();
  poll();
}));

// ---------------------------------------------------------------------------
// POST /_replicate, CouchDB 3 style: endpoints are URLs, or objects
// {"url", "headers", "auth": {"basic": {"username", "password"}}}; plain
// local names are accepted too. One-shot replications answer with a CouchDB
// shaped history; continuous ones run until cancelled or the server stops.

const continuousReplications = new Map();

function redactUrl(url) {
  try {
    const u = new URL(url);
    u.username = '';
    u.password = '';
    return u.toString();
  } catch (e) {
    return url;
  }
}

function parseEndpoint(value, which) {
  if (typeof value === 'string') {
    if (/^https?:\/\//i.test(value)) return { url: value, headers: {} };
    return { local: value };
  }
  if (value && typeof value === 'object' && typeof value.url === 'string') {
    const headers = Object.assign({}, value.headers || {});
    let auth;
    if (value.auth !== undefined) {
      const basic = value.auth && value.auth.basic;
      if (!basic || typeof basic.username !== 'string' || typeof basic.password !== 'string') {
        throw new HttpError(400, 'bad_request', `Unsupported auth in ${which}; only {"basic": {"username", "password"}} is supported.`);
      }
      auth = { username: basic.username, password: basic.password };
    }
    if (!/^https?:\/\//i.test(value.url)) return { local: value.url };
    return { url: value.url, headers, auth };
  }
  throw new HttpError(400, 'bad_request', `Invalid ${which} endpoint`);
}

function endpointKey(ep) {
  return ep.local !== undefined ? `local:${ep.local}` : `url:${redactUrl(ep.url)}`;
}

// Credentials may come in the URL, in "auth" or in "headers"; they all end up
// as headers because fetch() refuses URLs with credentials, and because
// PouchDB's http adapter would otherwise send two Authorization headers.
function remoteEndpoint(ep) {
  let u;
  try {
    u = new URL(ep.url);
  } catch (e) {
    throw new HttpError(400, 'bad_request', `Invalid URL: ${redactUrl(ep.url)}`);
  }
  let auth = ep.auth;
  if (!auth && (u.username || u.password)) {
    auth = { username: decodeURIComponent(u.username), password: decodeURIComponent(u.password) };
  }
  u.username = '';
  u.password = '';
  const headers = Object.assign({}, ep.headers);
  const hasAuthHeader = Object.keys(headers).some((k) => k.toLowerCase() === 'authorization');
  if (auth && !hasAuthHeader) {
    headers.Authorization = 'Basic ' + Buffer.from(`${auth.username}:${auth.password}`).toString('base64');
  }
  return { url: u.toString().replace(/\/+$/, ''), headers };
}

async function openEndpoint(ep, { create }) {
  if (ep.local !== undefined) {
    if (!(await dbExists(ep.local))) {
      if (!create) throw new HttpError(404, 'db_not_found', `could not open ${ep.local}`);
      if (!isValidDbName(ep.local)) throw new HttpError(400, 'illegal_database_name', ep.local);
      const db = await getOrCreateDB(PouchDB, ep.local);
      dbUpdates.record('created', ep.local);
      return db;
    }
    return getOrCreateDB(PouchDB, ep.local);
  }
  const remote = remoteEndpoint(ep);
  // PouchDB's http adapter reports a 404 from GET /db as a successful info(),
  // so existence is checked here, like CouchDB's replicator does.
  let resp = await fetch(remote.url, { headers: remote.headers });
  if (resp.status === 404 && create) {
    resp = await fetch(remote.url, { method: 'PUT', headers: remote.headers });
    if (resp.status === 412) resp = { ok: true };
  }
  if (resp.status === 401 || resp.status === 403) {
    throw new HttpError(resp.status, 'unauthorized', `unauthorized to access or create database ${remote.url}`);
  }
  if (resp.status === 404) throw new HttpError(404, 'db_not_found', `could not open ${remote.url}`);
  if (!resp.ok) {
    throw new HttpError(502, 'replication_failed', `could not open ${remote.url}: HTTP ${resp.status}`);
  }
  return new PouchDB(remote.url, { skip_setup: true, headers: remote.headers });
}

function replicationOptions(body) {
  const opts = {};
  if (Array.isArray(body.doc_ids)) opts.doc_ids = body.doc_ids;
  if (typeof body.filter === 'string') opts.filter = body.filter;
  if (body.query_params) opts.query_params = body.query_params;
  if (body.selector) opts.selector = body.selector;
  if (body.since_seq !== undefined) opts.since = body.since_seq;
  if (body.batch_size) opts.batch_size = body.batch_size;
  return opts;
}

app.post('/_replicate', epUtils.jsonParser, wrap(async (req, res) => {
  const body = req.body || {};
  if (body.source === undefined || body.target === undefined) {
    if (body.cancel && body.replication_id) {
      const rep = continuousReplications.get(body.replication_id);
      if (!rep) throw new HttpError(404, 'not_found', 'Replication not found');
      rep.cancel();
      continuousReplications.delete(body.replication_id);
      return sendJSON(res, 200, { ok: true, _local_id: body.replication_id });
    }
    throw new HttpError(400, 'bad_request', 'Both source and target must be specified.');
  }
  const source = parseEndpoint(body.source, 'source');
  const target = parseEndpoint(body.target, 'target');
  const opts = replicationOptions(body);
  const repId = crypto.createHash('md5')
    .update(JSON.stringify([endpointKey(source), endpointKey(target), opts.doc_ids, opts.filter,
      opts.query_params, opts.selector]))
    .digest('hex') + (body.continuous ? '+continuous' : '');

  if (body.cancel) {
    const rep = continuousReplications.get(repId);
    if (!rep) throw new HttpError(404, 'not_found', 'Replication not found');
    rep.cancel();
    continuousReplications.delete(repId);
    return sendJSON(res, 200, { ok: true, _local_id: repId });
  }

  const sourceDb = await openEndpoint(source, { create: false });
  const targetDb = await openEndpoint(target, { create: !!body.create_target });

  if (body.continuous) {
    if (!continuousReplications.has(repId)) {
      const rep = PouchDB.replicate(sourceDb, targetDb, Object.assign({ live: true, retry: true }, opts));
      rep.on('error', (err) => {
        logErr('continuous replication', repId, 'failed:', err && err.message);
        continuousReplications.delete(repId);
      });
      continuousReplications.set(repId, rep);
    }
    return sendJSON(res, 202, { ok: true, _local_id: repId });
  }

  const startTime = new Date().toUTCString();
  let result;
  try {
    const replication = PouchDB.replicate(sourceDb, targetDb, opts);
    // The Replication emitter also emits 'error'; unhandled it would crash.
    replication.on('error', () => {});
    result = await replication;
  } catch (err) {
    const status = err.status || 500;
    const error = status === 401 ? 'unauthorized' : (err.name && err.name !== 'Error' ? err.name : 'replication_failed');
    throw new HttpError(status, error, err.message || err.reason || String(err));
  }
  const sessionId = crypto.randomBytes(16).toString('hex');
  const lastSeq = result.last_seq;
  const history = {
    session_id: sessionId,
    start_time: startTime,
    end_time: new Date().toUTCString(),
    recorded_seq: lastSeq,
    end_last_seq: lastSeq,
    missing_checked: result.docs_read,
    missing_found: result.docs_read,
    docs_read: result.docs_read,
    docs_written: result.docs_written,
    doc_write_failures: result.doc_write_failures,
  };
  const response = {
    ok: true,
    session_id: sessionId,
    source_last_seq: lastSeq,
    replication_id_version: 4,
    history: [history],
  };
  if (result.docs_read === 0 && result.doc_write_failures === 0) response.no_changes = true;
  sendJSON(res, 200, response);
}));

app.use(pouchApp);

// ---------------------------------------------------------------------------
// Start

async function main() {
  const started = Date.now();
  if (args.dataDir) {
    fs.mkdirSync(args.dataDir, { recursive: true });
    // A stable server uuid keeps PouchDB's replication ids (and so its
    // checkpoints) valid across restarts.
    const uuidFile = path.join(args.dataDir, 'server-uuid');
    try {
      serverUuid = fs.readFileSync(uuidFile, 'utf8').trim() || serverUuid;
    } catch (e) {
      fs.writeFileSync(uuidFile, serverUuid + '\n');
    }
  }
  await pouchApp.setPouchDB(PouchDB);
  await new Promise((resolve, reject) => {
    pouchApp.couchConfig.set('couchdb', 'uuid', serverUuid, (err) => (err ? reject(err) : resolve()));
  });
  if (args.admin) {
    await new Promise((resolve, reject) => {
      pouchApp.couchConfig.set('admins', args.admin.name, args.admin.password,
        (err) => (err ? reject(err) : resolve()));
    });
  }
  // Let the daemons finish their startup writes (_users and _replicator
  // design documents) before events are recorded; and load the names.
  await PouchDB.allDbs();
  await loadDbNames();

  const server = app.listen(args.port, args.host);
  // Node closes an idle keep-alive connection after 5 s by default, so a
  // client that reuses it at that moment sees a reset. CouchDB keeps idle
  // connections open far longer: keep them past the clients' own idle
  // timeouts (reqwest: 90 s).
  server.keepAliveTimeout = 120 * 1000;
  server.headersTimeout = 121 * 1000;
  server.on('error', (err) => {
    logErr(`cannot listen on ${args.host}:${args.port}:`, err.message);
    process.exit(1);
  });
  server.on('listening', () => {
    dbUpdates.enabled = true;
    const port = server.address().port;
    const host = args.host === '0.0.0.0' || args.host === '::' ? '127.0.0.1'
      : (args.host.includes(':') ? `[${args.host}]` : args.host);
    process.stdout.write(JSON.stringify({ url: `http://${host}:${port}` }) + '\n');
    if (args.verbose) {
      logErr(`listening on ${host}:${port} after ${Date.now() - started}ms,`,
        args.dataDir ? `data in ${args.dataDir}` : 'in memory');
    }
  });

  const shutdown = () => {
    for (const rep of continuousReplications.values()) rep.cancel();
    server.close();
    if (server.closeAllConnections) server.closeAllConnections();
    // Data is written through to LevelDB as it goes (a SIGKILL loses
    // nothing), so there is nothing to wait for.
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);

  // A test process that dies without stopping its server (a shared server in
  // a static, a harness killed on timeout) would leave it running forever;
  // being re-parented means the process that started us is gone.
  if (args.parentWatch) {
    const parent = process.ppid;
    setInterval(() => {
      if (process.ppid !== parent) shutdown();
    }, 500).unref();
  }
}

main().catch((err) => {
  logErr('startup failed:', err && err.stack || err);
  process.exit(1);
});
