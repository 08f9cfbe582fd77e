"""Prompts longer than the model's context: skip them, keep their last tokens, or stop.

Real prompt sets hold a few questions longer than a small model's context (8% of the GSM8K
test questions exceed 384 bytes, a context our earlier bundled models had), and one of them
should not end a run over hundreds. ``skip`` (the default) leaves such a prompt out and lists
it with its length; ``truncate`` keeps its last tokens that fit (the question usually ends a
prompt), after the BOS token when the tokenizer prepends one, and says how many were cut;
``error`` stops with the prompt, its length, the context and the fix. The list of what was
skipped or cut goes into ``trace.json`` under ``long_prompts`` and from there into the report
and ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loopscope.analysis.report_parts import Section, Table
from loopscope.engine.loop import ContextLengthError
from loopscope.trace.settings import PromptInput, TraceError

LONG_PROMPT_MODES = ("skip", "truncate", "error")
DEFAULT_LONG_PROMPTS = "skip"
#: How much of a prompt's text a record keeps (enough to find it in the prompt file).
PREVIEW_CHARS = 80


@dataclass(frozen=True)
class LongPrompt:
    """One prompt that did not fit: its place in the prompt file, its token count, the
    context, and the tokens cut (0 for a skipped prompt)."""

    index: int
    n_tokens: int
    context: int
    cut: int
    text: str


@dataclass
class FittedPrompts:
    """The prompts to run, and the ones skipped or truncated to get there."""

    mode: str
    kept: list[PromptInput]
    skipped: list[LongPrompt] = field(default_factory=list)
    truncated: list[LongPrompt] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What ``trace.json`` keeps under ``long_prompts``."""
        return {
            "mode": self.mode,
            "skipped": [asdict(p) for p in self.skipped],
            "truncated": [asdict(p) for p in self.truncated],
        }

    def header(self) -> dict[str, Any]:
        """The ``trace.json`` entry: the record when a prompt was skipped or cut, else nothing
        (a trace of prompts that all fit is the same whichever mode was asked for)."""
        return {"long_prompts": self.record()} if self.skipped or self.truncated else {}

    def messages(self) -> list[str]:
        """One line per prompt skipped or cut, for the terminal."""
        return record_messages(self.record())


def record_messages(record: Mapping[str, Any]) -> list[str]:
    """The terminal lines of a ``long_prompts`` record (as :meth:`FittedPrompts.record`)."""
    lines = [
        f"skipped prompt {p['index']}: {p['n_tokens']} tokens > the model's context of "
        f"{p['context']} (--long-prompts truncate keeps its last tokens instead)"
        for p in record.get("skipped", [])
    ]
    lines += [
        f"truncated prompt {p['index']}: cut its first {p['cut']} of {p['n_tokens']} tokens to "
        f"fit the model's context of {p['context']}"
        for p in record.get("truncated", [])
    ]
    return lines


def check_mode(mode: str) -> str:
    if mode not in LONG_PROMPT_MODES:
        raise TraceError(
            f"long_prompts must be one of {', '.join(LONG_PROMPT_MODES)}, got {mode!r}"
        )
    return mode


def too_long_error(index: int, n_tokens: int, context: int) -> ContextLengthError:
    """Today's refusal of a prompt that does not fit, naming the ways out."""
    return ContextLengthError(
        f"prompt {index} has {n_tokens} tokens but the model's context is {context}; shorten "
        "it or remove it from the prompt file, or pass --long-prompts skip (leave it out) or "
        "--long-prompts truncate (keep its last tokens)"
    )


def last_tokens(ids: Sequence[int], context: int, *, bos: bool) -> list[int]:
    """The last ``context`` tokens of ``ids``; with ``bos`` the first token (the BOS the
    tokenizer prepended) stays first and the last ``context - 1`` follow it."""
    if len(ids) <= context:
        return list(ids)
    if bos and context > 1:
        return [ids[0], *ids[len(ids) - context + 1 :]]
    return list(ids[len(ids) - context :])


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"


def fit_to_context(
    prompts: Sequence[PromptInput], context: int, mode: str = DEFAULT_LONG_PROMPTS, *, bos: bool
) -> FittedPrompts:
    """Apply ``mode`` to every prompt longer than ``context`` tokens (see the module doc).
    Refuses a prompt set in which nothing is left to run."""
    check_mode(mode)
    fitted = FittedPrompts(mode, [])
    for index, prompt in enumerate(prompts):
        n = len(prompt.ids)
        if n <= context:
            fitted.kept.append(prompt)
            continue
        if mode == "error":
            raise too_long_error(index, n, context)
        if mode == "skip":
            fitted.skipped.append(LongPrompt(index, n, context, 0, _preview(prompt.text)))
            continue
        ids = last_tokens(prompt.ids, context, bos=bos)
        fitted.truncated.append(LongPrompt(index, n, context, n - len(ids), _preview(prompt.text)))
        fitted.kept.append(PromptInput(prompt.text, ids))
    if prompts and not fitted.kept:
        first = fitted.skipped[0]
        raise ContextLengthError(
            f"every one of the {len(prompts)} prompts is longer than the model's context of "
            f"{context} tokens (prompt {first.index} has {first.n_tokens}), so nothing is left "
            "to run; shorten it (or them), or pass --long-prompts truncate to keep their last "
            "tokens"
        )
    return fitted


def skipped_metrics(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``metrics.json`` entries of a trace's ``long_prompts`` record: the skipped prompts
    with their lengths, and the truncated ones with the tokens cut (empty lists when every
    prompt fitted)."""
    record = record or {}
    return {
        "skipped_prompts": list(record.get("skipped", [])),
        "truncated_prompts": list(record.get("truncated", [])),
    }


def long_prompts_section(record: Mapping[str, Any] | None) -> Section | None:
    """The report section listing the prompts skipped or truncated (None when every prompt
    fitted, so a report of prompts that all fit is unchanged)."""
    record = record or {}
    skipped, truncated = record.get("skipped", []), record.get("truncated", [])
    if not skipped and not truncated:
        return None
    rows: list[list[Any]] = [
        [p["index"], "skipped", p["n_tokens"], p["context"], p["cut"], p["text"]] for p in skipped
    ]
    rows += [
        [p["index"], "truncated", p["n_tokens"], p["context"], p["cut"], p["text"]]
        for p in truncated
    ]
    rows.sort(key=lambda row: int(row[0]))
    text = (
        f"{len(skipped)} prompt(s) longer than the model's context were skipped and "
        f"{len(truncated)} truncated to their last tokens (--long-prompts {record.get('mode')}); "
        "every measurement below covers only the prompts that were traced."
    )
    columns = ["prompt", "action", "tokens", "context", "tokens cut", "text"]
    return Section(
        "Skipped and truncated prompts",
        text=text,
        tables=[Table("Prompts longer than the context", columns, rows)],
    )
