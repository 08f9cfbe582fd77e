"""How a sweep survives being killed: the sweep header, one JSON file per finished cell (both
written atomically through :mod:`loopscope.core.atomic`), and the mark that says whether the
tables and report on disk already describe every finished cell.

A killed sweep leaves only whole files, so a rerun skips exactly the cells that finished and
computes the rest; a rerun that computes nothing keeps the report it finds.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from loopscope.core.atomic import write_json, write_text
from loopscope.core.errors import LoopscopeError
from loopscope.report.html import ReportPaths, to_jsonable


def write_result(path: Path, data: Mapping[str, Any]) -> None:
    """One cell's result as strict JSON (NaN/Inf stored as null), written atomically; a failed
    write (a full disk) leaves no file and says how to go on."""
    text = json.dumps(to_jsonable(dict(data)), indent=1, allow_nan=False)
    try:
        write_text(path, text)
    except OSError as err:
        fix = "free disk space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise LoopscopeError(
            f"cannot write the cell result {path}: {err.strerror or err}. Then {fix} and rerun "
            "the same command: finished cells are kept and only the rest are computed"
        ) from err


def with_nan_floats(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with every null ``float`` field of dataclass ``cls`` back to NaN (strict JSON
    stores NaN as null)."""
    values = dict(data)
    for f in fields(cls):
        if f.type == "float" and values.get(f.name) is None:
            values[f.name] = math.nan
    return values


class CellStore:
    """``ROOT/sweep.json`` (what was measured, checked on every reopen) and one file per
    finished cell, ``ROOT/cells/KEY.json`` or ``ROOT/cells/NAME/result.json``: a killed sweep
    leaves only whole files, and a rerun skips exactly those cells."""

    def __init__(self, root: str | Path, header: Mapping[str, Any]) -> None:
        self.root = Path(root)
        self.cells = self.root / "cells"
        self.cells.mkdir(parents=True, exist_ok=True)
        head = self.root / "sweep.json"
        wanted = to_jsonable(dict(header))
        if head.exists():
            existing = json.loads(head.read_text())
            diff = sorted(
                k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k)
            )
            if diff:
                raise LoopscopeError(
                    f"{self.root} holds a sweep with different settings ({', '.join(diff)}); "
                    "use another --out directory, or delete it to start afresh"
                )
        else:
            write_text(head, json.dumps(wanted, indent=2, sort_keys=True))

    def path(self, key: str) -> Path:
        return self.cells / f"{key}.json"

    def cell_dir(self, name: str) -> Path:
        """The directory of a cell that writes more than its result (a trained model)."""
        return self.cells / name

    def done(self, key: str) -> bool:
        return self.path(key).exists()

    def load_json(self, key: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path(key).read_text())
        return data

    def save_json(self, key: str, data: Mapping[str, Any]) -> None:
        write_result(self.path(key), data)


@dataclass
class SweepRun:
    """What a sweep did: every result of its grid, the keys computed by this call (the rest
    were found on disk), the wall time of this call and where the report went."""

    results: list[Any]
    computed: list[str]
    seconds: float
    report: ReportPaths | None
    table_md: Path
    table_csv: Path


def table_paths(out: Path) -> tuple[Path, Path]:
    """Where a sweep's Markdown and CSV tables go."""
    return out / "table.md", out / "table.csv"


def _outputs_current(out: Path, keys: Sequence[str]) -> bool:
    """True when the tables and report on disk describe exactly these finished cells, so a
    rerun that computed nothing need not redraw them (figures are the slow part)."""
    mark = out / "outputs.json"
    needed = [out / "report.html", *table_paths(out), mark]
    if not all(p.exists() for p in needed):
        return False
    return bool(json.loads(mark.read_text()).get("cells") == list(keys))


def _existing_report(out: Path) -> ReportPaths:
    figures = sorted((out / "figures").glob("*")) if (out / "figures").is_dir() else []
    return ReportPaths(html=out / "report.html", metrics_json=out / "metrics.json", figures=figures)


def finish_sweep(
    out: Path,
    keys: Sequence[str],
    results: list[Any],
    computed: list[str],
    elapsed: float,
    write_outputs: Callable[[], tuple[Path, Path, ReportPaths]],
) -> SweepRun:
    """Write the tables and report (``write_outputs``) unless this call computed nothing and
    those on disk already describe exactly ``keys``; then mark them as describing ``keys``."""
    if not computed and _outputs_current(out, keys):
        return SweepRun(results, computed, elapsed, _existing_report(out), *table_paths(out))
    md, csv_path, paths = write_outputs()
    write_json(out / "outputs.json", {"cells": list(keys)}, indent=1)
    return SweepRun(results, computed, elapsed, paths, md, csv_path)
