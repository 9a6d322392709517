'use strict';
// The Node.js `ws` peer of tests/benchmarks/fanout.py: the fan-out a Node user would write,
// doing the same work per tick as RealTimeMetricsServer.
//
// Run by fanout.py (which installs ws and better-sqlite3 on demand and points NODE_PATH at
// them) as `node server.js PORT DB INTERVAL CONFIG`, CONFIG being JSON that fanout.py takes
// from session_buddy_realtime (the SQL of data/queries.py, detection settings, limits,
// keepalive and close timings), so that both servers run the same queries.
//
// Same as ours:
// * reads the database through one read-only connection and runs its queries again only
//   when `PRAGMA data_version` says the database changed: the top skills, the unresolved
//   anomalies of the last hour and live detection (z-scores over window statistics);
// * sends a `connected` welcome on connect, then every tick one `metrics_update` (the same
//   fields in the same order), encoded once per tick (one JSON.stringify) and sent with
//   `ws.send()` to every client, skipping a client whose backlog is over
//   max_buffered_bytes; ticks keep a fixed phase and stop while nobody is connected;
// * no permessage-deflate;
// * keepalive: one timer for all connections that pings each one ping_interval after it
//   connected and after each pong, not while its backlog is over 8 KiB, and closes it with
//   1011 when no pong came within ping_timeout;
// * stop: 1001 to every client at once, one close_timeout for all, then the rest dropped.
//
// Control protocol, one JSON object per line, as fanout.py's Python servers speak it: it
// prints {"port": N} once listening; on stdin "stats" answers {"cpu", "rss", "ticks",
// "queries", "handshakes"}; "stop" (or the end of stdin) stops the server, answers
// {"stop_ms"} and exits.

const readline = require('node:readline');
const { performance } = require('node:perf_hooks');
const { WebSocketServer, WebSocket } = require('ws');
const Database = require('better-sqlite3');

const [portArg, dbPath, intervalArg, configArg] = process.argv.slice(2);
const config = JSON.parse(configArg);
const intervalMs = Number(intervalArg) * 1000;
const UNIX_EPOCH_JULIAN_DAY = 2440587.5;
const PING_BUFFER_LIMIT = 8 * 1024;
const utf8 = new TextDecoder('utf-8', { fatal: true });

const ticks = []; // seconds per broadcast
let queries = 0;
let handshakes = 0;

// Reading

const db = new Database(dbPath, { readonly: true, fileMustExist: true });
const topStatement = db.prepare(config.top_sql);
const anomaliesStatement = db.prepare(config.table_anomalies_sql);
const windowStatement = db.prepare(config.window_stats_sql);

const cache = {
  token: null,
  top: [],
  table: [], // {payload, expiresAt}
  live: [],
  liveSince: new Map(), // "name\0type" -> detected_at
  asOf: null,
};

function text(value) {
  if (value === null || value === undefined) return null;
  if (Buffer.isBuffer(value)) {
    try {
      return utf8.decode(value);
    } catch {
      return null;
    }
  }
  return String(value);
}

function round(value, digits) {
  return Number(value.toFixed(digits));
}

function floatOrNull(value, digits = 2) {
  if (value === null || value === undefined) return null;
  const number = Number(Buffer.isBuffer(value) ? text(value) : value);
  return Number.isFinite(number) ? round(number, digits) : null;
}

function intOrZero(value) {
  const number = Number(Buffer.isBuffer(value) ? text(value) : value);
  return Number.isSafeInteger(number) ? number : Number.isFinite(number) ? Math.trunc(number) : 0;
}

function julianDay(seconds) {
  return seconds / 86400 + UNIX_EPOCH_JULIAN_DAY;
}

function unixTime(day) {
  return (day - UNIX_EPOCH_JULIAN_DAY) * 86400;
}

function datePrefix(seconds) {
  return new Date((seconds - 86400) * 1000).toISOString().slice(0, 10);
}

function timestamp(ms = Date.now()) {
  return new Date(ms).toISOString(); // 2026-11-25T12:00:00.000Z, as ours
}

