"""Ouro family against the authors' own implementation: a tiny seeded checkpoint in the published
layout, with logits, per-recurrence states and exit-gate values that their modeling code produced
(tests/fixtures/ouro, see tools/make_ouro_fixtures.md)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from helpers import FIXTURES, edited_checkpoint
from safetensors.torch import load_file
from tolerances import (
    cast_tolerance,
    forward_depth,
    forward_tolerance,
    magnitude,
    model_tolerance,
    rounding_tolerance,
)

from loopscope.engine.cache import ActivationCache
from loopscope.engine.loop import ContextLengthError, block_step, prelude_output
from loopscope.engine.probes import CaptureProbe
from loopscope.engine.sites import Site
from loopscope.families.checkpoint import CheckpointError
from loopscope.families.ouro import (
    ExitDistribution,
    OuroExitRecorder,
    OuroLM,
    early_exit_logits,
    exit_distribution,
    exit_probabilities,
    is_ouro_config,
    load_ouro,
    ouro_config_from_dict,
)
from loopscope.families.parcae import is_parcae_config
from loopscope.families.raven import is_raven_config
from loopscope.nn.layers import Edit

FIXTURE = FIXTURES / "ouro"
CHECKPOINT = FIXTURE / "checkpoint"
RECURRENCES = (1, 2, 4, 8)
THRESHOLDS = (0.3, 0.6)


@pytest.fixture(scope="module")
def model() -> OuroLM:
    return load_ouro(CHECKPOINT)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference.safetensors"))


def _block_site(model: OuroLM, r: int, layer: int) -> Site:
    k = model.meta.block_layers
    return Site("block", layer, r, r * k + layer)


# ------------------------------------------------------------------- numerics vs reference
@torch.no_grad()
def test_logits_match_reference_at_several_recurrence_counts(model: OuroLM, ref: dict) -> None:
    """The reference's default readout (exit threshold 1.0) is the last recurrence."""
    ids = ref["input_ids"]
    for r in RECURRENCES:
        logits = model(ids, recurrences=r).logits
        expected = ref[f"logits_default_r{r}"]
        tol = model_tolerance(model, expected, r)
        torch.testing.assert_close(logits, expected, atol=tol, rtol=0)
    assert (ref["logits_default_r4"] - ref["logits_default_r8"]).abs().max() > 0.5


@torch.no_grad()
def test_normed_state_after_every_recurrence_matches_reference(model: OuroLM, ref: dict) -> None:
    """``model.norm`` runs after every recurrence and the next recurrence takes the normed
    state: our state after recurrence t is the reference's t-th hidden state."""
    ids = ref["input_ids"]
    last = model.meta.block_layers - 1
    for r in RECURRENCES:
        rec = ActivationCache()
        out = model(ids, recurrences=r, probes=[rec])
        states = torch.stack(
            [model.recurrence_norm(rec[_block_site(model, t, last)]) for t in range(r)]
        )
        tol = model_tolerance(model, ref[f"states_r{r}"], r)
        torch.testing.assert_close(states, ref[f"states_r{r}"], atol=tol, rtol=0)
        torch.testing.assert_close(out.state, ref[f"states_r{r}"][-1], atol=tol, rtol=0)


@torch.no_grad()
def test_every_layer_at_every_recurrence_matches_reference(model: OuroLM, ref: dict) -> None:
    rec = ActivationCache()
    model(ref["input_ids"], recurrences=2, probes=[rec])
    k = model.meta.block_layers
    expected = ref["layer_states_r2"]
    assert expected.shape[0] == 2 * k
    for r in range(2):
        for j in range(k):
            got = rec[_block_site(model, r, j)]
            tol = model_tolerance(model, expected, 2)
            torch.testing.assert_close(got, expected[r * k + j], atol=tol, rtol=0)


