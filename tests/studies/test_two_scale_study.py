"""The two-scale study end to end on a tiny random hrm_text checkpoint made by transformers:
report.html with both scales, one figure each, metrics.json entries per level, rendered in
headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from hrm_checkpoints import TINY_HRM, save_reference

from loopscope.core.errors import LoopscopeError
from loopscope.families.hrm_text import load_hrm_text
from loopscope.studies.two_scale import analyze_two_scale, is_nested
from loopscope.trace.settings import PromptInput

CHROMIUM_TIMEOUT_S = 120
PROMPTS = [PromptInput("first", [3, 14, 15, 9, 26]), PromptInput("second", [5, 35, 8, 9])]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint = tmp_path_factory.mktemp("hrm_ckpt")
    save_reference(checkpoint, seed=0)
    out = tmp_path_factory.mktemp("two_scale")
    analyze_two_scale(load_hrm_text(checkpoint), PROMPTS, out, stability_iters=8)
    return out


def test_metrics_have_an_entry_per_level(report_dir: Path) -> None:
    metrics = json.loads((report_dir / "metrics.json").read_text())
    two = metrics["two_scale"]
    assert metrics["model"]["family"] == "hrm_text"
    assert two["prompts"] == 2
    assert two["trained_cycles"] == {"h": TINY_HRM["H_cycles"], "l": TINY_HRM["L_cycles"]}
    n_h, n_l = TINY_HRM["H_cycles"], TINY_HRM["L_cycles"]
    assert np.asarray(two["inner"]["relative_step"]).shape == (n_h, n_l)
    assert len(two["inner"]["spectral_radius_per_h_step"]) == n_h
    assert len(two["outer"]["relative_step"]) == n_h
    assert two["inner"]["extrapolation"]["n_after"] == n_l
    assert two["outer"]["extrapolation"]["n_after"] == n_h
    assert set(two["stacks"]) == {"L", "H"}
    assert set(two["verdict"]) == {"inner", "outer"}
    for radius in [*two["inner"]["spectral_radius_per_h_step"], two["outer"]["spectral_radius"]]:
        assert radius is not None and radius > 0


def test_report_renders_in_headless_chromium(report_dir: Path, tmp_path: Path) -> None:
    html = (report_dir / "report.html").read_text()
    assert "Two timescales" in html and html.count("<img") == 2
    for name in ("two_scale_inner", "two_scale_outer"):
        assert (report_dir / "figures" / f"{name}.png").is_file()
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("no `chromium` binary on PATH (install it: apt-get install -y chromium)")
    url = (report_dir / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    res = _chromium(binary, tmp_path / "p1", f"--screenshot={shot}", "--window-size=1280,2400", url)
    assert shot.is_file(), f"no screenshot; chromium rc={res.returncode}: {res.stderr[-2000:]!r}"
    img = np.asarray(matplotlib.image.imread(str(shot)))[..., :3]
    differs = np.any(np.abs(img - img[5, 5]) > 0.02, axis=-1).mean()
    assert differs > 0.02, f"only {differs:.1%} of pixels differ from the background"
    dom = _chromium(binary, tmp_path / "p2", "--dump-dom", url).stdout.decode("utf-8")
    assert ">Two timescales: inner (L) and outer (H) loops</h2>" in dom
    assert dom.count("<img") == 2


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=CHROMIUM_TIMEOUT_S, check=False)


def test_instruction_prompts_attend_both_ways(tmp_path: Path, report_dir: Path) -> None:
    save_reference(tmp_path / "ckpt", seed=0)
    model = load_hrm_text(tmp_path / "ckpt")
    analyze_two_scale(model, PROMPTS, tmp_path / "out", stability_iters=8, instruction_prompts=True)
    both_ways = json.loads((tmp_path / "out" / "metrics.json").read_text())["two_scale"]
    causal = json.loads((report_dir / "metrics.json").read_text())["two_scale"]
    assert both_ways["attention"] == "instruction (bidirectional)"
    assert causal["attention"] == "causal"
    assert both_ways["inner"]["relative_step"] != causal["inner"]["relative_step"]


def test_single_loop_models_and_bad_prompts_are_refused(
    tiny_trace_model: Any, tmp_path: Path
) -> None:
    assert not is_nested(tiny_trace_model)
    with pytest.raises(LoopscopeError, match="one loop"):
        analyze_two_scale(tiny_trace_model, PROMPTS, tmp_path)


def test_bad_prompts_are_refused(tmp_path: Path) -> None:
    save_reference(tmp_path / "ckpt", seed=1)
    model = load_hrm_text(tmp_path / "ckpt")
    with pytest.raises(LoopscopeError, match="no prompts"):
        analyze_two_scale(model, [], tmp_path / "out")
    too_long = [PromptInput("long", [1] * (TINY_HRM["max_position_embeddings"] + 1))]
    with pytest.raises(LoopscopeError, match="context"):
        analyze_two_scale(model, too_long, tmp_path / "out")
