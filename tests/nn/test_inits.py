"""The family init schemes against the authors' formulas, measured on a width-256 layer, and
LoopLM's own default init left exactly as it was.

Formulas (written here from the authors' code, independently of ``loopscope.nn.inits``):
Huginn's "takase" init (seal-rg/recurrent-pretraining, ``recpre/init.py``) draws normals cut
at ±3σ, σ = √(2/(5d)), output projections σ/√(2L), the embedding σ times the √d it is scaled
by in the forward pass; Ouro's and the Llama layers of the retrofit models use transformers'
generic N(0, 0.02); the retrofit adapter keeps PyTorch's ``nn.Linear`` default U(±1/√fan_in).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.nn.inits import (
    InitScheme,
    InitSizes,
    init_name,
    parse_init_parts,
    scheme_init,
    truncated_std_factor,
    weight_kind,
)

WIDTH = 256
RECURRENCES = 4  # L = block layers × recurrences = 4 for the one-layer stack below


def _stack(injection: str = "concat-linear") -> LoopLM:
    return LoopLM(
        LoopConfig(
            d_model=WIDTH,
            n_heads=4,
            prelude_layers=0,
            block_layers=1,
            coda_layers=0,
            train_recurrences=RECURRENCES,
            injection=injection,  # type: ignore[arg-type]
            init_state="zeros",
        )
    )


def _cut_normal_std() -> float:
    """Std of a unit normal cut at ±3, by quadrature (independent of the closed form)."""
    x = np.linspace(-3.0, 3.0, 200_001)
    pdf = np.exp(-0.5 * x * x)
    return float(np.sqrt(np.trapezoid(x * x * pdf, x) / np.trapezoid(pdf, x)))


def _expected(scheme: str, kind: str, fan_in: int) -> tuple[float, float | None]:
    """(standard deviation, bound on |w| or None) of one weight kind, from the formulas above."""
    depth = RECURRENCES
    if scheme == "huginn":
        sigma = math.sqrt(2 / (5 * WIDTH))
        if kind in ("attn_out", "mlp_out"):
            sigma /= math.sqrt(2 * depth)
        elif kind == "embedding":
            sigma *= math.sqrt(WIDTH)
        return sigma * _cut_normal_std(), 3 * sigma
    if scheme == "retrofit" and kind == "adapter":
        bound = 1 / math.sqrt(fan_in)
        return bound / math.sqrt(3), bound
    return 0.02, None


@pytest.mark.parametrize("scheme", ["huginn", "ouro", "retrofit"])
def test_each_weight_kind_has_the_authors_std(scheme: InitScheme) -> None:
    model = _stack()
    model.reset_parameters(0, scheme)
    kinds_seen = set()
    for name, param in model.named_parameters():
        w = param.detach().double()
        if w.dim() < 2:
            assert torch.equal(w, torch.ones_like(w)), name  # norm gains start at 1
            continue
        kind = weight_kind(name)
        kinds_seen.add(kind)
        std, bound = _expected(scheme, kind, w.shape[1])
        n = w.numel()
        # the sample std of n draws has relative sd ≈ 1/√(2n) (normal) and at most ~1/√n for
        # these light-tailed laws; 4/√n is four of the latter
        assert float(w.std()) == pytest.approx(std, rel=4 / math.sqrt(n)), (scheme, name)
        assert abs(float(w.mean())) < 4 * std / math.sqrt(n), (scheme, name)
        if bound is not None:
            assert float(w.abs().max()) <= bound * (1 + 1e-6), (scheme, name)
    assert kinds_seen == {"embedding", "qkv", "attn_out", "mlp_in", "mlp_out", "adapter"}


def test_truncated_std_factor_matches_quadrature() -> None:
    # trapezoid rule on 200k intervals: error far below 1e-9 for this smooth integrand
    assert truncated_std_factor(3.0) == pytest.approx(_cut_normal_std(), abs=1e-9)


def test_scheme_scales_are_the_formulas() -> None:
    sizes = InitSizes(d_model=WIDTH, effective_depth=10)
    sigma = math.sqrt(2 / (5 * WIDTH))
    assert scheme_init("huginn", "qkv", sizes, WIDTH).scale == sigma
    assert scheme_init("huginn", "mlp_out", sizes, 4 * WIDTH).scale == sigma / math.sqrt(20)
    assert scheme_init("huginn", "adapter", sizes, 2 * WIDTH).scale == sigma
    assert scheme_init("ouro", "adapter", sizes, 2 * WIDTH).scale == 0.02
    retro = scheme_init("retrofit", "adapter", sizes, 2 * WIDTH)
    assert (retro.law, retro.scale) == ("uniform", 1 / math.sqrt(2 * WIDTH))
    with pytest.raises(ValueError, match="unknown init scheme"):
        scheme_init("xavier", "qkv", sizes, WIDTH)  # type: ignore[arg-type]


def _old_default(model: LoopLM, seed: int) -> dict[str, torch.Tensor]:
    """LoopLM's init as it stood before the schemes existed, written out from its rule: one
    generator, parameters in order; 1-d: log-rates −1, biases 0, gains 1; matrices N(0, 0.02),
    output projections N(0, 0.02/√(2L)), the embedding N(0, embed σ), the adapter
    (Z + X)/√2 plus N(0, adapter σ)."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    depth = c.prelude_layers + c.block_layers * c.train_recurrences + c.coda_layers
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            value = -1.0 if name.endswith("log_rate") else 0.0 if name.endswith("bias") else 1.0
            out[name] = torch.full(param.shape, value)
            continue
        std = 0.02 / math.sqrt(2 * depth) if name.endswith(("proj.weight", "down.weight")) else 0.02
        if name.endswith("adapter.weight"):
            std = c.adapter_init_noise
        elif name == "tok_embeddings.weight":
            std = c.embed_init_std
        w = torch.randn(param.shape, generator=generator) * std
        if name.endswith("adapter.weight"):
            eye = torch.eye(c.d_model) / math.sqrt(2)
            w += torch.cat([eye, eye], dim=1)
        out[name] = w
    return out


