"""HTML and SVG of the retention page, rendered on the server from plain data (no script, no CDN,
no third-party code): a heatmap of the positions retained over a session's recent calls coloured by
the policy's weight, the evictions per call, and the policy's config.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from nexus_sidecar.server.retention_history import CallRecord

# Colour ramp of the weights, low -> high (dark violet, blue, teal, green, yellow): readable on
# white and in greyscale, hand-picked stops interpolated linearly.
RAMP = ((0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
        (1.0, (253, 231, 37)))
EVICTED = "#d4d4d4"  # a position that had arrived but is not retained at that call
MAX_ROWS = 128  # position bins of the heatmap
PLOT_W = 760


def colour(x: float) -> str:
    """``#rrggbb`` on the ramp for ``x`` in [0, 1] (clamped)."""
    x = min(1.0, max(0.0, x))
    for (a, ca), (b, cb) in itertools.pairwise(RAMP):
        if x <= b:
            t = (x - a) / (b - a)
            return "#" + "".join(f"{round(u + (v - u) * t):02x}" for u, v in zip(ca, cb, strict=True))
    return "#{:02x}{:02x}{:02x}".format(*RAMP[-1][1])


@dataclass
class SessionSummary:
    """What the page header shows about the session right now."""

    tenant: str
    session_id: str
    step: int
    policy: str
    config: Mapping[str, Any]
    groups: int
    retained: int
    tokens_seen: int
    tokens_evicted: int
    source: str = "the live session on this replica"


def weight_range(calls: Sequence[CallRecord]) -> tuple[float, float]:
    """(lo, hi) of the colour scale: the window's largest weight and 1/1000 of it (or the smallest
    positive one, if larger). Log scale: a token's memory grows from ~0 as it ages, so a linear
    scale would paint every young token the same dark colour."""
    ws = [c.weights[c.weights > 0] for c in calls if c.weights is not None]
    pos = np.concatenate(ws) if ws else np.zeros(0, np.float32)
    if not pos.size:
        return 0.0, 0.0
    hi = float(pos.max())
    return max(float(pos.min()), hi * 1e-3), hi


def scaled(w: float, lo: float, hi: float) -> float:
    """``w`` on the log scale [lo, hi] -> [0, 1]."""
    if hi <= 0 or w <= 0:
        return 0.0
    if hi <= lo:
        return 1.0
    return (math.log(max(w, lo)) - math.log(lo)) / (math.log(hi) - math.log(lo))


