// The dashboard: wires the connection to the page. It keeps one view (all skills, or one
// skill named in the URL), asks the server for that view's history, and renders each
// metrics_update as it arrives. The parts: connection.js (WebSocket, auth, backoff),
// activity.js (the activity numbers), charts.js (SVG), views.js (table and anomalies),
// search.js (the skill search), auth.js (the token form), dom.js (safe DOM building).

import { Activity } from "./activity.js";
import { savedToken, TokenForm } from "./auth.js";
import { activityChart } from "./charts.js";
import { Connection, socketUrl } from "./connection.js";
import { formatAgo, formatClock, formatDuration, replaceChildren, setText } from "./dom.js";
import { Search } from "./search.js";
import { renderAnomalyItems, renderSkillRows } from "./views.js";

const HISTORY_REPLY_MS = 10_000; // a history request not answered by then is given up
const ANOMALIES_SHOWN = 6; // more wait behind a button, so 50 do not bury the metrics
const TITLE = "Session-Buddy realtime";
const $ = (id) => document.getElementById(id);

const state = {
  skill: skillFromUrl(), // the view: null for all skills
  interval: null, // seconds between updates, from `connected`
  lastUpdate: null, // when the last metrics_update for this view arrived (ms)
  lastMessage: null, // that update, to redraw it at once
  readyAt: 0, // when the current connection became ready (ms)
  asOf: undefined, // its source.as_of, which changes when the database did
  stale: false,
  connection: { name: "connecting" },
  history: { supported: null, pending: false, asked: 0, dirty: false },
  allAnomalies: false, // the person asked to see every anomaly
};
const activity = new Activity();
activity.reset(state.skill);

const connection = new Connection({
  url: socketUrl(),
  onState: renderConnection,
  onReady: ready,
  onMessage: received,
});
const search = new Search({ send: (message) => connection.send(message), onPick: setView });
const tokenForm = new TokenForm((token) => connection.authenticate(token));

// ---- the view ------------------------------------------------------------------------

function skillFromUrl() {
  return new URLSearchParams(window.location.search).get("skill") || null;
}

/** Show `skill` alone (null: all skills); the URL follows, so the view can be shared. */
function setView(skill) {
  state.skill = skill;
  const url = new URL(window.location.href);
  if (skill === null) url.searchParams.delete("skill");
  else url.searchParams.set("skill", skill);
  window.history.replaceState(null, "", url);
  Object.assign(state, { lastUpdate: null, lastMessage: null, asOf: undefined });
  activity.reset(skill);
  if (state.history.supported === false) activity.historyUnavailable();
  replaceChildren($("skills-body"));
  replaceChildren($("anomaly-list"));
  $("skills-table").hidden = true;
  showEmpty("skills-empty", "Loading…");
  renderView();
  renderActivity();
  connection.send({ type: "subscribe", skill });
  requestHistory();
}

function renderView() {
  const one = state.skill !== null;
  setText($("view-title"), one ? `Skill: ${state.skill}` : "All skills");
  $("view-all").hidden = !one;
  setText($("skills-title"), one ? "Skill metrics" : "Top skills");
  setText(
    $("view-help"),
    one
      ? "This skill alone: its metrics, anomalies and activity. This page's address shows it again."
      : "The ten most invoked skills. Pick a name, here or in the table, to follow it alone.",
  );
  renderTitle(0);
}

function renderTitle(anomalies) {
  const prefix = anomalies ? `(${anomalies}) ` : "";
  document.title = `${prefix}${state.skill === null ? "" : `${state.skill} · `}${TITLE}`;
}

function showEmpty(id, text) {
  setText($(id), text);
  $(id).hidden = false;
}

// ---- messages ------------------------------------------------------------------------

function ready(welcome) {
  state.readyAt = Date.now();
  state.interval = Number(welcome.update_interval) || null;
  setText($("meta-interval"), state.interval ? formatDuration(state.interval) : "–");
  const version = `${welcome.server_version ?? "?"} (protocol ${welcome.protocol_version ?? "?"})`;
  setText($("meta-version"), version);
  tokenForm.hide();
  // A new connection starts subscribed to all skills (docs/protocol.md).
  if (state.skill !== null) connection.send({ type: "subscribe", skill: state.skill });
  state.history.pending = false;
  requestHistory();
  search.refresh();
}

