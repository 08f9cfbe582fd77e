"""The report layer: one self-contained HTML page, figure files and ``metrics.json``.

Pure presentation: callers hand over finished :class:`matplotlib.figure.Figure` objects, tables
and numbers; nothing here touches a model. The page has no external resources and no scripts
(a Content-Security-Policy meta tag enforces that), so it can be mailed, archived or opened
offline and renders the same everywhere. All caller text is HTML-escaped, because prompts and
labels come from data and must never be interpreted as markup.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure as MplFigure

from loopscope.analysis.report_parts import Figure, Section, Table
from loopscope.core.atomic import write_bytes

__all__ = [
    "Figure",
    "ReportPaths",
    "Section",
    "Table",
    "format_cell",
    "page_body",
    "render_html",
    "to_jsonable",
    "write_report",
]

PNG_DPI = 120
FIGURE_FORMATS = ("png", "svg", "pdf")
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DASH = "\u2014"


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` put things."""

    html: Path
    metrics_json: Path
    figures: list[Path]

    def _repr_html_(self) -> str:
        """The written report inline in a notebook (its body; figures are embedded)."""
        return page_body(self.html.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- formatting


def _format_float(x: float) -> str:
    """Three significant digits, but never scientific notation for 1e3..1e5 (whole numbers read
    better there) and no '-0'."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "\u221e" if x > 0 else "\u2212\u221e"
    if x == 0:
        return "0"
    if 1e3 <= abs(x) < 1e5:
        return f"{x:.0f}"
    return f"{x:.3g}"


def format_cell(value: Any) -> str:
    """Table-cell text: None → '—', bool → 'yes'/'no', floats to 3 significant digits,
    ints exact, strings unchanged (escaping happens later)."""
    if value is None:
        return _DASH
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _format_float(float(value))
    if isinstance(value, str):
        return value
    raise TypeError(
        f"table cell {value!r} has type {type(value).__name__}; "
        "cells must be str, int, float, bool or None (format it to a string first)"
    )


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


# ---------------------------------------------------------------------------- validation


def _check_table(table: Table, where: str) -> None:
    if not table.columns:
        raise ValueError(f"{where} table {table.title!r} has no columns; give at least one")
    for i, row in enumerate(table.rows):
        if len(row) != len(table.columns):
            raise ValueError(
                f"{where} table {table.title!r} row {i} has {len(row)} cells but "
                f"{len(table.columns)} columns; make every row as long as `columns`"
            )
        for cell in row:
            format_cell(cell)  # raises a clear TypeError for unsupported cells


def _check_inputs(verdict: Table, sections: Sequence[Section], formats: Sequence[str]) -> None:
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad:
        raise ValueError(f"unknown figure format(s) {bad}; choose from {list(FIGURE_FORMATS)}")
    _check_table(verdict, "verdict")
    seen: set[str] = set()
    for s in sections:
        if not isinstance(s, Section):
            raise TypeError(f"sections must be Section objects, got {type(s).__name__}")
        for t in s.tables:
            _check_table(t, f"section {s.title!r}")
        for f in s.figures:
            if not _SLUG.match(f.name):
                raise ValueError(
                    f"figure name {f.name!r} is not a file-safe slug; use letters, digits, "
                    "'.', '_' and '-' only, starting with a letter or digit"
                )
            if f.name in seen:
                raise ValueError(
                    f"figure name {f.name!r} is used twice; names must be unique because "
                    "they become file names"
                )
            if not isinstance(f.figure, MplFigure):
                raise TypeError(
                    f"figure {f.name!r}: expected a matplotlib Figure, "
                    f"got {type(f.figure).__name__}"
                )
            seen.add(f.name)


# ---------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any, _path: str = "metrics") -> Any:
    """Plain-Python copy of ``obj`` for strict JSON: numpy scalars/arrays (and anything with
    ``.tolist()``, e.g. tensors) become numbers/lists, NaN/±Inf become None, dataclasses become
    dicts, paths become strings. Raises TypeError naming the offending key path."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), _path)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), _path)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            key = _json_key(k, _path)
            out[key] = to_jsonable(v, f"{_path}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_path}[{i}]") for i, v in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_jsonable(getattr(obj, f.name), f"{_path}.{f.name}")
            for f in dataclasses.fields(obj)
        }
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return to_jsonable(tolist(), _path)
    raise TypeError(
        f"{_path}: cannot convert {type(obj).__name__} to JSON; "
        "pass numbers, strings, lists, dicts or numpy arrays"
    )


def _json_key(key: Any, path: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (bool, int, float, np.generic)):
        return json.dumps(to_jsonable(key, path))
    raise TypeError(
        f"{path}: dict key {key!r} ({type(key).__name__}) is not JSON-compatible; use str keys"
    )


