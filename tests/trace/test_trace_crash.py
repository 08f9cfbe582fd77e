"""A trace survives ``kill -9`` and a full disk: what was finished stays bit for bit, nothing
half-written is ever read back, and rerunning the same command finishes the same trace as a run
that was never interrupted."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from helpers import DEMO_PROMPTS
from tolerances import forward_depth, forward_tolerance, magnitude

import loopscope
from loopscope.cli.main import main
from loopscope.trace import TraceError, TraceStore, writer

SRC = Path(loopscope.__file__).resolve().parents[1]
PROMPTS = DEMO_PROMPTS
CHUNK = re.compile(r"prompt_\d{5}")
#: Four bundled prompts, long enough runs that a chunk takes a while to compute and write,
#: one prompt per forward pass (so they finish in order and a resumed run is bit for bit the
#: uninterrupted one; batched runs are killed in test_killed_batched_trace_resumes_...).
ARGS = [
    "trace",
    "demo",
    "--prompts",
    str(PROMPTS),
    "--limit",
    "4",
    "--recurrences",
    "24",
    "--stability-prompts",
    "0",
    "--no-progress",
    "--batch-size",
    "1",
]


def trace_command(out: Path) -> list[str]:
    return [*ARGS, "--out", str(out)]


def run_cli(out: Path) -> int:
    """The command in this process, on one thread (what the subprocesses use)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(trace_command(out))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "trace"
    assert run_cli(out) == 0
    return out


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def _cli_subprocess(out: Path) -> subprocess.Popen[bytes]:
    script = "import sys; from loopscope.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", script, *trace_command(out)],
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _listing(out: Path) -> tuple[list[str], list[str]]:
    """(finished chunks, partial chunks holding at least one file) at the top of ``out``."""
    names = sorted(os.listdir(out)) if out.is_dir() else []
    partial = []
    for name in names:
        if name.endswith(".partial"):
            try:
                if os.listdir(out / name):
                    partial.append(name)
            except FileNotFoundError:  # published between the two calls
                pass
    return [n for n in names if CHUNK.fullmatch(n)], partial


def kill_mid_chunk(proc: subprocess.Popen[bytes], out: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as one chunk is finished and the next is being written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the trace ended before it could be killed: {err.decode()[-500:]}")
        finished, partial = _listing(out)
        if finished and partial:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.001)
    proc.kill()
    pytest.fail("no chunk was in progress within the timeout")


def _files(chunk: Path) -> list[str]:
    return sorted(p.name for p in chunk.iterdir())


def assert_same_chunk(a: Path, b: Path) -> None:
    """The same files with the same contents (``.npz``: the same arrays; its zip headers carry
    write times)."""
    assert _files(a) == _files(b), (a, b)
    for name in _files(a):
        if name.endswith(".npz"):
            with np.load(a / name) as za, np.load(b / name) as zb:
                assert za.files == zb.files
                for key in za.files:
                    assert za[key].tobytes() == zb[key].tobytes(), f"{a.name}/{name}[{key}]"
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{a.name}/{name}"


def assert_same_trace(got: Path, expected: Path) -> None:
    for name in ("trace.json", "prompts.jsonl"):
        assert (got / name).read_bytes() == (expected / name).read_bytes(), name
    a, b = TraceStore(got), TraceStore(expected)
    assert a.completed() == b.completed() == [0, 1, 2, 3]
    for pa, pb in zip(a, b, strict=True):
        assert_same_chunk(pa.path, pb.path)
    assert not [p for p in got.rglob("*") if p.name.endswith((".partial", ".tmp"))]


def _stamps(out: Path, chunks: list[str]) -> dict[str, tuple[int, int]]:
    return {
        f"{c}/{f.name}": (f.stat().st_ino, f.stat().st_mtime_ns)
        for c in chunks
        for f in (out / c).iterdir()
    }


