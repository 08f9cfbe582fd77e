"""The ``loopscope`` command line: one table of commands, one entry point.

Each row (a :class:`~loopscope.cli.common.Command`) is declared by the module that implements
it and names the command, its help, how it adds its arguments and the function that runs it;
``loopscope --help`` lists the rows in this order. Adding a command is one row here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from loopscope.cli.ablate import ABLATE
from loopscope.cli.adaptive import ADAPTIVE
from loopscope.cli.analysis import ANALYZE, REPORT, TRACE
from loopscope.cli.common import Command, run_cli
from loopscope.cli.compare import COMPARE
from loopscope.cli.convert import CONVERT_TRACE
from loopscope.cli.demo import DEMO
from loopscope.cli.evaluate import EVALUATE
from loopscope.cli.stages import STAGES
from loopscope.cli.training import EXPORT, TRAIN

__all__ = ["COMMANDS", "main"]

#: Every ``loopscope`` command, in the order ``loopscope --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    DEMO,
    TRACE,
    ANALYZE,
    REPORT,
    COMPARE,
    STAGES,
    ADAPTIVE,
    EVALUATE,
    ABLATE,
    TRAIN,
    EXPORT,
    CONVERT_TRACE,
)


def main(argv: Sequence[str] | None = None) -> int:
    """``loopscope COMMAND ...``; returns the exit status (2 on a user error, 130 on Ctrl-C)."""
    return run_cli(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
