"""The stages pipeline on tiny random LoopLMs: streaming profile vs captured states and closed
forms, trace pooling, neuron classes per layer, report sections, run_stages and the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import forward_depth, forward_tolerance, rounding_tolerance, widest_sum

from loopscope.analysis.stages import (
    ATTENTION_METRICS,
    METRICS,
    StagesProfile,
    colsum_concentration,
    massive_ratio,
    matrix_entropy,
    mixing_score,
    neuron_classes,
    residual_norm,
    sink_rate,
    sink_scores,
)
from loopscope.cli.main import main
from loopscope.engine.interventions import InterventionSpec
from loopscope.engine.probes import CaptureProbe
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.report import to_jsonable
from loopscope.studies.stages import (
    compare_intervention,
    neuron_classes_per_layer,
    pool_profiles,
    pooled_profile_from_trace,
    run_stages,
    stages_profile,
    stages_sections,
)
from loopscope.trace.settings import PromptInput, TraceSettings
from loopscope.trace.writer import trace_prompts
from loopscope.training.checkpoints import save_checkpoint
from loopscope.training.config import TrainConfig

R = 3
LENGTHS = (5, 9, 12)


def looped_model(seed: int = 0) -> LoopLM:
    cfg = LoopConfig(
        name="tiny-looped",
        d_model=16,
        n_heads=2,
        prelude_layers=1,
        block_layers=2,
        coda_layers=1,
        train_recurrences=R,
        mlp_ratio=2.0,
        context_length=32,
        init_seed=seed,
    )
    model = LoopLM(cfg).eval()
    with torch.no_grad():  # larger weights: attention far from uniform, stages differ
        gen = torch.Generator().manual_seed(seed + 10)
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def feedforward_model() -> LoopLM:
    cfg = LoopConfig(
        name="tiny-ff",
        d_model=16,
        n_heads=2,
        prelude_layers=0,
        block_layers=4,
        coda_layers=0,
        train_recurrences=1,
        injection="none",
        init_state="prelude",
        mlp_ratio=2.0,
        context_length=32,
        init_seed=5,
    )
    return LoopLM(cfg).eval()


def prompts() -> list[PromptInput]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, 259, (n,), generator=gen).tolist()
        out.append(PromptInput(text=f"prompt of {n} tokens", ids=ids))
    return out


@pytest.fixture(scope="module")
def model() -> LoopLM:
    return looped_model()


@pytest.fixture(scope="module")
def profile(model: LoopLM) -> StagesProfile:
    return stages_profile(model, prompts(), recurrences=R, progress=False)


def test_streaming_matches_captured_states(model: LoopLM, profile: StagesProfile) -> None:
    sums: dict[str, dict[str, float]] = {}
    for p in prompts():
        cap = CaptureProbe(attention=True)
        with torch.no_grad():
            model(torch.tensor([p.ids]), recurrences=R, probes=[cap], return_attn=True)
        for site, rows in cap.states.items():
            h = rows[0]  # the one prompt's (T, D)
            vals = {
                "matrix_entropy": matrix_entropy(h),
                "residual_norm": residual_norm(h),
                "massive_ratio": massive_ratio(h),
            }
            if site in cap.attn:  # CaptureProbe keeps attention of block sites
                a = cap.attn[site][0]  # (H, T, T)
                vals |= {
                    "colsum_concentration": colsum_concentration(a).mean(),
                    "sink_rate": sink_rate(a, 0.3),
                    "sink_score": sink_scores(a)[:, 0].mean(),
                    "mixing": mixing_score(a).mean(),
                }
            acc = sums.setdefault(site.name, {})
            for k, v in vals.items():
                acc[k] = acc.get(k, 0.0) + float(v) / len(LENGTHS)
    names = [s.name for s in profile.sites]
    assert sorted(names) == sorted(sums)
    assert len(names) == 1 + 2 * R + 1
    # two forward passes of the same prompt (relative rounding of the states) and a metric
    # summing over a prompt's T×D entries
    passes = forward_tolerance(torch.float32, 1.0, forward_depth(model.meta, R), widest_sum(model))
    tol = passes + rounding_tolerance(torch.float32, 1.0, max(LENGTHS) * model.meta.d_model)
    for i, name in enumerate(names):
        for m, expected in sums[name].items():
            assert profile.metrics[m][i] == pytest.approx(expected, rel=tol, abs=tol), (name, m)
    assert (profile.counts == len(LENGTHS)).all()
    assert profile.meta["n_prompts"] == len(LENGTHS) and profile.meta["recurrences"] == R


def test_uniform_attention_closed_forms() -> None:
    """Zero q/k projections make every head's attention uniform over the causal prefix, whose
    metrics have closed forms, at every site of the real engine."""
    model = looped_model()
    with torch.no_grad():
        for layer in [*model.prelude_stack, *model.block_stack, *model.coda_stack]:
            layer.attn.qkv.weight[: 2 * 16].zero_()
    prof = stages_profile(model, prompts(), recurrences=R, progress=False)

    def closed(t: int) -> dict[str, float]:
        harmonic = sum(1.0 / (i + 1) for i in range(t))
        col = np.array([sum(1.0 / (i + 1) for i in range(j, t)) / t for j in range(t)])
        return {
            "mixing": float(np.mean([math.log(i + 1) for i in range(t)])),
            "sink_score": harmonic / t,
            "sink_rate": float(harmonic / t >= 0.3),
            "colsum_concentration": 1.0 + float((col * np.log(col)).sum()) / math.log(t),
        }

    expected = {m: np.mean([closed(t)[m] for t in LENGTHS]) for m in ATTENTION_METRICS}
    # uniform weights 1/(i+1) (one rounding), then sums of T terms and an entropy over them
    tol = forward_tolerance(torch.float32, 1.0, 2, max(LENGTHS))
    for m, value in expected.items():
        np.testing.assert_allclose(prof.metrics[m], value, rtol=tol, err_msg=m)


def test_pooled_trace_profile_equals_streaming(
    model: LoopLM, profile: StagesProfile, tmp_path: Path
) -> None:
    settings = TraceSettings(recurrences=R, stability_prompts=0, attention=True)
    store = trace_prompts(model, prompts(), tmp_path / "trace", settings, progress=False)
    pooled = pooled_profile_from_trace(store)
    assert [s.name for s in pooled.sites] == [s.name for s in profile.sites]
    for m in METRICS:
        # the same float32 states and metrics, pooled over the prompts in float64
        mean = rounding_tolerance(np.float64, 1.0, len(LENGTHS))
        np.testing.assert_allclose(pooled.metrics[m], profile.metrics[m], rtol=mean, err_msg=m)
    assert (pooled.counts == profile.counts).all()
    assert pooled.meta["n_prompts"] == len(LENGTHS)


def test_pool_profiles_weights_and_nans() -> None:
    base = stages_profile(looped_model(), prompts()[:1], recurrences=R, progress=False)
    a = copy.deepcopy(base)
    b = copy.deepcopy(base)
    b.counts = b.counts * 3
    b.metrics["mixing"] = b.metrics["mixing"] + 4.0
    b.metrics["sink_rate"][:] = np.nan  # not observed: left out, not averaged as zero
    pooled = pool_profiles([a, b])
    np.testing.assert_allclose(pooled.metrics["mixing"], base.metrics["mixing"] + 3.0)
    np.testing.assert_allclose(pooled.metrics["sink_rate"], base.metrics["sink_rate"])
    assert (pooled.counts == 4).all()
    other = stages_profile(looped_model(), prompts()[:1], recurrences=2, progress=False)
    with pytest.raises(ValueError, match="other sites"):
        pool_profiles([a, other])


def test_neuron_classes_per_layer(model: LoopLM) -> None:
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.final_norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    classes = neuron_classes_per_layer(m)
    assert list(classes) == ["prelude.0", "block.0", "block.1", "coda.0"]
    direct = neuron_classes(
        m.block_stack[1].mlp.down.weight, m.unembedding(), final_norm_weight=m.final_norm.weight
    )
    np.testing.assert_allclose(classes["block.1"].kurtosis, direct.kurtosis)
    assert len(classes["coda.0"].skew) == 32  # F = mlp_ratio · d_model
    # A layer without an MLP output projection is skipped with a note, not a crash.
    m.block_stack[0].mlp = torch.nn.Identity()
    notes: list[str] = []
    classes = neuron_classes_per_layer(m, notes=notes)
    assert "block.0" not in classes and len(classes) == 3
    assert "block.0" in notes[0]


def test_stages_sections_and_metrics(model: LoopLM, profile: StagesProfile) -> None:
    ff = feedforward_model()
    reference = stages_profile(ff, prompts(), progress=False)
    spec = InterventionSpec("block", 1, "mlp", recurrences=[0])
    result = compare_intervention(model, prompts(), spec, progress=False)
    # "before" is the plain run: identical to the streaming profile.
    np.testing.assert_allclose(result.before.metrics["mixing"], profile.metrics["mixing"])
    assert 0.0 <= result.top1_agreement <= 1.0 and result.kl > 0.0
    sections, metrics = stages_sections(
        profile,
        reference,
        neuron_classes_per_layer(model),
        result,
        reference_neuron_classes=neuron_classes_per_layer(ff),
    )
    titles = [s.title for s in sections]
    assert titles[0] == "Stages of inference"
    assert "Stage alignment with the feedforward model" in titles
    assert titles[-1] == "Intervention: block.1.mlp@0:zero"
    figures = [f.name for s in sections for f in s.figures]
    assert figures == [
        "stages-views",
        "stages-alignment",
        "stages-neuron-classes",
        "stages-intervention",
    ]
    views = sections[0].figures[0].figure
    assert len(views.axes) == 3 * len(METRICS)  # three views per metric
    assert len(metrics["alignment"]["mixing"]) == R
    assert [a["recurrence"] for a in metrics["alignment"]["mixing"]] == list(range(R))
    assert metrics["looped"]["site_names"][1] == "block.0@r0"
    assert set(metrics["neuron_classes"]) == {"prelude.0", "block.0", "block.1", "coda.0"}
    change = metrics["intervention"]["change"]["residual_norm"]
    # Recurrence 0 of block layer 1 is the first site the intervention can change.
    diff = np.asarray(change["difference"])
    assert np.all(diff[:2] == 0.0) and diff[2] != 0.0
    text = json.dumps(to_jsonable(metrics), allow_nan=False)
    assert "pearson" in text


def test_run_stages_writes_report(model: LoopLM, tmp_path: Path) -> None:
    shown = ["mixing", "matrix_entropy", "massive_ratio"]  # fewer panels: faster rendering
    paths = run_stages(
        model,
        prompts(),
        tmp_path / "out",
        reference=feedforward_model(),
        intervention=InterventionSpec("block", 0, "attn", recurrences=[1]),
        show_metrics=shown,
        progress=False,
    )
    page = paths.html.read_text()
    assert paths.html.name == "report.html"
    for title in (
        "Stages of inference",
        "Stage alignment",
        "Prediction and suppression",
        "Intervention: block.0.attn@1:zero",
        "Largest massive-activation ratio",
    ):
        assert title in page
    saved = json.loads(paths.metrics_json.read_text())
    assert saved["recurrences"] == R
    assert set(saved["stages"]["alignment_summary"]) == set(shown)
    assert set(saved["stages"]["looped"]["metrics"]) == set(METRICS)  # numbers kept for all
    assert {p.name for p in paths.figures} >= {"stages-views.png", "stages-intervention.svg"}
    with pytest.raises(ValueError, match="unknown stage metrics"):
        run_stages(model, prompts(), tmp_path / "x", show_metrics=["entropy"], progress=False)


def test_cli_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_checkpoint(tmp_path / "looped", looped_model(), TrainConfig())
    save_checkpoint(tmp_path / "ff", feedforward_model(), TrainConfig())
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("two plus two\nthree times four is\nhello\n")
    common = ["--prompts", str(prompt_file), "--metrics", "mixing", "--no-progress"]
    code = main(
        [
            "stages",
            str(tmp_path / "looped"),
            *common,
            "--limit",
            "2",
            "--recurrences",
            "2",
            "--reference",
            str(tmp_path / "ff"),
            "--intervene",
            "block.0.attn@1",
            "coda.0.mlp:scale=0.5",
            "--out",
            str(tmp_path / "report"),
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["recurrences"] == 2
    stages = saved["stages"]
    assert stages["intervention"]["specs"] == ["block.0.attn@1:zero", "coda.0.mlp:scale=0.5"]
    assert len(stages["looped"]["sites"]) == 1 + 2 * 2 + 1
    assert len(stages["reference"]["sites"]) == 4
    assert stages["looped"]["meta"]["n_prompts"] == 2
    assert len(stages["alignment"]["mixing"]) == 2
    capsys.readouterr()
    bad = [
        "stages",
        str(tmp_path / "looped"),
        *common,
        "--intervene",
        "block.9.mlp",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(bad) == 2
    assert "2 block layers" in capsys.readouterr().err
