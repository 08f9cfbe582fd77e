"""Raven family (Huginn-0125 and the retrofitted-recurrence checkpoints) against the authors' own
implementation: tiny seeded checkpoints in the published layout, with logits and states that
their modeling code produced (tests/fixtures/raven/*, see tools/make_raven_fixtures.md)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from helpers import FIXTURES as ALL_FIXTURES
from helpers import edited_checkpoint, made_with_this_torch
from safetensors.torch import load_file, save_file
from tolerances import (
    cast_tolerance,
    forward_depth,
    forward_tolerance,
    magnitude,
    model_tolerance,
    rounding_tolerance,
    truncated_normal_tolerance,
    widest_sum,
)

from loopscope.analysis.stability import spectral_radius
from loopscope.analysis.stages import StagesAccumulator
from loopscope.engine.cache import ActivationCache
from loopscope.engine.loop import ContextLengthError, block_step, prelude_output
from loopscope.engine.sites import Site
from loopscope.families.checkpoint import CheckpointError
from loopscope.families.raven import (
    RavenLM,
    detect_variant,
    is_raven_config,
    load_raven,
)
from loopscope.nn.layers import Edit

FIXTURES = ALL_FIXTURES / "raven"
VARIANTS = {"huginn": "huginn", "retro_llama": "llama", "retro_olmo": "olmo2"}
RECURRENCES = (1, 4, 8, 16)
STATE_SEED = 1234  # the seed the reference's global generator had when it drew Z0


def _checkpoint(name: str) -> Path:
    return FIXTURES / name / "checkpoint"


def _wte(model: RavenLM) -> torch.Tensor:
    return cast(torch.nn.Embedding, model.transformer["wte"]).weight


def _reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "reference.safetensors"))


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request: pytest.FixtureRequest) -> tuple[str, RavenLM, dict[str, torch.Tensor]]:
    name = str(request.param)
    return name, load_raven(_checkpoint(name)), _reference(name)


# ------------------------------------------------------------------- numerics vs reference
def _same_torch_as_reference(name: str) -> bool:
    return made_with_this_torch(FIXTURES / name)


def _logits_from_state(model: RavenLM, ids: torch.Tensor, z0: torch.Tensor, r: int) -> torch.Tensor:
    """The forward pass from an explicit initial state, built from the engine's public pieces."""
    inputs, positions = prelude_output(model, ids)
    state = z0
    for _ in range(r):
        state = block_step(model, state, inputs, positions)
    for layer in model.coda:
        state, _ = layer(state, positions)
    return model.head(state)


@torch.no_grad()
def test_logits_match_reference_at_several_recurrence_counts(case: tuple) -> None:
    name, model, ref = case
    ids = ref["input_ids"]
    for r in RECURRENCES:
        zeros = model(ids, recurrences=r, init_state="zeros").logits
        tol = model_tolerance(model, ref[f"logits_zeros_r{r}"], r)
        torch.testing.assert_close(zeros, ref[f"logits_zeros_r{r}"], atol=tol, rtol=0)
        # the same pass from the reference's own random initial state
        rand = _logits_from_state(model, ids, ref["init_state_random"], r)
        tol = model_tolerance(model, ref[f"logits_random_r{r}"], r)
        torch.testing.assert_close(rand, ref[f"logits_random_r{r}"], atol=tol, rtol=0)
    # the helper is the engine's pass, and the recurrence count matters (no vacuous match)
    direct = _logits_from_state(model, ids, torch.zeros_like(ref["prelude_out"]), 4)
    tol = model_tolerance(model, ref["logits_zeros_r4"], 4)
    torch.testing.assert_close(direct, ref["logits_zeros_r4"], atol=tol, rtol=0)
    assert (ref["logits_zeros_r4"] - ref["logits_zeros_r8"]).abs().max() > 0.1


@torch.no_grad()
def test_final_state_matches_reference_latents(case: tuple) -> None:
    """Huginn hands the coda ln_f(state); the retrofitted models hand it the raw state."""
    name, model, ref = case
    for r in (4, 16):
        state = model(ref["input_ids"], recurrences=r, init_state="zeros").state
        if VARIANTS[name] == "huginn":
            state = model.transformer["ln_f"](state)
        tol = model_tolerance(model, ref[f"latent_zeros_r{r}"], r)
        torch.testing.assert_close(state, ref[f"latent_zeros_r{r}"], atol=tol, rtol=0)


