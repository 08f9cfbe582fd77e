"""The stability certificate: spectral radii of the whole block's and every block layer's
Jacobian at the fixed point, averaged over the prompts that have one."""

from __future__ import annotations

from typing import Any

import numpy as np

from loopscope.analysis.registry import (
    STABILITY,
    Measurement,
    Results,
    Source,
    TraceFacts,
    VerdictColumn,
    register,
)
from loopscope.analysis.report_parts import Table

# -------------------------------------------------------------------- stability certificate


def _pool_stability(
    parts: list[dict[str, Any] | None], facts: TraceFacts, results: Results
) -> dict[str, Any]:
    """Spectral radii averaged over the prompts that have a certificate."""
    records = [r for r in parts if r is not None]
    block = [r["block"]["radius"] for r in records]
    layers = np.array([[layer["radius"] for layer in r["layers"]] for r in records])
    return {
        "prompts": len(records),
        "block_radius": float(np.mean(block)),
        "block_radius_max": float(np.max(block)),
        "block_verdicts": [r["block"]["verdict"] for r in records],
        "layer_radius": layers.mean(axis=0).tolist(),
        "layer_verdicts": [
            [r["layers"][j]["verdict"] for r in records] for j in range(layers.shape[1])
        ],
    }


def _stability_rows(stab: dict[str, Any], facts: TraceFacts) -> list[Table]:
    rows: list[list[Any]] = [
        [f"block layer {j}", r, ", ".join(sorted(set(v)))]
        for j, (r, v) in enumerate(zip(stab["layer_radius"], stab["layer_verdicts"]))
    ]
    rows.append(["whole block", stab["block_radius"], ", ".join(stab["block_verdicts"])])
    return [Table("Spectral radius at the fixed point", ["map", "radius", "verdicts"], rows)]


def radius_words(radius: float | None) -> str:
    """A spectral radius and what it certifies, as a verdict cell."""
    if radius is None or not np.isfinite(radius):
        return "—"
    if radius < 0.98:
        return f"{radius:.3f} contracting"
    if radius > 1.02:
        return f"{radius:.3f} expanding"
    return f"{radius:.3f} neutral"


STABILITY_CERTIFICATE = register(
    Measurement(
        name="stability",
        title="Stability certificate",
        sources=(Source((STABILITY,), lambda prompt, facts: prompt.stability),),
        pool=_pool_stability,
        metrics=lambda s: {"stability": s},
        text=lambda s, facts, results: (
            "Spectral radius of the Jacobian at the fixed point, by Arnoldi iteration on "
            "Jacobian-vector products (no dense Jacobian): below 1 the fixed point is "
            "locally attracting."
        ),
        tables=_stability_rows,
        verdict=VerdictColumn(
            "spectral radius",
            lambda s, layer: radius_words(s["layer_radius"][layer]),
            lambda facts: (
                "spectral radius of each layer's Jacobian at the fixed point (power/Arnoldi "
                "iteration on JVPs)"
            ),
            whole_block=lambda s: radius_words(s["block_radius"]),
        ),
    )
)
