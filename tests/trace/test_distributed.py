"""Tracing sharded over Ray workers equals tracing in one process, bit for bit — also when a
worker dies mid-run; reruns skip finished work; without --ray nothing imports Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import loopscope
from loopscope.cli.main import main
from loopscope.data import ByteTokenizer
from loopscope.engine.loop import ContextLengthError
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.trace.settings import PromptInput, TraceError, TraceSettings
from loopscope.trace.store import SHARDS_DIR, TraceStore, chunk_paths
from loopscope.trace.writer import trace_prompts

SRC = Path(loopscope.__file__).resolve().parents[1]
SETTINGS = TraceSettings(
    recurrences=6, stability_prompts=1, stability_iters=6, attention_recurrences=2
)
RAY_REASON = "Ray is not installed (optional extra): pip install 'loopscope[ray]'"


def _prompts(n: int) -> list[PromptInput]:
    tokenizer = ByteTokenizer()
    texts = [f"Q: what is {i} plus {2 * i + 3}? A:" for i in range(n)]
    return [PromptInput(text, tokenizer.encode(text, bos=True)) for text in texts]


def _single_thread_trace(prompts: list[PromptInput], out: Path) -> TraceStore:
    """The reference: one process, one thread (what every CPU worker uses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return trace_prompts(loopscope.load("demo"), prompts, out, SETTINGS, progress=False)
    finally:
        torch.set_num_threads(threads)


def _files(chunk: Path) -> list[str]:
    return sorted(p.name for p in chunk.iterdir())


def assert_same_trace(a: TraceStore, b: TraceStore) -> None:
    """Same header, same prompts, and every chunk's arrays equal bit for bit."""
    assert (a.path / "trace.json").read_text() == (b.path / "trace.json").read_text()
    assert (a.path / "prompts.jsonl").read_text() == (b.path / "prompts.jsonl").read_text()
    assert a.completed() == b.completed()
    for pa, pb in zip(a, b, strict=True):
        assert _files(pa.path) == _files(pb.path)
        for name in _files(pa.path):
            fa, fb = pa.path / name, pb.path / name
            if name.endswith(".npy"):
                xa, xb = np.load(fa), np.load(fb)
                assert (xa.dtype, xa.shape) == (xb.dtype, xb.shape), name
                assert xa.tobytes() == xb.tobytes(), f"{pa.path.name}/{name} differs"
            elif name.endswith(".npz"):
                with np.load(fa) as za, np.load(fb) as zb:
                    assert za.files == zb.files
                    for key in za.files:
                        assert za[key].tobytes() == zb[key].tobytes(), f"{name}[{key}]"
            else:
                assert fa.read_bytes() == fb.read_bytes(), name


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason=RAY_REASON)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


def test_sharded_trace_survives_a_killed_worker_and_equals_the_single_process_trace(
    ray_cluster: Any, tmp_path: Path
) -> None:
    from loopscope.trace.sharding import FailOnce, plan_shards, trace_distributed

    prompts = _prompts(8)
    single = _single_thread_trace(prompts, tmp_path / "single")
    out = tmp_path / "sharded"
    crashed = tmp_path / "crashed.json"
    # What a worker killed while writing prompt 3 leaves behind: a half-written chunk.
    stale = out / SHARDS_DIR / "shard_00002-00003" / "prompt_00003.partial"
    stale.mkdir(parents=True)
    (stale / "block.npy").write_bytes(b"\x93NUMPY truncated")

    store = trace_distributed(
        "demo",
        prompts,
        out,
        SETTINGS,
        shard_size=2,
        progress=False,
        fail_once=FailOnce(prompt=2, after=1, marker=str(crashed)),
    )

    # The worker holding prompts 2-3 died after prompt 2; the retry, in another process,
    # traced only prompt 3.
    died = json.loads(crashed.read_text())
    assert died["before"] == 3
    log = out / SHARDS_DIR / "shard_00002-00003" / "attempts.jsonl"
    attempts = [json.loads(line) for line in log.read_text().splitlines()]
    assert [a["todo"] for a in attempts] == [[2, 3], [3]]
    assert attempts[0]["pid"] == died["pid"] != attempts[1]["pid"]
    assert sorted(p.name for p in (out / SHARDS_DIR).iterdir()) == [
        "shard_00000-00001",
        "shard_00002-00003",
        "shard_00004-00005",
        "shard_00006-00007",
    ]
    assert not list(out.rglob("*.partial"))
    assert_same_trace(single, store)
    assert_same_trace(single, TraceStore(out))

    # Rerunning skips every finished shard: nothing is rewritten, no task starts.
    assert plan_shards(len(prompts), set(chunk_paths(out)), 2) == []
    before = _snapshot(out / SHARDS_DIR)
    trace_distributed("demo", prompts, out, SETTINGS, shard_size=2, progress=False)
    assert _snapshot(out / SHARDS_DIR) == before
    # …and a one-process resume sees the shards as finished too.
    trace_prompts(loopscope.load("demo"), prompts, out, SETTINGS, progress=False)
    assert not list(out.glob("prompt_*"))


