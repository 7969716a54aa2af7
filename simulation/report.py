"""The report: one self-contained HTML file (plots as inline PNG, no script, no stylesheet or
font from anywhere else) with the figures of one run or several side by side."""
from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402

from simulation.metrics import METRIC_KEYS  # noqa: E402
from zones.demo import DEMO_ZONES  # noqa: E402

TABLE_KEYS = METRIC_KEYS + ("p95DeliverySeconds", "ordersCreated", "ordersAssigned", "ordersAssignedNotPickedUp",
                            "ordersDelivered", "offers")
BARS = (
    ("meanTimeToAssignSeconds", "Mean time to assign (s)"), ("p95TimeToAssignSeconds", "p95 time to assign (s)"),
    ("meanPickupEtaSeconds", "Mean pickup time (s)"), ("assignmentRate", "Assignment rate"),
    ("driverUtilization", "Driver utilization"), ("ordersPerDriverHour", "Orders per driver-hour"),
)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _hist(series: dict, key: str, title: str, xlabel: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    values = [v for s in series.values() for v in s[key]]
    top = max(values) if values else 1.0
    bins = [top * i / 40 for i in range(41)] if top > 0 else 10
    for name, s in series.items():
        if s[key]:
            ax.hist(s[key], bins=bins, histtype="step", linewidth=1.6, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("deliveries")
    ax.legend()
    return _png(fig)


def _lines(series: dict, key: str, title: str, ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, s in series.items():
        points = s[key]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_title(title)
    ax.set_xlabel("simulated minute")
    ax.set_ylabel(ylabel)
    ax.legend()
    return _png(fig)


def _heat(series: dict) -> str:
    n = len(series)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], series.items()):
        for zone, (*_rest, ring) in DEMO_ZONES.items():
            ax.plot([p[0] for p in ring], [p[1] for p in ring], color="grey", linewidth=0.8)
        points = s["unassignedHeat"]
        if points:
            hb = ax.hexbin([p[1] for p in points], [p[0] for p in points], gridsize=30, cmap="inferno_r", mincnt=1,
                           extent=(77.50, 77.70, 12.88, 13.05))
            fig.colorbar(hb, ax=ax, label="orders")
        ax.set_xlim(77.50, 77.70)
        ax.set_ylim(12.88, 13.05)
        ax.set_aspect("equal")
        ax.set_title(f"{name}: orders that waited unassigned ({len(points)})", fontsize=9)
    return _png(fig)


def _bars(runs: dict) -> str:
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5))
    names = list(runs)
    for ax, (key, title) in zip(axes.flat, BARS):
        values = [runs[n].get(key) or 0 for n in names]
        ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    return _png(fig)


def _fmt(value) -> str:
    return "–" if value is None else html.escape(str(value))


def _comparison(compared: dict) -> str:
    """Each policy against the baseline: the difference of each mean, its 95 % interval, and
    whether it is a difference at all."""
    rows = []
    for name, figures in compared["against"].items():
        for key, d in figures.items():
            if d is None:
                rows.append(f"<tr><th>{html.escape(name)}</th><td>{key}</td><td colspan=3>too few orders</td></tr>")
                continue
            rel = "" if d["relative"] is None else f" ({d['relative'] * 100:+.1f} %)"
            rows.append(f"<tr><th>{html.escape(name)}</th><td>{key}</td><td>{d['difference']:+.1f} s{rel}</td>"
                        f"<td>{d['ci95'][0]:+.1f} … {d['ci95'][1]:+.1f} s</td><td>{html.escape(d['verdict'])}</td></tr>")
    return (f"<h2>Against {html.escape(compared['baseline'])}</h2><p>The difference of each mean, with its 95 % "
            "confidence interval (Welch). An interval that holds 0 is no difference this run can show: run "
            "more minutes or more seeds.</p><table><tr><th>policy</th><th>figure</th><th>difference</th>"
            f"<th>95 % interval</th><th>verdict</th></tr>{''.join(rows)}</table>")


def render(runs: dict, series: dict, compared: dict | None = None) -> str:
    """runs: label → JSON result; series: label → the series of that run; compared: the
    JSON's `comparison` (several runs)."""
    names = list(runs)
    first = runs[names[0]]["parameters"]
    params = ", ".join(f"{k} {v}" for k, v in first.items() if k not in ("policy", "stacking"))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><th>{k}</th>{''.join(f'<td>{_fmt(runs[n].get(k))}</td>' for n in names)}</tr>" for k in TABLE_KEYS
    )
    sections = []
    if len(names) > 1:
        if compared:
            sections.append(_comparison(compared))
        sections.append(f"<h2>Policies side by side</h2>{_bars(runs)}")
    sections += [
        "<h2>Time to assign</h2>" + _hist(series, "timeToAssign", "Time from ready to accepted offer", "seconds"),
        "<h2>Pickup time</h2>" + _hist(series, "pickupEta", "Time from assignment to arrival at the pickup", "seconds"),
        "<h2>Driver utilization</h2>" + _lines(series, "utilization", "Busy share of working drivers", "busy / (busy + available)"),
        "<h2>Unassigned orders</h2>" + _lines(series, "unassignedOpen", "Open unassigned records", "orders")
        + _heat(series),
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Dispatch simulation: {html.escape(', '.join(names))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>Dispatch simulation</h1><p>{html.escape(params)}</p>
<table><tr><th></th>{head}</tr>{rows}</table>
{''.join(sections)}
</body></html>
"""
