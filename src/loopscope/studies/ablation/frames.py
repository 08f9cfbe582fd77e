"""A sweep's finished cells as one ``pandas.DataFrame``, for notebooks.

``cells_frame(sweep_dir)`` reads the cell files a sweep (``loopscope ablate random-init`` or
``trained``) wrote, finished or not, and gives one row per finished cell: its factors, the four
verdict parts, the label, the reason in words, then every scalar it measured (the curves
are left out: they are in the cell files). It lives here rather than in
``loopscope.report.frames`` because the report layer may not import the studies.
``pandas`` is imported only when a frame is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loopscope.core.errors import LoopscopeError
from loopscope.studies.ablation.random_init import CellResult
from loopscope.studies.ablation.trained import TrainedResult

__all__ = ["PARTS", "cells_frame", "cells_rows"]

#: The verdict's parts, in the order the rule reads them.
PARTS = ("direction", "magnitude", "norm_trend", "certificate")
#: Each sweep's factors: what tells its cells apart.
_FACTORS = {
    "random-init": ("norm", "injection", "block", "seed", "init"),
    "trained": (
        "layout",
        "block",
        "injection",
        "prelude_coda",
        "norm",
        "seed",
        "feedforward",
        "init",
    ),
}


def _random_init_row(result: CellResult) -> dict[str, Any]:
    data = asdict(result)
    return {"key": result.cell.key, **data.pop("cell"), **data}


def _sweep_kind(root: Path) -> str:
    header = root / "sweep.json"
    if not header.is_file():
        raise LoopscopeError(
            f"{root} holds no sweep (no sweep.json); pass the --out directory of "
            "`loopscope ablate random-init` or `loopscope ablate trained`"
        )
    kind = str(json.loads(header.read_text()).get("kind"))
    if kind not in _FACTORS:
        raise LoopscopeError(f"{header} names an unknown sweep kind {kind!r}")
    return kind


def cells_rows(sweep_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """The sweep's kind and one flat record per finished cell, sorted by cell name (the
    sweep header does not keep the grid's order), every field as the cell file holds it."""
    root = Path(sweep_dir)
    kind = _sweep_kind(root)
    cells = root / "cells"
    if kind == "random-init":
        found = [CellResult.from_json(json.loads(p.read_text())) for p in cells.glob("*.json")]
        return kind, [_random_init_row(r) for r in sorted(found, key=lambda r: r.cell.key)]
    files = sorted(cells.glob("*/result.json"))
    return kind, [asdict(TrainedResult.from_json(json.loads(p.read_text()))) for p in files]


def _ordered(record: Mapping[str, Any], factors: Sequence[str]) -> dict[str, Any]:
    """Factors, parts, label and reason first, then every other scalar field as it comes."""
    first = [*factors, *PARTS]
    row = {name: record[name] for name in first}
    row["label"] = record["verdict"]
    row["reason"] = record["reason"]
    skipped = {*first, "verdict", "reason", "key", "name"}
    row.update(
        (k, v) for k, v in record.items() if k not in skipped and not isinstance(v, (list, dict))
    )
    return row


def cells_frame(sweep_dir: str | Path) -> Any:
    """One row per finished cell of the sweep at ``sweep_dir``, indexed by the cell's name
    (``pre-none-k2-s0``, ``2-2x4-2-add-pre-s0``): its factors, the verdict parts
    (``direction``, ``magnitude``, ``norm_trend``, ``certificate``), ``label`` (stable
    distinct / degenerate / not stable), ``reason`` and the scalar measures. ``attrs["kind"]``
    says which sweep it was."""
    import pandas as pd

    kind, records = cells_rows(sweep_dir)
    names = [r["key"] if kind == "random-init" else r["name"] for r in records]
    rows = [_ordered(r, _FACTORS[kind]) for r in records]
    frame = pd.DataFrame(rows, index=pd.Index(names, name="cell"))
    frame.attrs["kind"] = kind
    return frame
