"""The one atomic writer every store uses (trace chunks, ablation cells, training
checkpoints, reports).

A file is written to a temporary name in its own directory, flushed and fsynced, then renamed
over the target, and the directory is fsynced so the rename itself survives a crash. A reader
therefore sees the old file or the new one, never half of one, even after ``kill -9`` or a power
cut; a failed write (a full disk, say) removes its temporary file and leaves the old file as it
was. ``publish_directory`` does the same for a whole directory built under a temporary name:
its files are written plainly (``write_unpublished``: nothing reads an unpublished directory, and
a rerun removes one left by a crash), then made durable together, by one ``syncfs`` of their file
system where Linux offers it (one flush instead of two fsyncs per file), else one fsync per file,
before the rename.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

#: Files loopscope writes are meant to be shared (mkstemp alone would make them 0600).
FILE_MODE = 0o644


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block ends without error."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(target.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """``path`` holds exactly ``data`` afterwards, or is unchanged."""
    with atomic_file(path) as fh:
        fh.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent))


def write_with(path: str | Path, save: Callable[[str], None]) -> None:
    """Atomically write a file that a library can only save by name (``save(tmp_name)``),
    such as ``safetensors.torch.save_file`` or ``numpy.save``."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(target.parent)


def write_unpublished(path: str | Path, save: Callable[[BinaryIO], None]) -> None:
    """Write a file inside a directory that :func:`publish_directories` will publish: a plain
    write, since publishing makes every file durable before anyone can see it, and a crash before
    that leaves only an unpublished directory, which a rerun rebuilds."""
    with open(path, "wb") as fh:
        save(fh)
    os.chmod(path, FILE_MODE)


def _syncfs(directory: Path) -> bool:
    """Flush the file system holding ``directory`` in one call (Linux ``syncfs``, which reports
    write-back errors since Linux 5.8); False where it is missing or fails, so that the caller
    fsyncs each file instead and any error surfaces there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(directory, os.O_RDONLY)
    except (OSError, AttributeError):
        return False
    try:
        return bool(libc.syncfs(fd) == 0)
    except AttributeError:  # a C library without syncfs
        return False
    finally:
        os.close(fd)


def _fsync_files(built: Path) -> None:
    for item in built.rglob("*"):
        if item.is_file():
            with open(item, "rb+") as fh:
                os.fsync(fh.fileno())


def publish_directories(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Rename fully written directories (``built`` → ``final``, all in one parent) into place,
    after making every file in them durable: one ``syncfs`` for the whole group where it works
    (a batch of chunks costs one flush), else one fsync per file."""
    if not pairs:
        return
    if not _syncfs(pairs[0][0]):  # syncfs covers the files' data and their entries
        for built, _ in pairs:
            _fsync_files(built)
            fsync_directory(built)
    parents = []
    for built, final in pairs:
        os.replace(built, final)
        if final.parent not in parents:
            parents.append(final.parent)
    for parent in parents:
        fsync_directory(parent)


def publish_directory(built: Path, final: Path) -> None:
    """Rename a fully written directory into place, after making every file in it durable."""
    publish_directories([(built, final)])
