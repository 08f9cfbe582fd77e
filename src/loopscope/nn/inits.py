"""Weight initialisation schemes of the looped-model families, so an untrained stack starts
the way each family's own training code starts it.

Each scheme gives every weight *kind* (embedding, fused q/k/v, attention output, MLP input,
MLP output, concat-linear adapter, other linear maps, an untied head) a distribution; norm
gains start at 1, biases at 0. ``d`` is the model width and ``L`` the effective depth
``prelude + coda + block × training recurrences``.

- ``huginn``: the "takase" strategy that Huginn (seal-rg/recurrent-pretraining) was trained
  with (model registry ``recpre/model_registry.py``; the factor table in ``recpre/init.py``,
  applied by name in ``recpre/model_dynamic.py``; the released ``recpre/raven_modeling_minimal.py``
  states the same numbers in its ``_init_func``). Every weight is a normal truncated at ±3σ
  with σ = √(2/(5d)); the attention and MLP output projections use σ/√(2L); the fused MLP
  input (gate and up halves) and q, k, v all use σ, and so does the adapter (looked up as an
  input projection, which the table does not name, so it falls back to σ). The embedding is
  drawn at σ and multiplied by √d in the forward pass; LoopLM has no such multiplier, so we
  draw it at σ·√d = √(2/5), which gives the same embedded input.
- ``ouro``: ByteDance's Ouro modeling file (``modeling_ouro.py``, copy in LoopedLMs/ouro_rl)
  does not override transformers' ``PreTrainedModel._init_weights``, so every linear map and
  the embedding is N(0, initializer_range²) with ``initializer_range = 0.02`` (the default in
  its ``configuration_ouro.py`` and in the published config). No depth scaling.
- ``retrofit``: retrofitted recurrence (McLeish et al., LoopedLMs/retrofitting-recurrence)
  starts from a pretrained Llama/OLMo decoder, whose random init is transformers' same
  generic rule with ``initializer_range = 0.02`` (``LlamaPreTrainedModel`` and OLMo-2 do not
  override it): N(0, 0.02²) everywhere. The conversion
  (``convert_pretrained_model/convert_llama.py``) builds the Huginn-format model, copies every
  pretrained layer into it and never sets the new adapter; the modeling file it ships for the
  converted model (``convert_pretrained_model/raven_modeling_minimal_llama.py``) has an
  ``_init_weights`` that only prints that random init is not implemented, as Huginn's released
  modeling file had until July 2025. So the adapter keeps PyTorch's ``nn.Linear`` default:
  uniform on ±1/√fan_in with fan_in = 2d.
- ``identity-adapter``: LoopLM's own start (see ``LoopLM.reset_parameters``), kept as is.

*Parts* (``InitParts``, written ``KIND=SCHEME``) replace the distribution of some weight kinds
by another scheme's, so a verdict can be traced to one part of an init: a retrofit start with
``embedding=huginn`` differs from the retrofit scheme only in the token embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

InitScheme = Literal["identity-adapter", "huginn", "ouro", "retrofit"]
INIT_SCHEMES: tuple[InitScheme, ...] = ("identity-adapter", "huginn", "ouro", "retrofit")
WeightKind = Literal[
    "embedding", "qkv", "attn_out", "mlp_in", "mlp_out", "adapter", "head", "linear"
]
Law = Literal["normal", "truncated", "uniform"]
WEIGHT_KINDS: tuple[WeightKind, ...] = (
    "embedding",
    "qkv",
    "attn_out",
    "mlp_in",
    "mlp_out",
    "adapter",
    "head",
    "linear",
)
#: Weight kinds whose distribution comes from another scheme, as (kind, scheme) pairs.
InitParts = tuple[tuple[WeightKind, InitScheme], ...]

#: Huginn's truncated normals cut at ±3σ.
TRUNCATION = 3.0


@dataclass(frozen=True)
class WeightInit:
    """One weight's distribution: ``normal`` N(0, scale²); ``truncated`` the same normal cut
    at ±3·scale; ``uniform`` on ±scale."""

    law: Law
    scale: float

    def std(self) -> float:
        """The standard deviation the draws have (truncation and the uniform law included)."""
        if self.law == "uniform":
            return self.scale / math.sqrt(3.0)
        if self.law == "truncated":
            return self.scale * truncated_std_factor(TRUNCATION)
        return self.scale

    def draw(self, shape: torch.Size, generator: torch.Generator) -> Tensor:
        out = torch.empty(shape)
        if self.law == "uniform":
            return out.uniform_(-self.scale, self.scale, generator=generator)
        if self.law == "truncated":
            a = TRUNCATION * self.scale
            return nn.init.trunc_normal_(out, 0.0, self.scale, -a, a, generator=generator)
        return out.normal_(0.0, self.scale, generator=generator)


def truncated_std_factor(cut: float) -> float:
    """Standard deviation of a unit normal truncated to ±``cut`` (≈ 0.9866 at 3)."""
    pdf = math.exp(-0.5 * cut * cut) / math.sqrt(2 * math.pi)
    mass = math.erf(cut / math.sqrt(2))
    return math.sqrt(1.0 - 2.0 * cut * pdf / mass)


@dataclass(frozen=True)
class InitSizes:
    """What the schemes' formulas depend on: the width and the effective depth L."""

    d_model: int
    effective_depth: int


