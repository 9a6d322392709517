// Hand-written SVG charts: a horizontal meter for table cells and the activity columns.
// Geometry goes into SVG attributes and colours into CSS classes, so the page needs no
// inline style (the server's CSP forbids it).

import { formatClock, formatCount, svg } from "./dom.js";

/** A horizontal bar filled to `fraction` (0..1); `tone` is a CSS class suffix. */
export function meter(fraction, tone = "neutral") {
  const width = Math.max(0, Math.min(1, Number.isFinite(fraction) ? fraction : 0)) * 100;
  return svg(
    "svg",
    {
      class: `meter meter-${tone}`,
      viewBox: "0 0 100 10",
      preserveAspectRatio: "none",
      "aria-hidden": "true",
      focusable: "false",
    },
    svg("rect", { class: "meter-track", width: 100, height: 10, rx: 2 }),
    svg("rect", { class: "meter-fill", width: width.toFixed(2), height: 10, rx: 2 }),
  );
}

/** The smallest of 1, 2, 5 x 10^k that is at least `value` (1 for nothing). */
export function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

const MIN_HEIGHT = 150;
const MAX_HEIGHT = 420;
const MARGIN = { top: 10, right: 8, bottom: 22, left: 40 };

/**
 * Columns of invocations per bucket, the completed part below the rest.
 *
 * `view` is Activity.view(); `width` and `height` the pixels available; `labelId` the id
 * of the caption that names the chart for screen readers.
 */
export function activityChart(view, width, height, labelId) {
  const chartHeight = Math.round(Math.max(MIN_HEIGHT, Math.min(MAX_HEIGHT, height)));
  const plotWidth = Math.max(100, width - MARGIN.left - MARGIN.right);
  const plotHeight = chartHeight - MARGIN.top - MARGIN.bottom;
  const buckets = view.buckets;
  // Grid lines every `step` (1, 2 or 5 x 10^k, about four of them) up to the top.
  const most = Math.max(0, ...buckets.map((bucket) => bucket.invocations));
  const step = Math.max(1, niceCeiling(most / 4));
  const top = step * Math.max(1, Math.ceil(most / step));
  const chart = svg("svg", {
    class: "activity-svg",
    width: plotWidth + MARGIN.left + MARGIN.right,
    height: chartHeight,
    viewBox: `0 0 ${plotWidth + MARGIN.left + MARGIN.right} ${chartHeight}`,
    role: "img",
    "aria-labelledby": labelId,
    "data-buckets": buckets.length,
    "data-total": view.total,
  });

  for (let value = 0; value <= top; value += step) {
    const y = MARGIN.top + plotHeight - (value / top) * plotHeight;
    chart.append(
      svg("line", { class: "grid", x1: MARGIN.left, x2: MARGIN.left + plotWidth, y1: y, y2: y }),
      svg(
        "text",
        { class: "axis", x: MARGIN.left - 6, y: y + 4, "text-anchor": "end" },
        formatCount(value),
      ),
    );
  }

  const slot = plotWidth / Math.max(1, buckets.length);
  const gap = slot > 6 ? Math.min(3, slot * 0.2) : 0;
  const seconds = view.bucketSeconds ?? 0;
  buckets.forEach((bucket, index) => {
    const x = MARGIN.left + index * slot + gap / 2;
    const barWidth = Math.max(1, slot - gap);
    const scale = plotHeight / top;
    const completedHeight = bucket.completed * scale;
    const failedHeight = (bucket.invocations - bucket.completed) * scale;
    const base = MARGIN.top + plotHeight;
    const span = `${formatClock(bucket.start)}–${formatClock(bucket.start + seconds * 1000)}`;
    const counts = `${formatCount(bucket.invocations)} invocations`;
    const done = `${formatCount(bucket.completed)} completed`;
    const group = svg(
      "g",
      { class: "bucket", "data-invocations": bucket.invocations },
      svg("title", {}, `${span}: ${counts}, ${done}`), // the tooltip of the bar
    );
    if (bucket.invocations > 0) {
      group.append(
        svg("rect", {
          class: "bar-completed",
          x: x.toFixed(1),
          y: (base - completedHeight).toFixed(1),
          width: barWidth.toFixed(1),
          height: completedHeight.toFixed(1),
        }),
        svg("rect", {
          class: "bar-failed",
          x: x.toFixed(1),
          y: (base - completedHeight - failedHeight).toFixed(1),
          width: barWidth.toFixed(1),
          height: failedHeight.toFixed(1),
        }),
      );
    }
    chart.append(group);
  });

  // Time labels: the start of the window, its middle and the newest bucket.
  if (buckets.length) {
    const marks = [...new Set([0, Math.floor((buckets.length - 1) / 2), buckets.length - 1])];
    marks.forEach((index, position) => {
      const anchor = ["start", "middle", "end"][marks.length === 1 ? 1 : position];
      const x =
        anchor === "start"
          ? MARGIN.left
          : anchor === "end"
            ? MARGIN.left + plotWidth
            : MARGIN.left + (index + 0.5) * slot;
      const label = formatClock(buckets[index].start, false);
      chart.append(
        svg("text", { class: "axis", x, y: chartHeight - 6, "text-anchor": anchor }, label),
      );
    });
  }
  return chart;
}