@torch.no_grad()
def test_block_step_is_one_recurrence_from_the_embeddings(model: OuroLM, ref: dict) -> None:
    inputs, positions = prelude_output(model, ref["input_ids"])
    state = inputs  # no prelude: the state starts as the token embeddings
    for t in range(4):
        state = block_step(model, state, inputs, positions)
        tol = model_tolerance(model, ref["states_r4"], t + 1)
        torch.testing.assert_close(state, ref["states_r4"][t], atol=tol, rtol=0)


# ------------------------------------------------------------------- early-exit gate
@torch.no_grad()
def test_gate_logits_after_every_recurrence_match_reference(model: OuroLM, ref: dict) -> None:
    for r in RECURRENCES:
        dist = exit_distribution(model, ref["input_ids"], r)
        assert dist.gate_logits.shape == (r, *ref["input_ids"].shape)
        tol = model_tolerance(model, ref[f"gate_logits_r{r}"], r)
        torch.testing.assert_close(dist.gate_logits, ref[f"gate_logits_r{r}"], atol=tol, rtol=0)
        # σ(x) = 1/(1 + e^−x): three rounded operations on values below 1
        tol = rounding_tolerance(torch.float32, 1.0, 3)
        torch.testing.assert_close(dist.lambdas, torch.sigmoid(dist.gate_logits), atol=tol, rtol=0)
        # the method the adaptive-depth module calls, on the reference's own normed states
        gate = model.exit_gate_logits(ref[f"states_r{r}"])
        # one linear layer (a sum over d_model terms) on the very states the reference read
        one_layer = forward_tolerance(
            torch.float32, magnitude(ref[f"gate_logits_r{r}"]), 1, model.meta.d_model
        )
        torch.testing.assert_close(gate, ref[f"gate_logits_r{r}"], atol=one_layer, rtol=0)


@torch.no_grad()
def test_exit_distribution_sums_to_one_and_is_nonnegative(model: OuroLM, ref: dict) -> None:
    for r in RECURRENCES:
        probs = exit_distribution(model, ref["input_ids"], r).probabilities
        assert float(probs.min()) >= 0.0
        # r probabilities of at most r rounded factors each, then their sum: under r² roundings
        tol = rounding_tolerance(torch.float32, 1.0, r * r)
        torch.testing.assert_close(probs.sum(0), torch.ones(probs.shape[1:]), atol=tol, rtol=0)
    lam = exit_distribution(model, ref["input_ids"], 8).lambdas
    assert float(lam.min()) > 0.02 and float(lam.max()) < 0.98  # the gate really varies


def test_exit_probabilities_on_known_gates() -> None:
    """λ = ½ three times → ½, ¼ and the remainder ¼; a saturated first gate exits at once."""
    half = torch.zeros(3, 1, 1)
    torch.testing.assert_close(
        exit_probabilities(half).flatten(), torch.tensor([0.5, 0.25, 0.25]), atol=0, rtol=0
    )
    sure = torch.tensor([60.0, 0.0, 0.0]).view(3, 1, 1)
    torch.testing.assert_close(
        exit_probabilities(sure).flatten(), torch.tensor([1.0, 0.0, 0.0]), atol=0, rtol=0
    )
    one = exit_probabilities(torch.tensor([-3.0]).view(1, 1, 1))
    assert float(one) == 1.0  # a single recurrence takes all the probability
    dist = ExitDistribution.from_gate_logits(half.expand(3, 1, 2))
    # 1·½ + 2·¼ + 3·¼: dyadic numbers, exact in float32 whatever the order of the sum
    expected = torch.full((1, 2), 1.75)
    torch.testing.assert_close(dist.expected_recurrences(), expected, atol=0, rtol=0)
    assert dist.exit_step(0.5).tolist() == [[0, 0]]
    assert dist.exit_step(0.7).tolist() == [[1, 1]]
    assert dist.exit_step(1.01).tolist() == [[2, 2]]  # never reached: the last recurrence


