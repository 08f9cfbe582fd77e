"""``loopscope demo``: the whole pipeline on the bundled models and prompts, offline.

It traces the looped model on the bundled problems far past its training depth, compares its
stages of inference with its feedforward twin, and writes one report (``report.html``,
``figures/``, ``metrics.json``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from loopscope.analysis.report_parts import Cell
from loopscope.engine.contract import LoopedLM
from loopscope.report.html import Section, Table, format_cell
from loopscope.trace.settings import PromptInput, TraceSettings
from loopscope.trace.store import TraceStore
from loopscope.training.held_out import NEAR_BEST, RecurrenceGain, recurrence_gains

DEMO_PROMPTS = "demo.jsonl"
#: The accuracy curve's problems (every bundled one; 4 with ``--quick``) and recurrence counts:
#: decoded together with the KV cache they add about 13 s to the demo on one CPU thread.
ACCURACY_PROBLEMS = 16
QUICK_ACCURACY_PROBLEMS = 4
ACCURACY_RECURRENCES = (1, 2, 4, 8, 16)
#: The system-prompt variants traced side by side over the same few problems, fewer and
#: shallower than the main trace and without attention maps (the long persona's prompts of
#: several hundred tokens would store 0.5 GB of them; the main trace shows attention), so that
#: the four traces stay a small part of the demo.
DEMO_VARIANTS = "none,long-persona,long-persona-padded,short-math"
VARIANT_PROBLEMS = 3
QUICK_VARIANT_PROBLEMS = 2
VARIANT_RECURRENCES = 24


def bundled_prompts_path() -> Path:
    return Path(str(resources.files("loopscope") / "assets" / "prompts" / DEMO_PROMPTS))


def _cards(names: list[str]) -> list[dict[str, Any]]:
    """The bundled models' cards (``card.json``, written by ``loopscope export``)."""
    from loopscope.families.checkpoint import bundled_model_dir

    cards = []
    for name in names:
        card_path = bundled_model_dir(name) / "card.json"
        cards.append(json.loads(card_path.read_text()) if card_path.exists() else {"name": name})
    return cards


def _models_table(cards: list[dict[str, Any]]) -> Table:
    """What the bundled models are and how well they do, from their model cards (measured on
    held-out problems when they were exported)."""
    columns = [
        "model",
        "layout",
        "parameters",
        "training steps",
        "held-out loss",
        "held-out accuracy",
        "± s.e.",
        "problems",
        "bytes on disk",
    ]
    keys = ["name", "layout", "parameters", "steps", "held_out_loss", "held_out_accuracy"]
    keys += ["held_out_accuracy_se", "held_out_problems", "size_bytes"]
    return Table(
        "Bundled models (from their model cards)",
        columns,
        [[card.get(k) for k in keys] for card in cards],
        note="Accuracy: exact final answer by greedy decoding on held-out synthetic problems "
        "(never trained on), at the training recurrence count; ± one binomial standard error.",
    )


def held_out_section(looped: dict[str, Any], feedforward: dict[str, Any]) -> Section:
    """What the looped model buys with test-time recurrences, from the cards: its held-out
    accuracy against recurrences beside the feedforward twin's, overall and by difficulty."""
    from loopscope.report.html import Figure
    from loopscope.training.held_out import plot_held_out

    by_steps = looped.get("accuracy_vs_recurrences_by_steps")
    if not by_steps:
        return Section("Test-time recurrences", text="The looped model's card has no curve.")
    counts = list(looped["accuracy_vs_recurrences"])
    rows = [
        [f"{steps}-step", *(curve[r]["accuracy"] for r in counts), curve[counts[0]]["problems"]]
        for steps, curve in by_steps.items()
    ]
    overall = looped["accuracy_vs_recurrences"]
    rows.append(["all", *(overall[r]["accuracy"] for r in counts), looped["held_out_problems"]])
    table = Table(
        f"Held-out accuracy of {looped['name']} against test-time recurrences",
        ["problems", *(f"R={r}" for r in counts), "count"],
        rows,
        note=f"{feedforward['name']} (feedforward, {feedforward.get('parameters')} parameters): "
        f"{feedforward.get('held_out_accuracy')} ± {feedforward.get('held_out_accuracy_se')} on "
        "the same problems.",
    )
    sampled = looped.get("recurrence_sampling", "constant") != "constant"
    trained = (
        f"with recurrence counts sampled around {looped.get('train_recurrences')}"
        if sampled
        else f"at a constant {looped.get('train_recurrences')} recurrences"
    )
    text = (
        f"Measured when the models were exported (`loopscope export`, {looped['held_out_problems']}"
        " held-out problems, greedy decoding with the per-recurrence key/value cache). The "
        f"looped model ({looped.get('parameters')} parameters) was trained {trained}; the left "
        "panel shows its accuracy at each test-time count beside its feedforward twin's, the "
        "right panel the same curve per problem difficulty (calculation steps). "
        + gains_sentence(recurrence_gains(looped))
    )
    figure = Figure(
        "held_out_accuracy_vs_recurrences",
        "Held-out accuracy against test-time recurrences (±1 s.e.); the orange band is the "
        "feedforward twin.",
        plot_held_out(looped, twin=feedforward),
    )
    return Section(
        "Test-time recurrences", text=text, tables=[table, gains_table(looped)], figures=[figure]
    )