def weight_kind(name: str) -> WeightKind:
    """The kind of a LoopLM matrix from its parameter name."""
    if name == "tok_embeddings.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "head"
    for suffix, kind in (
        ("attn.qkv.weight", "qkv"),
        ("attn.proj.weight", "attn_out"),
        ("mlp.up.weight", "mlp_in"),
        ("mlp.gate.weight", "mlp_in"),
        ("mlp.down.weight", "mlp_out"),
        ("adapter.weight", "adapter"),
    ):
        if name.endswith(suffix):
            return kind  # type: ignore[return-value]
    return "linear"


def huginn_init(kind: WeightKind, sizes: InitSizes, fan_in: int) -> WeightInit:
    sigma = math.sqrt(2.0 / (5.0 * sizes.d_model))
    if kind in ("attn_out", "mlp_out"):
        return WeightInit("truncated", sigma / math.sqrt(2.0 * max(sizes.effective_depth, 1)))
    if kind == "embedding":
        return WeightInit("truncated", sigma * math.sqrt(sizes.d_model))
    return WeightInit("truncated", sigma)


def ouro_init(kind: WeightKind, sizes: InitSizes, fan_in: int) -> WeightInit:
    return WeightInit("normal", 0.02)


def retrofit_init(kind: WeightKind, sizes: InitSizes, fan_in: int) -> WeightInit:
    if kind == "adapter":
        return WeightInit("uniform", 1.0 / math.sqrt(fan_in))
    return WeightInit("normal", 0.02)


_SCHEMES = {"huginn": huginn_init, "ouro": ouro_init, "retrofit": retrofit_init}


def scheme_init(scheme: InitScheme, kind: WeightKind, sizes: InitSizes, fan_in: int) -> WeightInit:
    """The distribution of one weight kind under a family scheme (not ``identity-adapter``,
    which is LoopLM's own code)."""
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
    return _SCHEMES[scheme](kind, sizes, fan_in)


def parse_init_parts(specs: Iterable[str]) -> InitParts:
    """``KIND=SCHEME`` strings as :data:`InitParts`, each kind at most once; refused with the
    choices when a kind or scheme is unknown (``identity-adapter`` is LoopLM's whole start,
    not a per-kind law)."""
    parts: list[tuple[WeightKind, InitScheme]] = []
    schemes = tuple(_SCHEMES)
    for spec in specs:
        kind, sep, scheme = spec.partition("=")
        if not sep or kind not in WEIGHT_KINDS or scheme not in schemes:
            raise ValueError(
                f"init part {spec!r} is not KIND=SCHEME; KIND is one of "
                f"{', '.join(WEIGHT_KINDS)} and SCHEME one of {', '.join(schemes)}"
            )
        if any(k == kind for k, _ in parts):
            raise ValueError(f"init parts name {kind!r} twice; give each weight kind once")
        parts.append((kind, scheme))  # type: ignore[arg-type]
    return tuple(parts)


def init_name(scheme: InitScheme, parts: InitParts = ()) -> str:
    """How a cell's init is recorded: the scheme, then each replaced kind (``retrofit+
    embedding=huginn``)."""
    return "+".join([scheme, *(f"{kind}={source}" for kind, source in parts)])


def apply_init(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    scheme: InitScheme,
    sizes: InitSizes,
    generator: torch.Generator,
    parts: InitParts = (),
) -> None:
    """Initialise every parameter under ``scheme`` (the kinds in ``parts`` under their own
    scheme): matrices by kind, biases 0, norm gains 1, and LoopLM's diagonal-decay log-rates
    at −1 (no family has that injection)."""
    source = dict(parts)
    with torch.no_grad():
        for name, param in named_parameters:
            if param.dim() < 2:
                if name.endswith("log_rate"):
                    param.fill_(-1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.fill_(1.0)
                continue
            kind = weight_kind(name)
            init = scheme_init(source.get(kind, scheme), kind, sizes, param.shape[1])
            param.copy_(init.draw(param.shape, generator))


def describe_scheme(scheme: InitScheme, parts: InitParts = ()) -> str:
    """One sentence per scheme for reports, with its formulas (and the replaced kinds)."""
    replaced = "".join(f"; {kind} weights as in {source}" for kind, source in parts)
    return {
        "identity-adapter": "LoopLM's own start: N(0, 0.02) weights, output projections "
        "N(0, 0.02/√(2L)), concat-linear adapter (Z + X)/√2 plus N(0, σ_a) noise",
        "huginn": "Huginn's scaled init (normals truncated at ±3σ, σ = √(2/(5d))): q/k/v, MLP "
        "inputs and adapter σ, output projections σ/√(2L), embedding σ·√d",
        "ouro": "Ouro's init: every linear map and the embedding N(0, 0.02), no depth scaling",
        "retrofit": "the retrofit models' init: Llama/OLMo layers N(0, 0.02), adapter PyTorch's "
        "nn.Linear default U(±1/√(2d))",
    }[scheme] + replaced
