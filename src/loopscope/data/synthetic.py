"""Seeded GSM8K-style arithmetic word problems with worked answers, in our own templates.

Our small byte-level looped models need reasoning data whose difficulty we control: the number of
steps (one calculator-annotated operation each) is the knob, so we can ask whether harder problems
use more recurrences. Everything comes from ``random.Random(seed)``, so a seed names a data set.
Every problem fits a 384-byte context as a training example (see :data:`CONTEXT_BYTES`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loopscope.core import atomic
from loopscope.data.formatting import format_training_example

__all__ = [
    "ANSWER_MAX_CHARS",
    "CONTEXT_BYTES",
    "MAX_STEPS",
    "QUESTION_MAX_CHARS",
    "Problem",
    "generate_problems",
    "write_jsonl",
]

QUESTION_MAX_CHARS = 220
ANSWER_MAX_CHARS = 200
#: Training context of our small models, in bytes; BOS + training example + EOS must fit.
CONTEXT_BYTES = 384
#: Most steps a problem may have: longer chains no longer fit the length limits above.
MAX_STEPS = 5
_MAX_VALUE = 999  # keeps every quantity small, like GSM8K's
_ATTEMPTS = 200


@dataclass(frozen=True)
class Problem:
    """One word problem: GSM8K-format ``answer`` (annotated steps, then ``#### N``)."""

    question: str
    answer: str
    final_answer: int
    steps: int


@dataclass(frozen=True)
class _Op:
    """One step template. ``kind``: ``+ - * /`` apply ``n`` to the running value ``v``;
    ``change`` is ``bill - v`` for the smallest bill above ``v``; ``short`` is ``price - v``
    for a price above ``v``. ``final`` (set only on terminal ops) replaces the closing question,
    because after such a step the running value means something else."""

    kind: str
    question: str
    answer: str
    final: str | None = None
    lo: int = 2
    hi: int = 20


@dataclass(frozen=True)
class _Start:
    """The opening fact, itself step 1: ``a op b`` with ``a``/``b`` drawn from the ranges
    (``range(lo, hi + 1, step)``); for ``/`` the dividend is ``a * b`` so division is exact."""

    kind: str
    question: str
    answer: str
    a: tuple[int, int, int]
    b: tuple[int, int, int]


@dataclass(frozen=True)
class _Theme:
    items: tuple[str, ...]
    start: _Start
    ops: tuple[_Op, ...]
    final: str


_NAMES: tuple[tuple[str, str], ...] = (
    ("Tom", "he"), ("Mia", "she"), ("Sam", "he"), ("Lena", "she"), ("Omar", "he"),
    ("Ana", "she"), ("Ravi", "he"), ("Kim", "she"), ("Leo", "he"), ("Zoe", "she"),
    ("Ben", "he"), ("Nora", "she"), ("Jin", "he"), ("Ella", "she"), ("Max", "he"),
    ("Ida", "she"),
)  # fmt: skip

_PRONOUNS = {
    "he": {"He": "He", "he": "he", "His": "His", "his": "his", "him": "him"},
    "she": {"He": "She", "he": "she", "His": "Her", "his": "her", "him": "her"},
}

_THEMES: tuple[_Theme, ...] = (
    _Theme(  # buying items
        items=("notebooks", "pens", "mugs", "candles", "tickets", "plants"),
        start=_Start(
            "*",
            "{name} buys {a} {item} that cost ${b} each.",
            "The {item} cost {expr} dollars.",
            a=(2, 9, 1),
            b=(2, 12, 1),
        ),
        ops=(
            _Op("+", "{He} also buys a snack for ${n}.", "With the snack it is {expr} dollars."),
            _Op("+", "Shipping costs ${n}.", "With shipping it is {expr} dollars.", hi=9),
            _Op("-", "{He} has a coupon for ${n} off.", "The coupon makes it {expr} dollars."),
            _Op("*", "{He} buys the same each week for {n} weeks.", "That is {expr} dollars."),
            _Op(
                "/",
                "{He} splits the cost equally among {n} people.",
                "Each person pays {expr} dollars.",
                final="How many dollars does each person pay?",
            ),
            _Op(
                "change",
                "{He} pays with a ${n} bill.",
                "The change is {expr} dollars.",
                final="How many dollars of change does {he} get?",
            ),
        ),
        final="How many dollars does {name} spend?",
    ),
    _Theme(  # collecting
        items=("marbles", "stickers", "shells", "stamps", "cards", "beads"),
        start=_Start(
            "*",
            "{name} has {a} boxes with {b} {item} in each.",
            "{name} has {expr} {item}.",
            a=(2, 9, 1),
            b=(2, 12, 1),
        ),
        ops=(
            _Op("+", "{He} finds {n} more.", "Now {he} has {expr} {item}."),
            _Op("+", "A friend gives {him} {n} more.", "Then {he} has {expr} {item}."),
            _Op("-", "{He} gives {n} to {his} sister.", "{He} keeps {expr} {item}."),
            _Op("-", "{He} loses {n} of them.", "{He} has {expr} {item} left."),
            _Op("*", "{He} collects until {he} has {n} times as many.", "That is {expr}.", hi=3),
            _Op(
                "/",
                "{He} puts them equally into {n} jars.",
                "Each jar gets {expr} {item}.",
                final="How many {item} are in each jar?",
            ),
        ),
        final="How many {item} does {name} have now?",
    ),
    _Theme(  # sharing
        items=("cookies", "grapes", "candies", "crackers", "cherries"),
        start=_Start(
            "/",
            "{name} shares {a} {item} equally among {b} friends.",
            "Each friend gets {expr} {item}.",
            a=(2, 12, 1),
            b=(2, 8, 1),
        ),
        ops=(
            _Op("+", "Each friend then gets {n} more.", "Each friend has {expr} {item}."),
            _Op("+", "{name} adds {n} more to each share.", "Each share is {expr} {item}."),
            _Op("-", "Each friend eats {n} of them.", "Each friend has {expr} {item} left."),
            _Op("*", "Then each share is made {n} times as big.", "Each has {expr} {item}.", hi=3),
        ),
        final="How many {item} does each friend have?",
    ),
    _Theme(  # speed and distance
        items=("train", "bus", "car", "truck", "van"),
        start=_Start(
            "*",
            "A {item} travels at {a} km per hour for {b} hours.",
            "It covers {expr} km.",
            a=(10, 60, 5),
            b=(2, 5, 1),
        ),
        ops=(
            _Op("+", "Then it travels {n} km more.", "In total it goes {expr} km.", hi=40),
            _Op("+", "A detour adds {n} km.", "With the detour it is {expr} km.", hi=30),
            _Op("-", "A shortcut saves {n} km.", "With the shortcut it is {expr} km."),
            _Op("*", "It makes this trip {n} times this week.", "That is {expr} km.", hi=3),
            _Op(
                "/",
                "It uses 1 liter of fuel for every {n} km.",
                "It uses {expr} liters.",
                final="How many liters of fuel does it use?",
            ),
        ),
        final="How many km does the {item} travel?",
    ),
    _Theme(  # time from distance and speed
        items=("boat", "bus", "ferry", "tram"),
        start=_Start(
            "/",
            "A {item} goes {a} km at {b} km per hour.",
            "It takes {expr} hours.",
            a=(2, 6, 1),
            b=(5, 30, 5),
        ),
        ops=(
            _Op("+", "It stops for {n} hours on the way.", "With stops it is {expr} hours.", hi=4),
            _Op("+", "The way back takes {n} hours.", "Both ways take {expr} hours.", hi=6),
            _Op("*", "It makes the same trip {n} times.", "That is {expr} hours.", hi=4),
            _Op("-", "A tailwind saves {n} hours.", "It takes {expr} hours.", hi=3),
        ),
        final="How many hours does the {item} spend?",
    ),
    _Theme(  # savings
        items=("bike", "game", "tent", "guitar"),
        start=_Start(
            "*",
            "{name} saves ${a} each week for {b} weeks.",
            "{He} saves {expr} dollars.",
            a=(2, 15, 1),
            b=(2, 10, 1),
        ),
        ops=(
            _Op("+", "{He} gets ${n} for {his} birthday.", "With the gift it is {expr} dollars."),
            _Op("+", "{He} earns ${n} washing cars.", "Now {he} has {expr} dollars."),
            _Op("-", "{He} spends ${n} on a book.", "After the book {he} has {expr} dollars."),
            _Op("*", "{His} parents make it {n} times as much.", "Now it is {expr} dollars.", hi=3),
            _Op(
                "/",
                "{He} splits the money equally into {n} jars.",
                "Each jar holds {expr} dollars.",
                final="How many dollars are in each jar?",
            ),
            _Op(
                "short",
                "{He} wants a {item} that costs ${n}.",
                "{He} still needs {expr} dollars.",
                final="How many more dollars does {he} need?",
            ),
        ),
        final="How many dollars does {name} have?",
    ),
    _Theme(  # garden
        items=("tulips", "roses", "daisies", "sunflowers"),
        start=_Start(
            "*",
            "{name} plants {a} rows of {b} {item}.",
            "{He} plants {expr} {item}.",
            a=(2, 9, 1),
            b=(3, 12, 1),
        ),
        ops=(
            _Op("+", "Later {he} plants {n} more.", "Now there are {expr} {item}."),
            _Op("+", "A neighbor gives {him} {n} more.", "Then there are {expr} {item}."),
            _Op("-", "Rabbits eat {n} of them.", "{expr} {item} are left."),
            _Op("-", "{n} of them wilt.", "{expr} {item} are left."),
            _Op(
                "/",
                "{He} puts them equally into {n} vases.",
                "Each vase gets {expr} {item}.",
                final="How many {item} are in each vase?",
            ),
        ),
        final="How many {item} are there now?",
    ),
    _Theme(  # reading
        items=("book", "novel"),
        start=_Start(
            "*",
            "{name} reads {a} pages a day for {b} days.",
            "{He} reads {expr} pages.",
            a=(5, 30, 5),
            b=(2, 7, 1),
        ),
        ops=(
            _Op("+", "On Sunday {he} reads {n} more pages.", "That makes {expr} pages.", hi=30),
            _Op("+", "{He} also reads a story of {n} pages.", "In all {he} reads {expr} pages."),
            _Op("+", "At school {he} reads {n} more pages.", "Now it is {expr} pages.", hi=15),
            _Op("*", "{He} does this {n} times this month.", "That is {expr} pages.", hi=3),
            _Op(
                "*",
                "{His} sister reads {n} times as many pages.",
                "{His} sister reads {expr} pages.",
                final="How many pages does {his} sister read?",
                hi=3,
            ),
            _Op(
                "-",
                "{He} had read {n} of those pages before.",
                "{expr} pages are new to {him}.",
                final="How many new pages does {he} read?",
                lo=1,
                hi=10,
            ),
            _Op(
                "short",
                "The {item} has {n} pages.",
                "{He} has {expr} pages left.",
                final="How many pages are left to read?",
            ),
        ),
        final="How many pages does {name} read?",
    ),
    _Theme(  # baking
        items=("muffins", "rolls", "cupcakes", "pies"),
        start=_Start(
            "*",
            "{name} bakes {a} trays of {b} {item}.",
            "{He} bakes {expr} {item}.",
            a=(2, 6, 1),
            b=(4, 12, 1),
        ),
        ops=(
            _Op("+", "{His} friend brings {n} more.", "Now there are {expr} {item}."),
            _Op("+", "{He} buys {n} more at a shop.", "Then there are {expr} {item}."),
            _Op("-", "The family eats {n} of them.", "{expr} {item} are left."),
            _Op("-", "{n} of them burn.", "{expr} {item} are left."),
            _Op(
                "/",
                "{He} packs them equally into {n} boxes.",
                "Each box gets {expr} {item}.",
                final="How many {item} are in each box?",
            ),
        ),
        final="How many {item} are there now?",
    ),
)

_BILLS = (5, 10, 20, 50, 100, 200, 500, 1000)


def _expr(x: int, op: str, y: int, z: int) -> str:
    """GSM8K calculator notation: ``3*4=<<3*4=12>>12``."""
    return f"{x}{op}{y}=<<{x}{op}{y}={z}>>{z}"


def _draw(rng: random.Random, bounds: tuple[int, int, int]) -> int:
    lo, hi, step = bounds
    return rng.randrange(lo, hi + 1, step)


def _apply(rng: random.Random, op: _Op, v: int) -> tuple[int, str, int, int] | None:
    """Draw ``op``'s operand at value ``v``: ``(n, sym, x, y)``, where ``n`` fills the template
    and the step is ``x sym y``. None when the result would not be an exact integer in
    ``2.._MAX_VALUE`` (2, not 0 or 1, so no sentence says "1 apples")."""
    if op.kind == "+":
        n = rng.randint(op.lo, op.hi)
        return (n, "+", v, n) if v + n <= _MAX_VALUE else None
    if op.kind == "-":
        hi = min(op.hi, v - 2)  # leave at least 2, so no "1 apples"
        if hi < op.lo:
            return None
        n = rng.randint(op.lo, hi)
        return n, "-", v, n
    if op.kind == "*":
        choices = [n for n in range(op.lo, op.hi + 1) if v * n <= _MAX_VALUE]
        if not choices:
            return None
        n = rng.choice(choices)
        return n, "*", v, n
    if op.kind == "/":
        divisors = [n for n in range(2, 11) if v % n == 0 and v // n >= 2]
        if not divisors:
            return None
        n = rng.choice(divisors)
        return n, "/", v, n
    if op.kind == "change":
        bills = [b for b in _BILLS if b >= v + 2]
        if not bills:
            return None
        n = bills[0]
        return n, "-", n, v
    if op.kind == "short":
        n = v + rng.randint(op.lo, 60)
        return (n, "-", n, v) if n <= _MAX_VALUE else None
    raise ValueError(f"unknown op kind {op.kind!r}")


def _compute(sym: str, x: int, y: int) -> int:
    if sym == "+":
        return x + y
    if sym == "-":
        return x - y
    if sym == "*":
        return x * y
    return x // y  # callers only divide exactly


def _one_problem(rng: random.Random, steps: int) -> Problem:
    """Draw one problem of exactly ``steps`` annotated operations (not yet length-checked)."""
    theme = rng.choice(_THEMES)
    name, gender = rng.choice(_NAMES)
    fields: dict[str, str | int] = {"name": name, "item": rng.choice(theme.items)}
    fields.update(_PRONOUNS[gender])

    start = theme.start
    b = _draw(rng, start.b)
    a = _draw(rng, start.a) * (b if start.kind == "/" else 1)
    v = _compute(start.kind, a, b)
    questions = [start.question.format(a=a, b=b, **fields)]
    answers = [start.answer.format(expr=_expr(a, start.kind, b, v), **fields)]
    final = theme.final

    unused = list(theme.ops)
    for i in range(1, steps):
        last = i == steps - 1
        fresh = [op for op in unused if last or op.final is None]
        used = [op for op in theme.ops if op not in unused and op.final is None]
        rng.shuffle(fresh)
        rng.shuffle(used)
        for op in fresh + used:  # repeat a template only when no unused one applies
            drawn = _apply(rng, op, v)
            if drawn is not None:
                break
        else:  # nothing applies (a value near the cap): an addition, which always reads well
            op = next(o for o in theme.ops if o.kind == "+")
            drawn = (op.lo, "+", v, op.lo)
        n, sym, x, y = drawn
        if op in unused:
            unused.remove(op)
        v = _compute(sym, x, y)
        questions.append(op.question.format(n=n, **fields))
        answers.append(op.answer.format(n=n, expr=_expr(x, sym, y, v), **fields))
        if op.final is not None:
            final = op.final
    questions.append(final.format(**fields))
    question = " ".join(q[0].upper() + q[1:] for q in questions)
    answer = "\n".join(s[0].upper() + s[1:] for s in answers) + f"\n#### {v}"
    return Problem(question=question, answer=answer, final_answer=v, steps=steps)


def _fits(p: Problem) -> bool:
    """Within the character limits, and BOS + training text + EOS within the byte context."""
    example = format_training_example(p.question, p.answer).encode("utf-8")
    return (
        len(p.question) <= QUESTION_MAX_CHARS
        and len(p.answer) <= ANSWER_MAX_CHARS
        and len(example) + 2 <= CONTEXT_BYTES
    )


def generate_problems(
    n: int, *, seed: int, min_steps: int = 1, max_steps: int = 3
) -> list[Problem]:
    """``n`` problems, each with a step count drawn uniformly from ``[min_steps, max_steps]``.

    Deterministic for a seed (only ``random.Random(seed)`` is used). A draw that breaks a length
    limit is redrawn from the same generator, so lengths never depend on anything but the seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps <= MAX_STEPS:
        raise ValueError(
            f"need 1 <= min_steps <= max_steps <= {MAX_STEPS}, "
            f"got min_steps={min_steps}, max_steps={max_steps}"
        )
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        steps = rng.randint(min_steps, max_steps)
        for _attempt in range(_ATTEMPTS):
            problem = _one_problem(rng, steps)
            if _fits(problem):
                break
        else:  # pragma: no cover - the templates are sized so this does not happen
            raise RuntimeError(f"could not draw a {steps}-step problem within the length limits")
        problems.append(problem)
    return problems


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> None:
    """Write GSM8K-format lines ``{"question": ..., "answer": ...}`` (UTF-8, one per line),
    atomically: a reader never sees half a file."""
    lines = [json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in problems]
    atomic.write_text(path, "".join(lines))