@torch.no_grad()
def test_early_exit_readouts_match_reference(model: OuroLM, ref: dict) -> None:
    """Threshold exit, fixed-step exit and the expectation over the exit distribution."""
    ids = ref["input_ids"]
    for r in RECURRENCES:
        for q in THRESHOLDS:
            got = early_exit_logits(model, ids, r, threshold=q)
            expected = ref[f"logits_threshold{q}_r{r}"]
            tol = model_tolerance(model, expected, r)
            torch.testing.assert_close(got, expected, atol=tol, rtol=0)
        got = early_exit_logits(model, ids, r, expected=True)
        expected = ref[f"logits_weighted_r{r}"]
        torch.testing.assert_close(got, expected, atol=model_tolerance(model, expected, r), rtol=0)
        default = early_exit_logits(model, ids, r)  # config threshold 1.0
        expected = ref[f"logits_default_r{r}"]
        tol = model_tolerance(model, expected, r)
        torch.testing.assert_close(default, expected, atol=tol, rtol=0)
    for step in range(4):
        got = early_exit_logits(model, ids, 4, step=step)
        expected = ref[f"logits_step{step}_r4"]
        tol = model_tolerance(model, expected, step + 1)
        torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    diff = ref["logits_threshold0.3_r4"] - ref["logits_default_r4"]
    assert diff.abs().max() > 0.5  # tokens really exit early at 0.3
    with pytest.raises(ValueError, match="at most one"):
        early_exit_logits(model, ids, 4, step=1, expected=True)
    with pytest.raises(ValueError, match=r"step must lie in \[0, 4\)"):
        early_exit_logits(model, ids, 4, step=4)


@torch.no_grad()
def test_exit_recorder_works_as_a_probe_alongside_others(model: OuroLM, ref: dict) -> None:
    recorder, capture = OuroExitRecorder(model), CaptureProbe()
    model(ref["input_ids"], recurrences=3, probes=[capture, recorder])
    dist = recorder.result()
    tol = model_tolerance(model, ref["gate_logits_r4"], 3)
    torch.testing.assert_close(dist.gate_logits, ref["gate_logits_r4"][:3], atol=tol, rtol=0)
    with pytest.raises(RuntimeError, match="probes"):
        OuroExitRecorder(model).result()


@torch.no_grad()
def test_adaptive_depth_module_reads_the_gate(model: OuroLM, ref: dict) -> None:
    """loopscope.studies.adaptive finds ``exit_gate_logits`` and gets the reference's cumulative
    exit
    probabilities."""
    from loopscope.studies.adaptive import collect_signals

    signals = collect_signals(model, [ref["input_ids"][0]], 4)[0]
    assert signals.gate_cdf is not None
    lam = torch.sigmoid(ref["gate_logits_r4"][:, 0].double())
    cdf = 1 - torch.cumprod(1 - lam, 0)
    # σ has slope at most ¼ and the cdf adds up 4 gates: its error is at most the gate logits'
    tol = model_tolerance(model, ref["gate_logits_r4"], 4)
    np.testing.assert_allclose(signals.gate_cdf, cdf.numpy(), atol=tol, rtol=0)


# ------------------------------------------------------------------- attention, probes, edits
@torch.no_grad()
def test_eager_attention_agrees_with_fused_and_is_causal(model: OuroLM, ref: dict) -> None:
    ids = ref["input_ids"]
    fused = model(ids, recurrences=3, return_attn=False).logits
    rec = ActivationCache(attention=True)
    eager = model(ids, recurrences=3, probes=[rec]).logits
    torch.testing.assert_close(eager, fused, atol=model_tolerance(model, fused, 3), rtol=0)
    b, t = ids.shape
    assert len(rec.attention_sites()) == 3 * model.meta.block_layers
    for probs in (rec.attention(site) for site in rec.attention_sites()):
        assert probs is not None and probs.shape == (b, model.meta.n_heads, t, t)
        ones = torch.ones(b, model.meta.n_heads, t)  # a row is a sum of t probabilities
        tol = rounding_tolerance(torch.float32, 1.0, t)
        torch.testing.assert_close(probs.sum(-1), ones, atol=tol, rtol=0)
        assert float(probs.triu(1).abs().max()) == 0.0


