"""Parcae family against the authors' own implementation: a tiny seeded checkpoint in the published
layout (2, 2⊗l, 2) with diagonal injection, value embeddings and tied head, and the logits and
states their code produced (tests/fixtures/parcae, see tools/make_parcae_fixtures.md)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from helpers import FIXTURES, edited_checkpoint, made_with_this_torch
from safetensors.torch import load_file
from tolerances import (
    forward_tolerance,
    magnitude,
    model_tolerance,
    rounding_tolerance,
    truncated_normal_tolerance,
    widest_sum,
)

from loopscope.engine.cache import ActivationCache
from loopscope.engine.loop import ContextLengthError, block_step, prelude_output
from loopscope.engine.probes import CaptureProbe
from loopscope.engine.sites import Site
from loopscope.families.checkpoint import CheckpointError
from loopscope.families.ouro import is_ouro_config
from loopscope.families.parcae import (
    ParcaeLM,
    has_value_embedding,
    is_parcae_config,
    load_parcae,
    parcae_config_from_dict,
)
from loopscope.families.raven import is_raven_config
from loopscope.nn.injection import DiscretisedDiagonalInjection
from loopscope.nn.layers import Edit

FIXTURE = FIXTURES / "parcae"
CHECKPOINT = FIXTURE / "checkpoint"
RECURRENCES = (1, 4, 8, 16)
STATE_SEED = 1234  # the seed the reference's global generator had when it drew Z0


@pytest.fixture(scope="module")
def model() -> ParcaeLM:
    return load_parcae(CHECKPOINT)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference.safetensors"))


def _block_site(model: ParcaeLM, r: int, layer: int) -> Site:
    p, k = model.meta.prelude_layers, model.meta.block_layers
    return Site("block", layer, r, p + r * k + layer)


def _logits_from_state(
    model: ParcaeLM, ids: torch.Tensor, z0: torch.Tensor, r: int
) -> torch.Tensor:
    """The forward pass from an explicit initial state, built from the engine's public pieces."""
    inputs, positions = prelude_output(model, ids)
    state = z0
    for _ in range(r):
        state = block_step(model, state, inputs, positions)
    for layer in model.coda:
        state, _ = layer(state, positions)
    return model.head(state)


def _same_torch_as_reference() -> bool:
    return made_with_this_torch(FIXTURE)


# ------------------------------------------------------------------- numerics vs reference
@torch.no_grad()
def test_logits_match_reference_at_several_recurrence_counts(model: ParcaeLM, ref: dict) -> None:
    ids = ref["input_ids"]
    for r in RECURRENCES:
        zeros = model(ids, recurrences=r, init_state="zeros").logits
        tol = model_tolerance(model, ref[f"logits_zeros_r{r}"], r)
        torch.testing.assert_close(zeros, ref[f"logits_zeros_r{r}"], atol=tol, rtol=0)
        rand = _logits_from_state(model, ids, ref["init_state_random"], r)
        tol = model_tolerance(model, ref[f"logits_random_r{r}"], r)
        torch.testing.assert_close(rand, ref[f"logits_random_r{r}"], atol=tol, rtol=0)
    assert (ref["logits_zeros_r4"] - ref["logits_zeros_r8"]).abs().max() > 0.5
    assert (ref["logits_zeros_r4"] - ref["logits_random_r4"]).abs().max() > 0.1