# ---------------------------------------------------------------------------- files


def _render_figure(fig: MplFigure, fmt: str, name: str) -> bytes:
    """Figure bytes without timestamps or random ids, so reruns give identical files."""
    buf = io.BytesIO()
    metadata: dict[str, Any] = {"Software": None} if fmt == "png" else {"Date": None}
    if fmt == "pdf":
        metadata = {"CreationDate": None, "ModDate": None}
    with matplotlib.rc_context({"svg.hashsalt": name}):
        fig.savefig(
            buf,
            format=fmt,
            dpi=PNG_DPI,
            bbox_inches="tight",
            facecolor="white",
            metadata=metadata,
        )
    return buf.getvalue()


def _close(fig: MplFigure) -> None:
    """Release a pyplot-managed figure; if pyplot was never imported nothing holds it."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


# ---------------------------------------------------------------------------- HTML

_CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0;
  --zebra: #f6f8fa; --accent: #0b5cad; --head: #eef2f6; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; background: #fff; color: var(--fg); line-height: 1.5; font-size: 16px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
    "Noto Sans", "Liberation Sans", sans-serif; }
.container { max-width: 980px; margin: 0 auto; padding: 2rem 1.25rem 4rem; }
header { border-bottom: 3px solid var(--accent); padding-bottom: 1rem; margin-bottom: 1.5rem; }
h1 { font-size: 1.9rem; margin: 0 0 .25rem; line-height: 1.2; }
.subtitle { color: var(--muted); margin: 0; font-size: 1.05rem; }
h2 { font-size: 1.35rem; margin: 2.5rem 0 .75rem; padding-bottom: .3rem;
  border-bottom: 1px solid var(--line); }
nav.toc { font-size: .95rem; margin: 1.75rem 0 1.5rem; }
nav.toc ol { margin: .25rem 0 0; padding-left: 1.4rem; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.table-wrap { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; width: 100%; font-size: .92rem;
  font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0 0 .4rem; }
th, td { border: 1px solid var(--line); padding: .35rem .6rem; vertical-align: top; }
thead th { background: var(--head); text-align: left; }
tbody th { text-align: left; font-weight: 600; white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--zebra); }
td.num, thead th.num { text-align: right; white-space: nowrap; }
table.data { width: auto; min-width: 50%; }
table.verdict { font-size: 1rem; border: 2px solid var(--accent); }
table.verdict caption { font-size: 1.15rem; }
.note { color: var(--muted); font-size: .88rem; margin: .35rem 0 0; }
figure { margin: 1.5rem 0; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .92rem; margin-top: .4rem; text-align: left; }
figcaption .file { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: .82rem; }
details { margin: 2.5rem 0 0; border: 1px solid var(--line); border-radius: 6px;
  padding: .5rem .9rem; }
summary { cursor: pointer; font-weight: 600; }
ol.prompts { padding-left: 2rem; }
ol.prompts li { margin: .35rem 0; }
ol.prompts pre { margin: 0; white-space: pre-wrap; word-break: break-word; font-size: .88rem;
  font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
@media print {
  body { font-size: 11pt; }
  .container { max-width: none; padding: 0; }
  nav.toc { display: none; }
  h2 { break-after: avoid; }
  figure, tr, .table-wrap { break-inside: avoid; }
  .table-wrap { overflow: visible; }
  a { color: inherit; }
  details { border: none; padding: 0; }
  details::details-content { content-visibility: visible; display: block; }
}
"""

# No scripts, no fetches: images may only be data: URIs and styles only the inline sheet.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'"


def _paragraphs(text: str) -> list[str]:
    parts = re.split(r"\n[ \t]*\n", text.strip())
    return [f"<p>{_esc(p.strip())}</p>" for p in parts if p.strip()]


def _numeric_columns(table: Table) -> list[bool]:
    """A column is right-aligned when it holds numbers and nothing but numbers or None."""
    cols = list(zip(*table.rows)) if table.rows else [() for _ in table.columns]
    return [
        any(_is_numeric(v) for v in col) and all(v is None or _is_numeric(v) for v in col)
        for col in cols
    ]


