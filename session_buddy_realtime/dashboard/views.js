// Rendering of the server's data: the skills table and the anomaly list. Every function
// builds fresh nodes from a message (see dom.js for why nothing uses innerHTML).

import { meter } from "./charts.js";
import {
  el,
  formatCount,
  formatDuration,
  formatMetricValue,
  formatPercent,
  replaceChildren,
  timeElement,
} from "./dom.js";

/** Completion rate as a tone: the colour is a hint, the number stays readable. */
export function rateTone(rate) {
  if (!Number.isFinite(rate)) return "neutral";
  rate = Math.floor(rate * 10) / 10; // the tone of the number shown (see formatPercent)
  if (rate >= 90) return "good";
  if (rate >= 70) return "warn";
  return "bad";
}

/**
 * Whether the server would accept `name` in `subscribe` (the protocol's skill-name rules):
 * 1 to 128 characters, no whitespace at either end, no control or format character (such
 * as a right-to-left override). Any tool can write a name the database keeps but the
 * stream cannot follow; such a name is shown, but offered as nothing to click.
 */
export function followable(name) {
  const length = [...name].length;
  return length >= 1 && length <= 128 && !/^\s|\s$/u.test(name) && !/\p{C}/u.test(name);
}

/** A skill's name: a button that drills down when `onPick` is given, plain text otherwise. */
function skillLabel(name, onPick) {
  if (!onPick || !followable(name)) return el("span", { class: "skill-name" }, name);
  const attrs = { type: "button", class: "link skill-link", title: `Show only ${name}` };
  const button = el("button", attrs, name);
  button.addEventListener("click", () => onPick(name));
  return button;
}

/**
 * Fill the skills table body with one row per skill.
 *
 * `onPick(name)` drills down into a skill; null in the one-skill view, where the name
 * is plain text.
 */
export function renderSkillRows(body, rows, onPick, now = Date.now()) {
  const most = Math.max(1, ...rows.map((row) => Number(row.total_invocations) || 0));
  replaceChildren(
    body,
    ...rows.map((row) => {
      const name = String(row.skill_name);
      const total = Number(row.total_invocations) || 0;
      const rate = Number.isFinite(row.completion_rate) ? row.completion_rate : null;
      const tone = rateTone(rate);
      const label = skillLabel(name, onPick);
      const completed = `${formatCount(row.completed_invocations)} of ${formatCount(total)}`;
      return el(
        "tr",
        { class: "skill-row" },
        el(
          "th",
          { scope: "row", class: "skill-cell" },
          label,
          row.last_invoked
            ? el("span", { class: "sub" }, "last ", timeElement(row.last_invoked, now))
            : null,
        ),
        el(
          "td",
          { class: "num", "data-label": "Invocations" },
          el("span", { class: "value" }, formatCount(total)),
          meter(total / most, "count"),
        ),
        el(
          "td",
          { class: "num", "data-label": "Completed" },
          el("span", { class: `value rate rate-${tone}` }, formatPercent(rate)),
          meter((rate ?? 0) / 100, tone),
          el("span", { class: "sub" }, completed),
        ),
        el(
          "td",
          { class: "num", "data-label": "Avg duration" },
          el("span", { class: "value" }, formatDuration(row.avg_duration_seconds)),
        ),
      );
    }),
  );
}

const TYPE_LABELS = {
  drop: ["▼", "Drop"],
  spike: ["▲", "Spike"],
  pattern_shift: ["◆", "Pattern shift"],
};
const METRIC_LABELS = {
  completion_rate: "completion rate",
  avg_duration_seconds: "average duration",
};

/** Fill the anomaly list; most severe first, as the server sorts them. */
export function renderAnomalyItems(list, anomalies, onPick, now = Date.now()) {
  replaceChildren(
    list,
    ...anomalies.map((anomaly) => {
      // Own keys only: a type stored as "constructor" must not find Object's.
      const kind = String(anomaly.anomaly_type ?? "unknown");
      const known = Object.hasOwn(TYPE_LABELS, kind);
      const [icon, label] = known ? TYPE_LABELS[kind] : ["●", kind];
      const name = String(anomaly.skill_name);
      const source = anomaly.source === "live" ? "live" : "table";
      const skill = skillLabel(name, onPick);
      // Live anomalies name their metric, so their values get its unit; table rows do not.
      const metric = Object.hasOwn(METRIC_LABELS, anomaly.metric) && METRIC_LABELS[anomaly.metric];
      const before = formatMetricValue(anomaly.baseline_value, anomaly.metric);
      const after = formatMetricValue(anomaly.observed_value, anomaly.metric);
      const change = metric
        ? `${metric} ${before} → ${after}`
        : `baseline ${before} → observed ${after}`;
      const score = Number.isFinite(anomaly.deviation_score)
        ? anomaly.deviation_score.toFixed(2)
        : "–";
      return el(
        "li",
        { class: `anomaly anomaly-${known ? kind : "other"}` },
        el(
          "div",
          { class: "anomaly-head" },
          el(
            "span",
            { class: "anomaly-type" },
            el("span", { "aria-hidden": "true" }, icon),
            " ",
            label,
          ),
          skill,
          el(
            "span",
            { class: `source source-${source}`, title: sourceTitle(source) },
            source === "live" ? "live detection" : "skill_anomalies table",
          ),
        ),
        el(
          "p",
          { class: "anomaly-detail" },
          el("span", { class: "deviation" }, `deviation ${score}`),
          " · ",
          change,
        ),
        el("p", { class: "anomaly-time" }, "detected ", timeElement(anomaly.detected_at, now)),
      );
    }),
  );
}

function sourceTitle(source) {
  return source === "live"
    ? "Found by the server's own z-score detection on recent invocations"
    : "An unresolved row of Session-Buddy's skill_anomalies table";
}
