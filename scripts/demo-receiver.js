#!/usr/bin/env node
// The webhook receiver of scripts/demo.sh: a tiny HTTP server that stands in
// for "your API". It answers every request with 200 and prints one line per
// request to stdout:
//
//   webhook: POST /changed db=users/alice id=note-3 text="note 3 from alice"
//
// Usage: node scripts/demo-receiver.js [--port N] [--host 127.0.0.1]
//
// Like testing/couchdb/server.js, its first line on stdout, once listening,
// is {"url":"http://127.0.0.1:PORT"} (port 0, the default, picks a free
// one). It stops on SIGTERM or SIGINT, and by itself when the process that
// started it dies. Node.js only, no packages.

'use strict';

const http = require('http');

function usage(code) {
  process.stderr.write('usage: node scripts/demo-receiver.js [--port N] [--host H]\n');
  process.exit(code);
}

const opts = { port: 0, host: '127.0.0.1' };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const [flag, inline] = argv[i].split(/=(.*)/s);
  const value = () => {
    if (inline !== undefined) return inline;
    if (i + 1 >= argv.length) usage(2);
    return argv[++i];
  };
  switch (flag) {
    case '--port': {
      const v = value();
      opts.port = Number(v);
      if (!/^\d+$/.test(v) || opts.port > 65535) usage(2);
      break;
    }
    case '--host': opts.host = value(); break;
    case '-h': case '--help': usage(0); break;
    default:
      process.stderr.write(`unknown argument: ${argv[i]}\n`);
      usage(2);
  }
}

// One short value for the line: strings as they are (quoted when they
// contain spaces), anything else as compact JSON without CouchDB's `_id`
// and `_rev` (a document's id is usually a field of its own), long values
// cut.
function show(value) {
  let text;
  if (typeof value === 'string') {
    text = value;
  } else if (value && typeof value === 'object' && !Array.isArray(value)) {
    const rest = {};
    for (const [k, v] of Object.entries(value)) if (k !== '_id' && k !== '_rev') rest[k] = v;
    text = JSON.stringify(rest);
  } else {
    text = JSON.stringify(value);
  }
  if (text.length > 100) text = `${text.slice(0, 97)}...`;
  return /[\s"]/.test(text) && typeof value === 'string' || text === '' ? JSON.stringify(text) : text;
}

function describe(req, body) {
  const url = new URL(req.url, 'http://receiver');
  const fields = [];
  for (const [k, v] of url.searchParams) fields.push(`${k}=${show(v)}`);
  if (body.length > 0) {
    let parsed;
    try {
      parsed = JSON.parse(body);
    } catch (_) {
      parsed = undefined;
    }
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) {
      // Plain values first, objects and arrays last: easier to read.
      const entries = Object.entries(parsed);
      const nested = (v) => v !== null && typeof v === 'object';
      for (const [k, v] of entries) if (!nested(v)) fields.push(`${k}=${show(v)}`);
      for (const [k, v] of entries) if (nested(v)) fields.push(`${k}=${show(v)}`);
    } else {
      fields.push(`body=${show(body)}`);
    }
  }
  return [`webhook: ${req.method} ${url.pathname}`, ...fields].join(' ');
}

const server = http.createServer((req, res) => {
  const chunks = [];
  let size = 0;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size <= 1 << 20) chunks.push(chunk);
  });
  req.on('end', () => {
    process.stdout.write(`${describe(req, Buffer.concat(chunks).toString('utf8'))}\n`);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{"ok":true}\n');
  });
  req.on('error', () => res.destroy());
});
server.keepAliveTimeout = 5000;

let stopping = false;
function shutdown() {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.on('error', (err) => {
  process.stderr.write(`demo-receiver: ${err.message}\n`);
  process.exit(1);
});

server.listen(opts.port, opts.host, () => {
  const { port } = server.address();
  const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host;
  process.stdout.write(`${JSON.stringify({ url: `http://${host}:${port}` })}\n`);
  // Being re-parented means the process that started us is gone.
  const parent = process.ppid;
  setInterval(() => {
    if (process.ppid !== parent) shutdown();
  }, 500).unref();
});