def _table_html(table: Table, *, verdict: bool = False) -> str:
    attrs = ' id="verdict" class="verdict"' if verdict else ' class="data"'
    numeric = _numeric_columns(table)
    num = [' class="num"' if n else "" for n in numeric]
    out = ['<div class="table-wrap">', f"<table{attrs}>"]
    if table.title:
        out.append(f"<caption>{_esc(table.title)}</caption>")
    out.append("<thead><tr>")
    out.extend(f'<th scope="col"{num[j]}>{_esc(c)}</th>' for j, c in enumerate(table.columns))
    out.append("</tr></thead>")
    out.append("<tbody>")
    for row in table.rows:
        cells = [f'<th scope="row">{_esc(format_cell(row[0]))}</th>']
        for j, v in enumerate(row[1:], 1):
            cls = ' class="num"' if num[j] or _is_numeric(v) else ""
            cells.append(f"<td{cls}>{_esc(format_cell(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if table.note:
        out.append(f'<p class="note">{_esc(table.note)}</p>')
    return "\n".join(out)


def _figure_html(fig: Figure, png: bytes, formats: Sequence[str]) -> str:
    data = base64.b64encode(png).decode("ascii")
    files = " · ".join(f"figures/{fig.name}.{fmt}" for fmt in formats)
    files_html = f' <span class="file">({_esc(files)})</span>' if files else ""
    return (
        f'<figure id="fig-{_esc(fig.name)}">'
        f'<img src="data:image/png;base64,{data}" alt="{_esc(fig.caption or fig.name)}">'
        f"<figcaption>{_esc(fig.caption)}{files_html}</figcaption></figure>"
    )


def page_body(page: str) -> str:
    """What of a report page goes inline in a notebook: its body's content (not its style
    sheet, whose page-wide rules would restyle the whole notebook)."""
    body = re.search(r"<body>(.*)</body>", page, re.DOTALL)
    return f'<div class="loopscope-report">{body.group(1) if body else page}</div>'


def render_html(
    *,
    title: str,
    subtitle: str,
    verdict: Table,
    sections: Sequence[Section],
    figure_pngs: Mapping[str, bytes],
    prompts: Sequence[str] | None = None,
    formats: Sequence[str] = ("png", "svg"),
) -> str:
    """The page as a string; ``figure_pngs`` maps figure name → PNG bytes to embed."""
    body: list[str] = [
        "<header>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="subtitle">{_esc(subtitle)}</p>' if subtitle else "",
        "</header>",
        '<section aria-label="verdict">',
        _table_html(verdict, verdict=True),
        "</section>",
    ]
    if sections:
        body.append('<nav class="toc" aria-label="contents"><strong>Contents</strong><ol>')
        body.extend(
            f'<li><a href="#section-{i}">{_esc(s.title)}</a></li>'
            for i, s in enumerate(sections, 1)
        )
        body.append("</ol></nav>")
    for i, s in enumerate(sections, 1):
        body.append(f'<section id="section-{i}">')
        body.append(f"<h2>{_esc(s.title)}</h2>")
        body.extend(_paragraphs(s.text))
        body.extend(_table_html(t) for t in s.tables)
        body.extend(_figure_html(f, figure_pngs[f.name], formats) for f in s.figures)
        body.append("</section>")
    if prompts is not None:
        body.append(f"<details><summary>Prompts ({len(prompts)})</summary>")
        if prompts:
            body.append('<ol class="prompts">')
            body.extend(f"<li><pre>{_esc(p)}</pre></li>" for p in prompts)
            body.append("</ol>")
        else:
            body.append('<p class="note">No prompts.</p>')
        body.append("</details>")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="generator" content="loopscope">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            '<main class="container">',
            *[b for b in body if b],
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )


def write_report(
    out_dir: Path,
    *,
    title: str,
    subtitle: str,
    verdict: Table,
    sections: list[Section],
    metrics: dict[str, Any],
    prompts: list[str] | None = None,
    formats: Sequence[str] = ("png", "svg"),
) -> ReportPaths:
    """Write ``report.html`` (self-contained), ``figures/NAME.{fmt}`` and ``metrics.json``
    into ``out_dir``; figures are closed once saved."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    if prompts is not None and not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    _check_inputs(verdict, sections, formats)
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    # Convert metrics first: a bad value should fail before anything is written.
    metrics_text = json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n"

    pngs: dict[str, bytes] = {}
    fig_paths: list[Path] = []
    for s in sections:
        for f in s.figures:
            try:
                pngs[f.name] = _render_figure(f.figure, "png", f.name)
                for fmt in formats:
                    data = pngs[f.name] if fmt == "png" else _render_figure(f.figure, fmt, f.name)
                    path = fig_dir / f"{f.name}.{fmt}"
                    write_bytes(path, data)
                    fig_paths.append(path)
            finally:
                _close(f.figure)

    page = render_html(
        title=title,
        subtitle=subtitle,
        verdict=verdict,
        sections=sections,
        figure_pngs=pngs,
        prompts=prompts,
        formats=formats,
    )
    html_path = out_dir / "report.html"
    write_bytes(html_path, page.encode("utf-8"))
    metrics_path = out_dir / "metrics.json"
    write_bytes(metrics_path, metrics_text.encode("utf-8"))
    return ReportPaths(html=html_path, metrics_json=metrics_path, figures=fig_paths)
