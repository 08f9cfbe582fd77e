"""Crash safety of ``loopscope train`` and ``loopscope ablate``: a run killed with SIGKILL at any
moment (between steps, in the middle of a checkpoint write, between the resume snapshot and the
exported model) or refused by a full disk resumes on rerun and ends bit-identical to a run that
was never interrupted, and no partly written file is ever read back.

The kills are real ``kill -9`` of the real command in a subprocess: from outside at a random
moment after a checkpoint exists, or from inside at an exact write (``os.replace`` wrapped so the
process kills itself just before or just after renaming a chosen file into place)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch
from helpers import quiet as _quiet
from safetensors import safe_open

import loopscope
from loopscope.cli.main import main as cli_main
from loopscope.core import atomic
from loopscope.core.errors import LoopscopeError
from loopscope.families.looplm import LoopLM
from loopscope.training.loop import train
from loopscope.training.named_configs import get_config

STEPS = 60  # smoke-tiny checkpoints every 10 steps and evaluates at the last one
TRAIN = [
    "train",
    "--config",
    "smoke-tiny",
    "--steps",
    str(STEPS),
    "--device",
    "cpu",
    "--threads",
    "1",
    "--no-progress",
]
ABLATE = [
    "ablate",
    "random-init",
    "--preset",
    "quick",
    "--block-sizes",
    "4",
    "--norms",
    "pre",
    "--injections",
    "add",
    "--seeds",
    "2",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--no-progress",
]
CELLS = ["pre-add-k4-s0.json", "pre-add-k4-s1.json"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NO_SPACE = os.strerror(errno.ENOSPC)

#: Runs the CLI with ``os.replace`` wrapped: at the N-th rename onto a file called NAME the
#: process SIGKILLs itself, "before" the rename (the temporary file cut to half its size, as a
#: write in progress would leave it) or "after" it (the file in place, nothing after it written).
KILLER = r"""
import os, signal, sys
name, nth, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == name:
        seen[0] += 1
        if seen[0] == nth and when == "before":
            os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        if seen[0] == nth:
            real_replace(src, dst, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from loopscope.cli.main import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every run here, in-process or not, uses one thread, so float sums add up alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopscope.cli.main", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _killed_at(name: str, nth: int, when: str, args: list[str]) -> None:
    """Run the CLI until it SIGKILLs itself at the ``nth`` rename onto ``name``."""
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, name, str(nth), when, *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def _temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


def _snapshot_step(out: Path) -> int:
    with safe_open(str(out / "resume" / "state.safetensors"), framework="pt") as handle:
        return int(json.loads(handle.metadata()["trainer_state"])["step"])


def _exported_step(out: Path) -> int:
    return int(json.loads((out / "trainer_state.json").read_text())["step"])


def _resumed_from(stdout: str) -> int | None:
    lines = [line for line in stdout.splitlines() if line.startswith("resuming from step ")]
    return int(lines[0].split()[3]) if lines else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """An uninterrupted run of the same command: its weights and trainer state, as bytes."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = _cli([*TRAIN, "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert _resumed_from(done.stdout) is None
    return {name: (out / name).read_bytes() for name in ("model.safetensors", "trainer_state.json")}


def _assert_same_as_uninterrupted(out: Path, trained: dict[str, bytes]) -> None:
    for name, expected in trained.items():
        assert (out / name).read_bytes() == expected, f"{name} differs from the uninterrupted run"
    assert _temporaries(out) == []


def test_train_killed_between_steps_resumes_bit_identical(
    tmp_path: Path, trained: dict[str, bytes]
) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopscope.cli.main", *TRAIN, "--out", str(out)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (out / "resume" / "state.safetensors").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    step = _snapshot_step(out)
    assert 10 <= step < STEPS

    rerun = _cli([*TRAIN, "--out", str(out)])
    assert rerun.returncode == 0, rerun.stderr
    assert _resumed_from(rerun.stdout) == step
    _assert_same_as_uninterrupted(out, trained)


def test_train_killed_inside_checkpoint_writes_never_reads_a_partial_one(
    tmp_path: Path, trained: dict[str, bytes]
) -> None:
    out = tmp_path / "run"
    args = [*TRAIN, "--out", str(out)]
    # killed while writing the step-20 snapshot: a torn temporary file, the step-10 one intact
    _killed_at("state.safetensors", 2, "before", args)
    assert _snapshot_step(out) == _exported_step(out) == 10
    assert [p.parent.name for p in _temporaries(out)] == ["resume"]

    # the rerun resumes from step 10, then is killed right after its step-40 snapshot is in
    # place, before the loadable model of step 40 is written (that one still says step 30)
    _killed_at("state.safetensors", 3, "after", args)
    assert (_snapshot_step(out), _exported_step(out)) == (40, 30)
    assert _temporaries(out) == []  # the torn file was removed, never read

    rerun = _cli(args)
    assert rerun.returncode == 0, rerun.stderr
    assert _resumed_from(rerun.stdout) == 40  # the snapshot, not the older exported model
    _assert_same_as_uninterrupted(out, trained)


def _full_disk_on(name: str, nth: int) -> Callable[..., None]:
    """``atomic.write_with`` whose ``nth`` write of a file called ``name`` runs out of space
    after writing part of its temporary file, as a real full disk would."""
    real = atomic.write_with
    seen = [0]

    def write_with(path: str | Path, save: Callable[[str], None]) -> None:
        if Path(path).name == name:
            seen[0] += 1
            if seen[0] == nth:

                def save_then_fail(tmp: str) -> None:
                    save(tmp)
                    raise OSError(errno.ENOSPC, NO_SPACE, tmp)

                return real(path, save_then_fail)
        return real(path, save)

    return write_with


@pytest.mark.parametrize(
    ("failing", "resumable"),
    [("state.safetensors", 10), ("model.safetensors", 20)],
    ids=["snapshot", "exported-model"],
)
def test_train_on_a_full_disk_says_so_and_resumes(
    tmp_path: Path,
    trained: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failing: str,
    resumable: int,
) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr(atomic, "write_with", _full_disk_on(failing, 2))
    assert cli_main([*TRAIN, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loopscope: error: cannot write the step-20 ")
    assert NO_SPACE in err[0] and "free disk space" in err[0]
    assert f"resumes from step {resumable}," in err[0]

    assert _temporaries(out) == []
    assert _snapshot_step(out) == resumable
    assert loopscope.load(out).meta.name == "smoke-tiny"  # the store stays readable

    monkeypatch.undo()
    assert cli_main([*TRAIN, "--out", str(out)]) == 0
    assert _resumed_from(capsys.readouterr().out) == resumable
    _assert_same_as_uninterrupted(out, trained)


# ------------------------------------------------------------------------------ ablation


def _cells(out: Path) -> dict[str, dict[str, Any]]:
    """Each finished cell's result without its wall time (which no rerun repeats)."""
    found = {}
    for path in sorted((out / "cells").glob("*.json")):
        data = json.loads(path.read_text())
        data.pop("seconds")
        found[path.name] = data
    return found


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted sweep of the same cells."""
    out = tmp_path_factory.mktemp("uninterrupted") / "sweep"
    done = _cli([*ABLATE, "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert sorted(_cells(out)) == CELLS
    return out


def _assert_same_sweep(out: Path, swept: Path) -> None:
    assert _cells(out) == _cells(swept)
    assert (out / "table.csv").read_bytes() == (swept / "table.csv").read_bytes()
    assert _without_timings(out / "table.md") == _without_timings(swept / "table.md")


def _without_timings(table: Path) -> list[str]:
    return [line for line in table.read_text().splitlines() if " s of cell time" not in line]


def test_ablate_killed_mid_sweep_keeps_finished_cells_and_resumes(
    tmp_path: Path, swept: Path
) -> None:
    out = tmp_path / "sweep"
    args = [*ABLATE, "--out", str(out)]
    _killed_at(CELLS[1], 1, "before", args)  # while writing the second cell's result
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == [CELLS[0]]
    finished = (out / "cells" / CELLS[0]).read_bytes()

    rerun = _cli(args)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 computed now" in rerun.stdout
    assert (out / "cells" / CELLS[0]).read_bytes() == finished  # kept, not recomputed
    _assert_same_sweep(out, swept)


@contextmanager
def _atomic_file_full_on(name: str) -> Iterator[None]:
    """``atomic.atomic_file`` (under every text and JSON write) running out of space in the
    first write of a file called ``name``, after its temporary file was opened."""
    real: Callable[[str | Path], AbstractContextManager[BinaryIO]] = atomic.atomic_file

    @contextmanager
    def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
        with real(path) as handle:
            if Path(path).name == name:
                handle.write(b'{"cell": ')
                raise OSError(errno.ENOSPC, NO_SPACE, str(path))
            yield handle

    saved = atomic.atomic_file
    atomic.atomic_file = atomic_file
    try:
        yield
    finally:
        atomic.atomic_file = saved


def test_ablate_on_a_full_disk_says_so_and_resumes(
    tmp_path: Path, swept: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    args = [*ABLATE, "--out", str(out)]
    with _atomic_file_full_on(CELLS[1]):
        assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loopscope: error: "), err
    assert NO_SPACE in err[0] and CELLS[1] in err[0] and "free disk space" in err[0]

    assert _temporaries(out) == []
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == [CELLS[0]]
    assert json.loads((out / "sweep.json").read_text())["kind"] == "random-init"

    assert cli_main(args) == 0
    assert "1 computed now" in capsys.readouterr().out
    _assert_same_sweep(out, swept)


def test_a_torn_resume_snapshot_is_refused_with_its_fix(tmp_path: Path) -> None:
    """A snapshot changed behind loopscope's back (cut short) is refused, never half-read."""
    out = tmp_path / "run"
    named = get_config("smoke-tiny")
    cfg = replace(named.train, steps=10)
    train(LoopLM(named.model), cfg, out, progress=False, log=_quiet)
    snapshot = out / "resume" / "state.safetensors"
    snapshot.write_bytes(snapshot.read_bytes()[:1000])
    with pytest.raises(LoopscopeError, match=r"cannot be read as a resume snapshot.*delete"):
        train(LoopLM(named.model), cfg, out, progress=False, log=_quiet)
