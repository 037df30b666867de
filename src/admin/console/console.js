// Spiegel's console: refreshes the state and the live tail, and sends the
// actions, with the admin token when one is entered (reading needs it too
// when the server has one: the page then comes without its state, and the
// state is fetched once the token is entered). No framework, no build step.
"use strict";

const TOKEN_KEY = "spiegel-admin-token";
const TAIL_EVERY_MS = 1000;
const TAIL_ROWS = 100;

let lastTail = 0;

const LOCKED = "The console needs the admin token: enter it above and press Enter.";

// `kind` is "locked" for the request of the token, which a refresh that
// gets in replaces; an action's outcome stays until the next action.
function say(text, bad, kind) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = bad ? "bad" : "ok";
  message.dataset.kind = kind || "outcome";
}

function token() {
  return document.getElementById("token")?.value || "";
}

// A GET of the console, with the token when one is entered.
function get(path) {
  const headers = token() ? { "Authorization": "Bearer " + token() } : {};
  return fetch(path, { cache: "no-store", headers });
}

async function refreshState() {
  const state = document.getElementById("state");
  const kind = document.getElementById("message").dataset.kind;
  try {
    const answer = await get("/console/state");
    if (answer.ok) {
      state.innerHTML = await answer.text();
      if (kind === "locked") say("", false, "none");
    } else if (answer.status === 401 && kind !== "outcome") {
      say(LOCKED, true, "locked");
    }
  } catch (_) {
    // The next refresh tries again.
  }
}

function cell(row, label, text, className) {
  const td = row.insertCell();
  td.dataset.label = label;
  td.textContent = text;
  if (className) td.className = className;
}

async function refreshTail() {
  try {
    const answer = await get("/console/tail?after=" + lastTail);
    if (!answer.ok) return;
    const body = document.getElementById("tail");
    const entries = await answer.json();
    if (entries.length && entries[0].id <= lastTail) {
      // The process restarted: its ids began again.
      body.replaceChildren();
    }
    for (const entry of entries) {
      lastTail = entry.id;
      const row = body.insertRow(0);
      row.dataset.db = entry.db;
      row.className = entry.ok ? "" : "failed";
      cell(row, "At", entry.at.replace("T", " ").replace(/\.\d+Z$/, "Z"));
      cell(row, "Role", entry.role);
      cell(row, "Document", entry.doc);
      cell(row, "Database", entry.db);
      cell(row, "Outcome", (entry.ok ? "ok" : "failed") + (entry.detail ? ": " + entry.detail : ""), entry.ok ? "ok" : "bad");
    }
    while (body.rows.length > TAIL_ROWS) body.deleteRow(-1);
  } catch (_) {
    // The next poll tries again.
  }
}

const ACTIONS = {
  "redeliver": (b) => ["/console/redeliver", { rule: b.dataset.rule || null },
    (r) => `Redelivered ${r.delivered}, failed again ${r.failed}, held by an open circuit ${r.held}, kept without their rule ${r.orphaned}, skipped (another redelivery had them) ${r.skipped}.`],
  "run-now": (b) => ["/console/run-now", { db: b.dataset.db, role: b.dataset.role },
    (r) => `${r.db} runs now (${r.roles.join(", ")}).`],
  "pause": (b) => ["/console/pause", { rule: b.dataset.rule, paused: b.dataset.paused === "true" },
    (r) => `${r.rule} ${r.paused ? "paused" : "resumed"}.`],
};

async function act(button) {
  const [path, body, done] = ACTIONS[button.dataset.action](button);
  sessionStorage.setItem(TOKEN_KEY, token());
  button.disabled = true;
  say("Working…", false);
  try {
    const answer = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token() },
      body: JSON.stringify(body),
    });
    const result = await answer.json().catch(() => ({ error: answer.statusText }));
    if (answer.ok) say(done(result), false);
    else say(`Refused (${answer.status}): ${result.error}`, true);
  } catch (e) {
    say("The request failed: " + e, true);
  } finally {
    button.disabled = false;
    refreshState();
  }
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (button) act(button);
});

// Entering the token (Enter in its field) shows what it opens at once.
function useToken(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, token());
  refreshState();
  refreshTail();
}

document.addEventListener("DOMContentLoaded", () => {
  const field = document.getElementById("token");
  if (field) {
    field.value = sessionStorage.getItem(TOKEN_KEY) || "";
    document.getElementById("token-form").addEventListener("submit", useToken);
  }
  const state = document.getElementById("state");
  if (state.dataset.locked) {
    say(LOCKED, true, "locked");
    if (token()) refreshState();
  }
  const every = Number(state.dataset.refresh) || 5000;
  setInterval(refreshState, every);
  refreshTail();
  setInterval(refreshTail, TAIL_EVERY_MS);
});
