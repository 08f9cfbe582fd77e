"""What every ``loopscope`` command shares: the row type of the command table, the common flags
of the model-running commands, and the one place errors become a one-line message.

A command is data (:class:`Command`): its name, its help, how it adds its own arguments and the
function that runs it. ``loopscope.cli.main`` lists the rows; :func:`build_parser` turns any
list of rows into an ``argparse`` parser and :func:`run_cli` parses, checks the common flags
and runs the chosen row, so ``python -m loopscope.cli.ablate`` behaves exactly like
``loopscope ablate``.

The common flags (``--device``, ``--dtype``, ``--batch-size``, ``--seed``, ``--limit``,
``--no-progress``, ``--threads``) mean the same on every command. A command that cannot honour
one says so in :class:`CommonFlags.refuses`; a value other than the default then stops the run
with that reason instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from loopscope.core.errors import LoopscopeError

if TYPE_CHECKING:
    import torch

    from loopscope.engine.contract import LoopedLM

__all__ = [
    "DTYPES",
    "Command",
    "CommonFlags",
    "RunOptions",
    "add_common_flags",
    "build_parser",
    "run_cli",
    "run_options",
]

Handler = Callable[[argparse.Namespace], int]

#: The dtypes ``--dtype`` offers, by the name torch gives them.
DTYPES = ("float32", "bfloat16", "float16")

#: What the command line turns into ``loopscope: error: <message>`` (exit status 2): every
#: error a user can fix (``LoopscopeError``), and the built-in kinds the commands have always
#: reported that way (a missing file, a bad value, a failed run).
REPORTED_ERRORS: tuple[type[BaseException], ...] = (
    LoopscopeError,
    ValueError,
    KeyError,
    FileNotFoundError,
    RuntimeError,
)


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command with only the common flags (or none at all)."""


@dataclass(frozen=True)
class CommonFlags:
    """One command's defaults for the common flags and the ones it cannot honour.

    ``refuses`` maps a flag's destination (``batch_size``, ``seed``, ``limit``, ``dtype``) to
    the reason the command cannot use it; only the default is then accepted. ``builds_model``
    marks commands that construct their models (training, ablations): their ``--dtype`` default
    is float32 on any device, where loading commands default to the checkpoint's dtype on a GPU.
    """

    batch_size: int | str | None = 1
    batch_size_help: str = "prompts per forward pass"
    seed: int | None = 0
    seed_help: str = "seed of the random initial state when the model draws one"
    limit_help: str = "only the first N prompts"
    builds_model: bool = False
    refuses: Mapping[str, str] = field(default_factory=dict)

    def accepted(self, dest: str) -> tuple[Any, ...]:
        """The values of a refused flag that still run: its default (and float32 for a
        model the command builds, which is the same thing)."""
        if dest == "dtype":
            return (None, "float32") if self.builds_model else (None,)
        return ({"batch_size": self.batch_size, "seed": self.seed}.get(dest),)


@dataclass(frozen=True)
class Command:
    """One row of the command table: ``loopscope NAME`` with its help, its own arguments and
    the function that runs it. ``common`` adds the common flags with this command's defaults;
    ``subcommands`` makes it a group (``loopscope ablate random-init``) whose rows run instead.
    ``interrupted`` is printed on Ctrl-C (exit status 130)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    run: Handler | None = None
    common: CommonFlags | None = None
    subcommands: tuple[Command, ...] = ()
    interrupted: str = "interrupted; finished work is saved and a rerun resumes"


# --------------------------------------------------------------------------- common flags


def _refused_note(flags: CommonFlags, dest: str) -> str:
    why = flags.refuses.get(dest)
    return f" (this command takes no other value: {why})" if why else ""


def add_common_flags(parser: argparse.ArgumentParser, flags: CommonFlags) -> None:
    """Add the common flags to a model-running command, with ``flags``' defaults."""
    group = parser.add_argument_group("common options (the same on every model-running command)")
    group.add_argument(
        "--device", help="torch device: cpu, cuda, cuda:N (default: cuda if available, else cpu)"
    )
    dtype_default = (
        "float32"
        if flags.builds_model
        else "float32 on CPU, on a GPU the checkpoint's own dtype (bfloat16 when it names none)"
    )
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        help=f"dtype of the model's weights (default: {dtype_default})"
        + _refused_note(flags, "dtype"),
    )
    batch_default = "" if flags.batch_size is None else f" (default {flags.batch_size})"
    group.add_argument(
        "--batch-size",
        dest="batch_size",
        type=batch_size_value if flags.batch_size == "auto" else int,
        default=flags.batch_size,
        help=flags.batch_size_help + batch_default + _refused_note(flags, "batch_size"),
    )
    seed_default = "" if flags.seed is None else f" (default {flags.seed})"
    group.add_argument(
        "--seed",
        type=int,
        default=flags.seed,
        help=flags.seed_help + seed_default + _refused_note(flags, "seed"),
    )
    group.add_argument("--limit", type=int, help=flags.limit_help + _refused_note(flags, "limit"))
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads, as torch.set_num_threads (default 0: torch's own choice)",
    )


