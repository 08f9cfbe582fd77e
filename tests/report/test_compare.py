"""``loopscope compare``: analysed runs side by side, numbers read as each run's report wrote
them, one overlaid figure per measurement, and a page that renders in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from helpers import random_prompts

from loopscope.report.compare import (
    CompareError,
    Run,
    load_run,
    run_summary,
    summary_table,
    write_comparison,
)

CHROMIUM_TIMEOUT_S = 60
SECTIONS = ["Convergence", "Limiting behaviour", "Attention stabilisation", "Stages", "Stability"]


def _metrics(relative: list[list[float]], token_rate: float, example_rate: float) -> dict[str, Any]:
    return {
        "model": {"name": "m", "family": "looplm"},
        "dynamics": {
            "prompts": 4,
            "recurrences": len(relative),
            "train_recurrences": 2,
            "fixed_point": {"relative": relative, "converged_at": [None, 3]},
            "attention_stabilised_from": [2, 1],
            "stability": {"block_radius": 0.5, "layer_radius": [0.9, 1.1]},
            "limiting_behaviour": {
                "last_layer": {
                    "non_fixed_point_token_rate": token_rate,
                    "non_fixed_point_example_rate": example_rate,
                    "token_rates": {"fixed_point": 1 - token_rate},
                    "example_rates": {"fixed_point": 1 - example_rate},
                }
            },
        },
    }


def _write_run(directory: Path, metrics: dict[str, Any]) -> Path:
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps(metrics))
    return directory


def test_summary_reads_the_numbers_as_written(tmp_path: Path) -> None:
    run = load_run(
        _write_run(
            tmp_path / "a", _metrics([[0.5, 0.4], [0.2, 0.1], [0.05, 0.01], [0, 0]], 0.25, 0.5)
        )
    )
    s = run_summary(run)
    assert run.name == "a"
    assert s["non_fixed_point_token_rate"] == 0.25 and s["non_fixed_point_example_rate"] == 0.5
    assert s["converged_at"] == 3  # the last block layer's
    assert s["fixed_point_distance_at_train"] == 0.1  # recurrence 2, last layer
    assert s["fixed_point_distance_at_half"] == 0.1  # recurrence 4 // 2 = 2
    assert s["attention_stabilised_from"] == 1 and s["block_radius"] == 0.5
    table = summary_table([run])
    assert table.rows[0][:5] == ["a", 4, 0.25, 0.5, 3]
    cut = _metrics([[0.5, 0.4]], 0.0, 0.0) | {"truncated_prompts": [{"index": 0}, {"index": 2}]}
    cut_run = load_run(_write_run(tmp_path / "cut", cut))
    assert run_summary(cut_run)["prompts_truncated"] == 2
    assert summary_table([cut_run]).rows[0][1] == "4 (2)"


def test_compare_writes_one_entry_per_run_and_refuses_bad_input(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", _metrics([[0.5, 0.4], [0.2, 0.1]], 0.0, 0.0))
    b = _write_run(tmp_path / "b", _metrics([[0.6, 0.5], [0.3, 0.2]], 0.1, 0.5))
    paths = write_comparison([a, b], tmp_path / "out", names=["gsm8k", "hellaswag"])
    metrics = json.loads(paths.metrics_json.read_text())
    assert list(metrics["runs"]) == ["gsm8k", "hellaswag"]
    assert metrics["runs"]["hellaswag"]["non_fixed_point_example_rate"] == 0.5
    assert metrics["runs"]["gsm8k"]["fixed_point_distance_at_train"] == 0.1
    page = paths.html.read_text()
    for title in SECTIONS[:3] + SECTIONS[4:]:
        assert f">{title}</h2>" in page
    assert {p.name for p in paths.figures} >= {"compare_convergence.png", "compare_limiting.png"}
    with pytest.raises(CompareError, match="two or more"):
        write_comparison([a], tmp_path / "out2")
    with pytest.raises(CompareError, match="share the name a"):
        write_comparison([a, a], tmp_path / "out3")
    with pytest.raises(CompareError, match="not an analysed run"):
        write_comparison([a, tmp_path], tmp_path / "out4")


@pytest.fixture(scope="module")
def analysed_runs(tmp_path_factory: pytest.TempPathFactory, tiny_trace_model: Any) -> list[Path]:
    import loopscope.pipeline as lp
    from loopscope.trace.settings import TraceSettings

    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, seed in (("first", 1), ("second", 2)):
        out = root / name
        settings = TraceSettings(stability_prompts=1)
        lp.analyze(
            tiny_trace_model,
            random_prompts(2, seed),
            out,
            recurrences=6,
            settings=settings,
            progress=False,
        )
        runs.append(out)
    return runs


def test_stages_of_a_run_are_its_prompts_pooled(analysed_runs: list[Path]) -> None:
    run = load_run(analysed_runs[0])
    assert set(run.stages) >= {"residual_norm", "mixing"}
    depth, norm = run.stages["residual_norm"]
    assert depth[0] == 0.0 and depth[-1] == 1.0
    profiles = [
        json.loads((analysed_runs[0] / "trace" / f"prompt_0000{i}" / "stages.json").read_text())
        for i in range(2)
    ]
    values = np.array([p["metrics"]["residual_norm"] for p in profiles], dtype=float)
    counts = np.array([p["counts"] for p in profiles], dtype=float)
    np.testing.assert_allclose(norm, (values * counts).sum(0) / counts.sum(0))


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=CHROMIUM_TIMEOUT_S, check=False)


def test_compare_renders_in_headless_chromium(tmp_path: Path, analysed_runs: list[Path]) -> None:
    paths = write_comparison(analysed_runs, tmp_path / "compare")
    assert isinstance(load_run(analysed_runs[1]), Run)
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("no `chromium` binary on PATH (install it: apt-get install -y chromium)")
    url = paths.html.resolve().as_uri()
    shot = tmp_path / "shot.png"
    res = _chromium(binary, tmp_path / "p1", f"--screenshot={shot}", "--window-size=1280,2400", url)
    assert shot.is_file(), f"no screenshot; chromium rc={res.returncode}: {res.stderr[-2000:]!r}"
    img = np.asarray(matplotlib.image.imread(str(shot)))[..., :3]
    assert img.shape[:2] == (2400, 1280)
    differs = np.any(np.abs(img - img[5, 5]) > 0.02, axis=-1).mean()
    assert differs > 0.02, f"only {differs:.1%} of pixels differ from the background"

    res = _chromium(binary, tmp_path / "p2", "--dump-dom", url)
    dom = res.stdout.decode("utf-8")
    assert res.returncode == 0, f"chromium --dump-dom rc={res.returncode}: {res.stderr[-2000:]!r}"
    for title in SECTIONS:
        assert f">{title}</h2>" in dom
    assert dom.count("<img") == 5  # one overlaid figure per measurement
    assert ">first</th>" in dom and ">second</th>" in dom
