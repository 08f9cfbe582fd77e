"""Report layer: a self-contained HTML page, figure files and metrics.json."""

from loopscope.report.html import (
    Figure,
    ReportPaths,
    Section,
    Table,
    format_cell,
    render_html,
    to_jsonable,
    write_report,
)

__all__ = [
    "Figure",
    "ReportPaths",
    "Section",
    "Table",
    "format_cell",
    "render_html",
    "to_jsonable",
    "write_report",
]