function refresh(nowSeconds) {
  queries += 1;
  const top = [];
  for (const row of topStatement.raw().all({ limit: config.top_skills_limit })) {
    const name = text(row[0]);
    if (name === null) continue;
    top.push({
      skill_name: name,
      total_invocations: intOrZero(row[1]),
      completion_rate: floatOrNull(row[3]) ?? 0.0,
      avg_duration_seconds: floatOrNull(row[4], 3),
      completed_invocations: intOrZero(row[2]),
      last_invoked: text(row[5]),
    });
  }
  const since = nowSeconds - config.anomaly_window;
  queries += 1;
  const table = [];
  for (const row of anomaliesStatement.raw().all({
    prefix: datePrefix(since),
    since: julianDay(since),
    limit: config.max_table_anomalies,
  })) {
    const [name, detectedAt, kind] = [text(row[0]), text(row[1]), text(row[2])];
    if (name === null || detectedAt === null || kind === null) continue;
    table.push({
      payload: {
        skill_name: name,
        detected_at: detectedAt,
        anomaly_type: kind,
        deviation_score: floatOrNull(row[5]),
        baseline_value: floatOrNull(row[3]),
        observed_value: floatOrNull(row[4]),
        source: 'table',
      },
      expiresAt: unixTime(row[6]) + config.anomaly_window,
    });
  }
  cache.top = top;
  cache.table = table;
  cache.live = liveAnomalies(nowSeconds);
  cache.asOf = timestamp(nowSeconds * 1000);
}

// Live detection, as session_buddy_realtime/data/detection.py.

function liveAnomalies(nowSeconds) {
  const d = config.detection;
  const baselineStart = nowSeconds - d.baseline_window;
  queries += 1;
  const rows = windowStatement.raw().all({
    prefix: datePrefix(baselineStart),
    baseline: julianDay(baselineStart),
    recent: julianDay(nowSeconds - d.recent_window),
    min_recent: d.min_recent,
  });
  const findings = [];
  for (const row of rows) {
    const name = text(row[0]);
    if (name === null || name.length > config.max_skill_name_length || /[\x00-\x1f\x7f-\x9f]/.test(name)) {
      continue;
    }
    const s = {
      name,
      recentCount: Number(row[1] ?? 0),
      recentCompleted: Number(row[2] ?? 0),
      recentTimed: Number(row[3] ?? 0),
      recentDurationSum: Number(row[4] ?? 0),
      baselineCount: Number(row[5] ?? 0),
      baselineCompleted: Number(row[6] ?? 0),
      baselineTimed: Number(row[7] ?? 0),
      baselineDurationSum: Number(row[8] ?? 0),
      baselineDurationSumsq: Number(row[9] ?? 0),
      lastRecentAt: row[10] === null ? nowSeconds : unixTime(row[10]),
    };
    for (const finding of [completionDrop(s, d), durationSpike(s, d)]) {
      if (finding !== null) findings.push(finding);
    }
  }
  findings.sort(
    (a, b) =>
      b.deviation_score - a.deviation_score ||
      compare(a.skill_name, b.skill_name) ||
      compare(a.anomaly_type, b.anomaly_type),
  );
  const stamp = timestamp(nowSeconds * 1000);
  const active = new Set(findings.map((f) => `${f.skill_name}\0${f.anomaly_type}`));
  for (const key of cache.liveSince.keys()) if (!active.has(key)) cache.liveSince.delete(key);
  return findings.map((f) => {
    const key = `${f.skill_name}\0${f.anomaly_type}`;
    if (!cache.liveSince.has(key)) cache.liveSince.set(key, stamp);
    return {
      payload: {
        skill_name: f.skill_name,
        detected_at: cache.liveSince.get(key),
        anomaly_type: f.anomaly_type,
        deviation_score: f.deviation_score,
        baseline_value: f.baseline_value,
        observed_value: f.observed_value,
        metric: f.metric,
        source: 'live',
      },
      expiresAt: f.lastEvidenceAt + d.recent_window,
    };
  });
}

