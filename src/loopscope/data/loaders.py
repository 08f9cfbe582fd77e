"""Loading prompt and evaluation files (GSM8K JSONL, HellaSwag JSONL, plain text).

A bad line in a data file should stop a run before any model time is spent, with a message that
names the file, the 1-based line and the fix, not a bare ``KeyError`` from deep inside a probe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from loopscope.core.errors import LoopscopeError
from loopscope.data.formatting import (
    extract_final_answer,
    format_prompt,
    strip_calculator_annotations,
)

__all__ = [
    "DataFormatError",
    "GSM8KExample",
    "HellaSwagExample",
    "PromptRecord",
    "extract_final_answer",
    "load_gsm8k_jsonl",
    "load_hellaswag_jsonl",
    "load_prompt_records",
    "load_prompts",
    "load_text_prompts",
    "strip_calculator_annotations",
]

PathLike: TypeAlias = str | os.PathLike[str]

_GSM8K_NEEDS = '(a GSM8K line needs "question" and "answer")'
_HELLASWAG_NEEDS = '(a HellaSwag line needs "ctx" (or "ctx_a" and "ctx_b") and "endings")'


class DataFormatError(LoopscopeError):
    """A data file is malformed. ``str(err)`` reads ``"<file> line <n>: <problem and fix>"``;
    ``path``, ``line`` (1-based, None for whole-file problems) and ``problem`` are attributes."""

    def __init__(self, path: PathLike, line: int | None, problem: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path} line {line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.line, self.problem))


@dataclass(frozen=True)
class GSM8KExample:
    """A GSM8K line. ``final_answer`` is the ``####`` number as a string without commas;
    ``answer_plain`` is ``answer`` without ``<<...>>`` calculator annotations."""

    question: str
    answer: str
    final_answer: str
    answer_plain: str


@dataclass(frozen=True)
class HellaSwagExample:
    """A HellaSwag line: context, candidate endings, index of the right one (None if unlabelled,
    as in the test split), and the real layout's other fields when the line has them.

    ``ctx`` is the prompt a model is traced on: the line's ``ctx``, or ``ctx_a`` + " " +
    ``ctx_b`` when it has no ``ctx`` (which is how HellaSwag builds ``ctx``). The endings and the
    label are validated and kept for scoring, but never fed to the model as part of the prompt.
    ``ctx_a``/``ctx_b`` are the two halves of the context, ``split`` the split it came from
    (train/val/test), ``ind`` its index in the original release."""

    ctx: str
    endings: list[str]
    label: int | None
    activity_label: str | None = None
    ctx_a: str | None = None
    ctx_b: str | None = None
    split: str | None = None
    ind: int | None = None


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt file, before any model-specific rendering.

    ``line`` is the 1-based line of the file it came from (what a sample records); ``kind`` is
    "gsm8k", "hellaswag" or "text"; ``content`` is what a chat template receives as the user's
    message (the bare question, the context, the line); ``raw`` is what the raw format feeds
    the model (a GSM8K question in the ``"Q: ...\\nA:"`` layout of :func:`format_prompt`, the
    content itself otherwise)."""

    line: int
    kind: str
    content: str
    raw: str


def _read_file(path: PathLike) -> bytes:
    """The file's bytes, or DataFormatError saying why it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, None, "no such file; check the path") from None
    except IsADirectoryError:
        raise DataFormatError(
            path, None, "is a directory; give a .jsonl file (GSM8K or HellaSwag) or a .txt file"
        ) from None
    except OSError as err:
        raise DataFormatError(
            path, None, f"cannot be read ({err.strerror or err}); check its permissions"
        ) from None


def _read_lines(path: PathLike) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers, line terminators removed, UTF-8 checked
    per line so that a bad byte is reported with its line."""
    raw = _read_file(path)
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM some editors add; not part of the first line
        raw = raw[3:]
    lines = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataFormatError(
                path, number, f"not valid UTF-8 ({err.reason} at byte {err.start}); save as UTF-8"
            ) from None
        text = text.rstrip("\r")
        if text.strip():
            lines.append((number, text))
    return lines


def _parse_jsonl(path: PathLike, lines: list[tuple[int, str]]) -> list[tuple[int, dict[str, Any]]]:
    """One JSON object per line, or DataFormatError naming the line."""
    if not lines:
        raise DataFormatError(path, None, "empty file: expected one JSON object per line")
    records = []
    for number, text in lines:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                path,
                number,
                f"malformed JSON ({err.msg} at column {err.colno}); "
                "each line must be one complete JSON object",
            ) from None
        except (ValueError, RecursionError) as err:  # a number too long to convert, deep nesting
            raise DataFormatError(
                path,
                number,
                f"unreadable JSON ({type(err).__name__}: {str(err).split(';')[0]}); "
                "each line must be one JSON object of the prompt's fields",
            ) from None
        if not isinstance(record, dict):
            raise DataFormatError(
                path,
                number,
                f"expected a JSON object ({{...}}), got {type(record).__name__}",
            )
        records.append((number, record))
    return records