function received(message, request) {
  const forView = (message.skill ?? null) === state.skill;
  if (message.type === "metrics_update") {
    // Until subscription_confirmed, updates for the previous view may still arrive.
    if (forView) showUpdate(message);
  } else if (message.type === "subscription_confirmed") {
    if (forView && message.known === false) {
      const text = `No metrics for “${state.skill}” yet; they appear when it runs.`;
      showEmpty("skills-empty", text);
    }
  } else if (message.type === "history") {
    if (!forView) return;
    Object.assign(state.history, { supported: true, pending: false });
    activity.fromHistory(message);
    renderActivity();
  } else if (message.type === "skills") {
    search.results(message);
  } else if (message.type === "error") {
    refused(message, request);
  }
  // Later protocol versions may add messages: the page ignores what it does not know.
}

/** An `error` reply; `request` is the kind of message it answers, when known. */
function refused(message, request) {
  const unknown = message.code === "unknown_type";
  if (request === "history") {
    state.history.pending = false;
    if (unknown) {
      // A server without `history`: count activity from live updates (see activity.js).
      state.history.supported = false;
      activity.historyUnavailable();
      renderActivity();
    }
  } else if (request === "skills" && unknown) {
    search.unsupported();
  } else if (request === "subscribe") {
    setText($("search-status"), `Cannot show that skill: ${message.message ?? message.code}`);
    if (state.skill !== null) setView(null);
  }
}

function showUpdate(message) {
  Object.assign(state, { lastUpdate: Date.now(), lastMessage: message });
  const data = message.data ?? {};
  const rows = Array.isArray(data.top_skills) ? data.top_skills : [];
  const anomalies = Array.isArray(data.anomalies) ? data.anomalies : [];
  const source = message.source ?? {};
  if (source.as_of !== state.asOf) {
    state.history.dirty = state.asOf !== undefined; // the database changed: ask again
    state.asOf = source.as_of;
  }
  const pick = state.skill === null ? setView : null; // names are buttons in the top 10

  $("skills-table").hidden = rows.length === 0;
  $("skills-empty").hidden = rows.length > 0;
  if (rows.length === 0) {
    const none = state.skill === null ? "No skills recorded yet." : "No metrics for it yet.";
    setText($("skills-empty"), none);
  }
  renderSkillRows($("skills-body"), rows, pick);

  const shown = state.allAnomalies ? anomalies : anomalies.slice(0, ANOMALIES_SHOWN);
  renderAnomalyItems($("anomaly-list"), shown, pick);
  const more = $("anomalies-more");
  more.hidden = anomalies.length <= ANOMALIES_SHOWN;
  setText(more, state.allAnomalies ? "Show fewer" : `Show all ${anomalies.length}`);
  more.setAttribute("aria-expanded", String(state.allAnomalies));
  $("anomalies").dataset.count = String(anomalies.length);
  setText($("anomaly-count"), anomalies.length);
  $("anomalies-empty").hidden = anomalies.length > 0;
  renderTitle(anomalies.length);

  // `stale` is true exactly when state is not "ok"; a state we do not know counts as stale.
  state.stale = source.stale === true || (source.state !== undefined && source.state !== "ok");
  $("stale").hidden = !state.stale;
  if (state.stale) {
    const reason = source.message || `the database state is “${source.state ?? "unknown"}”`;
    const asOf = Date.parse(source.as_of);
    const since = Number.isNaN(asOf) ? "" : ` Showing data as of ${formatClock(asOf)}.`;
    setText($("stale-text"), `${reason.replace(/\.$/, "")}.${since}`);
  }
  activity.addUpdate(rows);
  if (activity.mode === "live") renderActivity();
  renderConnection(state.connection);
}

// ---- history -------------------------------------------------------------------------

function requestHistory() {
  const history = state.history;
  if (history.supported === false) return;
  if (connection.send({ type: "history", skill: state.skill })) {
    Object.assign(history, { pending: true, asked: Date.now(), dirty: false });
  }
}