def test_cli_trace_with_ray_matches_the_cli_without(ray_cluster: Any, tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("".join(f"{p.text}\n" for p in _prompts(3)))
    common = ["--prompts", str(prompt_file), "--recurrences", "4", "--no-progress"]
    common += ["--stability-prompts", "1"]
    one_at_a_time = ["--batch-size", "1"]  # as each Ray worker traces (bit for bit the same)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["trace", "demo", *common, *one_at_a_time, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    sharded = ["trace", "demo", *common, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]
    assert main(sharded) == 0
    assert (tmp_path / "ray" / SHARDS_DIR).is_dir()
    assert_same_trace(TraceStore(tmp_path / "one"), TraceStore(tmp_path / "ray"))


def test_bad_input_is_reported_from_the_workers(ray_cluster: Any, tmp_path: Path) -> None:
    from loopscope.trace.sharding import trace_distributed

    too_long = [PromptInput("long", [1] * 1100)]  # longer than the demo model's context
    with pytest.raises(ContextLengthError, match="prompt 0 has 1100 tokens"):
        trace_distributed("demo", too_long, tmp_path / "t", SETTINGS, progress=False)
    with pytest.raises(TraceError, match="workers must be ≥ 1"):
        trace_distributed("demo", _prompts(1), tmp_path / "t", SETTINGS, workers=0)
    with pytest.raises(TraceError, match="source string"):
        trace_distributed(loopscope.load("demo"), _prompts(1), tmp_path / "t", SETTINGS)


def test_readers_merge_shards_and_never_see_partial_chunks(tmp_path: Path) -> None:
    tiny = LoopConfig(name="tiny", d_model=16, n_heads=2, block_layers=2, context_length=64)
    model = LoopLM(tiny).eval()
    prompts = _prompts(3)
    settings = TraceSettings(recurrences=3, stability_prompts=0, attention=False)
    store = trace_prompts(model, prompts, tmp_path / "t", settings, progress=False)
    shard = tmp_path / "t" / SHARDS_DIR / "shard_00001-00002"
    shard.mkdir(parents=True)
    for index in (1, 2):
        shutil.move(str(tmp_path / "t" / f"prompt_0000{index}"), shard / f"prompt_0000{index}")
    (shard / "prompt_00002").rename(shard / "prompt_00002.partial")
    assert store.completed() == [0, 1]
    assert [p.path for p in store] == [tmp_path / "t" / "prompt_00000", shard / "prompt_00001"]
    assert store.prompt(1).tokens.tolist() == prompts[1].ids
    with pytest.raises(TraceError, match="prompt 2 has not been traced"):
        store.prompt(2)
    # Resuming in one process traces only the missing prompt, at the top level.
    trace_prompts(model, prompts, tmp_path / "t", settings, progress=False)
    assert sorted(chunk_paths(tmp_path / "t")) == [0, 1, 2]
    assert chunk_paths(tmp_path / "t")[2] == tmp_path / "t" / "prompt_00002"


def test_plan_shards_cuts_only_unfinished_prompts() -> None:
    from loopscope.trace.sharding import plan_shards

    shards = plan_shards(7, {1, 2, 5}, 2)
    assert [s.indices for s in shards] == [(0, 3), (4, 6)]
    assert [s.name for s in shards] == ["shard_00000-00003", "shard_00004-00006"]
    with pytest.raises(TraceError, match="shard_size must be ≥ 1"):
        plan_shards(3, set(), 0)


def test_missing_ray_gives_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from loopscope.trace.sharding import trace_distributed

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees without the extra
    with pytest.raises(ImportError, match=r"pip install 'loopscope\[ray\]'"):
        trace_distributed("demo", _prompts(1), tmp_path / "t", SETTINGS)
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("hello\n")
    argv = ["trace", "demo", "--prompts", str(prompt_file), "--out", str(tmp_path / "o")]
    assert main([*argv, "--ray"]) == 2
    assert "pip install 'loopscope[ray]'" in capsys.readouterr().err
    assert main([*argv, "--workers", "2"]) == 2
    assert "--workers only applies with --ray" in capsys.readouterr().err


def test_tracing_without_ray_flag_never_imports_ray(tmp_path: Path) -> None:
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("one\ntwo\n")
    script = (
        "import sys\n"
        "from loopscope.cli.main import main\n"
        f"code = main(['trace', 'demo', '--prompts', {str(prompt_file)!r}, '--out', "
        f"{str(tmp_path / 'o')!r}, '--recurrences', '2', '--no-progress', "
        "'--stability-prompts', '0'])\n"
        "print(code, 'ray' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["0", "False"]