@torch.no_grad()
def test_seeded_random_state_is_the_references_draw(model: ParcaeLM, ref: dict) -> None:
    """With the seed the reference's generator had, the engine draws the same Z0 ('like-init':
    a discarded normal draw, then a normal truncated at ±3σ) and so reproduces its logits."""
    if not _same_torch_as_reference():
        pytest.skip("this torch's CPU random stream differs from the one that made the fixture")
    inputs, _ = prelude_output(model, ref["input_ids"])
    z0 = model.initial_state(
        inputs, "random", torch.Generator().manual_seed(STATE_SEED), model.init_std
    )
    # the same uniforms on every CPU, mapped with or without a fused multiply-add
    tol = truncated_normal_tolerance(torch.float32, model.init_std)
    torch.testing.assert_close(z0, ref["init_state_random"], atol=tol, rtol=0)
    for r in RECURRENCES:
        out = model(ref["input_ids"], recurrences=r, init_state="random", seed=STATE_SEED)
        tol = model_tolerance(model, ref[f"logits_random_r{r}"], r)
        torch.testing.assert_close(out.logits, ref[f"logits_random_r{r}"], atol=tol, rtol=0)
        if r == 4:
            tol = model_tolerance(model, ref["latent_random_r4"], r)
            torch.testing.assert_close(out.state, ref["latent_random_r4"], atol=tol, rtol=0)


@torch.no_grad()
def test_random_initial_state_has_the_references_distribution(model: ParcaeLM, ref: dict) -> None:
    inputs, _ = prelude_output(model, ref["input_ids"])
    draws = [
        model.initial_state(inputs, "random", torch.Generator().manual_seed(s), model.init_std)
        for s in (STATE_SEED, STATE_SEED, STATE_SEED + 1)
    ]
    torch.testing.assert_close(draws[0], draws[1], atol=0, rtol=0)
    assert not torch.equal(draws[0], draws[2])
    sigma = math.sqrt(2 / (5 * model.config.n_embd))  # the scaled init's embedding std
    assert model.init_std == pytest.approx(sigma)
    for z0 in (draws[0], ref["init_state_random"]):
        assert z0.shape == (*ref["input_ids"].shape, model.config.rec_dim)
        cut = 1 + rounding_tolerance(torch.float32, 1.0, 1)  # 3σ stored in float32
        assert float(z0.abs().max()) <= 3 * sigma * cut
        assert 0.85 * sigma < float(z0.std()) < 1.1 * sigma


@torch.no_grad()
def test_prelude_output_and_every_core_layer_match_reference(model: ParcaeLM, ref: dict) -> None:
    """The prelude output is ln_prelude of the last prelude layer (the injected e); every core
    layer at every recurrence and the state handed to C match."""
    rec = ActivationCache()
    out = model(ref["input_ids"], recurrences=4, init_state="zeros", probes=[rec])
    p, k = model.meta.prelude_layers, model.meta.block_layers
    last_prelude = rec[Site("prelude", p - 1, 0, p - 1)]
    tol = forward_tolerance(torch.float32, magnitude(ref["prelude_out"]), p, widest_sum(model))
    torch.testing.assert_close(last_prelude, ref["prelude_out"], atol=tol, rtol=0)
    expected = ref["block_states_zeros_r4"]
    assert expected.shape[0] == 4 * k
    for r in range(4):
        for j in range(k):
            got = rec[_block_site(model, r, j)]
            tol = model_tolerance(model, expected, 4)
            torch.testing.assert_close(got, expected[r * k + j], atol=tol, rtol=0)
    tol = model_tolerance(model, ref["latent_zeros_r4"], 4)
    torch.testing.assert_close(out.state, ref["latent_zeros_r4"], atol=tol, rtol=0)


@torch.no_grad()
def test_block_step_is_one_recurrence(model: ParcaeLM, ref: dict) -> None:
    inputs, positions = prelude_output(model, ref["input_ids"])
    state = model.initial_state(inputs, "zeros", None, model.init_std)
    for _ in range(4):
        state = block_step(model, state, inputs, positions)
    tol = model_tolerance(model, ref["latent_zeros_r4"], 4)
    torch.testing.assert_close(state, ref["latent_zeros_r4"], atol=tol, rtol=0)


