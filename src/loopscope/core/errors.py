"""The error type every loopscope failure a user can fix derives from.

A ``LoopscopeError`` message names the input at fault and says how to fix it; the command line
prints it as one line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class LoopscopeError(ValueError):
    """A problem with the user's input or files, stated with its fix."""


class CheckpointError(LoopscopeError):
    """A checkpoint directory that cannot be loaded as it is (missing, malformed or unsafe)."""
