"""Batched tracing: prompts of different lengths share a forward pass through right padding,
and every prompt's chunk equals tracing that prompt alone, in every family and on both
attention paths; pad positions never enter a metric; a batch that runs out of memory is split;
a batched run resumes prompt by prompt under any batch size."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from family_zoo import FAMILIES
from tolerances import forward_depth, forward_tolerance, magnitude, widest_sum

import loopscope.trace.writer as writer
from loopscope.analysis.stages import StagesAccumulator
from loopscope.engine.contract import LoopedLM
from loopscope.engine.loop import RunSpec, padded_initial_state, prelude_output, run_probed
from loopscope.engine.probes import CaptureProbe, DynamicsProbe, PerRowProbes
from loopscope.pipeline import report
from loopscope.trace.batched import PAD_ID, padded_ids
from loopscope.trace.settings import PromptInput, TraceError, TraceSettings
from loopscope.trace.store import chunk_paths
from loopscope.trace.writer import trace_prompts

LENGTHS = (3, 7, 5, 11)
RECURRENCES = 5
SETTINGS = TraceSettings(
    recurrences=RECURRENCES, attention_recurrences=2, stability_prompts=2, stability_iters=6
)


#: Inkling-2 is traced at two recurrences only (see the Inkling-2 tests below: each pass
#: expands rounding differences about fivefold in the tiny model).
TRACED = [name for name in FAMILIES if name != "inkling2"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> LoopedLM:
    return FAMILIES[str(request.param)]().eval()


@pytest.fixture(scope="module", params=TRACED)
def traced_family(request: pytest.FixtureRequest) -> LoopedLM:
    return FAMILIES[str(request.param)]().eval()


@pytest.fixture(scope="module")
def looplm() -> LoopedLM:
    return FAMILIES["looplm"]().eval()


def prompts_of(model: LoopedLM, lengths: tuple[int, ...] = LENGTHS) -> list[PromptInput]:
    """Seeded prompts of ``lengths`` tokens whose ids avoid the pad id (so a test can tell
    pad positions by their id) and fit every vocabulary here (the smallest is 100)."""
    generator = torch.Generator().manual_seed(7)
    top = min(model.meta.vocab_size, 100)
    return [
        PromptInput(f"p{i}", torch.randint(PAD_ID + 1, top, (n,), generator=generator).tolist())
        for i, n in enumerate(lengths)
    ]


# ------------------------------------------------------------------------- comparing chunks


def _numbers(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a JSON record with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")
    else:
        yield path, value


def _is_float(value: Any) -> bool:
    return isinstance(value, float)


def _close(want: float, have: float, tol: float) -> bool:
    """Equal to ``tol``, NaN matching NaN (a diverged record stays diverged)."""
    return want == have or abs(want - have) <= tol or (np.isnan(want) and np.isnan(have))


def _chunk_arrays(chunk: Path) -> dict[str, Any]:
    """Every array and JSON leaf of a chunk, keyed by file (and key or path)."""
    values: dict[str, Any] = {}
    for path in sorted(chunk.iterdir()):
        if path.suffix == ".npy":
            values[path.name] = np.load(path)
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                values.update({f"{path.name}:{k}": arrays[k] for k in arrays.files})
        else:
            for leaf, value in _numbers(json.loads(path.read_text())):
                values[f"{path.name}{leaf}"] = value
    return values


def batched_tolerance(
    model: LoopedLM, values: np.ndarray, length: int, recurrences: int = RECURRENCES
) -> float:
    """How far a padded batch's result may lie from the prompt's own. On the real positions
    the batch does the prompt's arithmetic, but in matrix products of another shape, which
    block and sum in another order: two evaluations that differ only in rounding, through
    the whole pass (forward_tolerance). The widest sum is a weight's input or, for the norms
    and Gram spectra of a layer's states, the T·d entries of that layer."""
    terms = max(widest_sum(model), length * model.meta.d_model)
    depth = forward_depth(model.meta, recurrences)
    return forward_tolerance(torch.float32, magnitude(values), depth, terms)


