// The numbers behind the activity chart: invocations per interval over the last minutes.
//
// The server's `history` reply is the truth: it counts invocations in the database, so
// the chart is full the moment the page opens, and the page simply asks again when the
// data changes (see app.js). Summing deltas of `total_invocations` between updates would
// be wrong for the all-skills view, which carries only the top 10: a skill entering the
// top 10 would look like a burst, one outside it would not count at all. Only against a
// server without `history` does the chart fall back to those deltas, from page load on.

import { parseTime } from "./dom.js";

const LIVE_BUCKET_SECONDS = 10;
const LIVE_WINDOW_SECONDS = 600;

export class Activity {
  constructor() {
    this.reset(null);
  }

  /** Forget everything: a new view (all skills, or one skill). */
  reset(skill) {
    this.skill = skill;
    this.mode = "waiting"; // then "history", or "live" when the server has no history
    this.bucketSeconds = null;
    this.windowSeconds = null;
    this.buckets = []; // [{start: ms, invocations, completed}], oldest first
    this.previous = null; // live mode: skill name -> [total, completed] of the last update
    this.asOf = null; // history mode: when the server counted
  }

  /** Take a `history` reply for the current view. */
  fromHistory(message) {
    const buckets = [];
    for (const bucket of Array.isArray(message.buckets) ? message.buckets : []) {
      const start = parseTime(bucket?.start);
      if (start === null) continue;
      buckets.push({
        start,
        invocations: count(bucket.invocations),
        completed: count(bucket.completed),
      });
    }
    buckets.sort((a, b) => a.start - b.start);
    this.mode = "history";
    this.bucketSeconds = positive(message.bucket_seconds) ?? inferBucket(buckets);
    this.windowSeconds =
      positive(message.window_seconds) ?? buckets.length * (this.bucketSeconds ?? 0);
    this.buckets = buckets;
    this.asOf = parseTime(message.timestamp);
  }

  /** The server answered `history` with `unknown_type`: count from live updates. */
  historyUnavailable() {
    this.mode = "live";
    this.bucketSeconds = LIVE_BUCKET_SECONDS;
    this.windowSeconds = LIVE_WINDOW_SECONDS;
    this.buckets = [];
    this.previous = null;
  }

  /** Feed a `metrics_update` for the current view (used in live mode only). */
  addUpdate(rows, now = Date.now()) {
    if (this.mode !== "live") return;
    const current = new Map();
    for (const row of rows) {
      current.set(row.skill_name, [count(row.total_invocations), count(row.completed_invocations)]);
    }
    if (this.previous !== null) {
      let invocations = 0;
      let completed = 0;
      for (const [name, [total, done]] of current) {
        const before = this.previous.get(name);
        if (before === undefined) continue; // newly in the top 10: no delta known
        invocations += Math.max(0, total - before[0]);
        completed += Math.max(0, done - before[1]);
      }
      if (invocations > 0 || completed > 0) this.add(now, invocations, completed);
    }
    this.previous = current;
  }

  add(now, invocations, completed) {
    const size = this.bucketSeconds * 1000;
    const start = Math.floor(now / size) * size;
    let last = this.buckets.at(-1);
    if (last === undefined || last.start !== start) {
      last = { start, invocations: 0, completed: 0 };
      this.buckets.push(last);
    }
    last.invocations += invocations;
    last.completed += Math.min(completed, last.invocations - last.completed);
    const oldest = now - this.windowSeconds * 1000;
    while (this.buckets.length && this.buckets[0].start + size <= oldest) this.buckets.shift();
  }

  /** What the chart shows: contiguous buckets (gaps filled with zeros) and their total. */
  view(now = Date.now()) {
    if (this.mode === "waiting" || !this.bucketSeconds) {
      return { mode: this.mode, buckets: [], total: 0 };
    }
    const size = this.bucketSeconds * 1000;
    const byStart = new Map(this.buckets.map((bucket) => [bucket.start, bucket]));
    // The last bucket is the server's newest (its buckets need not align with ours), or
    // the current one; the window runs back from it, gaps shown as zeros.
    let end = Math.floor((this.mode === "history" ? this.asOf ?? now : now) / size) * size;
    if (this.mode === "history" && this.buckets.length) end = this.buckets.at(-1).start;
    let first = end - (Math.max(1, Math.round(this.windowSeconds / this.bucketSeconds)) - 1) * size;
    if (this.buckets.length && this.buckets[0].start < first) first = this.buckets[0].start;
    const buckets = [];
    for (let start = first; start <= end && buckets.length < 2000; start += size) {
      buckets.push(byStart.get(start) ?? { start, invocations: 0, completed: 0 });
    }
    const total = buckets.reduce((sum, bucket) => sum + bucket.invocations, 0);
    return {
      mode: this.mode,
      buckets,
      total,
      bucketSeconds: this.bucketSeconds,
      windowSeconds: this.windowSeconds,
    };
  }
}

function count(value) {
  return Number.isFinite(value) && value > 0 ? Math.floor(value) : 0;
}

function positive(value) {
  return Number.isFinite(value) && value > 0 ? value : null;
}

function inferBucket(buckets) {
  return buckets.length > 1 ? (buckets[1].start - buckets[0].start) / 1000 : null;
}
