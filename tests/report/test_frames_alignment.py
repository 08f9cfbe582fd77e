"""Stage alignment as DataFrames, on passes with a known answer: a pass of the reference's
shape (any scale) correlates at 1 with no distance, its mirror image (negated) at -1, a flat
pass has no correlation (NaN); the stages study's records give the same frame."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loopscope.analysis.alignment import align_pass_to_reference, alignment_summary
from loopscope.report.frames import ALIGNMENT_SCORES, alignment_frame, alignment_summary_frame

pd = pytest.importorskip("pandas")

REFERENCE = np.array([0.0, 1.0, 4.0, 9.0, 16.0])


def _scores() -> dict:
    same_shape = align_pass_to_reference(3.0 * REFERENCE + 7.0, REFERENCE)
    mirrored = align_pass_to_reference(-REFERENCE, REFERENCE)
    flat = align_pass_to_reference(np.ones(5), REFERENCE)
    return {"norm": [same_shape, mirrored], "entropy": [flat]}


def test_one_row_per_metric_and_pass_with_the_known_scores() -> None:
    frame = alignment_frame(_scores())
    assert frame.index.names == ["metric", "recurrence"]
    assert frame.index.tolist() == [("norm", 0), ("norm", 1), ("entropy", 0)]
    assert frame.columns.tolist() == list(ALIGNMENT_SCORES)
    same = frame.loc[("norm", 0)]
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["dtw_distance"] == pytest.approx(0.0, abs=1e-12)
    assert same["lockstep_distance"] == pytest.approx(0.0, abs=1e-12)
    back = frame.loc[("norm", 1)]
    assert back["pearson"] == pytest.approx(-1.0) and back["spearman"] == pytest.approx(-1.0)
    assert back["lockstep_distance"] >= back["dtw_distance"] > 0.0
    assert math.isnan(frame.loc[("entropy", 0), "pearson"])


def test_the_stages_study_records_give_the_same_frame() -> None:
    scores = _scores()
    labelled = alignment_frame(scores, recurrences=[3, 7])
    assert labelled.index.get_level_values("recurrence").tolist() == [3, 7, 3]
    records = {
        metric: [
            {"recurrence": r, **{name: getattr(a, name) for name in ALIGNMENT_SCORES}}
            for r, a in zip([3, 7], passes)
        ]
        for metric, passes in scores.items()
    }
    pd.testing.assert_frame_equal(alignment_frame(records), labelled)


def test_the_summary_has_one_row_per_metric() -> None:
    summary = alignment_summary(_scores())
    frame = alignment_summary_frame(summary)
    assert frame.index.name == "metric" and frame.index.tolist() == ["norm", "entropy"]
    assert frame.loc["norm", "pearson"] == pytest.approx(0.0, abs=1e-12)  # mean of 1 and -1
    assert math.isnan(frame.loc["entropy", "pearson"])
    per_pass = alignment_frame(_scores())
    assert frame.loc["norm", "dtw_distance"] == pytest.approx(
        per_pass.loc["norm", "dtw_distance"].mean()
    )
