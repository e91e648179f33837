// llmtap UI: the live feed (server-sent events) and the charts (uPlot). No inline script: the
// Content-Security-Policy allows only files served by llmtap. Text goes in with textContent only.
"use strict";

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fmtTokens(n) {
  if (n === null || n === undefined) return "—";
  return n >= 1e6 ? (n / 1e6).toFixed(2) + "M" : n >= 1e4 ? (n / 1e3).toFixed(1) + "k" : String(n);
}

function startLive(section) {
  const active = new Map();
  const box = document.getElementById("active");
  const badge = document.getElementById("daemon");
  const render = () => {
    box.replaceChildren();
    if (active.size === 0) box.append(el("p", "muted", "nothing in flight"));
    for (const call of active.values()) {
      const card = el("div", "card");
      const who = call.process ? (call.process.tool || call.process.name || "?") + "[" + call.process.pid + "]" : "?";
      card.append(el("div", "model", call.model || (call.method || "") + " " + (call.path || "?")), el("div", "muted", who + " → " + (call.host || "")));
      const out = call.output_tokens !== undefined && call.output_tokens !== null ? call.output_tokens : call.output_tokens_estimate;
      card.append(el("div", "small", "in " + fmtTokens(call.input_tokens) + " · out " + fmtTokens(out) +
        " · " + ((Date.now() / 1000 - call.ts).toFixed(1)) + "s"));
      box.append(card);
    }
  };
  const source = new EventSource(section.dataset.events);
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "online" || event.type === "offline") {
      badge.textContent = event.type === "online" ? "daemon connected" : "daemon not running";
      badge.className = "badge " + event.type;
    } else if (event.type === "snapshot") {
      active.clear();
      for (const call of event.active || []) active.set(String(call.id), call);
    } else if (event.type === "start") {
      active.set(String(event.id), event);
    } else if (event.type === "update" && active.has(String(event.id))) {
      Object.assign(active.get(String(event.id)), event);
    } else if (event.type === "end") {
      active.delete(String(event.id));
      // the record lands a moment after the call ends
      for (const wait of [800, 3000]) setTimeout(() => htmx.trigger("#recent", "refresh"), wait);
    }
    render();
  };
  setInterval(render, 1000);
}

const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
                 "#ff9da7", "#9c755f", "#bab0ac"];

const FORMAT = {
  cost: (v) => "$" + (v >= 1 ? v.toFixed(2) : v.toPrecision(2)),
  tokens: fmtTokens,
  cache: (v) => v + "%",
  context: (v) => v + "%",
};

function drawChart(node, spec, pad) {
  const points = node.dataset.points === "1";
  const kind = node.dataset.chart;
  const series = [{}].concat(spec.labels.map((label, i) => ({
    label: label, stroke: PALETTE[i % PALETTE.length], width: points ? 0 : 2,
    value: (u, v) => (v === null || v === undefined ? "—" : FORMAT[kind](v)),
    points: { show: points || spec.data[0].length < 3, size: 6, fill: PALETTE[i % PALETTE.length] },
  })));
  const width = Math.max(320, node.clientWidth || 800);
  const scales = {
    // a bucket of room on each side, so one bucket is not a lone dot at the edge of years
    x: { time: true, range: (u, min, max) => [min - pad, max + pad] },
    y: kind === "cache" || kind === "context" ? { range: [0, 100] } : { range: (u, min, max) => [0, max * 1.1 || 1] },
  };
  const axes = [{}, { size: 70, values: (u, values) => values.map((v) => FORMAT[kind](v)) }];
  const plot = new uPlot({ width: width, height: 220, series: series, scales: scales, axes: axes },
                         spec.data, node);
  node.dataset.rendered = String(spec.data[0].length);
  return plot;
}

function startCharts(box) {
  fetch(box.dataset.series, { credentials: "omit" }).then((r) => r.json()).then((data) => {
    for (const node of box.querySelectorAll("[data-chart]")) {
      const spec = data[node.dataset.chart];
      if (!spec || spec.data[0].length === 0) {
        node.append(el("p", "muted", "no data in this range"));
        node.dataset.rendered = "0";
        continue;
      }
      drawChart(node, spec, data.bucket_s);
    }
    const table = document.getElementById("groups");
    for (const group of data.groups) {
      const row = el("tr");
      row.append(el("td", "", group.name), el("td", "num", "$" + group.cost.toFixed(4)));
      table.append(row);
    }
    box.dataset.ready = "1";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live) startLive(live);
  const charts = document.getElementById("charts");
  if (charts) startCharts(charts);
  const session = document.getElementById("session-context");
  if (session) {
    const spec = JSON.parse(session.dataset.series);
    if (spec.data[0].length) drawChart(session, spec, 60);
    else session.append(el("p", "muted", "no model with a known context window"));
  }
});
