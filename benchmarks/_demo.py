"""What the benchmarks measure on by default: the bundled demo model and prompts.

Imported by the benchmark scripts (run as ``python benchmarks/NAME.py``, which puts this
folder on the import path), so every script picks its model the same way."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loopscope is imported only when a model is asked for: scripts that put
    from loopscope.engine.contract import LoopedLM  # src/ on sys.path first import this early

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "src" / "loopscope" / "assets" / "prompts" / "demo.jsonl"


def demo_model(source: str | None = None, device: str = "cpu") -> tuple[LoopedLM, str]:
    """``source`` when given (anything ``loopscope.load`` accepts), else the bundled demo, else
    a fresh (seeded, deterministic) demo-looped initialisation; and a line saying which, so a
    printed ratio never hides that it came from untrained weights."""
    import loopscope
    from loopscope.families.checkpoint import bundled_model_dir

    if source is not None:
        return loopscope.load(source, device=device), source
    if (bundled_model_dir("demo") / "config.json").exists():
        return loopscope.load("demo", device=device), "bundled demo (loopscope.load('demo'))"
    from loopscope.families.looplm import LoopLM
    from loopscope.training.named_configs import get_config

    model = LoopLM(get_config("demo-looped").model).to(device).eval()
    return model, "FRESH RANDOM INIT of demo-looped (no bundled demo; pass --model DIR)"