@torch.no_grad()
def test_random_initial_state_has_the_references_distribution(case: tuple) -> None:
    """Truncated at ±3σ and scaled like the embeddings; seeded through the engine's generator."""
    name, model, ref = case
    inputs, _ = prelude_output(model, ref["input_ids"])
    draw = [
        model.initial_state(inputs, "random", torch.Generator().manual_seed(s), model.init_std)
        for s in (STATE_SEED, STATE_SEED, STATE_SEED + 1)
    ]
    torch.testing.assert_close(draw[0], draw[1], atol=0, rtol=0)
    assert not torch.equal(draw[0], draw[2])
    scale = model.init_std * model.config.embed_scale
    for z0 in (draw[0], ref["init_state_random"]):
        cut = 1 + rounding_tolerance(torch.float32, 1.0, 2)  # 3σ stored, then scaled
        assert float(z0.abs().max()) <= 3 * scale * cut
        assert 0.9 * scale < float(z0.std()) < 1.1 * scale  # ±3σ truncation keeps 98.7% of σ


@torch.no_grad()
def test_seeded_random_state_is_the_references_draw(case: tuple) -> None:
    """With the seed the reference's generator had, the engine draws the very same Z0 and so
    reproduces the reference's random-start logits."""
    name, model, ref = case
    if not _same_torch_as_reference(name):
        pytest.skip("this torch's CPU random stream differs from the one that made the fixture")
    inputs, _ = prelude_output(model, ref["input_ids"])
    gen = torch.Generator().manual_seed(STATE_SEED)
    z0 = model.initial_state(inputs, "random", gen, model.init_std)
    # the same uniforms on every CPU, mapped with or without a fused multiply-add
    tol = truncated_normal_tolerance(torch.float32, model.init_std * model.config.embed_scale)
    torch.testing.assert_close(z0, ref["init_state_random"], atol=tol, rtol=0)
    for r in RECURRENCES:
        out = model(ref["input_ids"], recurrences=r, init_state="random", seed=STATE_SEED)
        tol = model_tolerance(model, ref[f"logits_random_r{r}"], r)
        torch.testing.assert_close(out.logits, ref[f"logits_random_r{r}"], atol=tol, rtol=0)


@torch.no_grad()
def test_every_layer_at_every_recurrence_matches_reference(case: tuple) -> None:
    name, model, ref = case
    rec = ActivationCache()
    model(ref["input_ids"], recurrences=4, init_state="zeros", probes=[rec])
    p, k = model.meta.prelude_layers, model.meta.block_layers
    tol = forward_tolerance(torch.float32, magnitude(ref["prelude_out"]), p, widest_sum(model))
    torch.testing.assert_close(
        rec[Site("prelude", p - 1, 0, p - 1)], ref["prelude_out"], atol=tol, rtol=0
    )
    expected = ref["block_states_zeros_r4"]
    assert expected.shape[0] == 4 * k
    for r in range(4):
        for j in range(k):
            site = Site("block", j, r, p + r * k + j)
            tol = model_tolerance(model, expected, 4)
            torch.testing.assert_close(rec[site], expected[r * k + j], atol=tol, rtol=0)


@torch.no_grad()
def test_block_step_is_one_recurrence(case: tuple) -> None:
    name, model, ref = case
    inputs, positions = prelude_output(model, ref["input_ids"])
    state = torch.zeros_like(inputs)
    for _ in range(4):
        state = block_step(model, state, inputs, positions)
    tol = model_tolerance(model, ref["block_states_zeros_r4"], 4)
    torch.testing.assert_close(state, ref["block_states_zeros_r4"][-1], atol=tol, rtol=0)


# ------------------------------------------------------------------- attention and edits
@torch.no_grad()
def test_eager_attention_agrees_with_fused_and_is_causal(case: tuple) -> None:
    name, model, ref = case
    ids = ref["input_ids"]
    fused = model(ids, recurrences=3, init_state="zeros", return_attn=False).logits
    rec = ActivationCache(attention=True)
    eager = model(ids, recurrences=3, init_state="zeros", probes=[rec]).logits
    torch.testing.assert_close(eager, fused, atol=model_tolerance(model, fused, 3), rtol=0)
    b, t = ids.shape
    expected_sites = model.meta.prelude_layers + 3 * model.meta.block_layers
    expected_sites += model.meta.coda_layers
    assert len(rec.attention_sites()) == expected_sites
    for probs in (rec.attention(site) for site in rec.attention_sites()):
        assert probs is not None
        assert probs.shape == (b, model.meta.n_heads, t, t)
        ones = torch.ones(b, model.meta.n_heads, t)  # a row is a sum of t probabilities
        tol = rounding_tolerance(torch.float32, 1.0, t)
        torch.testing.assert_close(probs.sum(-1), ones, atol=tol, rtol=0)
        assert float(probs.triu(1).abs().max()) == 0.0