def assert_same_values(
    model: LoopedLM,
    expected: dict[str, Any],
    got: dict[str, Any],
    length: int,
    label: object,
    recurrences: int = RECURRENCES,
) -> float:
    """``got`` holds the keys of ``expected``, floats equal to :func:`batched_tolerance`,
    everything else (token ids, logit-lens predictions, divergence flags, labels) exactly.
    Returns the largest absolute float difference seen."""
    assert expected.keys() == got.keys(), label
    worst = 0.0
    for key, want in expected.items():
        have = got[key]
        if isinstance(want, np.ndarray) and want.dtype.kind == "f":
            assert want.shape == have.shape, (label, key)
            np.testing.assert_array_equal(np.isnan(want), np.isnan(have), err_msg=key)
            tol = batched_tolerance(model, want, length, recurrences)
            np.testing.assert_allclose(have, want, rtol=0, atol=tol, err_msg=f"{label} {key}")
            if want.size:
                worst = max(worst, float(np.nanmax(np.abs(have - want), initial=0.0)))
        elif isinstance(want, np.ndarray):
            np.testing.assert_array_equal(have, want, err_msg=f"{label} {key}")
        elif _is_float(want) and _is_float(have):
            tol = batched_tolerance(model, np.asarray(want), length, recurrences)
            assert _close(want, have, tol), (label, key, want, have)
            if np.isfinite(want):
                worst = max(worst, abs(want - have))
        else:
            assert want == have, (label, key, want, have)
    return worst


def assert_same_chunks(model: LoopedLM, alone: Path, batched: Path) -> float:
    """Every chunk of ``batched`` equals that of ``alone`` (:func:`assert_same_values`)."""
    assert chunk_paths(alone).keys() == chunk_paths(batched).keys()
    worst = 0.0
    for index, chunk in chunk_paths(alone).items():
        length = len(np.load(chunk / "tokens.npy"))
        expected, got = _chunk_arrays(chunk), _chunk_arrays(chunk_paths(batched)[index])
        worst = max(worst, assert_same_values(model, expected, got, length, index))
    return worst


# -------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(("attention", "batch_size"), [(True, 4), (False, 3)])
def test_batched_chunks_equal_each_prompt_traced_alone(
    traced_family: LoopedLM, attention: bool, batch_size: int, tmp_path: Path
) -> None:
    # eager attention (recorded) with every prompt in one batch; the fused kernel with three
    family = traced_family
    prompts = prompts_of(family)
    settings = TraceSettings(**{**SETTINGS.__dict__, "attention": attention})
    alone = trace_prompts(family, prompts, tmp_path / "alone", settings, progress=False)
    batched = trace_prompts(
        family, prompts, tmp_path / "batched", settings, progress=False, batch_size=batch_size
    )
    assert batched.completed() == alone.completed() == [0, 1, 2, 3]
    assert batched.header == alone.header  # the batch size is not part of the trace
    assert (tmp_path / "batched" / "prompt_00000" / "stability.json").exists()
    assert_same_chunks(family, alone.path, batched.path)


def test_reports_of_batched_and_single_traces_agree(looplm: LoopedLM, tmp_path: Path) -> None:
    # the pooled metrics: limiting-behaviour labels, verdicts and every measurement
    prompts = prompts_of(looplm)
    alone = trace_prompts(looplm, prompts, tmp_path / "alone", SETTINGS, progress=False)
    batched = trace_prompts(
        looplm, prompts, tmp_path / "batched", SETTINGS, progress=False, batch_size=4
    )
    metrics = [
        json.loads(report(store.path, tmp_path / name).metrics_json.read_text())
        for name, store in (("r-alone", alone), ("r-batched", batched))
    ]
    leaves = [dict(_numbers(m)) for m in metrics]
    assert leaves[0].keys() == leaves[1].keys()
    labels = [k for k, v in leaves[0].items() if isinstance(v, str)]
    assert any("verdicts" in k for k in labels)  # stability verdicts
    assert any("limiting_behaviour/per_layer_token_rates" in k for k in leaves[0])  # labels
    for key, want in leaves[0].items():
        have = leaves[1][key]
        if _is_float(want) and _is_float(have):
            tol = batched_tolerance(looplm, np.asarray(want), max(LENGTHS))
            assert _close(want, have, tol), (key, want, have)
        else:
            assert want == have, (key, want, have)