@pytest.mark.parametrize("injection", ["concat-linear", "gated", "diagonal", "add"])
def test_default_looplm_init_is_unchanged(injection: str) -> None:
    config = LoopConfig(d_model=32, n_heads=4, injection=injection, init_seed=7)  # type: ignore[arg-type]
    model = LoopLM(config)
    expected = _old_default(model, 7)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), expected[name]), name
    # asking for the default by name draws the same numbers again
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_parameters(7, "identity-adapter")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_family_schemes_are_deterministic_and_differ_from_the_default() -> None:
    a, b = _stack(), _stack()
    name = "injection.adapter.weight"
    default = a.state_dict()[name].clone()
    a.reset_parameters(3, "huginn")
    b.reset_parameters(3, "huginn")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.state_dict()[name], default)


def test_init_parts_draw_those_kinds_as_the_other_scheme() -> None:
    parts = parse_init_parts(["embedding=huginn", "adapter=ouro"])
    assert parts == (("embedding", "huginn"), ("adapter", "ouro"))
    assert init_name("retrofit", parts) == "retrofit+embedding=huginn+adapter=ouro"
    model = _stack()
    model.reset_parameters(0, "retrofit", parts)
    for name, param in model.named_parameters():
        w = param.detach().double()
        if w.dim() < 2:
            continue
        kind = weight_kind(name)
        scheme = {"embedding": "huginn", "adapter": "ouro"}.get(kind, "retrofit")
        std, bound = _expected(scheme, kind, w.shape[1])
        assert float(w.std()) == pytest.approx(std, rel=4 / math.sqrt(w.numel())), name
        if bound is not None:
            assert float(w.abs().max()) <= bound * (1 + 1e-6), name
    plain = _stack()
    plain.reset_parameters(0, "retrofit", ())
    again = _stack()
    again.reset_parameters(0, "retrofit")
    for (name, a), (_, b) in zip(plain.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name  # no parts is the scheme itself, draw for draw


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["embedding"], "is not KIND=SCHEME"),
        (["weights=huginn"], "KIND is one of embedding"),
        (["embedding=xavier"], "SCHEME one of huginn, ouro, retrofit"),
        (["embedding=identity-adapter"], "SCHEME one of"),
        (["qkv=ouro", "qkv=huginn"], "name 'qkv' twice"),
    ],
)
def test_bad_init_parts_are_refused_with_the_choices(specs: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_init_parts(specs)


def test_init_parts_need_a_family_scheme() -> None:
    with pytest.raises(ValueError, match="not identity-adapter"):
        _stack().reset_parameters(0, "identity-adapter", (("embedding", "huginn"),))