@torch.no_grad()
def test_edits_reach_the_chosen_site_only() -> None:
    model = load_raven(_checkpoint("huginn"))
    ids = _reference("huginn")["input_ids"]
    base = model(ids, recurrences=4, init_state="zeros")
    same = model(ids, recurrences=4, init_state="zeros", edit_plan=lambda s: lambda c, x: x)
    torch.testing.assert_close(same.logits, base.logits, atol=0, rtol=0)

    def zero_mlp_at_r2(site: Site) -> Edit | None:
        if site.stage == "block" and site.layer == 0 and site.recurrence == 2:
            return lambda comp, x: torch.zeros_like(x) if comp == "mlp" else x
        return None

    early, late = ActivationCache(attention=True), ActivationCache(attention=True)
    model(ids, recurrences=4, init_state="zeros", probes=[early])
    edited = model(ids, recurrences=4, init_state="zeros", edit_plan=zero_mlp_at_r2, probes=[late])
    rounding = model_tolerance(model, base.logits, 4)  # the edit moves more than rounding can
    assert not torch.allclose(edited.logits, base.logits, atol=rounding, rtol=0)
    before = Site("block", 1, 1, 1 + 1 * 2 + 1)
    after = Site("block", 0, 2, 1 + 2 * 2)
    torch.testing.assert_close(late[before], early[before], atol=0, rtol=0)
    rounding = model_tolerance(model, early[after], 3)
    assert not torch.allclose(late[after], early[after], atol=rounding, rtol=0)


# ------------------------------------------------------------------- format and metadata
def test_layout_and_metadata_follow_config() -> None:
    huginn = load_raven(_checkpoint("huginn"))
    assert huginn.meta.family == "raven"
    assert (huginn.meta.prelude_layers, huginn.meta.block_layers, huginn.meta.coda_layers) == (
        1,
        2,
        2,
    )
    assert huginn.meta.train_recurrences == 4
    assert huginn.meta.default_init_state == "random"
    assert huginn.meta.context_length == 32  # block_size: Huginn's rotary table length
    assert huginn.config.embed_scale == pytest.approx(8.0)  # √64
    assert huginn.unembedding().data_ptr() == _wte(huginn).data_ptr()
    llama = load_raven(_checkpoint("retro_llama"))
    assert (llama.config.n_heads, llama.config.n_kv_heads) == (4, 2)
    assert llama.config.embed_scale == 1.0
    assert llama.meta.context_length == 64  # max_position_embeddings
    assert llama.unembedding().data_ptr() != _wte(llama).data_ptr()
    with pytest.raises(ContextLengthError):
        huginn(torch.zeros(1, 33, dtype=torch.long), recurrences=1)


