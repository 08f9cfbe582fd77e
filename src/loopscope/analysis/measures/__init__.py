"""The measurements of a trace, one module per group; importing this package registers all of
them in :data:`loopscope.analysis.registry.MEASUREMENTS`, module by module in name order.

So a new measurement is one new module here: its function, its figure and its
:func:`~loopscope.analysis.registry.register` call. Where its section, verdict column and
``metrics.json`` keys go is the report's decision (:mod:`loopscope.report.trace_report`); by
default they follow the built-in ones.
"""

from __future__ import annotations

import importlib
import pkgutil


def _import_every_module() -> None:
    for name in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{name}")


_import_every_module()