# ------------------------------------------------------------------- injection and layout
def test_diagonal_injection_on_known_parameters() -> None:
    """A_log = 0 (A = 1) and softplus(dt_bias) = 1 give h' = e⁻¹·h + B e."""
    inj = DiscretisedDiagonalInjection(3, 2)
    with torch.no_grad():
        inj.dt_bias.fill_(math.log(math.e - 1))  # softplus⁻¹(1)
        inj.B.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    h, e = torch.tensor([[1.0, -2.0, 4.0]]), torch.tensor([[3.0, 5.0]])
    expected = math.exp(-1) * h + torch.tensor([[3.0, 10.0, 8.0]])
    # softplus (two roundings), exp, the product with h and a sum of two terms
    tol = rounding_tolerance(torch.float32, magnitude(expected), 6)
    torch.testing.assert_close(inj(h, e), expected, atol=tol, rtol=0)
    tol = rounding_tolerance(torch.float32, 1.0, 4)  # softplus, times A, exp
    torch.testing.assert_close(inj.decay(), torch.full((3,), math.exp(-1)), atol=tol, rtol=0)


def test_injection_decay_is_stable_per_channel(model: ParcaeLM) -> None:
    decay = model.injection_decay()
    assert decay is not None and decay.shape == (model.config.rec_dim,)
    assert float(decay.min()) > 0.0 and float(decay.max()) < 1.0


def test_value_embedding_layout_follows_the_authors_alternation(model: ParcaeLM) -> None:
    """Tables at effective layers 1, 3, 5 of 6; gates where the authors' layer ids (prelude i,
    core p + j, coda p + k·mean_recurrence + i) are odd, as n_layer = k·backprop depth = 8."""
    assert sorted(model.value_embeds.keys()) == ["1", "3", "5"]
    stages = (model.prelude, model.block, model.coda)
    keys = [[cast(Any, call).ve_key for call in stage] for stage in stages]
    assert keys == [[None, "1"], [None, "3"], [None, "5"]]
    assert [has_value_embedding(i, 8) for i in (0, 1, 18, 19)] == [False, True, False, True]


@torch.no_grad()
def test_value_embeddings_change_the_output(model: ParcaeLM, ref: dict) -> None:
    ids = ref["input_ids"]
    base = model(ids, recurrences=4, init_state="zeros").logits
    tables = {k: cast(torch.nn.Embedding, e).weight for k, e in model.value_embeds.items()}
    saved = {k: w.detach().clone() for k, w in tables.items()}
    try:
        for w in tables.values():
            w.zero_()
        without = model(ids, recurrences=4, init_state="zeros").logits
    finally:
        for k, w in tables.items():
            w.copy_(saved[k])
    assert (without - base).abs().max() > 0.1


def test_layers_without_the_prompt_ids_say_what_to_do(ref: dict) -> None:
    fresh = load_parcae(CHECKPOINT)
    x = torch.zeros(1, 5, fresh.config.n_embd)
    with pytest.raises(RuntimeError, match=r"model\.embed\(input_ids\)"):
        fresh.prelude[1](x, fresh.positions(5, x.device))


# ------------------------------------------------------------------- attention, probes, edits
@torch.no_grad()
def test_eager_attention_agrees_with_fused_and_is_causal(model: ParcaeLM, ref: dict) -> None:
    ids = ref["input_ids"]
    fused = model(ids, recurrences=3, init_state="zeros", return_attn=False).logits
    rec = ActivationCache(attention=True)
    eager = model(ids, recurrences=3, init_state="zeros", probes=[rec]).logits
    torch.testing.assert_close(eager, fused, atol=model_tolerance(model, fused, 3), rtol=0)
    b, t = ids.shape
    meta = model.meta
    assert (
        len(rec.attention_sites()) == meta.prelude_layers + 3 * meta.block_layers + meta.coda_layers
    )
    for probs in (rec.attention(site) for site in rec.attention_sites()):
        assert probs is not None and probs.shape == (b, meta.n_heads, t, t)
        tol = rounding_tolerance(torch.float32, 1.0, t)  # a row is a sum of t probabilities
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, meta.n_heads, t), atol=tol, rtol=0)
        assert float(probs.triu(1).abs().max()) == 0.0


