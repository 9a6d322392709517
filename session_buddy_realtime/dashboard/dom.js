// DOM building and formatting helpers.
//
// Skill names, anomaly types and error messages come from a database that any tool can
// write to, so nothing from the server ever goes through innerHTML: every string becomes a
// text node, and attributes are only set with names chosen here (never href/src/on*).

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.setAttribute("class", value);
    else if (name === "text") node.textContent = String(value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: el("li", {class: "x"}, "text", otherNode). Strings become text. */
export function el(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element, same rules as el(). */
export function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace all children of `node` with `children`. */
export function replaceChildren(node, ...children) {
  node.replaceChildren(...children.filter((child) => child !== null && child !== undefined));
}

/** Set textContent only when it changes, so aria-live regions do not re-announce. */
export function setText(node, text) {
  const value = String(text);
  if (node.textContent !== value) node.textContent = value;
}

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

export function formatCount(value) {
  return Number.isFinite(value) ? integer.format(value) : "–";
}

export function formatPercent(value) {
  if (!Number.isFinite(value)) return "–";
  if (value >= 100 || value <= 0) return `${Math.round(value)} %`;
  // Rounded down, so that 99.96 % reads 99.9 %: only complete success shows as 100 %.
  return `${(Math.floor(value * 10) / 10).toFixed(1)} %`;
}

/** Seconds as "850 ms", "4.2 s", "3 min 5 s", "1 h 2 min". */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  const rest = Math.round(seconds % 60);
  if (minutes < 60) return rest ? `${minutes} min ${rest} s` : `${minutes} min`;
  return minutes % 60 ? `${Math.floor(minutes / 60)} h ${minutes % 60} min` : `${minutes / 60} h`;
}

/** A number for an anomaly's baseline/observed value: unit from its metric, if any. */
export function formatMetricValue(value, metric) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (metric === "completion_rate") return formatPercent(value);
  if (metric === "avg_duration_seconds") return formatDuration(value);
  return String(Math.round(value * 100) / 100);
}

// ISO 8601 as the server or the host writes it: "T" or a space, optional fraction, "Z",
// an offset, or nothing (SQLite, and so Session-Buddy, treats a bare time as UTC, whereas
// Date.parse would take it as local time).
const ISO = /^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d(?::\d\d)?)(\.\d+)?(Z|[+-]\d\d:?\d\d)?$/i;

/** Milliseconds since the epoch, or null when `text` is not a time we understand. */
export function parseTime(text) {
  if (typeof text !== "string") return null;
  const match = ISO.exec(text.trim());
  if (!match) return null;
  const [, date, time, fraction = "", zone = "Z"] = match;
  const millis = fraction ? fraction.slice(0, 4).padEnd(4, "0") : ""; // Date keeps ms only
  const offset = zone.toUpperCase() === "Z" ? "Z" : zone.replace(/^([+-]\d\d)(\d\d)$/, "$1:$2");
  const value = Date.parse(`${date}T${time.length === 5 ? `${time}:00` : time}${millis}${offset}`);
  return Number.isNaN(value) ? null : value;
}

/** The local time of day, e.g. "12:03:04" ("12:03" without seconds). */
export function formatClock(millis, withSeconds = true) {
  return new Date(millis).toLocaleTimeString(undefined, {
    hour: "2-digit",
    minute: "2-digit",
    second: withSeconds ? "2-digit" : undefined,
  });
}

/** "just now", "42 s ago", "5 min ago", "3 h ago" (or "in 5 s" for a clock ahead of ours). */
export function formatAgo(millis, now = Date.now()) {
  const seconds = Math.round((now - millis) / 1000);
  if (seconds < -2) return `in ${formatDuration(-seconds)}`;
  if (seconds < 3) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  return `${Math.floor(seconds / 3600)} h ago`;
}

/** A <time> element showing "12:03:04 (2 min ago)", or the raw text if it is no time. */
export function timeElement(text, now = Date.now()) {
  const millis = parseTime(text);
  if (millis === null) return el("span", { class: "time" }, String(text ?? "–"));
  return el(
    "time",
    { datetime: new Date(millis).toISOString(), title: new Date(millis).toString() },
    `${formatClock(millis)} (${formatAgo(millis, now)})`,
  );
}