@dataclass(frozen=True)
class RunOptions:
    """The common flags of one run, checked. ``dtype`` is the name given (None: the default,
    see :meth:`load_dtype` and :meth:`build_dtype`)."""

    device: str
    dtype: str | None
    batch_size: int | None
    seed: int | None
    limit: int | None
    progress: bool
    threads: int
    #: ``--batch-size auto`` (then ``batch_size`` is None): the command fits it to memory.
    batch_auto: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def load_dtype(self, source: str | Path) -> torch.dtype:
        """The dtype to load ``source`` in: the one given, else float32 off the GPU, else the
        dtype its ``config.json`` names (bfloat16 when it names none)."""
        if self.dtype is not None:
            return torch_dtype(self.dtype)
        if not self.on_gpu:
            return torch_dtype("float32")
        return torch_dtype(checkpoint_dtype(source) or "bfloat16")

    def build_dtype(self) -> torch.dtype:
        """The dtype of a model the command constructs: the one given, else float32."""
        return torch_dtype(self.dtype or "float32")

    def load(self, source: str | Path, **load_options: Any) -> LoopedLM:
        """``loopscope.load(source)`` on this run's device, in this run's dtype."""
        import loopscope

        model: LoopedLM = loopscope.load(
            source, dtype=self.load_dtype(source), device=self.device, **load_options
        )
        return model


def batch_size_value(text: str) -> int | str:
    """``--batch-size``: a whole number, or ``auto`` (as many as fit in free memory)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batch-size takes a whole number or auto, got {text!r}"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def checkpoint_dtype(source: str | Path) -> str | None:
    """The dtype ``source``'s ``config.json`` declares, when it names one of :data:`DTYPES`
    (see :func:`loopscope.families.table.checkpoint_dtype`)."""
    from loopscope.families.table import checkpoint_dtype as declared

    return declared(source)


def default_device() -> str:
    from loopscope.families.table import default_device as chosen

    return chosen()


def _checked_device(name: str | None) -> str:
    """``--device`` as given (or the default), refused when torch cannot use it here."""
    import torch

    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LoopscopeError(
            f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoopscopeError(f"--device {name}: no CUDA device is available here; use --device cpu")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise LoopscopeError(
            f"--device {name}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LoopscopeError(f"--device {name}: MPS is not available here; use --device cpu")
    return name


def _at_least(flag: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise LoopscopeError(f"{flag} must be ≥ {minimum}, got {value}")


def run_options(args: argparse.Namespace) -> RunOptions:
    """The common flags of ``args``, checked (a bad value raises a ``LoopscopeError``)."""
    if args.batch_size != "auto":
        _at_least("--batch-size", args.batch_size, 1)
    _at_least("--limit", args.limit, 1)
    _at_least("--threads", args.threads, 0)
    auto = args.batch_size == "auto"
    return RunOptions(
        device=_checked_device(args.device),
        dtype=args.dtype,
        batch_size=None if auto else args.batch_size,
        seed=args.seed,
        limit=args.limit,
        progress=not args.no_progress,
        threads=args.threads,
        batch_auto=auto,
    )


def _check_refused(args: argparse.Namespace, flags: CommonFlags, command: str) -> None:
    for dest, why in flags.refuses.items():
        value = getattr(args, dest)
        if value not in flags.accepted(dest):
            flag = "--" + dest.replace("_", "-")
            raise LoopscopeError(
                f"loopscope {command} does not take {flag} {value}: {why}; drop {flag}"
            )


def prepare_run(args: argparse.Namespace, flags: CommonFlags, command: str) -> RunOptions:
    """Check the common flags against what ``command`` honours and apply ``--threads``."""
    _check_refused(args, flags, command)
    options = run_options(args)
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    return options


# --------------------------------------------------------------------------- parser and runner


def _add_command(sub: argparse._SubParsersAction, command: Command, path: str) -> None:
    parser = sub.add_parser(command.name, help=command.help, description=command.help)
    command.add_arguments(parser)
    if command.common is not None:
        add_common_flags(parser, command.common)
    if command.subcommands:
        group = parser.add_subparsers(dest=f"{command.name}_command", required=True)
        for child in command.subcommands:
            _add_command(group, child, f"{path} {child.name}")
    else:
        parser.set_defaults(command_row=command, command_path=path)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line with status 2, like every other
    loopscope error, instead of the usage block (``--help`` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"loopscope: error: {self.prog}: {' '.join(message.split())}\n")


def build_parser(
    commands: Sequence[Command],
    *,
    prog: str = "loopscope",
    description: str = "Take looped (recurrent-depth) language models apart.",
) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one sub-command per row of ``commands``, in that order."""
    parser = OneLineParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        _add_command(sub, command, command.name)
    return parser


def one_line(err: BaseException) -> str:
    """An error's message on one line (a ``KeyError`` without its quotes)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_cli(
    commands: Sequence[Command], argv: Sequence[str] | None = None, *, prog: str = "loopscope"
) -> int:
    """Parse ``argv`` against ``commands`` and run the chosen row; returns the exit status.

    A user-fixable error prints ``loopscope: error: <message>`` on stderr and returns 2 (never a
    traceback); Ctrl-C prints the row's ``interrupted`` line and returns 130."""
    args = build_parser(commands, prog=prog).parse_args(argv)
    command: Command = args.command_row
    assert command.run is not None, f"command {args.command_path!r} has nothing to run"
    try:
        if command.common is not None:
            args.options = prepare_run(args, command.common, args.command_path)
        return command.run(args)
    except KeyboardInterrupt:
        print(command.interrupted, file=sys.stderr)
        return 130
    except REPORTED_ERRORS as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
