"""What a measurement hands to the report: titled sections of text, tables and finished figures.

Plain data, so that measurements (in ``analysis/``) can describe their part of the page while
the report layer alone decides how it is rendered (:mod:`loopscope.report.html`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure as MplFigure

__all__ = ["Cell", "Figure", "Section", "Table"]

# numpy scalars are accepted too: analyses hand them over unconverted.
Cell = str | float | int | np.generic | None


@dataclass
class Table:
    """A titled table; the first column is the row label (rendered as a row header)."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    note: str = ""


@dataclass
class Figure:
    """A finished figure; ``name`` becomes ``figures/NAME.png`` / ``.svg``."""

    name: str
    caption: str
    figure: MplFigure


@dataclass
class Section:
    """A titled part of the report: plain text (paragraphs split on blank lines), then tables,
    then figures."""

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
