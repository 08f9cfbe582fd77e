"""hrm_text family against transformers' own HrmTextForCausalLM: tiny seeded checkpoints saved
by transformers, compared at the trained cycle counts and at other H/L counts, with and without
the prefix-LM mask (token_type_ids)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hrm_checkpoints import TINY_HRM, reference_logits, save_reference
from tolerances import forward_tolerance, magnitude, widest_sum

import loopscope
from loopscope.core.errors import LoopscopeError
from loopscope.engine.nested import NestedCyclesError, NestedSite, NestedStateRecorder
from loopscope.families.checkpoint import CheckpointError
from loopscope.families.hrm_text import (
    HrmTextLM,
    NestedOnlyError,
    hrm_text_config_from_dict,
    is_hrm_text_config,
    load_hrm_text,
    prefix_lm_mask,
)

LAYERS = TINY_HRM["num_hidden_layers"]
COUNTS = ((2, 3), (1, 1), (2, 1), (4, 2), (3, 6))  # (H, L); the first is the trained one


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    directory = tmp_path_factory.mktemp("hrm_text")
    return directory, save_reference(directory, seed=0)


@pytest.fixture(scope="module")
def model(checkpoint: tuple[Path, Any]) -> HrmTextLM:
    return load_hrm_text(checkpoint[0])


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts and their token types: a leading instruction block in both, plus one
    instruction token after a response token in the second (the block need not be contiguous)."""
    ids = torch.randint(
        0, TINY_HRM["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1)
    )
    types = torch.zeros_like(ids)
    types[:, :4] = 1
    types[1, 6] = 1
    return ids, types


def tolerance(model: HrmTextLM, expected: torch.Tensor, n_h: int, n_l: int) -> float:
    """forward_tolerance over the pass's depth: every stack application runs LAYERS layers in
    sequence, n_h·(n_l + 1) applications, then the head."""
    depth = n_h * (n_l + 1) * LAYERS + 1
    return forward_tolerance(torch.float32, magnitude(expected), depth, widest_sum(model))


@pytest.mark.parametrize("n_h,n_l", COUNTS)
@pytest.mark.parametrize("prefix", [False, True])
def test_logits_match_transformers(
    model: HrmTextLM, checkpoint: tuple[Path, Any], n_h: int, n_l: int, prefix: bool
) -> None:
    ids, types = prompts()
    token_types = types if prefix else None
    expected = reference_logits(checkpoint[1], ids, n_h, n_l, token_types)
    with torch.no_grad():
        fused = model.run(ids, cycles={"h": n_h, "l": n_l}, token_type_ids=token_types).logits
        eager = model.run(
            ids, cycles={"h": n_h, "l": n_l}, token_type_ids=token_types, return_attn=True
        ).logits
    # The derived bound, and the 1e-5 the family promises (the measured gap is ~1e-7).
    tol = min(tolerance(model, expected, n_h, n_l), 1e-5)
    assert (fused - expected).abs().max().item() <= tol
    assert (eager - expected).abs().max().item() <= tol


def test_forward_takes_counts_per_level(model: HrmTextLM, checkpoint: tuple[Path, Any]) -> None:
    ids, types = prompts()
    expected = reference_logits(checkpoint[1], ids, 3, 2, types)
    with torch.no_grad():
        out = model(ids, recurrences=3, cycles={"l": 2}, token_type_ids=types)
    assert out.recurrences == 3
    assert (out.logits - expected).abs().max().item() <= tolerance(model, expected, 3, 2)
    trained = reference_logits(checkpoint[1], ids, 2, 3)
    with torch.no_grad():
        default = model(ids).logits
    assert (default - trained).abs().max().item() <= tolerance(model, trained, 2, 3)


def test_prefix_mask_changes_the_logits(model: HrmTextLM) -> None:
    """The mask tests above are not vacuous: the prefix block moves the logits far beyond the
    tolerance, and only at the positions that can see a later instruction token."""
    ids, types = prompts()
    with torch.no_grad():
        causal = model.run(ids).logits
        prefixed = model.run(ids, token_type_ids=types).logits
    change = (prefixed - causal).abs().amax(-1)
    assert change.min().item() > 100 * tolerance(model, causal, 2, 3)
    # A block of one leading token, or none, adds no pair to the causal mask.
    lone = torch.zeros_like(types)
    lone[:, 0] = 1
    with torch.no_grad():
        for same in (lone, torch.zeros_like(types)):
            unchanged = model.run(ids, token_type_ids=same).logits
            assert (unchanged - causal).abs().max().item() <= tolerance(model, causal, 2, 3)


def test_prefix_lm_mask_is_causal_plus_the_instruction_block() -> None:
    types = torch.tensor([[1, 0, 1, 0]])
    allowed = prefix_lm_mask(types)[0, 0]
    expected = torch.tensor(
        [[1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(allowed, expected)


def test_attention_probabilities_follow_the_mask(model: HrmTextLM) -> None:
    ids, types = prompts()
    seen: dict[str, torch.Tensor] = {}

    class Grab:
        wants_attention = True

        def observe(self, site: NestedSite, hidden: torch.Tensor, attn: Any) -> None:
            if attn is not None:
                seen[site.name] = attn

    with torch.no_grad():
        model.run(ids, token_type_ids=types, probes=[Grab()])
    assert len(seen) == 2 * (3 + 1) * LAYERS
    probs = seen["L.1@h1.l2"]
    allowed = prefix_lm_mask(types)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
    assert probs.masked_select(~allowed.expand_as(probs)).abs().max().item() == 0.0
    assert probs[1, :, 0, 6].min().item() > 0.0  # instruction token 0 sees instruction token 6


def test_every_state_reaches_the_probes(model: HrmTextLM) -> None:
    ids, _ = prompts()
    recorder = NestedStateRecorder()
    with torch.no_grad():
        out = model.run(ids, cycles={"h": 3, "l": 2}, probes=[recorder])
    z_l, z_h = recorder.trajectory("L"), recorder.trajectory("H")
    assert z_l.shape == (3, 2, *ids.shape, TINY_HRM["hidden_size"])
    assert z_h.shape == (3, *ids.shape, TINY_HRM["hidden_size"])
    assert torch.equal(z_h[-1], out.z_h) and torch.equal(z_l[-1, -1], out.z_l)
    assert torch.equal(recorder.initial("H"), model.embed(ids))


def test_z_l_init_is_read_from_the_checkpoint(
    model: HrmTextLM, checkpoint: tuple[Path, Any]
) -> None:
    stored = checkpoint[1].model.z_L_init.detach()
    assert stored.abs().min().item() > 0
    assert torch.equal(model.model.z_L_init, stored)


def test_tied_embeddings(tmp_path: Path) -> None:
    reference = save_reference(tmp_path, seed=3, tie_word_embeddings=True)
    tied = load_hrm_text(tmp_path)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    ids, types = prompts()
    expected = reference_logits(reference, ids, 2, 2, types)
    with torch.no_grad():
        got = tied.run(ids, cycles={"l": 2}, token_type_ids=types).logits
    assert (got - expected).abs().max().item() <= tolerance(tied, expected, 2, 2)


def test_loopscope_load_finds_the_family(checkpoint: tuple[Path, Any]) -> None:
    loaded = loopscope.load(checkpoint[0])
    assert isinstance(loaded, HrmTextLM)
    assert loaded.meta.family == "hrm_text"
    assert loaded.meta.train_recurrences == 2
    assert loaded.meta.block_layers == (3 + 1) * LAYERS


def test_config_reading() -> None:
    raw = json.loads(json.dumps({**TINY_HRM, "model_type": "hrm_text"}))
    assert is_hrm_text_config(raw)
    config = hrm_text_config_from_dict(raw)
    assert config.layers_per_stack == LAYERS and config.embedding_scale == 50.0
    inflated = {**raw, "num_hidden_layers": 16, "num_layers_per_stack": LAYERS}
    assert hrm_text_config_from_dict(inflated).layers_per_stack == LAYERS
    with pytest.raises(CheckpointError, match="rope_type"):
        hrm_text_config_from_dict({**raw, "rope_parameters": {"rope_type": "linear"}})
    with pytest.raises(CheckpointError, match="attention_bias"):
        hrm_text_config_from_dict({**raw, "attention_bias": True})
    with pytest.raises(CheckpointError, match="hidden_size"):
        hrm_text_config_from_dict({**raw, "hidden_size": "wide"})


def test_single_loop_entry_points_are_refused(model: HrmTextLM) -> None:
    ids, _ = prompts()

    class SingleLoopProbe:
        wants_attention = False

        def observe(self, *args: Any) -> None:
            raise AssertionError("never fed")

    with pytest.raises(NestedOnlyError, match="nested loops"):
        model(ids, probes=[SingleLoopProbe()])
    with pytest.raises(NestedOnlyError, match="nested loops"):
        model(ids, exit_every_recurrence=True)
    with pytest.raises(NestedOnlyError):
        _ = model.block
    with pytest.raises(NestedOnlyError):
        model.inject(ids.float(), ids.float())


def test_bad_inputs_are_named(model: HrmTextLM) -> None:
    ids, types = prompts()
    with pytest.raises(NestedCyclesError, match="loops are h, l"):
        model.run(ids, cycles={"x": 2})
    with pytest.raises(NestedCyclesError, match="≥ 1"):
        model.run(ids, cycles={"l": 0})
    with pytest.raises(LoopscopeError, match="token_type_ids"):
        model.run(ids, token_type_ids=types[:, :3])
    with pytest.raises(LoopscopeError, match="init_state"):
        model.run(ids, init_state="prelude")


def test_random_initial_state_is_seeded(model: HrmTextLM) -> None:
    ids, _ = prompts()
    with torch.no_grad():
        a = model.run(ids, init_state="random", seed=4).logits
        b = model.run(ids, init_state="random", seed=4).logits
        c = model.run(ids, init_state="random", seed=5).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bfloat16_matches_transformers_in_bfloat16(checkpoint: tuple[Path, Any]) -> None:
    half = load_hrm_text(checkpoint[0], dtype=torch.bfloat16)
    ids, types = prompts()
    reference = copy.deepcopy(checkpoint[1]).to(torch.bfloat16)  # the shared one stays fp32
    expected = reference_logits(reference, ids, 2, 3, types).float()
    with torch.no_grad():
        got = half.run(ids, token_type_ids=types).logits
    assert got.dtype == torch.bfloat16
    depth = 2 * (3 + 1) * LAYERS + 1
    tol = forward_tolerance(torch.bfloat16, magnitude(expected), depth, widest_sum(half))
    assert (got.float() - expected).abs().max().item() <= tol
