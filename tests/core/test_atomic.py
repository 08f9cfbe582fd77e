"""The atomic writer: a reader sees the old file or the new one, never a mix, and a failed
write (here a full disk, simulated by a save that raises ENOSPC half-way) leaves the old file
and no temporary behind."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from loopscope.core import atomic


def test_write_json_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic.write_json(target, {"x": 1})
    atomic.write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic.write_bytes(target, b"old")
    with pytest.raises(OSError) as info, atomic.atomic_file(target) as fh:
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_write_with_a_library_saver(tmp_path: Path) -> None:
    target = tmp_path / "w.txt"

    def save(name: str) -> None:
        Path(name).write_text("saved")

    atomic.write_with(target, save)
    assert target.read_text() == "saved"

    def failing(name: str) -> None:
        Path(name).write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic.write_with(target, failing)
    assert target.read_text() == "saved"
    assert [p.name for p in tmp_path.iterdir()] == ["w.txt"]


def test_publish_directory(tmp_path: Path) -> None:
    built = tmp_path / ".tmp-chunk"
    built.mkdir()
    (built / "x.npy").write_bytes(b"123")
    atomic.publish_directory(built, tmp_path / "chunk")
    assert (tmp_path / "chunk" / "x.npy").read_bytes() == b"123"
    assert not built.exists()


@pytest.mark.parametrize("syncfs", [True, False], ids=["one-syncfs", "fsync-per-file"])
def test_publish_directories_publishes_a_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    if not syncfs:  # a platform without syncfs (or one where it fails) fsyncs each file
        monkeypatch.setattr(atomic, "_syncfs", lambda directory: False)
    pairs = []
    for i in range(3):
        built = tmp_path / f".chunk{i}.partial"
        built.mkdir()
        atomic.write_unpublished(built / "x.npy", lambda fh, i=i: fh.write(bytes([i]) * 4))
        pairs.append((built, tmp_path / f"chunk{i}"))
    atomic.publish_directories(pairs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk0", "chunk1", "chunk2"]
    assert [(tmp_path / f"chunk{i}" / "x.npy").read_bytes() for i in range(3)] == [
        bytes([i]) * 4 for i in range(3)
    ]
    assert oct((tmp_path / "chunk1" / "x.npy").stat().st_mode & 0o777) == oct(atomic.FILE_MODE)
    atomic.publish_directories([])  # nothing to publish is not an error


def test_syncfs_flushes_where_linux_has_it(tmp_path: Path) -> None:
    import sys

    assert atomic._syncfs(tmp_path) is sys.platform.startswith("linux")
    assert atomic._syncfs(tmp_path / "missing") is False