@torch.no_grad()
def test_capture_probe_holds_per_recurrence_states_and_attention(
    model: ParcaeLM, ref: dict
) -> None:
    probe = CaptureProbe(attention=True)
    model(ref["input_ids"], recurrences=4, init_state="zeros", probes=[probe])
    b, t = ref["input_ids"].shape
    k = model.meta.block_layers
    states = probe.stage_array("block")
    assert states.shape == (4, k, b, t, model.config.rec_dim)  # every batch row kept
    expected = ref["block_states_zeros_r4"].reshape(4, k, b, t, -1).numpy()
    tol = model_tolerance(model, ref["block_states_zeros_r4"], 4)
    np.testing.assert_allclose(states, expected, atol=tol, rtol=0)
    attn = probe.attention_array()
    assert attn is not None and attn.shape == (4, k, b, model.meta.n_heads, t, t)
    assert probe.stage_array("prelude").shape == (2, b, t, model.config.n_embd)
    assert probe.stage_array("coda").shape == (2, b, t, model.config.n_embd)


@torch.no_grad()
def test_edits_reach_the_chosen_site_only(model: ParcaeLM, ref: dict) -> None:
    ids = ref["input_ids"]
    base = model(ids, recurrences=4, init_state="zeros")
    same = model(ids, recurrences=4, init_state="zeros", edit_plan=lambda s: lambda c, x: x)
    torch.testing.assert_close(same.logits, base.logits, atol=0, rtol=0)

    def zero_mlp_at_r2(site: Site) -> Edit | None:
        if site.stage == "block" and site.layer == 0 and site.recurrence == 2:
            return lambda comp, x: torch.zeros_like(x) if comp == "mlp" else x
        return None

    early, late = ActivationCache(), ActivationCache()
    model(ids, recurrences=4, init_state="zeros", probes=[early])
    edited = model(ids, recurrences=4, init_state="zeros", edit_plan=zero_mlp_at_r2, probes=[late])
    rounding = model_tolerance(model, base.logits, 4)  # the edit moves more than rounding can
    assert not torch.allclose(edited.logits, base.logits, atol=rounding, rtol=0)
    before, after = _block_site(model, 1, 1), _block_site(model, 2, 0)
    torch.testing.assert_close(late[before], early[before], atol=0, rtol=0)
    rounding = model_tolerance(model, early[after], 3)
    assert not torch.allclose(late[after], early[after], atol=rounding, rtol=0)


# ------------------------------------------------------------------- format and metadata
def test_layout_and_metadata_follow_config(model: ParcaeLM) -> None:
    meta = model.meta
    assert meta.family == "parcae" and meta.layout == "(2, 2⊗l, 2)"
    assert meta.train_recurrences == 8  # mean_recurrence
    assert meta.default_init_state == "random"  # state_init 'like-init'
    assert meta.context_length == 64 and meta.vocab_size == 128
    assert model.config.injection_type == "diagonal" and model.config.qk_norm
    assert model.unembedding() is model.transformer["wte"].weight  # tied
    assert model.final_norm_weight() is model.transformer["ln_f"].weight
    assert model.rope_table is not None and model.rope_table.shape == (1, 64, 1, 4, 2)
    assert cast(Any, model.coda[0]).mlp.proj.weight.shape == (32, 64)
    with pytest.raises(ContextLengthError):
        model(torch.zeros(1, 65, dtype=torch.long), recurrences=1)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 3), 128), recurrences=1)


def test_config_recognition() -> None:
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["_class_name"] == "ParcaeConfig"
    assert is_parcae_config(config)
    assert not is_raven_config(config) and not is_ouro_config(config)
    huginn = json.loads(
        (FIXTURE.parent / "raven" / "huginn" / "checkpoint" / "config.json").read_text()
    )
    assert not is_parcae_config(huginn)


