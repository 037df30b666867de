// Spiegel's console: refreshes the state and the live tail, and sends the
// actions with the admin token. No framework, no build step.
"use strict";

const TOKEN_KEY = "spiegel-admin-token";
const TAIL_EVERY_MS = 1000;
const TAIL_ROWS = 100;

let lastTail = 0;

function say(text, bad) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = bad ? "bad" : "ok";
}

async function refreshState() {
  const state = document.getElementById("state");
  try {
    const answer = await fetch("/console/state", { cache: "no-store" });
    if (answer.ok) {
      state.innerHTML = await answer.text();
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
    const answer = await fetch("/console/tail?after=" + lastTail, { cache: "no-store" });
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
    (r) => `Redelivered ${r.delivered}, failed again ${r.failed}, held by an open circuit ${r.held}, kept without their rule ${r.orphaned}.`],
  "run-now": (b) => ["/console/run-now", { db: b.dataset.db, role: b.dataset.role },
    (r) => `${r.db} runs now (${r.roles.join(", ")}).`],
  "pause": (b) => ["/console/pause", { rule: b.dataset.rule, paused: b.dataset.paused === "true" },
    (r) => `${r.rule} ${r.paused ? "paused" : "resumed"}.`],
};

async function act(button) {
  const [path, body, done] = ACTIONS[button.dataset.action](button);
  const token = document.getElementById("token")?.value || "";
  sessionStorage.setItem(TOKEN_KEY, token);
  button.disabled = true;
  say("Working…", false);
  try {
    const answer = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token },
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

document.addEventListener("DOMContentLoaded", () => {
  const token = document.getElementById("token");
  if (token) {
    token.value = sessionStorage.getItem(TOKEN_KEY) || "";
    document.getElementById("token-form").addEventListener("submit", (e) => e.preventDefault());
  }
  const every = Number(document.getElementById("state").dataset.refresh) || 5000;
  setInterval(refreshState, every);
  refreshTail();
  setInterval(refreshTail, TAIL_EVERY_MS);
});