@torch.no_grad()
def test_capture_probe_holds_per_recurrence_states_and_attention(model: OuroLM, ref: dict) -> None:
    probe = CaptureProbe(attention=True)
    model(ref["input_ids"], recurrences=2, probes=[probe])
    k, t, d = model.meta.block_layers, ref["input_ids"].shape[1], model.meta.d_model
    b = ref["input_ids"].shape[0]
    states = probe.stage_array("block")
    assert states.shape == (2, k, b, t, d)  # every batch row kept
    attn = probe.attention_array()
    assert attn is not None and attn.shape == (2, k, b, model.meta.n_heads, t, t)
    expected = ref["layer_states_r2"].reshape(2, k, b, t, d).numpy()
    tol = model_tolerance(model, ref["layer_states_r2"], 2)
    np.testing.assert_allclose(states, expected, atol=tol, rtol=0)
    assert probe.stage_array("prelude").shape == (0,) and probe.stage_array("coda").shape == (0,)


@torch.no_grad()
def test_edits_reach_the_chosen_site_only(model: OuroLM, ref: dict) -> None:
    ids = ref["input_ids"]
    base = model(ids, recurrences=3)
    same = model(ids, recurrences=3, edit_plan=lambda s: lambda c, x: x)
    torch.testing.assert_close(same.logits, base.logits, atol=0, rtol=0)

    def zero_attn_at_r1(site: Site) -> Edit | None:
        if site.stage == "block" and site.layer == 1 and site.recurrence == 1:
            return lambda comp, x: torch.zeros_like(x) if comp == "attn" else x
        return None

    early, late = ActivationCache(), ActivationCache()
    model(ids, recurrences=3, probes=[early])
    edited = model(ids, recurrences=3, edit_plan=zero_attn_at_r1, probes=[late])
    rounding = model_tolerance(model, base.logits, 3)  # the edit moves more than rounding can
    assert not torch.allclose(edited.logits, base.logits, atol=rounding, rtol=0)
    before, after = _block_site(model, 1, 0), _block_site(model, 1, 1)
    torch.testing.assert_close(late[before], early[before], atol=0, rtol=0)
    rounding = model_tolerance(model, early[after], 2)
    assert not torch.allclose(late[after], early[after], atol=rounding, rtol=0)


# ------------------------------------------------------------------- format and metadata
def test_layout_and_metadata_follow_config(model: OuroLM) -> None:
    assert model.meta.family == "ouro"
    assert model.meta.layout == "(0, 3⊗l, 0)"
    assert model.meta.train_recurrences == 4  # total_ut_steps
    assert model.meta.default_init_state == "prelude"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert model.config.early_exit_threshold == 1.0
    assert model.unembedding().data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.final_norm_weight() is model.model.norm.weight
    mlp = cast(Any, model.block[0]).mlp
    assert mlp.down is mlp.down_proj  # the name the neuron-class analysis reads
    with pytest.raises(ContextLengthError):
        model(torch.zeros(1, 65, dtype=torch.long), recurrences=1)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 3), 128), recurrences=1)