@pytest.mark.parametrize("capture", ["summary", "anderson"])
def test_summary_traces_measure_each_prompts_fixed_point_in_batches(
    looplm: LoopedLM, capture: str, tmp_path: Path
) -> None:
    # the second pass against X* (the last recurrence, or Anderson's solve per prompt)
    fixed_point = "anderson" if capture == "anderson" else "last"
    settings = TraceSettings(
        **{**SETTINGS.__dict__, "capture": "summary", "fixed_point": fixed_point}
    )
    prompts = prompts_of(looplm)
    alone = trace_prompts(looplm, prompts, tmp_path / "alone", settings, progress=False)
    batched = trace_prompts(
        looplm, prompts, tmp_path / "batched", settings, progress=False, batch_size=4
    )
    summary = np.load(batched.path / "prompt_00001" / "summary.npz")
    assert np.isfinite(summary["ref_distance"]).all()
    assert_same_chunks(looplm, alone.path, batched.path)


def _probe_values(probes: list[Any]) -> dict[str, Any]:
    """What a DynamicsProbe, a StagesAccumulator and a CaptureProbe recorded, by name."""
    dynamics, stages, capture = probes
    values: dict[str, Any] = {
        f"summary:{k}": v for k, v in asdict(dynamics.result()).items() if v is not None
    }
    values.update({f"stages{k}": v for k, v in _numbers(stages.result().to_dict())})
    for stage in ("prelude", "block", "coda"):
        values[stage] = capture.stage_array(stage)
    values["attn"] = capture.attention_array()
    return values


@pytest.mark.parametrize("attention", [True, False])
def test_inkling2_batched_probes_equal_each_prompt_alone(attention: bool) -> None:
    # Inkling-2 is not traced (see TRACED): its per-prompt probes run on the engine directly.
    # Two recurrences: the tiny model's weights are moved far off their init, which makes
    # each pass expand differences about fivefold, so any rounding difference (even a batch
    # of two copies of one prompt, unpadded, against the prompt alone) outgrows a gain-one
    # bound after a few passes; two keep it inside forward_tolerance.
    model = FAMILIES["inkling2"]().eval()
    prompts = prompts_of(model)
    ids, lengths = padded_ids(prompts, torch.device("cpu"))
    recurrences = 2
    spec = RunSpec(recurrences)

    def probes() -> list[Any]:
        k = model.meta.block_layers
        dynamics = DynamicsProbe(recurrences, k, track_attention=attention)
        return [dynamics, StagesAccumulator(), CaptureProbe(attention=attention)]

    rows = [probes() for _ in prompts]
    run_probed(model, ids, spec, [PerRowProbes(rows, lengths)], attention=attention)
    for index, (prompt, row) in enumerate(zip(prompts, rows)):
        alone = probes()
        run_probed(model, torch.tensor([prompt.ids]), spec, alone, attention=attention)
        expected, got = _probe_values(alone), _probe_values(row)
        assert (expected["attn"] is None) is not attention
        for values in (expected, got):
            values["attn"] = values["attn"] if attention else np.zeros(0)
        assert_same_values(model, expected, got, len(prompt.ids), index, recurrences)


def test_inkling2_traces_without_a_logit_lens_batched_and_alone(tmp_path: Path) -> None:
    # its head mixes every block state of the run, so it declares no mid-run read-out: the
    # trace records no logit lens and the report says why instead of failing
    model = FAMILIES["inkling2"]().eval()
    assert not model.readout_between_recurrences
    settings = TraceSettings(**{**SETTINGS.__dict__, "recurrences": 2})
    prompts = prompts_of(model)
    alone = trace_prompts(model, prompts, tmp_path / "alone", settings, progress=False)
    batched = trace_prompts(
        model, prompts, tmp_path / "batched", settings, progress=False, batch_size=4
    )
    assert batched.completed() == alone.completed() == [0, 1, 2, 3]
    for index, chunk in chunk_paths(alone.path).items():
        assert not (chunk / "logit_lens.npy").exists()
        length = len(prompts[index].ids)
        expected = _chunk_arrays(chunk)
        got = _chunk_arrays(chunk_paths(batched.path)[index])
        assert_same_values(model, expected, got, length, index, recurrences=2)
    for store, name in ((alone, "r-alone"), (batched, "r-batched")):
        made = report(store.path, tmp_path / name)
        reason = json.loads(made.metrics_json.read_text())["dynamics"]["not_measured"]
        assert "read out between recurrences" in reason["logit_lens"]
        assert "trace again" not in reason["logit_lens"]
        assert "Logit lens" in made.html.read_text()


