"""System prompts: the named variants loopscope ships, and how ``--system`` is read.

How a looped model's limiting behaviour depends on what precedes the question is measured by
tracing the same prompts under several system prompts. The named variants are:

- ``none``: no system prompt at all;
- ``long-persona``: a careful, deliberate assistant persona of several hundred tokens;
- ``long-persona-padded``: as many tokens as ``long-persona`` has under the model's tokenizer,
  every one of them the pad token (so length is kept and content removed);
- ``short-math``: one sentence asking for a step-by-step solution.

The texts below were written for loopscope. A byte-level model's context (1,024 bytes for the
bundled models) cannot hold the long persona and a question; tracing skips, truncates or
refuses such a prompt by its length, as ``--long-prompts`` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loopscope.core.errors import LoopscopeError

__all__ = [
    "LONG_PERSONA",
    "SHORT_MATH",
    "VARIANTS",
    "SystemPrompt",
    "SystemPromptError",
    "parse_variants",
    "resolve_system",
    "variant",
]

LONG_PERSONA = (
    "You are a patient and methodical assistant. Before you write anything, you read the whole "
    "question once from beginning to end, and then you read it again, slowly, paying attention "
    "to every number, every unit and every word that changes the meaning of a sentence, such as "
    "'each', 'more than', 'left over' or 'in total'. You never hurry. You would rather take one "
    "more careful step than skip a step and be wrong.\n\n"
    "When a question involves quantities, you first list what is known and what is asked. You "
    "name each quantity in plain words and write down its value and its unit. You then decide "
    "which operations connect the known values to the unknown one, and you explain in a short "
    "sentence why each operation is the right one. You carry out one operation per line, and "
    "after each line you check that the result is reasonable: a count of people cannot be "
    "negative or fractional, a price rarely has more than two decimals, and a part cannot be "
    "larger than the whole it belongs to.\n\n"
    "When you have an answer, you go back to the question and test the answer against every "
    "condition it states. If one condition fails, you say so honestly, find the step where the "
    "reasoning went wrong, and correct it instead of defending it. You do not invent facts that "
    "the question does not give, and when a question is ambiguous you state the reading you "
    "chose.\n\n"
    "You write clearly and calmly, in short sentences, without decoration. You keep your "
    "working visible so that a reader can follow and verify every step. At the end, on its own "
    "line, you state the final answer as a single number, with no units and no extra words, "
    "so that it can be read and compared without doubt."
)

SHORT_MATH = "Solve the math problem step by step and give the final answer as a number."

#: The named variants, in the order the report lists them.
VARIANTS: tuple[str, ...] = ("none", "long-persona", "long-persona-padded", "short-math")


class SystemPromptError(LoopscopeError):
    """A ``--system`` or ``--system-variants`` value that names nothing loopscope can read."""


@dataclass(frozen=True)
class SystemPrompt:
    """The system prompt of a run. ``name`` is the variant's name, ``"file:PATH"`` for
    ``@FILE`` or ``"text"`` for literal text; ``text`` is None for no system prompt; ``padded``
    means: replace ``text`` by as many pad tokens as it has tokens (the text itself never
    reaches the model)."""

    name: str
    text: str | None
    padded: bool = False

    @property
    def is_empty(self) -> bool:
        return self.text is None

    def record(self) -> dict[str, object]:
        """What a trace header stores about it."""
        return {"name": self.name, "text": self.text, "padded": self.padded}


def variant(name: str) -> SystemPrompt:
    """The named variant ``name`` (one of :data:`VARIANTS`)."""
    if name == "none":
        return SystemPrompt("none", None)
    if name == "long-persona":
        return SystemPrompt("long-persona", LONG_PERSONA)
    if name == "long-persona-padded":
        return SystemPrompt("long-persona-padded", LONG_PERSONA, padded=True)
    if name == "short-math":
        return SystemPrompt("short-math", SHORT_MATH)
    raise SystemPromptError(
        f"unknown system-prompt variant {name!r}; the variants are {', '.join(VARIANTS)}"
    )


def _read_system_file(spec: str) -> SystemPrompt:
    path = Path(spec[1:]).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SystemPromptError(f"--system {spec}: no such file {path}; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SystemPromptError(
            f"--system {spec}: {path} cannot be read as UTF-8 text ({err}); save it as UTF-8"
        ) from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise SystemPromptError(f"--system {spec}: {path} is empty; write the system prompt in it")
    return SystemPrompt(f"file:{path}", text)


def resolve_system(spec: str | None) -> SystemPrompt:
    """``--system``'s value: None or ``none`` for no system prompt, ``@FILE`` for a file's text
    (one final line break dropped), a variant's name for that variant, anything else as the
    literal text of the system prompt."""
    if spec is None or spec == "none":
        return variant("none")
    if spec.startswith("@"):
        return _read_system_file(spec)
    if spec in VARIANTS:
        return variant(spec)
    if not spec.strip():
        raise SystemPromptError("--system is blank; give a text, @FILE, a variant name or none")
    return SystemPrompt("text", spec)


def parse_variants(text: str) -> list[SystemPrompt]:
    """``--system-variants``' comma-separated names, each a variant, none repeated."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise SystemPromptError(
            f"--system-variants takes comma-separated names ({', '.join(VARIANTS)}), got {text!r}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SystemPromptError(f"--system-variants names {', '.join(repeated)} more than once")
    return [variant(name) for name in names]