def _load_jsonl(path: PathLike) -> list[tuple[int, dict[str, Any]]]:
    return _parse_jsonl(path, _read_lines(path))


def _field_str(path: PathLike, number: int, record: dict[str, Any], field: str, needs: str) -> str:
    if field not in record:
        raise DataFormatError(path, number, f'missing field "{field}" {needs}')
    return _checked_str(path, number, field, record[field])


def _checked_str(path: PathLike, number: int, field: str, value: Any) -> str:
    """``value`` if it is a string of real characters (a JSON escape like ``\\ud800`` that
    leaves half a surrogate pair is not one, and no tokenizer can encode it)."""
    if not isinstance(value, str):
        raise DataFormatError(
            path, number, f'field "{field}" must be a string, got {type(value).__name__}'
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataFormatError(
            path,
            number,
            f'field "{field}" holds an unpaired surrogate escape (\\u{ord(value[err.start]):04x}), '
            "which is not a character; write the character itself or its full surrogate pair",
        ) from None
    return value


def _gsm8k(path: PathLike, number: int, record: dict[str, Any]) -> GSM8KExample:
    question = _field_str(path, number, record, "question", _GSM8K_NEEDS)
    answer = _field_str(path, number, record, "answer", _GSM8K_NEEDS)
    final = extract_final_answer(answer)
    if final is None:
        raise DataFormatError(
            path,
            number,
            'answer lacks a final "#### N" (a GSM8K answer ends with a line like "#### 12")',
        )
    return GSM8KExample(question, answer, final, strip_calculator_annotations(answer))


def _hellaswag_ctx(path: PathLike, number: int, record: dict[str, Any]) -> str:
    """``ctx``, or ``ctx_a`` + " " + ``ctx_b`` as HellaSwag builds it when ``ctx`` is absent;
    never empty (an empty prompt gives a model no token to start from)."""
    if "ctx" in record:
        ctx = _field_str(path, number, record, "ctx", _HELLASWAG_NEEDS)
    elif "ctx_a" not in record:
        raise DataFormatError(path, number, f'missing field "ctx" {_HELLASWAG_NEEDS}')
    else:
        ctx_a = _field_str(path, number, record, "ctx_a", _HELLASWAG_NEEDS)
        ctx_b = (
            _field_str(path, number, record, "ctx_b", _HELLASWAG_NEEDS) if "ctx_b" in record else ""
        )
        ctx = f"{ctx_a} {ctx_b}" if ctx_b.strip() else ctx_a
    if not ctx:
        raise DataFormatError(
            path, number, 'the context is empty; give the line its "ctx" (or "ctx_a") text'
        )
    return ctx


def _hellaswag(path: PathLike, number: int, record: dict[str, Any]) -> HellaSwagExample:
    ctx = _hellaswag_ctx(path, number, record)
    endings = record.get("endings")
    if endings is None:
        raise DataFormatError(path, number, f'missing field "endings" {_HELLASWAG_NEEDS}')
    if (
        not isinstance(endings, list)
        or len(endings) < 2
        or not all(isinstance(e, str) for e in endings)
    ):
        raise DataFormatError(
            path, number, '"endings" must be a list of strings (HellaSwag has 4 candidates)'
        )
    for ending in endings:
        _checked_str(path, number, "endings", ending)
    label = _hellaswag_label(path, number, record.get("label"), len(endings))
    extras = _hellaswag_extras(path, number, record)
    return HellaSwagExample(ctx, list(endings), label, **extras)


def _optional_str(path: PathLike, number: int, record: dict[str, Any], field: str) -> str | None:
    value = record.get(field)
    return None if value is None else _checked_str(path, number, field, value)


def _hellaswag_extras(path: PathLike, number: int, record: dict[str, Any]) -> dict[str, Any]:
    """The real layout's optional fields, each checked for its type when present: strings for
    ``activity_label``, ``ctx_a``, ``ctx_b`` and ``split``; a whole number for ``ind``."""
    ind = record.get("ind")
    if ind is not None and (isinstance(ind, bool) or not isinstance(ind, int)):
        raise DataFormatError(
            path, number, f'field "ind" must be a whole number (the example\'s index), got {ind!r}'
        )
    return {
        "activity_label": _optional_str(path, number, record, "activity_label"),
        "ctx_a": _optional_str(path, number, record, "ctx_a"),
        "ctx_b": _optional_str(path, number, record, "ctx_b"),
        "split": _optional_str(path, number, record, "split"),
        "ind": ind,
    }


def _hellaswag_prompt(path: PathLike, number: int, record: dict[str, Any]) -> str:
    """The context of a HellaSwag line read as a prompt: the whole line is validated when it
    has its endings (the real layout), only the context and optional fields otherwise."""
    if "endings" in record:
        return _hellaswag(path, number, record).ctx
    _hellaswag_extras(path, number, record)
    return _hellaswag_ctx(path, number, record)


def _hellaswag_label(path: PathLike, number: int, raw: Any, n_endings: int) -> int | None:
    """Label as an int index; None or "" means unlabelled. Digit strings are accepted because
    some HellaSwag exports store the label as ``"2"``."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < n_endings:
        raise DataFormatError(
            path,
            number,
            f'"label" must be an index 0..{n_endings - 1} into "endings" (or null), got {raw!r}',
        )
    return raw


def load_gsm8k_jsonl(path: PathLike) -> list[GSM8KExample]:
    """GSM8K JSONL (``{"question", "answer"}`` per line; blank lines skipped), fully validated."""
    return [_gsm8k(path, number, record) for number, record in _load_jsonl(path)]


def load_hellaswag_jsonl(path: PathLike) -> list[HellaSwagExample]:
    """HellaSwag JSONL in its released layout (``ctx_a``, ``ctx_b``, ``ctx``, ``endings``,
    ``label``, ``activity_label``, ``split``, ``ind``; only a context and ``endings`` are
    required; blank lines skipped), fully validated: a malformed line raises
    :class:`DataFormatError` naming the file, the line and the field."""
    return [_hellaswag(path, number, record) for number, record in _load_jsonl(path)]


def load_text_prompts(path: PathLike) -> list[str]:
    """One prompt per non-blank line, kept byte-for-byte except the line terminator
    (leading/trailing spaces matter to a byte-level model, so they are not stripped)."""
    prompts = [text for _, text in _read_lines(path)]
    if not prompts:
        raise DataFormatError(path, None, "empty file: expected one prompt per non-empty line")
    return prompts


def load_prompts(path: PathLike) -> list[str]:
    """Prompts from any supported file, recognised by content, in the raw layout.

    ``.txt``: one prompt per line. JSONL whose first object has ``question``: GSM8K, each
    question through :func:`format_prompt` (answers are not needed or checked here). JSONL with
    ``ctx``/``ctx_a``/``endings``: HellaSwag, the contexts (a line with ``endings`` is validated
    whole). Anything else raises :class:`DataFormatError`.
    """
    return [record.raw for record in load_prompt_records(path)]


def load_prompt_records(path: PathLike) -> list[PromptRecord]:
    """The prompts of any supported file (see :func:`load_prompts`), each with its line number,
    its kind, its bare content and its raw-layout text."""
    if Path(path).suffix.lower() == ".txt":
        lines = _read_lines(path)
        if not lines:
            raise DataFormatError(path, None, "empty file: expected one prompt per non-empty line")
        return [PromptRecord(number, "text", text, text) for number, text in lines]
    lines = _read_lines(path)
    if not lines:
        raise DataFormatError(path, None, "empty file: no prompts found")
    first_number, first = lines[0]
    if not first.lstrip().startswith("{"):
        raise DataFormatError(
            path,
            first_number,
            "unknown prompt format: expected JSONL objects (GSM8K or HellaSwag); "
            "for one plain-text prompt per line, give the file a .txt suffix",
        )
    records = _parse_jsonl(path, lines)
    keys = records[0][1].keys()
    if "question" in keys:
        needs = '(a GSM8K prompt line needs "question")'
        questions = [(n, _field_str(path, n, r, "question", needs)) for n, r in records]
        return [PromptRecord(n, "gsm8k", q, format_prompt(q)) for n, q in questions]
    if keys & {"ctx", "ctx_a", "endings"}:
        contexts = [(n, _hellaswag_prompt(path, n, r)) for n, r in records]
        return [PromptRecord(n, "hellaswag", ctx, ctx) for n, ctx in contexts]
    raise DataFormatError(
        path,
        first_number,
        f'unknown JSONL format with fields {sorted(keys)}: expected "question" (GSM8K) '
        'or "ctx"/"endings" (HellaSwag)',
    )
