"""A job's report page: one self-contained HTML file that the generation and training reports
both build (`pipeline.generate.report`, `pipeline.train.report`).

The page needs nothing but itself to be read: styles are inline, plots are inline SVG drawn by
matplotlib, and there is no script at all. Every piece of text that came from data (row text,
ids, error messages, labels, settings) is escaped by Jinja2's autoescape, and the page's
Content-Security-Policy forbids scripts and every network request, so that even a row that holds
`<script>` can only ever show as text.

Pure module: jinja2 and matplotlib (its object API only: no pyplot, no global figure state).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Iterable, Sequence

import jinja2
import matplotlib
from markupsafe import Markup, escape
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Longest text a table cell shows; the rest is in the output files.
CELL_CHARS = 600
_PLOT_RC = {
    "svg.fonttype": "none",     # text stays text: smaller files, selectable, escaped by matplotlib
    "text.parse_math": False,   # a label holding "$" is a label, not TeX that can fail to parse
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_COLORS = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5")


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    # Columns holding long free text (answers, messages): shown in a scrolling box.
    text_columns: Sequence[str] = ()
    header: bool = True


@dataclass
class Section:
    title: str
    note: str | None = None
    plots: list[Markup] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def key_value_table(pairs: Iterable[tuple[str, Any]]) -> Table:
    """A two-column table of facts without a header; facts with no value are left out."""
    return Table(["", ""], [[k, v] for k, v in pairs if v not in (None, {}, [], "")], header=False)


def render_page(title: str, status: str, facts: Iterable[tuple[str, Any]], sections: Iterable[Section],
                settings: dict | None = None) -> str:
    """The page: a title with the job's status, a row of headline figures, the sections in
    order, and the job's settings flattened into a table at the end."""
    template = _environment().get_template("report.html.jinja")
    return template.render(
        title=title,
        status=status,
        facts=[(k, _fact(v)) for k, v in facts],
        sections=[s for s in sections if s.plots or s.tables or s.note],
        settings=flatten(settings or {}),
        cell=_cell,
    )


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings as ("a.b.c", value) pairs, in key order within each level."""
    if isinstance(value, dict) and value:
        out = []
        for key, item in value.items():
            out.extend(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [(prefix, _fact(value))]


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 30) -> Markup | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    with _plot(title) as (ax, drawn):
        lo, hi = min(values), max(values)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.hist(values, bins=max(1, min(bins, int(hi - lo) + 1)), color=_COLORS[0], edgecolor="white")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows")
    return drawn["svg"]


def bar_chart(counts: dict[str, int], title: str, xlabel: str = "rows", limit: int = 20) -> Markup | None:
    """Horizontal bars, largest first; past `limit` categories the rest are summed as "(other)"."""
    if not counts:
        return None
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    if len(items) > limit:
        items = items[: limit - 1] + [("(other)", sum(v for _, v in items[limit - 1:]))]
    labels = [_short(str(k), 40) for k, _ in items][::-1]
    values = [v for _, v in items][::-1]
    with _plot(title, height=1.0 + 0.28 * len(items)) as (ax, drawn):
        bars = ax.barh(range(len(values)), values, color=_COLORS[0])
        ax.set_yticks(range(len(values)), labels)
        ax.bar_label(bars, padding=2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.margins(x=0.12)
    return drawn["svg"]


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str, xlabel: str,
               ylabel: str, right: tuple[str, Sequence[float], Sequence[float], str] | None = None,
               markers: bool = False, steps: bool = False) -> Markup | None:
    """One line per (label, xs, ys); `right` (label, xs, ys, axis label) is drawn against a
    second y axis (rows and tokens over time have different scales). `steps`: running totals
    that change only at the points (committed batches) and stay flat in between."""
    series = [s for s in series if len(s[1])]
    if not series:
        return None
    with _plot(title) as (ax, drawn):
        style = {"marker": "o", "markersize": 3} if markers else {}
        if steps:
            style["drawstyle"] = "steps-post"
        for i, (label, xs, ys) in enumerate(series):
            ax.plot(xs, ys, label=label, color=_COLORS[i % len(_COLORS)], **style)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        handles = ax.get_legend_handles_labels()
        if right is not None and len(right[1]):
            twin = ax.twinx()
            twin.plot(right[1], right[2], label=right[0], color=_COLORS[2], linestyle="--", **style)
            twin.set_ylabel(right[3])
            more = twin.get_legend_handles_labels()
            handles = (handles[0] + more[0], handles[1] + more[1])
        if len(handles[0]) > 1:
            ax.legend(*handles, loc="best", frameon=False)
    return drawn["svg"]


@contextlib.contextmanager
def _plot(title: str, height: float = 2.8):
    """`with _plot(title) as (ax, drawn)`: an axes to draw on; after the block, `drawn["svg"]`
    holds the drawing as an inline <svg> element."""
    drawn: dict[str, Markup] = {}
    # The salt names the SVG's clip paths: distinct per plot, so several SVGs share one page.
    with matplotlib.rc_context({**_PLOT_RC, "svg.hashsalt": title}):
        figure = Figure(figsize=(5.6, min(height, 7.0)), layout="constrained")
        ax = figure.add_subplot()
        ax.set_title(title, loc="left", fontsize=10)
        yield ax, drawn
        buf = io.StringIO()
        figure.savefig(buf, format="svg", metadata={"Date": None})
    drawn["svg"] = _inline_svg(buf.getvalue(), title)


def _inline_svg(document: str, title: str) -> Markup:
    """matplotlib's SVG document as an element to put in HTML: the XML prolog, doctype and
    metadata dropped, and a role and label for screen readers. matplotlib escapes the text it draws."""
    svg = document[document.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, count=1, flags=re.S)  # RDF boilerplate
    label = escape(title)
    svg = re.sub(r"<svg ", f'<svg class="plot" role="img" aria-label="{label}" ', svg, count=1)
    return Markup(svg)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return _short(value if isinstance(value, str) else _fact(value), CELL_CHARS)


def _fact(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fact(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fact(v)}" for k, v in value.items()) if value else "{}"
    return str(value)


_ENV: jinja2.Environment | None = None


def _environment() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        source = files("pipeline").joinpath("templates", "report.html.jinja").read_text(encoding="utf-8")
        _ENV = jinja2.Environment(
            loader=jinja2.DictLoader({"report.html.jinja": source}),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
    return _ENV