/** Ask again when the database changed (at most every 2 s), and once per bar anyway. */
function historyDue(now) {
  const history = state.history;
  if (history.supported === false || !connection.ready) return false;
  const since = now - history.asked;
  if (history.pending) return since > HISTORY_REPLY_MS;
  const gap = Math.max(2000, (state.interval ?? 1) * 1000);
  const bar = (activity.bucketSeconds ?? 10) * 1000;
  return (history.dirty && since >= gap) || since >= Math.max(gap, bar);
}

function renderActivity() {
  const view = activity.view();
  const box = $("activity-chart");
  let caption = "Waiting for history…";
  if (view.mode !== "waiting") {
    const span =
      view.mode === "history"
        ? `in the last ${formatDuration(view.windowSeconds)}`
        : "since this page opened (the server sends no history)";
    const bar = formatDuration(view.bucketSeconds);
    caption = `${view.total.toLocaleString()} invocations ${span}, ${bar} per bar`;
  }
  setText($("activity-caption"), caption);
  $("activity").dataset.mode = view.mode;
  const width = box.clientWidth || 600;
  const height = box.clientHeight || 170;
  const waiting = view.mode === "waiting";
  replaceChildren(box, waiting ? null : activityChart(view, width, height, "activity-caption"));
}

// ---- connection state and clock ------------------------------------------------------

/** No update for `intervals` intervals (at least that many seconds) on an open connection. */
function quiet(now = Date.now(), intervals = 5) {
  const limit = intervals * Math.max(1000, (state.interval ?? 1) * 1000);
  return now - Math.max(state.lastUpdate ?? 0, state.readyAt) > limit;
}

function renderConnection(connectionState) {
  state.connection = connectionState;
  const { name, attempt } = connectionState;
  let shown = name;
  let text = "Token required";
  if (name === "live") {
    text = state.stale ? "Live: data is stale" : quiet() ? "Live: no updates" : "Live";
    if (state.stale || quiet()) shown = "stale";
  } else if (name === "connecting") {
    text = attempt ? `Reconnecting (attempt ${attempt + 1})…` : "Connecting…";
  } else if (name === "reconnecting") {
    text = "Disconnected: reconnecting";
  }
  // Only the short text is in the aria-live region: it changes with the state, not
  // with every tick, so screen readers are not flooded.
  $("status").dataset.state = shown;
  setText($("status-text"), text);
  $("reconnect-now").hidden = name !== "reconnecting";
  if (name === "unauthorized") tokenForm.show(connectionState);
  renderClock();
}

/** What changes with time alone: once a second, and after each update. */
function renderClock() {
  const now = Date.now();
  const current = state.connection;
  let detail = "";
  if (current.name === "reconnecting") {
    const seconds = Math.max(0, Math.ceil((current.at - now) / 1000));
    detail = `next try in ${seconds} s (attempt ${current.attempt})`;
    if (current.attempt >= 3) detail += "; the server is down, unreachable, or refuses this page";
  } else if (current.name === "live" && quiet(now)) {
    detail = state.lastUpdate ? `last update ${formatAgo(state.lastUpdate, now)}` : "no update yet";
  }
  setText($("status-detail"), detail);
  const last = state.lastUpdate;
  const updated = last === null ? "never" : `${formatClock(last)} (${formatAgo(last, now)})`;
  setText($("meta-updated"), updated);
}

setInterval(() => {
  // The server sends an update every interval, even when nothing changed, so a long
  // silence means a connection that died without a close (a sleeping laptop, a dropped
  // network): start a new one rather than wait for TCP to notice.
  if (state.connection.name === "live" && quiet(Date.now(), 20)) connection.connect();
  if (state.connection.name === "live") renderConnection(state.connection);
  else renderClock();
  if (historyDue(Date.now())) requestHistory();
  if (activity.mode === "live") renderActivity(); // slide the window while idle
}, 1000);

// ---- start ---------------------------------------------------------------------------

$("view-all").addEventListener("click", () => setView(null));
$("anomalies-more").addEventListener("click", () => {
  state.allAnomalies = !state.allAnomalies;
  if (state.lastMessage) showUpdate(state.lastMessage);
});
$("reconnect-now").addEventListener("click", () => connection.connect());
window.addEventListener("online", () => {
  if (state.connection.name === "reconnecting") connection.connect();
});
new ResizeObserver(() => renderActivity()).observe($("activity-chart"));
setText($("footer-url"), socketUrl());

connection.token = savedToken();
renderView();
renderActivity();
connection.connect();
