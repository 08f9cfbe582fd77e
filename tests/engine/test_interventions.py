"""Interventions through the real engine, checked against edited weights, and the spec parser."""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import model_tolerance

from loopscope.engine.interventions import (
    InterventionError,
    InterventionSpec,
    check_specs,
    edit_plan,
    parse_intervention,
)
from loopscope.engine.sites import Site
from loopscope.families.looplm import LoopConfig, LoopLM

R = 3


def tiny_model() -> LoopLM:
    cfg = LoopConfig(
        name="tiny",
        d_model=16,
        n_heads=2,
        prelude_layers=1,
        block_layers=2,
        coda_layers=1,
        train_recurrences=R,
        mlp_ratio=2.0,
        context_length=32,
        init_seed=3,
    )
    model = LoopLM(cfg).eval()
    # Larger weights than the default init so that every branch visibly moves the logits.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> LoopLM:
    return tiny_model()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(1))


def logits(model: LoopLM, ids: torch.Tensor, specs: list[InterventionSpec] | None = None):
    with torch.no_grad():
        plan = edit_plan(specs) if specs else None
        return model(ids, recurrences=R, edit_plan=plan).logits


def weight_of(model: LoopLM, stage: str, layer: int, component: str) -> torch.Tensor:
    stack = {"prelude": model.prelude_stack, "block": model.block_stack, "coda": model.coda_stack}
    mod = stack[stage][layer]
    return mod.mlp.down.weight if component == "mlp" else mod.attn.proj.weight


@pytest.mark.parametrize(
    "stage,layer,component",
    [("block", 1, "mlp"), ("block", 0, "attn"), ("prelude", 0, "mlp"), ("coda", 0, "attn")],
)
def test_zero_everywhere_equals_zeroed_weights(
    model: LoopLM, ids: torch.Tensor, stage: str, layer: int, component: str
) -> None:
    edited = copy.deepcopy(model)
    with torch.no_grad():
        weight_of(edited, stage, layer, component).zero_()
    spec = InterventionSpec(stage, layer, component)  # type: ignore[arg-type]
    got = logits(model, ids, [spec])
    assert torch.equal(got, logits(edited, ids))  # a zero weight gives exact zeros
    plain = logits(model, ids)
    rounding = model_tolerance(model, plain, R)  # the edit moves more than rounding can
    assert not torch.allclose(got, plain, atol=rounding, rtol=0)


def test_zero_at_first_recurrence_only(model: LoopLM, ids: torch.Tensor) -> None:
    plain = logits(model, ids)
    everywhere = logits(model, ids, [InterventionSpec("block", 1, "mlp")])
    first = logits(model, ids, [InterventionSpec("block", 1, "mlp", recurrences=[0])])
    rounding = model_tolerance(model, plain, R)  # each edit moves more than rounding can
    assert not torch.allclose(first, plain, atol=rounding, rtol=0)
    assert not torch.allclose(first, everywhere, atol=rounding, rtol=0)
    # Listing every recurrence is the same as "all".
    listed = logits(model, ids, [InterventionSpec("block", 1, "mlp", recurrences=[0, 1, 2])])
    assert torch.equal(listed, everywhere)


def test_callable_doubling_equals_doubled_weight(model: LoopLM, ids: torch.Tensor) -> None:
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.block_stack[0].mlp.down.weight.mul_(2.0)
    spec = InterventionSpec("block", 0, "mlp", action=lambda m: 2.0 * m)
    # Scaling by 2 is exact in floating point, so the two runs agree to the last bit.
    assert torch.equal(logits(model, ids, [spec]), logits(edited, ids))


def test_replace_broadcasts_and_checks_shape(model: LoopLM, ids: torch.Tensor) -> None:
    zero = logits(model, ids, [InterventionSpec("block", 1, "mlp")])
    by_vector = InterventionSpec("block", 1, "mlp", action="replace", value=torch.zeros(16))
    assert torch.equal(logits(model, ids, [by_vector]), zero)
    # A constant replacement is the zeroed branch plus a constant added to the stream.
    const = InterventionSpec("block", 1, "mlp", action="replace", value=torch.tensor(0.25))
    rounding = model_tolerance(model, zero, R)
    assert not torch.allclose(logits(model, ids, [const]), zero, atol=rounding, rtol=0)
    bad = InterventionSpec("block", 1, "mlp", action="replace", value=torch.zeros(5))
    with pytest.raises(InterventionError, match=r"\(5,\) does not broadcast.*\(1, 9, 16\)"):
        logits(model, ids, [bad])


