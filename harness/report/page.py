"""One self-contained HTML page: plotly.js inlined once, each figure as escaped JSON drawn by Plotly.newPlot.

No network is needed to open the page from disk. Figure JSON is embedded in ``<script type="application/json">``
with ``<``, ``>`` and ``&`` written as JSON escapes, so no text inside a figure can close the tag.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d232a; background: #fafbfc; }
header, main, nav { max-width: 1400px; margin: 0 auto; padding: 0 24px; }
header h1 { margin: 24px 0 4px; font-size: 1.6em; }
nav { font-size: 0.9em; margin-bottom: 8px; }
nav a { margin-right: 14px; color: #2a5db0; text-decoration: none; }
section { background: #fff; border: 1px solid #e3e6ea; border-radius: 6px; padding: 8px 18px 16px; margin: 16px 0; }
section h2 { font-size: 1.2em; margin: 10px 0; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; font-size: 0.9em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
th, td { border-bottom: 1px solid #e3e6ea; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f4f7; position: sticky; top: 0; }
tr.nr td { color: #777; font-style: italic; }
tr.bad td:first-child { color: #b3261e; font-weight: 600; }
p.note { color: #555; font-style: italic; }
code { font-size: 0.95em; word-break: break-all; }
.plot { width: 100%; }
details summary { cursor: pointer; font-weight: 600; margin: 6px 0; }
.scroll { max-height: 520px; overflow: auto; }
"""

RENDER = """
document.querySelectorAll("script.figure-data").forEach(function (el) {
  var fig = JSON.parse(el.textContent);
  Plotly.newPlot(el.dataset.target, fig.data, fig.layout, {responsive: true, displaylogo: false});
});
"""


@dataclass
class Section:
    """One titled part of the page: an HTML body, a figure, or a note saying why there is nothing to show."""

    id: str
    title: str
    body: str = ""
    figure: go.Figure | None = None
    note: str = ""


def figure_json(fig: go.Figure) -> str:
    """Plotly JSON safe to place inside a script element."""
    text = pio.to_json(fig, validate=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render(title: str, header_html: str, sections: list[Section]) -> str:
    """The full page. ``header_html`` and section bodies are already-escaped HTML; titles and notes are text."""
    parts, scripts = [], []
    for i, s in enumerate(sections):
        inner = [f"<h2>{html.escape(s.title)}</h2>"]
        if s.note:
            inner.append(f"<p class='note'>{html.escape(s.note)}</p>")
        if s.figure is not None:
            target = f"plot-{i}"
            inner.append(f'<div class="plot" id="{target}"></div>')
            scripts.append(
                f'<script type="application/json" class="figure-data" data-target="{target}">'
                f"{figure_json(s.figure)}</script>"
            )
        inner.append(s.body)
        parts.append(f'<section id="{html.escape(s.id)}">{"".join(inner)}</section>')
    nav = "".join(f'<a href="#{html.escape(s.id)}">{html.escape(s.title)}</a>' for s in sections)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<header><h1>{html.escape(title)}</h1><p class='note'>generated {generated}</p>{header_html}</header>"
        f"<nav>{nav}</nav><main>{''.join(parts)}</main>{''.join(scripts)}<script>{RENDER}</script></body></html>\n"
    )