def test_settings_we_do_not_run_are_all_listed() -> None:
    config = json.loads((CHECKPOINT / "config.json").read_text())
    config.update(norm_class_name="LayerNorm", nonlin_name="Swish", use_fused_head="hhe")
    with pytest.raises(CheckpointError) as err:
        parcae_config_from_dict(config)
    message = str(err.value)
    for part in ("norm_class_name='LayerNorm'", "nonlin_name='Swish'", "use_fused_head='hhe'"):
        assert part in message


# ------------------------------------------------------------------- loading
def _copy_with(
    tmp: Path,
    edit: Callable[[dict[str, torch.Tensor]], object],
    config_change: dict | None = None,
) -> Path:
    return edited_checkpoint(CHECKPOINT, tmp, edit, config_change, prefix="parcae")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 3}, r"n_embd = 32 is not divisible by num_attention_heads = 3"),
        ({"n_embd": -32}, r"n_embd must be a positive integer, got -32"),
        ({"prelude_norm": 1}, r"prelude_norm must be true or false, got 1 \(int\)"),
        ({"rope_settings": {"rope_base": -1}}, r"rope_settings\.rope_base must be a positive"),
    ],
)
def test_a_wrong_config_field_is_named_with_its_file_and_fix(
    tmp_path: Path, change: dict, message: str
) -> None:
    path = _copy_with(tmp_path, lambda t: None, change)
    with pytest.raises(CheckpointError, match=message) as err:
        load_parcae(path)
    assert str(err.value).startswith(f"{path / 'config.json'}: ")


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(tmp_path: Path) -> None:
    def damage(t: dict[str, torch.Tensor]) -> None:
        del t["value_embeds.3.weight"]
        t["transformer.adapter.B"] = torch.zeros(32, 16)
        t["transformer.extra.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError) as err:
        load_parcae(_copy_with(tmp_path, damage))
    message = str(err.value)
    assert "missing tensors: value_embeds.3.weight" in message
    assert "unexpected tensors: transformer.extra.weight" in message
    assert "transformer.adapter.B: checkpoint (32, 16) vs model (32, 32)" in message


@torch.no_grad()
def test_rotary_table_from_config_equals_the_stored_one(tmp_path: Path, ref: dict) -> None:
    """Without ``freqs_cis`` the table comes from rope_settings (base 50000) and gives the same
    logits; a stored table of the wrong length is listed as mis-shaped."""
    path = _copy_with(tmp_path, lambda t: t.pop("freqs_cis"))
    computed = load_parcae(path)
    assert computed.rope_table is None
    logits = computed(ref["input_ids"], recurrences=4, init_state="zeros").logits
    tol = model_tolerance(computed, ref["logits_zeros_r4"], 4)
    torch.testing.assert_close(logits, ref["logits_zeros_r4"], atol=tol, rtol=0)
    short = _copy_with(tmp_path, lambda t: t.update(freqs_cis=t["freqs_cis"][:, :16]))
    with pytest.raises(CheckpointError, match=r"freqs_cis: checkpoint \(1, 16, 1, 4, 2\)"):
        load_parcae(short)


def test_a_separate_tied_head_tensor_is_accepted(tmp_path: Path) -> None:
    """The authors' state dict holds the tied head under both names; either form loads."""
    path = _copy_with(
        tmp_path, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].clone()})
    )
    both = load_parcae(path)
    assert both.lm_head.weight is both.transformer["wte"].weight


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    shutil.copy(CHECKPOINT / "config.json", tmp_path / "config.json")
    (tmp_path / "model.pt").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle"):
        load_parcae(tmp_path)


def test_bf16_load_casts_every_tensor_and_stays_close(ref: dict) -> None:
    model = load_parcae(CHECKPOINT, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_table is not None and model.rope_table.dtype == torch.float32
    with torch.no_grad():
        logits = model(ref["input_ids"], recurrences=4, init_state="zeros").logits
    assert logits.dtype == torch.float32  # the head reads out in fp32, as the authors' does
    agree = (logits.argmax(-1) == ref["logits_zeros_r4"].argmax(-1)).float().mean()
    assert agree > 0.8
