"""The bundled demo runs end to end offline and reports what the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import loopscope
from loopscope.cli.main import main
from loopscope.families.checkpoint import bundled_model_dir


def test_bundled_models_load_and_carry_their_model_cards() -> None:
    for name in ("demo-looped", "demo-feedforward"):
        card = json.loads((bundled_model_dir(name) / "card.json").read_text())
        assert card["command"].startswith("loopscope train --config " + name)
        assert 0.0 <= card["held_out_accuracy"] <= 1.0 and card["held_out_problems"] >= 256
        se = (card["held_out_accuracy"] * (1 - card["held_out_accuracy"]) / 256) ** 0.5
        assert card["held_out_accuracy_se"] == pytest.approx(se)
        assert card["context_length"] >= 1024 and card["train_seconds"] > 0
        assert (bundled_model_dir(name) / "model.safetensors").stat().st_size < 5_000_000
        assert (bundled_model_dir(name) / "accuracy_vs_recurrences.png").is_file()
    looped = loopscope.load("demo")
    assert looped.meta.layout == "(2, 4⊗l, 2)"
    assert loopscope.load("demo-feedforward").meta.train_recurrences == 1


def test_quick_demo_writes_the_full_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Verdict per block layer" in printed and "block layer 3" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dynamics"]["prompts"] == 4
    stages = metrics["stages"]
    assert stages["alignment"], "the stage-alignment score against the feedforward twin"
    accuracy = metrics["accuracy_vs_recurrences"]
    assert list(accuracy["accuracy"]) == ["1", "2", "4", "8", "16"]
    assert accuracy["problems"] == 4 and accuracy["kv_cache"] is True
    assert all(0.0 <= value <= 1.0 for value in accuracy["accuracy"].values())
    assert "seconds" not in accuracy, "metrics.json stays the same from run to run"
    for suffix in ("png", "svg"):
        assert (tmp_path / "figures" / f"accuracy_vs_recurrences.{suffix}").stat().st_size > 0
    variants = metrics["system_prompt_variants"]
    assert list(variants) == ["none", "long-persona", "long-persona-padded", "short-math"]
    for name, summary in variants.items():
        assert (tmp_path / summary["report"]).is_file(), name
        assert json.loads((tmp_path / "variants" / name / "metrics.json").read_text())
    padded = (tmp_path / "variants" / "long-persona-padded" / "trace" / "trace.json").read_text()
    assert json.loads(padded)["protocol"]["system"]["name"] == "long-persona-padded"
    html = (tmp_path / "report.html").read_text()
    for heading in (
        "System-prompt variants",
        "Successive differences",
        "Approximate fixed point",
        "Cycles and degeneracy",
        "Attention stabilisation",
        "Latent trajectory",
        "Limiting behaviour",
        "Stability certificate",
        "Stages of inference",
        "Accuracy against recurrences",
        "Test-time recurrences",
    ):
        assert heading in html, heading
    assert (tmp_path / "figures" / "held_out_accuracy_vs_recurrences.png").stat().st_size > 0
    held_out = metrics["held_out_vs_recurrences"]
    assert [row[0] for row in held_out] == ["1-step", "2-step", "all"]
    assert all(0.0 <= value <= 1.0 for row in held_out for value in row[1:-1])
    gains = metrics["recurrence_gains_by_difficulty"]
    assert [g["problems"] for g in gains] == ["1-step", "2-step", "all"]
    assert "What extra test-time recurrences buy, by difficulty" in html
