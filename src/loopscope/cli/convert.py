"""``loopscope convert-trace TRACE_DIR STORE``: a ``.npy`` trace directory as a Zarr v3 store
that ``xarray.open_zarr`` reads without loopscope, and ``loopscope convert-trace STORE DIR``
back (see :mod:`loopscope.trace.zarr_store`)."""

from __future__ import annotations

import argparse

from loopscope.cli.common import Command

__all__ = ["CONVERT_TRACE"]


def _add_convert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", help="a directory `loopscope trace` wrote, or a Zarr trace store to turn back"
    )
    p.add_argument(
        "dest",
        help="where the Zarr store goes (a path or an fsspec URL: memory://, s3://, ...), or "
        "the trace directory a store becomes",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a store already at that place")


def _cmd_convert(args: argparse.Namespace) -> int:
    from loopscope.trace.zarr_store import convert_trace, is_zarr_store, restore_trace

    if is_zarr_store(args.source):
        restored = restore_trace(args.source, args.dest)
        print(f"trace: {restored.path}")
        return 0
    written = convert_trace(args.source, args.dest, overwrite=args.overwrite)
    print(f"zarr store: {written}")
    return 0


CONVERT_TRACE = Command(
    "convert-trace",
    "a trace directory as a Zarr v3 store (xarray.open_zarr reads it), or back",
    _add_convert_options,
    _cmd_convert,
)