function completionDrop(s, d) {
  if (s.recentCount < d.min_recent || s.baselineCount < d.min_baseline) return null;
  const baseline = s.baselineCompleted / s.baselineCount;
  const observed = s.recentCompleted / s.recentCount;
  const p = (s.baselineCompleted + 1) / (s.baselineCount + 2);
  if (!(p > 0 && p < 1)) return null;
  const z = (p - observed) / Math.sqrt((p * (1 - p)) / s.recentCount);
  return finding(s, d, 'drop', 'completion_rate', round(baseline * 100, 2), round(observed * 100, 2), z);
}

function durationSpike(s, d) {
  const n = s.baselineTimed;
  if (s.recentTimed < d.min_recent || n < d.min_baseline) return null;
  const mean = s.baselineDurationSum / n;
  const variance = Math.max(s.baselineDurationSumsq - n * mean * mean, 0) / (n - 1);
  const stdev = Math.max(Math.sqrt(variance), Math.abs(mean) * 0.01, 0.001);
  const observed = s.recentDurationSum / s.recentTimed;
  const z = (observed - mean) / (stdev / Math.sqrt(s.recentTimed));
  return finding(s, d, 'spike', 'avg_duration_seconds', round(mean, 3), round(observed, 3), z);
}

function finding(s, d, type, metric, baselineValue, observedValue, z) {
  const score = round(z, 2);
  const numbers = [baselineValue, observedValue, score, s.lastRecentAt];
  if (!(z >= d.z_threshold && numbers.every(Number.isFinite))) return null;
  return {
    skill_name: s.name,
    anomaly_type: type,
    metric,
    baseline_value: baselineValue,
    observed_value: observedValue,
    deviation_score: score,
    lastEvidenceAt: s.lastRecentAt,
  };
}

function compare(a, b) {
  return a < b ? -1 : a > b ? 1 : 0;
}

function severityOrder(a, b) {
  const sa = a.deviation_score === null ? -1 : Math.abs(a.deviation_score);
  const sb = b.deviation_score === null ? -1 : Math.abs(b.deviation_score);
  return sb - sa || compare(a.skill_name, b.skill_name);
}

function read() {
  const nowSeconds = Date.now() / 1000;
  const token = db.pragma('data_version', { simple: true });
  if (token !== cache.token) {
    refresh(nowSeconds);
    cache.token = token;
  }
  const anomalies = [];
  for (const a of cache.live) if (a.expiresAt > nowSeconds) anomalies.push(a.payload);
  for (const a of cache.table) if (a.expiresAt > nowSeconds) anomalies.push(a.payload);
  anomalies.sort(severityOrder);
  const perSkill = new Map();
  const kept = [];
  for (const a of anomalies) {
    const seen = (perSkill.get(a.skill_name) ?? 0) + 1;
    perSkill.set(a.skill_name, seen);
    if (seen <= config.max_anomalies) kept.push(a);
  }
  return { top_skills: cache.top, anomalies: kept.slice(0, config.max_anomalies) };
}

// Serving

const wss = new WebSocketServer({
  host: '127.0.0.1',
  port: Number(portArg),
  perMessageDeflate: false,
  maxPayload: config.max_message_size,
});

let tickTimer = null;
let nextTick = 0;
let keepaliveTimer = null;
let stopping = false;

wss.on('connection', (ws) => {
  handshakes += 1;
  const now = performance.now() / 1000;
  ws.keepalive = { due: now + config.ping_interval, waiting: false, ponged: false, sentAt: 0 };
  ws.on('pong', () => {
    ws.keepalive.ponged = true;
  });
  ws.on('error', () => {});
  ws.send(
    JSON.stringify({
      type: 'connected',
      message: 'Connected to Session-Buddy real-time metrics',
      timestamp: timestamp(),
      protocol_version: config.protocol_version,
      server_version: config.server_version,
      update_interval: intervalMs / 1000,
      server_role: 'standalone',
      subscription: 'all',
      auth_required: false,
      authenticated: false,
    }),
  );
  if (tickTimer === null && !stopping) {
    // The first client is served at once; the schedule starts from there.
    nextTick = performance.now();
    tickTimer = setImmediate(tick);
  }
  if (keepaliveTimer === null && config.ping_interval !== null && !stopping) {
    keepaliveTimer = setInterval(keepalive, Math.min(1000, (config.ping_interval * 1000) / 4));
  }
});