def gains_table(card: dict[str, Any]) -> Table:
    """What extra recurrences buy each difficulty (:func:`recurrence_gains`), as a table."""
    trained = card["train_recurrences"]
    rows: list[list[Cell]] = [
        [g.problems, g.best, g.best_at, g.near_best_from, g.late_gain, g.past_training]
        for g in recurrence_gains(card)
    ]
    return Table(
        "What extra test-time recurrences buy, by difficulty",
        [
            "problems",
            "best accuracy",
            "at R",
            f"R reaching {NEAR_BEST:.0%} of best",
            f"gain over the second half of R={trained}",
            f"best past R={trained} minus R={trained}",
        ],
        rows,
        note="Gains are differences of exact-answer accuracy on the card's held-out problems "
        "(each accuracy ± its binomial standard error in the table above).",
    )


def gains_sentence(gains: Sequence[RecurrenceGain]) -> str:
    """One sentence comparing how many recurrences each difficulty needs, from the numbers."""
    per_difficulty = [g for g in gains if g.problems != "all" and g.near_best_from is not None]
    if len(per_difficulty) < 2:
        return ""
    parts = ", ".join(f"{g.problems} problems from R={g.near_best_from}" for g in per_difficulty)
    return f"Each difficulty reaches {NEAR_BEST:.0%} of its best accuracy: {parts}."


def print_table(table: Table) -> None:
    """Plain-text rendering of a report table for the terminal."""
    cells = [table.columns] + [[format_cell(c) for c in row] for row in table.rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(table.columns))]
    print(table.title)
    for n, row in enumerate(cells):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def run_demo(
    out_dir: Path,
    *,
    recurrences: int = 64,
    quick: bool = False,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    loader: Callable[[str], LoopedLM] | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str | Any = None,
) -> int:
    """Run the demo into ``out_dir``; returns a process exit code.

    ``limit`` traces fewer of the bundled problems (8, or 4 with ``quick``); ``seed`` seeds
    torch and any random initial state; ``loader`` loads the two bundled models by name
    (default :func:`loopscope.load`; the command line passes its device and dtype);
    ``batch_size`` prompts are traced per forward pass. Without a ``loader``, ``device`` and
    ``dtype`` say where the models load (defaults as :func:`loopscope.pipeline.trace`)."""
    import loopscope
    from loopscope.pipeline import prompt_inputs, report, trace

    start = time.perf_counter()
    torch.manual_seed(seed)
    load = loader or loopscope.load
    if loader is None and (device is not None or dtype is not None):
        from loopscope.pipeline import load_keywords

        def load(name: str) -> LoopedLM:
            model: LoopedLM = loopscope.load(name, **load_keywords(name, None, device, dtype))
            return model

    looped = load("demo")
    feedforward = load("demo-feedforward")
    n_prompts = 4 if quick else 8
    if limit is not None:
        n_prompts = min(n_prompts, limit)
    recurrences = min(recurrences, 32) if quick else recurrences
    prompts = prompt_inputs(bundled_prompts_path(), limit=n_prompts)
    print(
        f"loopscope demo: {looped.meta.name} {looped.meta.layout} and its twin "
        f"{feedforward.meta.name}; {len(prompts)} bundled problems, {recurrences} recurrences"
    )

    cards = _cards(["demo-looped", "demo-feedforward"])
    models = _models_table(cards)
    print_table(models)
    recurrence_section = held_out_section(*cards)
    settings = TraceSettings(
        recurrences=recurrences, seed=seed, stability_prompts=1, stability_iters=20
    )
    store = trace(
        looped, prompts, out_dir / "trace", settings, progress=progress, batch_size=batch_size
    )
    stage_sections, stage_metrics = _stages(store, feedforward, prompts, seed)
    n_accuracy = QUICK_ACCURACY_PROBLEMS if quick else ACCURACY_PROBLEMS
    n_accuracy = n_accuracy if limit is None else min(n_accuracy, limit)
    accuracy_section, accuracy_metrics = accuracy_curve(looped, recurrences, seed, n_accuracy)
    print_table(accuracy_section.tables[0])
    variant_sections, variant_metrics = system_prompt_variants(
        looped,
        out_dir / "variants",
        seed,
        min(n_prompts, QUICK_VARIANT_PROBLEMS if quick else VARIANT_PROBLEMS),
        progress,
    )
    print_table(variant_sections[0].tables[0])
    paths = report(
        store.path,
        out_dir,
        extra_sections=[
            Section("Bundled models", tables=[models]),
            recurrence_section,
            *stage_sections,
            accuracy_section,
            *variant_sections,
        ],
        extra_metrics={
            "bundled_models": models.rows,
            "held_out_vs_recurrences": recurrence_section.tables[0].rows
            if recurrence_section.tables
            else [],
            "recurrence_gains_by_difficulty": [asdict(g) for g in recurrence_gains(cards[0])],
            "stages": stage_metrics,
            "accuracy_vs_recurrences": accuracy_metrics,
            "system_prompt_variants": variant_metrics,
        },
        title="loopscope demo — bundled looped model",
    )
    from loopscope.report.trace_report import analyse_dynamics

    print_table(analyse_dynamics(store).verdict)
    print(f"report: {paths.html}\nmetrics: {paths.metrics_json}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


def system_prompt_variants(
    model: LoopedLM, out: Path, seed: int, n_prompts: int, progress: bool
) -> tuple[list[Section], dict[str, Any]]:
    """The same bundled problems traced under each of :data:`DEMO_VARIANTS` (each with its own
    trace and report under ``out/<variant>/``), as one table and the overlaid figures."""
    from loopscope.data.prompt_format import PromptProtocol
    from loopscope.data.system_prompts import parse_variants
    from loopscope.pipeline import report, trace
    from loopscope.report.compare import (
        comparison_sections,
        load_run,
        run_summary,
        summary_table,
    )

    settings = TraceSettings(
        recurrences=VARIANT_RECURRENCES,
        seed=seed,
        stability_prompts=1,
        stability_iters=20,
        capture="full",
        attention=False,
    )
    directories = []
    for system in parse_variants(DEMO_VARIANTS):
        directory = out / system.name
        protocol = PromptProtocol(format="raw", system=system, seed=seed)
        trace(
            model,
            bundled_prompts_path(),
            directory / "trace",
            settings,
            limit=n_prompts,
            progress=progress,
            protocol=protocol,
            long_prompts="truncate",
        )
        report(directory / "trace", directory)
        directories.append(directory)
    runs = [load_run(d, d.name) for d in directories]
    table = summary_table(runs, "System-prompt variants side by side")
    figures = [f for section in comparison_sections(runs) for f in section.figures]
    text = (
        f"The first {n_prompts} bundled problems traced for {VARIANT_RECURRENCES} recurrences "
        "under each system prompt, laid out as system prompt, blank line, question (this "
        "byte-level model has no chat template). A prompt longer than the model's context of "
        f"{model.meta.context_length} bytes would keep only its last bytes (--long-prompts "
        "truncate): the persona's end and the question. Each variant's own report is in "
        "variants/<name>/report.html."
    )
    metrics = {r.name: {**run_summary(r), "report": f"variants/{r.name}/report.html"} for r in runs}
    return [Section("System-prompt variants", text, tables=[table], figures=figures)], metrics


def accuracy_curve(
    looped: LoopedLM, max_recurrences: int, seed: int, n_problems: int = ACCURACY_PROBLEMS
) -> tuple[Section, dict[str, Any]]:
    """Exact-answer accuracy of the bundled looped model against recurrences on the first
    ``n_problems`` bundled problems, as ``loopscope evaluate`` computes it (greedy
    decoding with the per-recurrence key/value cache). The metrics leave out the wall time,
    so that two runs of the demo write the same ``metrics.json``."""
    from loopscope.data import load_gsm8k_jsonl
    from loopscope.report.html import Figure
    from loopscope.studies.evaluate import byte_codec, evaluate_accuracy, plot_accuracy

    problems = load_gsm8k_jsonl(bundled_prompts_path())[:n_problems]
    counts = [r for r in ACCURACY_RECURRENCES if r <= max_recurrences] or [max_recurrences]
    result = evaluate_accuracy(
        looped, problems, byte_codec(), counts, seed=seed, batch_size=len(problems)
    )
    metrics = {k: v for k, v in result.to_metrics().items() if k != "seconds"}
    text = (
        f"The bundled looped model answers the first {len(problems)} bundled problems by "
        f"greedy decoding at each recurrence count (trained at {result.train_recurrences}), "
        "exactly as `loopscope evaluate` does: the answer is the number after '####' (else "
        "the last number) and must equal the reference's. These few problems make a noisy "
        "curve, computed live; the section 'Test-time recurrences' above measures the same on "
        "the model card's held-out problems. Run `loopscope evaluate demo --prompts "
        "PROBLEMS.jsonl` for more problems and recurrences."
    )
    figure = Figure(
        "accuracy_vs_recurrences",
        "Exact-answer accuracy against recurrences; the dashed line is the training count.",
        plot_accuracy(result),
    )
    section = Section(
        "Accuracy against recurrences", text=text, tables=[result.table()], figures=[figure]
    )
    return section, metrics


def _stages(
    store: TraceStore, feedforward: LoopedLM, prompts: list[PromptInput], seed: int
) -> tuple[list[Section], dict[str, Any]]:
    """Stages of inference of the looped trace against the feedforward twin."""
    from loopscope.studies.stages import (
        pooled_profile_from_trace,
        stages_profile,
        stages_sections,
    )

    looped_profile = pooled_profile_from_trace(store)
    reference = stages_profile(feedforward, prompts, seed=seed, progress=False)
    return stages_sections(looped_profile, reference)