def test_config_recognition() -> None:
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert is_ouro_config(config)
    assert not is_raven_config(config) and not is_parcae_config(config)
    assert not is_ouro_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert is_ouro_config({"architectures": ["OuroForCausalLM"]})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
        ({"use_sliding_window": True, "sliding_window": 8}, "sliding-window"),
        ({"layer_types": ["sliding_attention"] * 3}, "sliding-window"),
    ],
)
def test_settings_we_do_not_run_are_refused(change: dict, message: str) -> None:
    config = {**json.loads((CHECKPOINT / "config.json").read_text()), **change}
    with pytest.raises(CheckpointError, match=message):
        ouro_config_from_dict(config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head_dim": None, "num_attention_heads": 3}, r"hidden_size = 32 is not divisible by "),
        ({"num_key_value_heads": 0}, r"num_key_value_heads must be a positive integer, got 0"),
        ({"total_ut_steps": 2.5}, r"total_ut_steps must be a positive integer, got 2\.5"),
        ({"rope_theta": "1e4"}, r"rope_theta must be a positive number, got '1e4' \(str\)"),
    ],
)
def test_a_wrong_config_field_is_named_with_its_file_and_fix(
    tmp_path: Path, change: dict, message: str
) -> None:
    path = _copy_with(tmp_path, lambda t: None, change)
    with pytest.raises(CheckpointError, match=message) as err:
        load_ouro(path)
    assert str(err.value).startswith(f"{path / 'config.json'}: ")
    assert "config.json" in str(err.value).split(": ", 1)[1]  # the fix names the file too


def test_bf16_load_casts_every_tensor_and_stays_close(ref: dict) -> None:
    model = load_ouro(CHECKPOINT, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(ref["input_ids"], recurrences=4).logits.float()
    expected = ref["logits_default_r4"]
    tol = cast_tolerance(torch.bfloat16, magnitude(expected), forward_depth(model.meta, 4))
    assert (logits - expected).abs().max() < tol
    agree = (logits.argmax(-1) == ref["logits_default_r4"].argmax(-1)).float().mean()
    assert agree > 0.8


# ------------------------------------------------------------------- loading errors
def _copy_with(
    tmp: Path,
    edit: Callable[[dict[str, torch.Tensor]], object],
    config_change: dict | None = None,
) -> Path:
    return edited_checkpoint(CHECKPOINT, tmp, edit, config_change, prefix="ouro")


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(tmp_path: Path) -> None:
    def damage(t: dict[str, torch.Tensor]) -> None:
        del t["model.layers.2.input_layernorm_2.weight"]
        t["model.early_exit_gate.weight"] = torch.zeros(2, 32)
        t["model.extra.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError) as err:
        load_ouro(_copy_with(tmp_path, damage))
    message = str(err.value)
    assert "missing tensors: model.layers.2.input_layernorm_2.weight" in message
    assert "unexpected tensors: model.extra.weight" in message
    assert "model.early_exit_gate.weight: checkpoint (2, 32) vs model (1, 32)" in message


def test_missing_exit_gate_is_listed(tmp_path: Path) -> None:
    path = _copy_with(tmp_path, lambda t: t.pop("model.early_exit_gate.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.early_exit_gate\.bias"):
        load_ouro(path)


def test_tied_embeddings_drop_and_share_the_head(tmp_path: Path) -> None:
    path = _copy_with(tmp_path, lambda t: t.pop("lm_head.weight"), {"tie_word_embeddings": True})
    tied = load_ouro(path)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    shutil.copy(CHECKPOINT / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle"):
        load_ouro(tmp_path)


def test_non_ouro_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not an Ouro config"):
        load_ouro(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_ouro(tmp_path / "absent")


@torch.no_grad()
def test_ouro_refuses_an_init_state_it_was_not_trained_for(model: OuroLM, ref: dict) -> None:
    """Ouro has no injection, so its state must start as the embeddings: zeros or random would
    silently give other logits. The family declares it; the engine refuses by name, and the
    documented override still runs the experiment."""
    from loopscope.core.errors import LoopscopeError

    ids = ref["input_ids"]
    for mode in ("zeros", "random"):
        with pytest.raises(LoopscopeError, match=r"init_state='(zeros|random)'.*prelude"):
            model(ids, recurrences=2, init_state=mode)
    default = model(ids, recurrences=2).logits
    assert torch.equal(model(ids, recurrences=2, init_state="prelude").logits, default)
    forced = model(ids, recurrences=2, init_state="zeros", allow_any_init_state=True).logits
    assert not torch.allclose(forced, default)