function tick() {
  tickTimer = null;
  if (wss.clients.size === 0 || stopping) return; // no ticks while nobody is connected
  const began = performance.now();
  const message = {
    type: 'metrics_update',
    timestamp: timestamp(),
    skill: null,
    data: read(),
    source: { state: 'ok', stale: false, as_of: cache.asOf, message: null },
  };
  const frame = Buffer.from(JSON.stringify(message));
  const limit = config.max_buffered_bytes;
  for (const ws of wss.clients) {
    if (ws.readyState === WebSocket.OPEN && ws.bufferedAmount <= limit) {
      ws.send(frame, { binary: false });
    }
  }
  const ended = performance.now();
  ticks.push((ended - began) / 1000);
  nextTick += intervalMs;
  if (nextTick <= ended) nextTick += (Math.floor((ended - nextTick) / intervalMs) + 1) * intervalMs;
  tickTimer = setTimeout(tick, nextTick - performance.now());
}

function keepalive() {
  if (wss.clients.size === 0 || stopping) {
    clearInterval(keepaliveTimer);
    keepaliveTimer = null;
    return;
  }
  const now = performance.now() / 1000;
  for (const ws of wss.clients) {
    if (ws.readyState !== WebSocket.OPEN) continue;
    const k = ws.keepalive;
    if (k.waiting) {
      if (!k.ponged) {
        if (config.ping_timeout !== null && now - k.sentAt > config.ping_timeout) {
          k.waiting = false;
          ws.close(1011, 'keepalive ping timeout');
        }
        continue;
      }
      k.waiting = false;
      k.due = now + config.ping_interval;
    }
    if (now < k.due || ws.bufferedAmount > PING_BUFFER_LIMIT) continue;
    ws.ping();
    k.waiting = true;
    k.ponged = false;
    k.sentAt = now;
  }
}

// Stopping

function stop(done) {
  stopping = true;
  clearTimeout(tickTimer);
  clearImmediate(tickTimer);
  clearInterval(keepaliveTimer);
  let serverClosed = false;
  let finished = false;
  const finish = () => {
    if (finished || !serverClosed || wss.clients.size > 0) return;
    finished = true;
    clearTimeout(deadline);
    db.close();
    done();
  };
  wss.close(() => {
    serverClosed = true;
    finish();
  });
  for (const ws of wss.clients) {
    ws.on('close', finish);
    if (ws.bufferedAmount > config.max_buffered_bytes) ws.terminate();
    else ws.close(1001, '');
  }
  const deadline = setTimeout(() => {
    for (const ws of wss.clients) ws.terminate();
  }, config.close_timeout * 1000);
}

function answer(object, callback) {
  process.stdout.write(`${JSON.stringify(object)}\n`, callback);
}

wss.on('listening', () => {
  answer({ port: wss.address().port });
  const lines = readline.createInterface({ input: process.stdin });
  let stopped = false;
  const stopNow = () => {
    if (stopped) return;
    stopped = true;
    const began = performance.now();
    stop(() => answer({ stop_ms: performance.now() - began }, () => process.exit(0)));
  };
  lines.on('line', (line) => {
    const command = line.trim();
    if (command === 'stats') {
      const usage = process.cpuUsage();
      answer({
        cpu: (usage.user + usage.system) / 1e6,
        rss: process.memoryUsage.rss(),
        ticks,
        queries,
        handshakes,
      });
    } else if (command === 'stop' || command === '') {
      stopNow();
    }
  });
  lines.on('close', stopNow);
});