def test_killed_trace_resumes_and_equals_an_uninterrupted_one(
    uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "trace"
    kill_mid_chunk(_cli_subprocess(out), out)

    # What the kill left: finished chunks, exactly like the uninterrupted run's, and one chunk
    # in progress that no reader sees.
    finished, partial = _listing(out)
    assert finished and partial, "the kill must land while a chunk is being written"
    in_progress = int(partial[0][len("prompt_") : -len(".partial")])
    store = TraceStore(out)
    assert store.completed() == list(range(in_progress))
    assert [p.path.name for p in store] == finished
    with pytest.raises(TraceError, match=f"prompt {in_progress} has not been traced"):
        store.prompt(in_progress)
    for name in finished:
        assert_same_chunk(out / name, uninterrupted / name)
    before = _stamps(out, finished)

    # The same command again resumes at the first unfinished prompt.
    rerun = _cli_subprocess(out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()
    assert _stamps(out, finished) == before  # finished chunks were not rewritten
    assert_same_trace(out, uninterrupted)


def _disk_fills_on(nth: int, chunk: str) -> Callable[[Path, Callable[[BinaryIO], None]], None]:
    """``write_unpublished`` whose ``nth`` save into ``chunk`` writes a few bytes, then finds
    the disk full (as a real full disk does: part of the file is there when the error comes)."""
    real = writer.write_unpublished
    calls: list[Path] = []

    def write_unpublished(path: Path, save: Callable[[BinaryIO], None]) -> None:
        if path.parent.name == chunk:
            calls.append(path)
            if len(calls) == nth:

                def fill(fh: BinaryIO) -> None:
                    fh.write(b"\x93NUMPY half")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

                real(path, fill)
        real(path, save)

    return write_unpublished


def test_full_disk_stops_with_one_line_and_a_rerun_completes(
    uninterrupted: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "trace"
    with monkeypatch.context() as patch:
        patch.setattr(writer, "write_unpublished", _disk_fills_on(3, "prompt_00001.partial"))
        assert run_cli(out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("loopscope") and "error: no space left on the disk holding" in err
    assert f"holding {out} (file system " in err
    assert "mounted at /" in err and "while writing prompt 1" in err
    assert "run the same command again to resume" in err

    # The store is readable: prompt 0 finished, nothing half-written left behind.
    store = TraceStore(out)
    assert store.completed() == [0]
    assert_same_chunk(out / "prompt_00000", uninterrupted / "prompt_00000")
    assert not [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]

    # Space freed: the same command finishes the trace, identical to an uninterrupted one.
    assert run_cli(out) == 0
    assert_same_trace(out, uninterrupted)


def _batched_command(out: Path, batch_size: int) -> list[str]:
    """The command of :data:`ARGS` with ``batch_size`` prompts per forward pass."""
    assert ARGS[-2:] == ["--batch-size", "1"]
    return [*ARGS[:-2], "--batch-size", str(batch_size), "--out", str(out)]


def test_killed_batched_trace_resumes_under_another_batch_size(
    uninterrupted: Path, tmp_path: Path
) -> None:
    # Two batches of two prompts: killed once the first batch is published, while the
    # second batch's chunks are being written (a batch's chunks are published together)
    script = "import sys; from loopscope.cli.main import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "trace"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *_batched_command(out, 2)],
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    kill_mid_chunk(proc, out)
    finished, partial = _listing(out)
    assert finished and partial
    in_progress = int(partial[0][len("prompt_") : -len(".partial")])
    store = TraceStore(out)
    assert in_progress not in store.completed()
    assert [p.path.name for p in store] == finished
    with pytest.raises(TraceError, match=f"prompt {in_progress} has not been traced"):
        store.prompt(in_progress)
    reference = tmp_path / "batched"  # the same batch, uninterrupted: the same bytes
    assert run_cli_args(_batched_command(reference, 2)) == 0
    for name in finished:
        assert_same_chunk(out / name, reference / name)
    before = _stamps(out, finished)

    assert run_cli_args(_batched_command(out, 4)) == 0  # resumed in batches of four
    assert _stamps(out, finished) == before  # finished chunks were not rewritten
    for name in ("trace.json", "prompts.jsonl"):  # the batch size is not part of the trace
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert TraceStore(out).completed() == [0, 1, 2, 3]
    assert not [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    depth = forward_depth(loopscope.load("demo").meta, 24)
    for index in TraceStore(uninterrupted).completed():  # as traced alone, to rounding
        chunk, got = TraceStore(uninterrupted).prompt(index), TraceStore(out).prompt(index)
        want_block, got_block = np.asarray(chunk.block), np.asarray(got.block)
        terms = got_block.shape[-2] * got_block.shape[-1]
        tol = forward_tolerance(torch.float32, magnitude(want_block), depth, terms)
        np.testing.assert_allclose(got_block, want_block, rtol=0, atol=tol)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(chunk.tokens))


def run_cli_args(argv: list[str]) -> int:
    """``argv`` in this process, on one thread (what the subprocesses use)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