def heatmap_svg(calls: Sequence[CallRecord]) -> str:
    """The heatmap (x = call, y = position bins, colour = the bin's largest retained weight) and,
    under it, the evictions of each call as bars. ``calls`` oldest first, at least one."""
    top = max(int(c.positions.max()) if c.positions.size else -1 for c in calls)
    top = max(top, max((int(c.evicted.max()) for c in calls if c.evicted.size), default=-1)) + 1
    rows = max(1, min(MAX_ROWS, top))
    per_row = top / rows  # positions per bin
    cw = max(4.0, min(24.0, PLOT_W / len(calls)))
    rh = max(2.0, min(6.0, 360 / rows))
    left, head = 64, 10
    hm_h = rows * rh
    bars_top = head + hm_h + 34
    bars_h = 90
    width = left + cw * len(calls) + 20
    height = bars_top + bars_h + 44
    lo, hi = weight_range(calls)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="retention heatmap" '
           'font-family="DejaVu Sans, sans-serif" font-size="11">']
    out.append(f'<rect x="{left}" y="{head}" width="{cw * len(calls):.1f}" height="{hm_h:.1f}" fill="#ffffff" '
               'stroke="#888"/>')
    for x, c in enumerate(calls):
        # The furthest position this call had seen: below it, an empty bin means "evicted".
        frontier = max(int(c.positions.max()) if c.positions.size else -1,
                       int(c.evicted.max()) if c.evicted.size else -1)
        seen_rows = min(rows, math.floor(frontier / per_row) + 1) if frontier >= 0 else 0
        xs = left + x * cw
        if seen_rows:
            out.append(f'<rect x="{xs:.1f}" y="{head + (rows - seen_rows) * rh:.1f}" width="{cw:.1f}" '
                       f'height="{seen_rows * rh:.1f}" fill="{EVICTED}"/>')
        if not c.positions.size:
            continue
        bins = np.minimum((c.positions / per_row).astype(np.int64), rows - 1)
        w = c.weights if c.weights is not None else np.zeros(c.positions.shape, np.float32)
        best = np.full(rows, -1.0)
        np.maximum.at(best, bins, w.astype(np.float64))
        for r in np.flatnonzero(best >= 0):
            fill = colour(scaled(best[r], lo, hi)) if hi > 0 else colour(0.6)
            y = head + (rows - 1 - int(r)) * rh
            out.append(f'<rect x="{xs:.1f}" y="{y:.1f}" width="{cw:.1f}" height="{rh:.1f}" fill="{fill}"/>')
    # Axes: positions (0 at the bottom) and calls.
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = head + hm_h * (1 - frac)
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{round(frac * top)}</text>')
    out.append(f'<text x="14" y="{head + hm_h / 2:.1f}" transform="rotate(-90 14 {head + hm_h / 2:.1f})" '
               'text-anchor="middle">position</text>')
    ticks = sorted({0, len(calls) // 2, len(calls) - 1})
    for x in ticks:
        out.append(f'<text x="{left + (x + 0.5) * cw:.1f}" y="{head + hm_h + 14:.1f}" text-anchor="middle">'
                   f'{calls[x].step}</text>')
    out.append(f'<text x="{left + cw * len(calls) / 2:.1f}" y="{head + hm_h + 27:.1f}" text-anchor="middle">'
               'step (policy call)</text>')
    # Evictions per call.
    emax = max(c.evicted_all_groups for c in calls) or 1
    out.append(f'<line x1="{left}" y1="{bars_top + bars_h}" x2="{left + cw * len(calls):.1f}" '
               f'y2="{bars_top + bars_h}" stroke="#888"/>')
    for x, c in enumerate(calls):
        h = bars_h * c.evicted_all_groups / emax
        out.append(f'<rect x="{left + x * cw + cw * 0.15:.1f}" y="{bars_top + bars_h - h:.1f}" '
                   f'width="{cw * 0.7:.1f}" height="{h:.1f}" fill="#c0392b"><title>step {c.step}: '
                   f'{c.evicted_all_groups} evicted, {c.new_tokens} new</title></rect>')
    out.append(f'<text x="{left - 6}" y="{bars_top + 4}" text-anchor="end">{emax}</text>')
    out.append(f'<text x="{left - 6}" y="{bars_top + bars_h + 4}" text-anchor="end">0</text>')
    out.append(f'<text x="{left + cw * len(calls) / 2:.1f}" y="{bars_top + bars_h + 16}" text-anchor="middle">'
               'evictions per call (all groups)</text>')
    out.append("</svg>")
    return "".join(out)


def legend_svg(lo: float, hi: float) -> str:
    """The colour scale (log) with its range, plus the "evicted" swatch."""
    stops = "".join(f'<stop offset="{o:.2f}" stop-color="{colour(o)}"/>' for o in np.linspace(0, 1, 9))
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="420" height="40" font-family="DejaVu Sans, sans-serif" '
            f'font-size="11"><defs><linearGradient id="ramp">{stops}</linearGradient></defs>'
            '<rect x="0" y="4" width="220" height="14" fill="url(#ramp)" stroke="#888"/>'
            f'<text x="0" y="32">{lo:.3g}</text><text x="110" y="32" text-anchor="middle">log scale</text>'
            f'<text x="220" y="32" text-anchor="end">{hi:.3g}</text>'
            f'<rect x="250" y="4" width="14" height="14" fill="{EVICTED}" stroke="#888"/>'
            '<text x="270" y="15">evicted (not retained)</text></svg>')


def _table(rows: Mapping[str, Any], columns: int = 1) -> str:
    """name/value pairs laid out in ``columns`` column pairs."""
    items = [(html.escape(str(k)), html.escape(str(v))) for k, v in rows.items()]
    per = -(-len(items) // columns)
    lines = []
    for r in range(per):
        cells = [items[c * per + r] for c in range(columns) if c * per + r < len(items)]
        lines.append("<tr>" + "".join(f"<th>{k}</th><td>{v}</td>" for k, v in cells) + "</tr>")
    return f"<table>{''.join(lines)}</table>"


def _facts(facts: Mapping[str, Any]) -> str:
    """The header's one-line facts."""
    cells = "".join(f"<span><b>{html.escape(str(v))}</b> {html.escape(str(k))}</span>" for k, v in facts.items())
    return f'<div class="facts">{cells}</div>'


STYLE = """
body { font-family: "DejaVu Sans", sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px 0; } h2 { font-size: 15px; margin: 22px 0 6px 0; }
.sub { color: #555; margin-bottom: 14px; } table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } th { background: #f6f6f6; }
.facts { display: flex; gap: 18px; flex-wrap: wrap; font-size: 13px; } .note { color: #555; font-size: 12px; }
"""


def page(summary: SessionSummary, calls: Sequence[CallRecord], *, history_sessions: int) -> str:
    """The whole retention page of one session."""
    s = summary
    title = f"Session {s.session_id}"
    seen = max(1, s.tokens_seen)
    facts = {"tenant": s.tenant, "policy": s.policy, "step": s.step, "groups": s.groups,
             "retained now": s.retained, "tokens seen": s.tokens_seen, "tokens evicted": s.tokens_evicted,
             "kept so far": f"{1 - s.tokens_evicted / seen:.1%}"}
    if calls:
        lo, hi = weight_range(calls)
        what = ("the policy's memory of each token at that call (for nexus the EMA of its walk scores, for h2o "
                "its accumulated attention), largest in the row's range of positions, log scale"
                if hi > 0 else f"retention only: the {html.escape(s.policy)} policy keeps no per-token memory")
        chart = (f"<h2>Retained positions over the last {len(calls)} calls (group 0 of {s.groups})</h2>"
                 f'<p class="note">Each column is one policy call; each row a range of token positions. '
                 f"Colour: {what}. Grey: positions that had arrived but are no longer held. Red bars: "
                 f"tokens each call evicted.</p>{heatmap_svg(calls)}<div>{legend_svg(lo, hi)}</div>")
    else:
        chart = ("<h2>No calls recorded</h2><p class=\"note\">This sidecar records the calls of the "
                 f"{history_sessions} most recently started sessions (setting ui_history_sessions); this one "
                 "has none here yet (not stepped on this replica since it started, or recorded on another).</p>")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<div class="sub">Nexus eviction sidecar · retention page · <a href="/v1/sessions/'
            f'{quote(s.session_id, safe="")}">JSON snapshot</a></div>'
            f'{_facts(facts)}<p class="note">Now: {html.escape(s.source)}.</p>{chart}'
            f"<h2>Policy config</h2>{_table(dict(s.config), columns=3)}</body></html>")


def error_page(status: int, message: str) -> str:
    """A plain page for 401/403/404 and friends."""
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{status}</title>"
            f"<style>{STYLE}</style></head><body><h1>{status}</h1><p>{html.escape(message)}</p></body></html>")


def index_page(tenant: str, sessions: Sequence[str]) -> str:
    """The caller's sessions, each linking to its page."""
    items = "".join(f'<li><a href="/ui/sessions/{quote(sid, safe="")}">{html.escape(sid)}</a></li>' for sid in sessions)
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sessions of {html.escape(tenant)}"
            f"</title><style>{STYLE}</style></head><body><h1>Sessions of tenant {html.escape(tenant)}</h1>"
            f"<ul>{items or '<li>none</li>'}</ul></body></html>")
