"""Numbers to text, shared by both sweeps' tables and prose: pooled statistics that skip
non-finite values, "—" for a number that is missing, Markdown and CSV tables, and the one
paragraph shape of a factor summary (each level, then each level against the first)."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from loopscope.report.html import Section

T = TypeVar("T")


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard deviation of the finite values (NaN, NaN when there are none)."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of the finite positive values (NaN when there are none)."""
    arr = np.asarray([v for v in values if math.isfinite(v) and v > 0], dtype=np.float64)
    return float(np.exp(np.log(arr).mean())) if arr.size else float("nan")


def group_by(items: Iterable[T], key: Callable[[T], Any]) -> dict[Any, list[T]]:
    """``items`` grouped by ``key``, groups in the order their first item appears."""
    groups: dict[Any, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def plus_minus(pair: tuple[float, float], fmt: str) -> str:
    mean, sd = pair
    if not math.isfinite(mean):
        return "—"
    return f"{mean:{fmt}} ± {sd:{fmt}}"


def number(x: float, fmt: str) -> str:
    return f"{x:{fmt}}" if math.isfinite(x) else "—"


def ratio_text(new: float, old: float) -> str:
    if not (math.isfinite(new) and math.isfinite(old)) or old == 0:
        return "—"
    return f"×{new / old:.2g}"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table ('|' in cells escaped)."""

    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines.extend("| " + " | ".join(esc(c) for c in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A CSV document with ``\\n`` line ends."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def factor_paragraph(
    title: str,
    against: str,
    stats: Mapping[Any, Mapping[str, Any]],
    level_text: Callable[[Any, Mapping[str, Any]], str],
    change_text: Callable[[Any, Mapping[str, Any], Mapping[str, Any]], str],
) -> str:
    """One factor's paragraph: every level (``level_text(level, stats)``), then every other
    level against the first (``change_text(level, stats, first_stats)``)."""
    base, *others = list(stats)
    parts = [level_text(lv, s) for lv, s in stats.items()]
    changes = [change_text(lv, stats[lv], stats[base]) for lv in others]
    return (
        f"{title} — " + "; ".join(parts) + f". Against {against}{base}: " + "; ".join(changes) + "."
    )


def summary_section(summary: Sequence[str]) -> Section:
    return Section(
        "Summary", text="\n\n".join(summary) or "One level per factor: nothing to compare."
    )


@contextlib.contextmanager
def quiet_nan_warnings() -> Iterator[None]:
    """Silence numpy's all-NaN-slice warnings (bands over a single seed, empty pools)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield
