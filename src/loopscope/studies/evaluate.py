"""Exact-answer accuracy against recurrences: the test-time-compute curve of a looped model.

Each problem is asked in the one prompt layout our models are trained on,
``"Q: <question>\\nA:"`` (:func:`loopscope.data.format_prompt`), and answered by greedy
decoding at every recurrence count asked for (:func:`loopscope.engine.generation.
generate_greedy`, with the per-recurrence key/value cache unless told otherwise), up to the end
of sequence token or ``max_new_tokens``.

How answers are read (the same parsing as the held-out accuracy that training reports,
``loopscope.training.evaluation``): the bundled models write a worked answer, one step a line,
ending with ``#### N`` as GSM8K does. :func:`loopscope.data.parse_model_answer` cuts the
generation at the first ``"\\nQ:"`` (a model that misses its end token starts a new example),
takes the number after ``####``, or else the last number in the text, drops thousands commas
and a zero fraction, and the answer is correct when that string equals the reference's
``#### N`` number (:func:`loopscope.data.extract_final_answer`). No number counts as wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loopscope.analysis.report_parts import Table
from loopscope.data import GSM8KExample, format_prompt, parse_model_answer
from loopscope.engine.contract import LoopedLM
from loopscope.engine.generation import check_kv_cache, generate_at_recurrences

__all__ = [
    "AnswerCodec",
    "EvaluationResult",
    "ProblemAnswer",
    "byte_codec",
    "codec_for",
    "evaluate_accuracy",
    "judge_answer",
    "plot_accuracy",
    "write_evaluation",
]

#: What ``loopscope evaluate`` writes into its output directory.
OUTPUT_FILES = ("metrics.json", "accuracy.md", "answers.jsonl", "accuracy.png", "accuracy.svg")


@dataclass(frozen=True)
class AnswerCodec:
    """How a model reads a prompt and writes an answer: prompt text → ids (with BOS when the
    model expects one), ids → text, and the token that ends an answer."""

    name: str
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    stop_id: int | None


def byte_codec() -> AnswerCodec:
    """Our byte-level models' codec: BOS first, the answer ends at EOS."""
    from loopscope.data import ByteTokenizer

    tokenizer = ByteTokenizer()
    return AnswerCodec(
        "byte", lambda text: tokenizer.encode(text, bos=True), tokenizer.decode, tokenizer.eos_id
    )


def codec_for(source: str | Path) -> AnswerCodec:
    """The codec of ``source`` (anything ``loopscope.load`` accepts): the byte codec for our
    models, else the checkpoint's own tokenizer (local files, no remote code), ending at its
    end-of-sequence token."""
    from loopscope.families.table import family_of, resolve_directory

    directory = resolve_directory(source)
    if family_of(directory).tokenizer == "byte":
        return byte_codec()
    from loopscope.core.errors import CheckpointError
    from loopscope.families.hub import auto_tokenizer
    from loopscope.families.tokenizers import TOKENIZER_FILES

    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) to write "
            "answers with; copy the model's tokenizer next to its weights"
        )
    tokenizer = auto_tokenizer(directory)
    return AnswerCodec(
        f"{type(tokenizer).__name__}:{directory.name}",
        lambda text: list(tokenizer(text)["input_ids"]),
        lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
        tokenizer.eos_token_id,
    )


def judge_answer(generated: str, reference: str) -> tuple[str | None, bool]:
    """The answer parsed from a generation and whether it is exactly the reference's
    ``#### N`` number (see the module docstring)."""
    parsed = parse_model_answer(generated)
    return parsed, parsed == reference


@dataclass(frozen=True)
class ProblemAnswer:
    """One problem answered at one recurrence count."""

    problem: int
    recurrences: int
    reference: str
    generated: str
    parsed: str | None
    correct: bool
    new_tokens: int


@dataclass(frozen=True)
class EvaluationResult:
    """Every answer of one evaluation, with what fixed it and how long it took."""

    model_name: str
    recurrences: list[int]
    train_recurrences: int
    answers: list[ProblemAnswer]
    n_problems: int
    max_new_tokens: int
    kv_cache: bool
    seconds: float

    def accuracy(self, recurrences: int) -> float:
        """Fraction of problems answered exactly at ``recurrences``."""
        hits = [a.correct for a in self.answers if a.recurrences == recurrences]
        return sum(hits) / max(len(hits), 1)

    def table(self) -> Table:
        rows: list[list[Any]] = []
        for r in self.recurrences:
            hits = sum(a.correct for a in self.answers if a.recurrences == r)
            rows.append([r, hits, self.n_problems, self.accuracy(r)])
        return Table(
            f"Exact-answer accuracy against recurrences ({self.model_name}, trained at "
            f"{self.train_recurrences})",
            ["recurrences", "correct", "problems", "accuracy"],
            rows,
            note="Greedy decoding; the answer is the number after '####', else the last "
            "number, compared with the reference's '#### N'.",
        )

    def to_metrics(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "train_recurrences": self.train_recurrences,
            "problems": self.n_problems,
            "max_new_tokens": self.max_new_tokens,
            "kv_cache": self.kv_cache,
            "seconds": self.seconds,
            "accuracy": {str(r): self.accuracy(r) for r in self.recurrences},
        }

    def to_markdown(self) -> str:
        table = self.table()
        lines = [f"# {table.title}", "", "| " + " | ".join(table.columns) + " |"]
        lines.append("|" + "---|" * len(table.columns))
        for r, hits, n, acc in table.rows:
            lines.append(f"| {r} | {hits} | {n} | {acc:.3f} |")
        return "\n".join(lines) + "\n"


def evaluate_accuracy(
    model: LoopedLM,
    problems: Sequence[GSM8KExample],
    codec: AnswerCodec,
    recurrences: Sequence[int],
    *,
    max_new_tokens: int = 96,
    kv_cache: bool = True,
    seed: int = 0,
    progress: bool = False,
    batch_size: int = 1,
) -> EvaluationResult:
    """Answer every problem greedily at every recurrence count, ``batch_size`` problems decoded
    together (:func:`loopscope.engine.generation.generate_greedy_batch`: the same answers as
    one at a time); see the module docstring for the prompt layout and how answers are read."""
    if kv_cache:  # refused before any problem is decoded, naming --no-kv-cache
        check_kv_cache(model, seed=seed)
    prompts = [codec.encode(format_prompt(p.question)) for p in problems]
    answers: list[ProblemAnswer] = []
    start = time.perf_counter()
    generated = generate_at_recurrences(
        model,
        prompts,
        recurrences,
        batch_size=batch_size,
        desc="evaluate",
        progress=progress,
        max_new_tokens=max_new_tokens,
        stop_id=codec.stop_id,
        kv_cache=kv_cache,
        seed=seed,
    )
    for r, i, out in generated:
        text = codec.decode(out.tokens)
        reference = problems[i].final_answer
        parsed, correct = judge_answer(text, reference)
        answers.append(ProblemAnswer(i, r, reference, text, parsed, correct, len(out.tokens)))
    return EvaluationResult(
        model_name=model.meta.name or model.meta.family,
        recurrences=list(recurrences),
        train_recurrences=model.meta.train_recurrences,
        answers=answers,
        n_problems=len(problems),
        max_new_tokens=max_new_tokens,
        kv_cache=kv_cache,
        seconds=time.perf_counter() - start,
    )


def plot_accuracy(result: EvaluationResult) -> Figure:
    """Accuracy against recurrences (log-2 axis), the training count marked."""
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.recurrences, [result.accuracy(r) for r in result.recurrences], marker="o")
    ax.axvline(result.train_recurrences, color="tab:gray", linestyle="--", label="trained")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("recurrences")
    ax.set_ylabel("exact-answer accuracy")
    ax.set_title(
        f"Accuracy against recurrences ({result.model_name}, {result.n_problems} problems)"
    )
    ax.legend(fontsize="small")
    return fig


def write_evaluation(result: EvaluationResult, out_dir: str | Path) -> list[Path]:
    """Write :data:`OUTPUT_FILES` into ``out_dir``, each atomically; returns their paths."""
    import json

    from loopscope.core.atomic import write_json, write_text, write_with

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in OUTPUT_FILES]
    write_json(paths[0], result.to_metrics())
    write_text(paths[1], result.to_markdown())
    write_text(paths[2], "".join(json.dumps(asdict(a)) + "\n" for a in result.answers))
    figure = plot_accuracy(result)
    write_with(paths[3], lambda name: figure.savefig(name, dpi=120, format="png"))
    write_with(paths[4], lambda name: figure.savefig(name, format="svg"))
    return paths
