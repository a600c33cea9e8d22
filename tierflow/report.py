"""``tierflow report``: a run report (``report.json``) as one self-contained HTML page.

Four plots from the run's telemetry (:mod:`tierflow.engine.telemetry`): blocks done per
stage over time with the faults marked, rows/s per stage, where each stage read its input
and wrote its copies (per tier), and the CPUs/GPUs in use with the workers' memory; then
the per-stage summary table. plotly.js is embedded in the page (about 4.5 MB), so it opens
offline, from a mail attachment or a CI artifact; plotly rather than matplotlib PNGs so
that hovering shows a point's stage, time and value.

Render only: reads JSON, writes HTML; no Ray.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["STAGE_COLORS", "TIER_COLORS", "find_report", "load_report", "render_html", "write_html"]

REPORT_NAME = "report.json"  # what tierflow.run writes under <cache dir>/<pipeline>/

# Stage i gets STAGE_COLORS[i % 10] in every plot (plotly's default colourway, spelled out
# so a stage keeps its colour across plots, and tests can look for it).
STAGE_COLORS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A",
                "#19D3F3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52")
TIER_COLORS = {
    "source": "#8C564B", "memory": "#17BECF", "local": "#2CA02C", "peer": "#1F77B4", "remote": "#D62728",
    "unknown": "#BCBD22", "sink": "#9467BD",
}
FAULT_COLORS = {"node_lost": "#D62728", "server_restarted": "#FF7F0E", "rereplicated": "#1F77B4"}
PLOT_W, PLOT_H = 590, 420  # two plots side by side in a 1200 px window

_CSS = f"""
body {{ font-family: system-ui, sans-serif; margin: 0; padding: 0 5px; color: #222; }}
header {{ height: 110px; overflow: hidden; }}
h1 {{ font-size: 22px; margin: 10px 0 4px; }}
.facts span {{ margin-right: 18px; }}
.failed {{ color: #c00; font-weight: bold; }}
.grid {{ display: grid; grid-template-columns: {PLOT_W}px {PLOT_W}px; gap: 0 10px; }}
.plot {{ width: {PLOT_W}px; height: {PLOT_H}px; }}
table {{ border-collapse: collapse; margin: 16px 0; font-size: 13px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.note {{ color: #666; font-size: 13px; }}
"""


def find_report(path: str | os.PathLike[str]) -> Path:
    """The ``report.json`` for ``path``: the file itself, or the one a manifest's run
    wrote (``<cache dir>/<pipeline>/report.json``).

    Raises:
        ManifestError: ``path`` is a manifest that does not load.
        FileNotFoundError: no run of that manifest has written a report yet.
    """
    p = Path(path)
    if p.suffix == ".json":
        return p
    from tierflow.manifest import load_manifest
    from tierflow.workspace import cache_settings

    manifest = load_manifest(p)
    found = Path(cache_settings(manifest).root) / manifest.name / REPORT_NAME
    if not found.is_file():
        raise FileNotFoundError(f"no run report for pipeline {manifest.name!r} yet (looked for {found})")
    return found


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The run report for a manifest or a ``report.json`` (see :func:`find_report`)."""
    report: dict[str, Any] = json.loads(find_report(path).read_text())
    return report


def write_html(report: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Write :func:`render_html` to ``out`` (atomically: a viewer never sees half a page)."""
    target = Path(out)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render_html(report), encoding="utf-8")
    tmp.replace(target)
    return target


def render_html(report: dict[str, Any]) -> str:
    """The whole page for one run report."""
    tel = report.get("telemetry")
    parts = [_header(report)]
    if tel and tel.get("steps"):
        figures = [_progress(tel, report), _throughput(tel), _cache_io(tel), _resources(tel)]
        if any("held_bytes" in s for s in tel["steps"]):  # schema 4 on
            figures.append(_held(tel))
        divs = [
            fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width=f"{PLOT_W}px",
                        default_height=f"{PLOT_H}px", config={"displayModeBar": False, "responsive": False},
                        div_id=f"plot-{i}")
            for i, fig in enumerate(figures)
        ]
        parts.append('<div class="grid">' + "".join(f'<div class="plot">{d}</div>' for d in divs) + "</div>")
        parts.append(_notes(tel))
    else:
        parts.append('<p class="note">This report has no telemetry (written by an older tierflow): '
                     "only the summary is shown.</p>")
    parts.append(_table(report))
    title = html.escape(f"tierflow: {report.get('pipeline', '?')}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


# -- page parts ------------------------------------------------------------------------


def _header(report: dict[str, Any]) -> str:
    status = str(report.get("status", "?"))
    facts = [
        f'<span class="{"failed" if status == "failed" else ""}">{html.escape(status)}</span>',
        f"<span>{report.get('elapsed_s', 0):.1f} s</span>",
        f"<span>{report.get('blocks', 0):,} blocks</span>",
        f"<span>{report.get('rows_in', 0):,} rows in, {report.get('rows_out', 0):,} out</span>",
    ]
    lost = report.get("nodes_lost") or []
    if lost:
        facts.append(f"<span>{len(lost)} node(s) lost</span>")
    error = report.get("error")
    err = f'<div class="failed">{html.escape(str(error).splitlines()[0])[:300]}</div>' if error else ""
    return (f"<header><h1>{html.escape(str(report.get('pipeline', '?')))}</h1>"
            f'<div class="facts">{"".join(facts)}</div>{err}</header>')


def _notes(tel: dict[str, Any]) -> str:
    memory = tel.get("memory", {})
    scope = memory.get("scope", "driver host")
    return (f'<p class="note">Sampled every {tel.get("interval_s", 1):g} s or more. CPUs/GPUs: what running '
            f"attempts hold (the stage's num_cpus/num_gpus x attempts running). Memory: Ray workers on the "
            f"{html.escape(scope)} only. Reads: the tier of the nearest copy a step was pointed at.</p>")


def _table(report: dict[str, Any]) -> str:
    cols = ("name", "blocks_done", "blocks", "rows_out", "executions", "retries", "reused", "reexecutions",
            "dead_letters", "busy_s")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    rows = []
    for s in report.get("stages", []):
        cells = "".join(
            f"<td>{html.escape(f'{s.get(c):,}' if isinstance(s.get(c), int) else str(s.get(c, '')))}</td>"
            for c in cols
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _layout(fig: go.Figure, title: str, **kwargs: Any) -> go.Figure:
    kwargs.setdefault("margin", {"l": 55, "r": 15, "t": 45, "b": 45})
    fig.update_layout(
        title={"text": title, "x": 0.02, "font": {"size": 15}}, width=PLOT_W, height=PLOT_H,
        template="plotly_white",
        legend={"orientation": "h", "y": -0.18, "font": {"size": 10}}, **kwargs,
    )
    return fig


def _color(i: int) -> str:
    return STAGE_COLORS[i % len(STAGE_COLORS)]


def _progress(tel: dict[str, Any], report: dict[str, Any]) -> go.Figure:
    fig = go.Figure()
    for i, s in enumerate(tel["steps"]):
        fig.add_trace(go.Scatter(x=s["t"], y=s["done"], name=s["name"], mode="lines",
                                 line={"color": _color(i), "width": 2}))
    total = max((max(s["done"], default=0) for s in tel["steps"]), default=0) or report.get("blocks", 1)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for f in tel.get("faults", []):
        by_kind.setdefault(f["kind"], []).append(f)
    for kind, faults in sorted(by_kind.items()):
        color = FAULT_COLORS.get(kind, "#555555")
        if kind in ("node_lost", "server_restarted"):  # rare and decisive: a line across the plot
            for f in faults:
                fig.add_vline(x=f["t"], line={"color": color, "dash": "dash", "width": 1.5})
        fig.add_trace(go.Scatter(
            x=[f["t"] for f in faults], y=[total * 1.04] * len(faults), mode="markers", name=kind,
            marker={"symbol": "x" if kind == "node_lost" else "triangle-down", "size": 9, "color": color},
            text=[str(f.get("detail", "")) for f in faults], hovertemplate="%{x:.1f} s: %{text}<extra>" + kind + "</extra>",
        ))
    return _layout(fig, "Blocks done per stage (faults marked)", xaxis_title="s", yaxis_title="blocks")


def _rates(t: Sequence[float], rows: Sequence[int]) -> tuple[list[float], list[float]]:
    """rows/s between consecutive samples, at each interval's end."""
    xs, ys = [], []
    for (t0, r0), (t1, r1) in zip(zip(t, rows), zip(t[1:], rows[1:])):
        if t1 > t0:
            xs.append(t1)
            ys.append((r1 - r0) / (t1 - t0))
    return xs, ys


def _throughput(tel: dict[str, Any]) -> go.Figure:
    fig = go.Figure()
    for i, s in enumerate(tel["steps"]):
        xs, ys = _rates(s["t"], s["rows_out"])
        fig.add_trace(go.Scatter(x=xs, y=ys, name=s["name"], mode="lines", line={"color": _color(i), "width": 2},
                                 line_shape="hv"))
    return _layout(fig, "Throughput per stage", xaxis_title="s", yaxis_title="rows/s")


def _cache_io(tel: dict[str, Any]) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("reads (blocks)", "writes (MiB)"), horizontal_spacing=0.12)
    names = [s["name"] for s in tel["steps"]]
    for tier, color in TIER_COLORS.items():
        reads = [s.get("reads", {}).get(tier, 0) for s in tel["steps"]]
        if any(reads):
            fig.add_trace(go.Bar(x=names, y=reads, name=tier, marker_color=color, legendgroup=tier), row=1, col=1)
        writes = [s.get("writes", {}).get(tier, {}).get("bytes", 0) / 2**20 for s in tel["steps"]]
        if any(writes):
            fig.add_trace(go.Bar(x=names, y=writes, name=tier, marker_color=color, legendgroup=tier,
                                 showlegend=not any(reads)), row=1, col=2)
    fig.update_annotations(font_size=12)
    return _layout(fig, "Cache I/O per stage and tier", barmode="stack", margin={"l": 45, "r": 15, "t": 60, "b": 45})


def _held(tel: dict[str, Any]) -> go.Figure:
    """Bytes of each stage's blocks held in the cache (all copies, stacked) and the bytes
    evicted to make room, cumulative: a stage whose reader lags fills the cache."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    mib = 2**20
    for i, s in enumerate(tel["steps"]):
        if any(s.get("held_bytes", ())):
            fig.add_trace(go.Scatter(x=s["t"], y=[b / mib for b in s["held_bytes"]], name=f"{s['name']} held",
                                     stackgroup="held", mode="lines", line={"color": _color(i), "width": 2}),
                          secondary_y=False)
        if any(s.get("evicted_bytes", ())):
            fig.add_trace(go.Scatter(x=s["t"], y=[b / mib for b in s["evicted_bytes"]], name=f"{s['name']} evicted",
                                     mode="lines", line={"color": _color(i), "dash": "dot", "width": 2}),
                          secondary_y=True)
    fig.update_yaxes(title_text="held (MiB)", secondary_y=False, rangemode="tozero")
    fig.update_yaxes(title_text="evicted, cumulative (MiB)", secondary_y=True, showgrid=False, rangemode="tozero")
    return _layout(fig, "Cache bytes held per stage and evicted", xaxis_title="s")


def _resources(tel: dict[str, Any]) -> go.Figure:
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for i, s in enumerate(tel["steps"]):
        fig.add_trace(go.Scatter(x=s["t"], y=s["cpus"], name=f"{s['name']} CPUs", stackgroup="cpus", mode="lines",
                                 line={"color": _color(i), "width": 0.5}), secondary_y=False)
        if any(s.get("gpus", ())):
            fig.add_trace(go.Scatter(x=s["t"], y=s["gpus"], name=f"{s['name']} GPUs", mode="lines",
                                     line={"color": _color(i), "dash": "dot", "width": 2}), secondary_y=False)
    mem = tel.get("memory", {})
    if mem.get("t"):
        mib = 2**20
        fig.add_trace(go.Scatter(x=mem["t"], y=[b / mib for b in mem["workers_rss"]], name="workers RSS",
                                 mode="lines+markers", line={"color": "#222222", "width": 2}), secondary_y=True)
        fig.add_trace(go.Scatter(x=mem["t"], y=[b / mib for b in mem["driver_rss"]], name="driver RSS",
                                 mode="lines", line={"color": "#777777", "dash": "dash"}), secondary_y=True)
    fig.update_yaxes(title_text="CPUs / GPUs in use", secondary_y=False)
    fig.update_yaxes(title_text="memory (MiB)", secondary_y=True, showgrid=False, rangemode="tozero")
    return _layout(fig, "Resources in use and memory", xaxis_title="s")
