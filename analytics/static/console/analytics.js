/* The analytics page: Chart.js (vendored, analytics/static/vendor/chartjs, MIT) over the summary
 * API. Axes are titled with their units; money is formatted in the configured currency. */
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("analytics-config").textContent);
  const DAY = 86400000;
  const money = new Intl.NumberFormat(undefined, { style: "currency", currency: config.currency, maximumFractionDigits: 2 });
  const dayLabel = new Intl.DateTimeFormat(undefined, { timeZone: config.timeZone, month: "short", day: "numeric" });
  window.opsCharts = [];

  async function summary(from, to) {
    const url = `${config.summaryUrl}?from=${encodeURIComponent(from.toISOString())}&to=${encodeURIComponent(to.toISOString())}`;
    const r = await fetch(url, { credentials: "same-origin" });
    if (!r.ok) throw new Error(`summary ${r.status}`);
    return r.json();
  }
  function axis(title, extra) { return Object.assign({ title: { display: true, text: title }, beginAtZero: true }, extra || {}); }
  function chart(id, type, labels, datasets, scales, tooltip) {
    const c = new Chart(document.getElementById(id), {
      type, data: { labels, datasets },
      options: { responsive: true, maintainAspectRatio: false, animation: false, scales,
                 plugins: { legend: { position: "bottom" }, tooltip: tooltip ? { callbacks: { label: tooltip } } : {} } },
    });
    window.opsCharts.push(c);
    return c;
  }

  async function draw() {
    const end = new Date();
    const ranges = [];
    for (let i = config.days - 1; i >= 0; i--) { const to = new Date(end - i * DAY); ranges.push([new Date(to - DAY), to]); }
    const daily = await Promise.all(ranges.map(([from, to]) => summary(from, to)));
    const labels = ranges.map(([, to]) => dayLabel.format(to));
    const dayAxis = axis(`day (${config.timeZone})`, { beginAtZero: false });

    chart("latency", "bar", labels, [
      { label: "p50", data: daily.map((s) => s.assignmentLatencySeconds.p50), backgroundColor: "#79aec8" },
      { label: "p95", data: daily.map((s) => s.assignmentLatencySeconds.p95), backgroundColor: "#417690" },
    ], { x: dayAxis, y: axis("seconds, ready → assigned") }, (ctx) => `${ctx.dataset.label}: ${ctx.parsed.y ?? "–"} s`);

    chart("acceptance", "line", labels, [
      { label: "offers accepted", data: daily.map((s) => (s.acceptanceRate == null ? null : 100 * s.acceptanceRate)),
        borderColor: "#2e7d32", backgroundColor: "#2e7d32", spanGaps: true },
    ], { x: dayAxis, y: axis("% of offers answered", { max: 100, ticks: { callback: (v) => `${v}%` } }) },
    (ctx) => `${ctx.parsed.y == null ? "–" : ctx.parsed.y.toFixed(1)}%`);

    const all = await summary(new Date(end - config.days * DAY), end);
    const zones = all.byZone;
    chart("zones", "bar", zones.map((z) => z.zoneName || "no zone"), [
      { label: "revenue", data: zones.map((z) => z.revenue), backgroundColor: "#2e7d32" },
      { label: "cost", data: zones.map((z) => z.cost), backgroundColor: "#ba2121" },
    ], { x: axis("zone", { beginAtZero: false }), y: axis(config.currency, { ticks: { callback: (v) => money.format(v) } }) },
    (ctx) => `${ctx.dataset.label}: ${money.format(ctx.parsed.y)}`);

    document.getElementById("totals").innerHTML =
      `<tr><th>Deliveries</th><td>${all.deliveries.total}</td><th>Revenue</th><td>${money.format(all.revenue)}</td>` +
      `<th>Cost</th><td>${money.format(all.cost)}</td><th>Margin</th><td>${money.format(all.margin)}</td>` +
      `<th>Acceptance</th><td>${all.acceptanceRate === null ? "–" : (100 * all.acceptanceRate).toFixed(1) + "%"}</td></tr>`;
    document.body.dataset.chartsReady = "true";
  }
  draw().catch((err) => { document.getElementById("totals").innerHTML = `<tr><th>Could not load: ${err.message}</th></tr>`; });
})();