def test_variant_detection_and_config_recognition() -> None:
    for name, variant in VARIANTS.items():
        config = json.loads((_checkpoint(name) / "config.json").read_text())
        assert is_raven_config(config)
        names = load_file(str(_checkpoint(name) / "model.safetensors")).keys()
        assert detect_variant(config, names) == variant
    assert not is_raven_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_bf16_load_casts_every_tensor_and_stays_close() -> None:
    ref = _reference("huginn")
    model = load_raven(_checkpoint("huginn"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(ref["input_ids"], recurrences=4, init_state="zeros").logits.float()
    expected = ref["logits_zeros_r4"]
    tol = cast_tolerance(torch.bfloat16, magnitude(expected), forward_depth(model.meta, 4))
    assert (logits - expected).abs().max() < tol
    agree = (logits.argmax(-1) == ref["logits_zeros_r4"].argmax(-1)).float().mean()
    assert agree > 0.8


# ------------------------------------------------------------------- loading errors
def _copy_with(tmp: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    return edited_checkpoint(_checkpoint(name), tmp, edit, prefix=name)


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(tmp_path: Path) -> None:
    def damage(t: dict[str, torch.Tensor]) -> None:
        del t["transformer.core_block.1.norm_3.weight"]
        t["transformer.adapter.weight"] = torch.zeros(64, 64)
        t["transformer.extra.weight"] = torch.zeros(3)

    path = _copy_with(tmp_path, "huginn", damage)
    with pytest.raises(CheckpointError) as err:
        load_raven(path)
    message = str(err.value)
    assert "missing tensors: transformer.core_block.1.norm_3.weight" in message
    assert "unexpected tensors: transformer.extra.weight" in message
    assert "transformer.adapter.weight: checkpoint (64, 64) vs model (64, 128)" in message


def test_missing_qk_norm_in_retrofitted_olmo_is_listed(tmp_path: Path) -> None:
    path = _copy_with(
        tmp_path, "retro_olmo", lambda t: t.pop("transformer.coda.1.attn.k_norm.weight")
    )
    with pytest.raises(
        CheckpointError, match=r"missing tensors: transformer\.coda\.1\.attn\.k_norm"
    ):
        load_raven(path)


def test_converter_leftovers_in_a_retrofitted_checkpoint_are_dropped(tmp_path: Path) -> None:
    """The converter's first pass saves Huginn's rotary table and untouched sandwich norms."""

    def leftovers(t: dict[str, torch.Tensor]) -> None:
        t["freqs_cis"] = torch.zeros(1, 4096, 1, 4, 2)
        for i in range(2):
            t[f"transformer.core_block.{i}.norm_3.weight"] = torch.ones(32)
            t[f"transformer.core_block.{i}.norm_4.weight"] = torch.ones(32)

    path = _copy_with(tmp_path, "retro_llama", leftovers)
    ref = _reference("retro_llama")
    with torch.no_grad():
        logits = load_raven(path)(ref["input_ids"], recurrences=4, init_state="zeros").logits
    tol = model_tolerance(load_raven(path), ref["logits_zeros_r4"], 4)
    torch.testing.assert_close(logits, ref["logits_zeros_r4"], atol=tol, rtol=0)

    trained = _copy_with(
        tmp_path,
        "retro_llama",
        lambda t: t.update({"transformer.coda.0.norm_3.weight": torch.full((32,), 2.0)}),
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensors: transformer\.coda\.0\.norm_3"):
        load_raven(trained)


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    shutil.copy(_checkpoint("huginn") / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle"):
        load_raven(tmp_path)


def test_sharded_checkpoint_loads_identically(tmp_path: Path) -> None:
    tensors = load_file(str(_checkpoint("retro_llama") / "model.safetensors"))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(keys, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(_checkpoint("retro_llama") / "config.json", tmp_path / "config.json")
    ref = _reference("retro_llama")
    with torch.no_grad():
        logits = load_raven(tmp_path)(ref["input_ids"], recurrences=8, init_state="zeros").logits
    tol = model_tolerance(load_raven(tmp_path), ref["logits_zeros_r8"], 8)
    torch.testing.assert_close(logits, ref["logits_zeros_r8"], atol=tol, rtol=0)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        load_raven(tmp_path)


def test_config_problems_are_named(tmp_path: Path) -> None:
    path = _copy_with(tmp_path, "retro_llama", lambda t: None)
    config = json.loads((path / "config.json").read_text())
    del config["rope_theta"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope_theta"):
        load_raven(path)
    config["rope_theta"] = 10000.0
    config["test_time_noise"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="test_time_noise"):
        load_raven(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a raven config"):
        load_raven(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_heads": -1}, r"n_heads must be a positive integer, got -1 \(int\); set it in"),
        ({"n_heads": "4"}, r"n_heads must be a positive integer, got '4' \(str\)"),
        ({"n_heads": 3}, r"n_embd = 32 is not divisible by n_heads = 3: every attention head"),
        ({"norm_eps": 0}, r"norm_eps must be a positive number, got 0"),
        ({"tie_embeddings": "yes"}, r"tie_embeddings must be true or false, got 'yes'"),
        ({"n_layers_in_coda": -1}, r"n_layers_in_coda must be an integer ≥ 0, got -1"),
        ({"init_values": {"std": "small"}}, r"init_values\.std must be a finite number"),
    ],
)
def test_a_wrong_config_field_is_named_with_its_file_and_fix(
    tmp_path: Path, change: dict, message: str
) -> None:
    path = _copy_with(tmp_path, "retro_llama", lambda t: None)
    config = {**json.loads((path / "config.json").read_text()), **change}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as err:
        load_raven(path)
    assert str(err.value).startswith(f"{path / 'config.json'}: ")


def test_analyses_run_unchanged_on_a_raven_model() -> None:
    """The stages probe sees every site with attention, and the block map's Jacobian at the
    state after 32 recurrences has a finite spectral radius."""
    model = load_raven(_checkpoint("huginn"))
    ids = _reference("huginn")["input_ids"][:1]
    stages = StagesAccumulator()
    with torch.no_grad():
        model(ids, recurrences=3, init_state="zeros", probes=[stages])
    profile = stages.result()
    assert len(profile.sites) == 1 + 3 * 2 + 2
    for name in ("colsum_concentration", "mixing", "residual_norm"):
        assert np.isfinite(profile.metrics[name]).all(), name
    inputs, positions = prelude_output(model, ids)
    with torch.no_grad():
        state = model(ids, recurrences=32, init_state="zeros").state
    estimate = spectral_radius(lambda z: block_step(model, z, inputs, positions), state, iters=20)
    assert np.isfinite(estimate.radius) and estimate.radius > 0
