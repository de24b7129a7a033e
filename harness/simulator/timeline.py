"""`simulate --timeline FILE`: a picture of the runs, one row per session, modes side by side.

Each row shows what its session's entity was doing over time, read from the status history
the executor keeps: waiting to start, creating (Provisioning: an invocation in flight),
queued, running (the spec's working state), releasing, done (completed), failed. The page is one
self-contained HTML file with inline SVG (no script, no network); a `.png` name renders that
page with a headless chromium (`chromium --headless --screenshot`).
"""

from __future__ import annotations

import html
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness.simulator.runner import RunResult, SessionScript
from harness.simulator.spec import Spec

COLORS = {
    "waiting": "#d9d9d9",
    "creating": "#4e79a7",
    "queued": "#f2b134",
    "running": "#59a14f",
    "releasing": "#9cc5a1",
    "done": "#eef3ee",
    "failed": "#e15759",
}
LEGEND = ("queued", "creating", "running", "releasing", "done", "failed", "waiting")
ROW_H = 16
PANEL_W = 560
LABEL_W = 130
TOP = 58


def category(status: str, spec: Spec, script: SessionScript) -> str:
    if status in script.queued_states:
        return "queued"
    if status == script.working_state:
        return "running"
    if status in script.completed_states:
        return "done"
    if status in script.failed_states:
        return "failed"
    if status == "Releasing" or status in script.failing_states:
        return "releasing"
    if status == spec.initial:
        return "waiting"
    return "creating"


def segments(
    history: Sequence[tuple[float, str]], end_s: float, spec: Spec, script: SessionScript
) -> list[tuple[float, float, str]]:
    """(start, end, category) for each stretch of one status, merged by category."""
    out: list[tuple[float, float, str]] = []
    for index, (at, status) in enumerate(history):
        until = history[index + 1][0] if index + 1 < len(history) else end_s
        kind = category(status, spec, script)
        if out and out[-1][2] == kind:
            out[-1] = (out[-1][0], until, kind)
        elif until > at or index + 1 == len(history):
            out.append((at, max(until, at), kind))
    return out


def _panel(mode: str, run: RunResult, spec: Spec, x0: float, span_s: float) -> list[str]:
    script = SessionScript.for_spec(spec)
    width = PANEL_W - LABEL_W - 10
    scale = width / span_s if span_s > 0 else 1.0
    done = run.completed
    parts = [
        f'<text x="{x0}" y="20" class="title">{html.escape(mode)}: {done}/{len(run.results)}'
        f" completed, makespan {run.makespan_s:.1f}s</text>",
        f'<text x="{x0}" y="36" class="sub">{html.escape(spec.source)}</text>',
    ]
    for row, result in enumerate(run.results):
        y = TOP + row * ROW_H
        parts.append(
            f'<text x="{x0}" y="{y + 11}" class="label">{html.escape(result.job.label[:18])}</text>'
        )
        end = result.finished_at_s if result.finished_at_s is not None else span_s
        end = max(end, span_s) if result.outcome == "failed" else end
        for start, stop, kind in segments(result.history, end, spec, script):
            w = max(1.0, (stop - start) * scale)
            x = x0 + LABEL_W + start * scale
            parts.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{ROW_H - 3}" '
                f'fill="{COLORS[kind]}"><title>{html.escape(result.job.label)}: '
                f"{kind} {start:.2f}-{stop:.2f}s</title></rect>"
            )
    axis_y = TOP + len(run.results) * ROW_H + 4
    step = _tick(span_s)
    tick = 0.0
    while tick <= span_s + 1e-9:
        x = x0 + LABEL_W + tick * scale
        parts.append(f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{axis_y}" class="grid"/>')
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 12}" class="tick">{tick:g}s</text>')
        tick += step
    return parts


def _tick(span_s: float) -> float:
    for step in (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600):
        if span_s / step <= 12:
            return float(step)
    return max(1.0, round(span_s / 10))


def render_html(runs: Sequence[tuple[str, RunResult, Spec]]) -> str:
    span = max([r.makespan_s for _, r, _ in runs] + [1.0]) * 1.04
    rows = max([len(r.results) for _, r, _ in runs] + [1])
    width = PANEL_W * len(runs) + 20
    height = TOP + rows * ROW_H + 60
    parts: list[str] = []
    for index, (mode, run, spec) in enumerate(runs):
        parts.extend(_panel(mode, run, spec, 10 + index * PANEL_W, span))
    legend_y = height - 16
    x = 10.0
    for kind in LEGEND:
        parts.append(
            f'<rect x="{x}" y="{legend_y - 10}" width="12" height="12" '
            f'fill="{COLORS[kind]}" stroke="#999"/>'
        )
        parts.append(f'<text x="{x + 16}" y="{legend_y}" class="tick">{kind}</text>')
        x += 90
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
        "<style>text{font-family:sans-serif;fill:#222}.title{font-size:14px;"
        "font-weight:bold}.sub{font-size:11px;fill:#666}.label{font-size:11px}"
        ".tick{font-size:10px;fill:#555}.grid{stroke:#ddd;stroke-width:1}</style>"
        f'<rect width="{width}" height="{height}" fill="white"/>' + "".join(parts) + "</svg>"
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>simulate timeline'
        '</title></head><body style="margin:0;background:white">' + svg + "</body></html>\n"
    )


def write_timeline(path: Path, runs: Sequence[tuple[str, RunResult, Spec]]) -> Path:
    page = render_html(runs)
    if path.suffix.lower() != ".png":
        path.write_text(page, encoding="utf-8")
        return path
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        fallback = path.with_suffix(".html")
        fallback.write_text(page, encoding="utf-8")
        raise RuntimeError(f"no chromium to render {path}; wrote {fallback} instead")
    rows = max([len(r.results) for _, r, _ in runs] + [1])
    width, height = PANEL_W * len(runs) + 20, TOP + rows * ROW_H + 60
    with tempfile.TemporaryDirectory(prefix="timeline-") as scratch:
        page_path = Path(scratch) / "timeline.html"
        page_path.write_text(page, encoding="utf-8")
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--screenshot={path.resolve()}",
                f"--window-size={width},{height}",
                page_path.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return path