def _poison_pads(model: LoopedLM, monkeypatch: pytest.MonkeyPatch, value: float) -> None:
    """Make every pad position's embedding ``value`` (NaN or huge): if any pad state or
    attention entered a metric, that metric would change (or turn NaN)."""
    embed = model.embed

    def poisoned(input_ids: torch.Tensor) -> torch.Tensor:
        hidden = embed(input_ids)
        return hidden.masked_fill((input_ids == PAD_ID)[..., None], value)

    monkeypatch.setattr(model, "embed", poisoned)


#: NaN pads where attention masks by -inf and guards non-finite values (our eager path);
#: huge finite pads where a masked score is a finite minimum plus the pad's (Hugging Face's
#: eager path: NaN plus that minimum stays NaN) or a fused kernel multiplies a masked zero
#: weight by a pad's value (0·NaN is NaN): a NaN pad would reach real tokens there through
#: the mask itself, which finite pads, the only kind a real batch holds, never do.
POISONS = [
    ("looplm", True, float("nan")),
    ("huginn", True, float("nan")),
    ("looplm", False, 1e4),
    ("huginn", False, 1e4),
    ("hf-retrofit", True, 1e4),
    ("hf-retrofit", False, 1e4),
]


@pytest.mark.parametrize(("name", "attention", "value"), POISONS)
def test_pad_positions_never_enter_a_metric(
    name: str, attention: bool, value: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = FAMILIES[name]().eval()
    settings = TraceSettings(**{**SETTINGS.__dict__, "attention": attention})
    prompts = prompts_of(model)
    alone = trace_prompts(model, prompts, tmp_path / "alone", settings, progress=False)
    _poison_pads(model, monkeypatch, value)
    poisoned = trace_prompts(
        model, prompts, tmp_path / "poisoned", settings, progress=False, batch_size=4
    )
    for index in poisoned.completed():
        summary = np.load(poisoned.path / f"prompt_{index:05d}" / "summary.npz")
        assert not summary["divergent"].any()
        assert np.isfinite(summary["state_norm"]).all()
    assert_same_chunks(model, alone.path, poisoned.path)


def test_poisoned_pads_would_show_in_an_unsliced_batch(
    looplm: LoopedLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the poison above reaches the states, so its absence from every metric means something
    _poison_pads(looplm, monkeypatch, float("nan"))
    prompts = prompts_of(looplm, (3, 7))
    ids, _ = padded_ids(prompts, torch.device("cpu"))
    whole = CaptureProbe()
    looplm(ids, recurrences=2, probes=[whole])
    block = whole.stage_array("block")  # (R, L, B, T, D)
    assert np.isnan(block[:, :, 0, 3:]).all() and np.isfinite(block[:, :, 0, :3]).all()


def test_per_row_probes_and_a_batch_capture_keep_every_row(looplm: LoopedLM) -> None:
    prompts = prompts_of(looplm, (4, 6, 2))
    ids, lengths = padded_ids(prompts, torch.device("cpu"))
    whole = CaptureProbe(attention=True)
    rows = [CaptureProbe(attention=True) for _ in prompts]
    with torch.no_grad():
        looplm(ids, recurrences=3, probes=[whole, PerRowProbes([[r] for r in rows], lengths)])
    block, attn = whole.stage_array("block"), whole.attention_array()
    assert block.shape[2] == 3 and attn is not None and attn.shape[2] == 3
    for row, (probe, n) in enumerate(zip(rows, lengths)):
        np.testing.assert_array_equal(probe.stage_array("block")[:, :, 0], block[:, :, row, :n])
        row_attn = probe.attention_array()
        assert row_attn is not None
        np.testing.assert_array_equal(row_attn[:, :, 0], attn[:, :, row, :, :n, :n])
    with pytest.raises(RuntimeError, match="probes for 3 rows but the batch has 2"):
        looplm(ids[:2], recurrences=1, probes=[PerRowProbes([[r] for r in rows], lengths)])


def test_a_padded_random_state_draws_each_row_as_alone(family: LoopedLM) -> None:
    if "random" not in family.supported_init_states:
        pytest.skip(f"{family.meta.family} starts only from {family.supported_init_states}")
    prompts = prompts_of(family, (2, 5, 4))
    ids, lengths = padded_ids(prompts, torch.device("cpu"))
    with torch.no_grad():
        inputs, _ = prelude_output(family, ids)
        state = padded_initial_state(family, inputs, "random", 11, lengths)
        for row, n in enumerate(lengths):
            generator = torch.Generator().manual_seed(11)
            alone = family.initial_state(
                inputs[row : row + 1, :n], "random", generator, family.init_std
            )
            assert torch.equal(state[row : row + 1, :n], alone)
            assert not state[row, n:].any()
        with pytest.raises(ValueError, match=r"lengths \[2, 9, 4\] do not fit a batch of 3"):
            padded_initial_state(family, inputs, "random", 11, [2, 9, 4])


def _chunk_bytes(out: Path) -> dict[str, bytes]:
    return {
        f"{c.name}/{f.name}": f.read_bytes() for c in chunk_paths(out).values() for f in c.iterdir()
    }


def test_a_batched_run_resumes_under_another_batch_size(
    looplm: LoopedLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = prompts_of(looplm, (3, 7, 5, 11, 4, 9))
    out = tmp_path / "resumed"
    trace_prompts(looplm, prompts, out, SETTINGS, progress=False, stop_after=3, batch_size=4)
    assert sorted(chunk_paths(out)) == [0, 1, 2]  # a limit stops at prompts, not batches
    first = _chunk_bytes(out)
    write = writer._write_chunk
    calls = {"n": 0}

    def crash_after_one(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stopped mid-batch, after one more prompt
        write(*args)

    monkeypatch.setattr(writer, "_write_chunk", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        trace_prompts(looplm, prompts, out, SETTINGS, progress=False, batch_size=3)
    monkeypatch.undo()
    assert len(chunk_paths(out)) == 4 and not list(out.glob("*.partial"))
    store = trace_prompts(looplm, prompts, out, SETTINGS, progress=False, batch_size=2)
    assert store.completed() == [0, 1, 2, 3, 4, 5]
    after = _chunk_bytes(out)
    assert {k: after[k] for k in first} == first  # finished chunks are never rewritten
    straight = trace_prompts(looplm, prompts, tmp_path / "straight", SETTINGS, progress=False)
    assert_same_chunks(looplm, straight.path, out)


def test_running_out_of_memory_splits_the_batch(
    looplm: LoopedLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = prompts_of(looplm)
    measure, write = writer.measure_batch, writer._write_chunk
    sizes: list[int] = []
    failed_write = {"done": False}

    def small_batches_only(model: LoopedLM, batch: list[PromptInput], *rest: Any) -> Any:
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return measure(model, batch, *rest)

    def first_second_write_fails(*args: Any) -> None:
        if len(sizes) == 2 and not failed_write["done"] and args[3] != 0:
            failed_write["done"] = True  # the second chunk of a batch, after the first is out
            raise RuntimeError("out of memory while solving stability")
        write(*args)

    monkeypatch.setattr(writer, "measure_batch", small_batches_only)
    monkeypatch.setattr(writer, "_write_chunk", first_second_write_fails)
    store = trace_prompts(looplm, prompts, tmp_path / "oom", SETTINGS, progress=False, batch_size=4)
    monkeypatch.undo()
    assert store.completed() == [0, 1, 2, 3] and failed_write["done"]
    assert sizes[:2] == [4, 2] and max(sizes[2:]) <= 2
    alone = trace_prompts(looplm, prompts, tmp_path / "alone", SETTINGS, progress=False)
    assert_same_chunks(looplm, alone.path, store.path)


def test_batch_size_must_be_a_positive_integer(looplm: LoopedLM, tmp_path: Path) -> None:
    for bad in (0, -2, 1.5, True):
        with pytest.raises(TraceError, match="batch_size must be an integer ≥ 1"):
            trace_prompts(
                looplm, prompts_of(looplm), tmp_path, SETTINGS, progress=False, batch_size=bad
            )
    assert not (tmp_path / "trace.json").exists()


def test_interventions_reach_every_row_of_a_batch(looplm: LoopedLM, tmp_path: Path) -> None:
    # a per-entry edit (the command line's zero / scale / replace) means the same in a batch
    from loopscope.engine.interventions import edit_plan, parse_intervention

    plan = edit_plan([parse_intervention("block.0.mlp@1-3:scale=0.5")])
    prompts = prompts_of(looplm)
    alone = trace_prompts(
        looplm, prompts, tmp_path / "alone", SETTINGS, progress=False, edit_plan=plan
    )
    batched = trace_prompts(
        looplm, prompts, tmp_path / "b", SETTINGS, progress=False, edit_plan=plan, batch_size=4
    )
    plain = trace_prompts(looplm, prompts[:1], tmp_path / "plain", SETTINGS, progress=False)
    assert_same_chunks(looplm, alone.path, batched.path)
    edited = np.load(batched.path / "prompt_00000" / "block.npy")
    assert not np.allclose(edited, np.load(plain.path / "prompt_00000" / "block.npy"))


def test_the_pipeline_passes_the_batch_size_on(
    looplm: LoopedLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopscope.pipeline import trace

    sizes: list[int] = []
    measure = writer.measure_batch

    def counted(model: LoopedLM, batch: list[PromptInput], *rest: Any) -> Any:
        sizes.append(len(batch))
        return measure(model, batch, *rest)

    monkeypatch.setattr(writer, "measure_batch", counted)
    prompts = prompts_of(looplm)
    store = trace(looplm, prompts, tmp_path / "t", SETTINGS, progress=False, batch_size=3)
    assert sizes == [3, 1] and store.completed() == [0, 1, 2, 3]


def test_a_diverging_prompt_is_flagged_as_alone_and_its_neighbours_are_not(
    looplm: LoopedLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = 99  # a NaN embedding: the token (and the later ones reading it) diverge
    prompts = [
        PromptInput(p.text, [98 if t == marker else t for t in p.ids]) for p in prompts_of(looplm)
    ]
    prompts[1].ids[4] = marker
    embed = looplm.embed

    def diverging(input_ids: torch.Tensor) -> torch.Tensor:
        return embed(input_ids).masked_fill((input_ids == marker)[..., None], float("nan"))

    monkeypatch.setattr(looplm, "embed", diverging)
    alone = trace_prompts(looplm, prompts, tmp_path / "alone", SETTINGS, progress=False)
    batched = trace_prompts(
        looplm, prompts, tmp_path / "batched", SETTINGS, progress=False, batch_size=4
    )
    flags = [
        np.load(batched.path / f"prompt_{i:05d}" / "summary.npz")["divergent"] for i in range(4)
    ]
    assert flags[1][4] and not flags[1][:4].any()
    assert not any(f.any() for i, f in enumerate(flags) if i != 1)
    assert_same_chunks(looplm, alone.path, batched.path)


def test_selected_positions_layers_and_recurrences_are_each_prompts_own(
    looplm: LoopedLM, tmp_path: Path
) -> None:
    # "last" is a different position in every row of a padded batch
    settings = TraceSettings(
        **{**SETTINGS.__dict__, "positions": "last", "layers": [1], "keep_recurrences": [0, 4]}
    )
    prompts = prompts_of(looplm)
    alone = trace_prompts(looplm, prompts, tmp_path / "alone", settings, progress=False)
    batched = trace_prompts(
        looplm, prompts, tmp_path / "batched", settings, progress=False, batch_size=4
    )
    assert np.load(batched.path / "prompt_00003" / "block.npy").shape == (2, 1, 1, 16)
    assert_same_chunks(looplm, alone.path, batched.path)