def test_callable_must_keep_shape(model: LoopLM, ids: torch.Tensor) -> None:
    spec = InterventionSpec("block", 0, "attn", action=lambda a: a[..., :3])
    with pytest.raises(InterventionError, match="shaped like its input"):
        logits(model, ids, [spec])


def test_edit_plan_sites_and_composition(model: LoopLM, ids: torch.Tensor) -> None:
    specs = [
        InterventionSpec("block", 0, "attn", recurrences=[1]),
        InterventionSpec("block", 0, "mlp", recurrences=[1]),
    ]
    plan = edit_plan(specs)
    assert plan(Site("block", 0, 0, 1)) is None
    assert plan(Site("block", 1, 1, 4)) is None
    edit = plan(Site("block", 0, 1, 3))
    assert edit is not None
    x = torch.ones(1, 2, 16)
    assert torch.equal(edit("attn", x), torch.zeros_like(x))
    assert torch.equal(edit("mlp", x), torch.zeros_like(x))
    # Both specs on one site = zeroing both weights of that layer, but only at recurrence 1:
    # differs from zeroing them at every recurrence.
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.block_stack[0].attn.proj.weight.zero_()
        edited.block_stack[0].mlp.down.weight.zero_()
    rounding = model_tolerance(model, logits(edited, ids), R)
    assert not torch.allclose(logits(model, ids, specs), logits(edited, ids), atol=rounding, rtol=0)


def test_spec_validation() -> None:
    with pytest.raises(InterventionError, match="prelude layers run once"):
        InterventionSpec("prelude", 0, "mlp", recurrences=[2])
    with pytest.raises(InterventionError, match="component must be"):
        InterventionSpec("block", 0, "ffn")  # type: ignore[arg-type]
    with pytest.raises(InterventionError, match="needs a value"):
        InterventionSpec("block", 0, "mlp", action="replace")
    with pytest.raises(InterventionError, match="action must be"):
        InterventionSpec("block", 0, "mlp", action="double")  # type: ignore[arg-type]


def test_check_specs_against_model(model: LoopLM) -> None:
    check_specs([InterventionSpec("block", 1, "mlp", recurrences=[2])], model.meta, R)
    with pytest.raises(InterventionError, match="tiny has 2 block layers"):
        check_specs([InterventionSpec("block", 2, "mlp")], model.meta, R)
    with pytest.raises(InterventionError, match=r"recurrences \[3, 4\] are not run"):
        check_specs([parse_intervention("block.0.mlp@1,3-4")], model.meta, R)
    with pytest.raises(InterventionError, match="1 coda layers"):
        check_specs([parse_intervention("coda.1.attn")], model.meta, R)


def test_parser_accepts() -> None:
    spec = parse_intervention("block.1.mlp@0,1,2:zero")
    assert (spec.stage, spec.layer, spec.component) == ("block", 1, "mlp")
    assert spec.recurrences == [0, 1, 2] and spec.action == "zero"
    assert parse_intervention("block.0.attn").recurrences is None
    assert parse_intervention("block.0.attn@all").recurrences is None
    assert parse_intervention(" block.3.mlp@5,0-2 ").recurrences == [0, 1, 2, 5]
    rep = parse_intervention("coda.0.attn:replace=1.5")
    assert rep.action == "replace" and rep.value is not None and float(rep.value) == 1.5
    scale = parse_intervention("prelude.1.mlp:scale=0.5")
    assert callable(scale.action)
    x = torch.ones(2, 3)
    assert torch.equal(scale.apply(x), 0.5 * x)
    # Labels are the string syntax again.
    assert spec.label == "block.1.mlp@0-2:zero"
    assert parse_intervention(spec.label) == spec
    assert scale.label == "prelude.1.mlp:scale=0.5"
    assert rep.label == "coda.0.attn:replace=1.5"


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty intervention"),
        ("block.1", "bad site 'block.1'"),
        ("blok.1.mlp", "bad stage 'blok'"),
        ("block.x.mlp", "bad layer 'x'"),
        ("block.-1.mlp", "bad layer '-1'"),
        ("block.1.ffn", "bad component 'ffn'"),
        ("block.1.mlp@", "empty recurrence list"),
        ("block.1.mlp@1-a", "bad recurrence '1-a'"),
        ("block.1.mlp@3-1", "bad recurrence '3-1'"),
        ("block.1.mlp:double", "bad action 'double'"),
        ("block.1.mlp:scale=abc", "bad scale factor 'abc'"),
        ("block.1.mlp:scale=inf", "must be finite"),
        ("block.1.mlp:replace", "bad action 'replace'"),
        ("prelude.0.mlp@2", "drop '@2'"),
    ],
)
def test_parser_rejects(text: str, message: str) -> None:
    with pytest.raises(InterventionError, match=message):
        parse_intervention(text)
