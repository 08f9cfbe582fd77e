"""The ``loopscope`` command line: one table of commands in ``loopscope.cli.main``."""
