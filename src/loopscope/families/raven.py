"""The "raven" checkpoint format: Huginn-0125 and the retrofitted-recurrence models.

One format, three block styles (``detect_variant``: ``rope_theta`` in config.json marks a
retrofitted model, q/k-norm tensors mark OLMo-2, sandwich norms without it mark Huginn):

* ``huginn`` — Huginn-0125: sandwich layers (``norm_1``..``norm_4``: the residual stream itself is
  normalised twice per layer), a learned per-head bias on queries and keys (``qk_bias``),
  rotary embeddings that rotate adjacent channel pairs, token embeddings scaled by √d, and the
  final norm ``ln_f`` applied twice: once to the state after the last recurrence, once after
  the coda.
* ``llama`` — retrofitted Llama-3.2 / TinyLlama: plain pre-norm layers (``norm_1`` before
  attention, ``norm_2`` before the MLP), grouped-query attention, Hugging Face rotary
  embeddings (rotate-half, ``rope_theta``, optional "llama3" frequency scaling), no embedding
  scale and no extra norm between recurrence and coda.
* ``olmo2`` — retrofitted OLMo-2: like ``llama`` but the norms sit on the branch outputs
  (``norm_1(attn(x))``, ``norm_2(mlp(x))``) and queries / keys are RMS-normalised over the whole
  projection (``attn.q_norm``, ``attn.k_norm``) before rotation.

All three share the concat-linear adapter W·[state; prelude output] at the start of every
recurrence and a random initial state drawn from a truncated normal (±3σ) scaled like the
embeddings. Weights are read from safetensors only, never with code shipped beside them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from loopscope.engine.contract import FamilyMeta, InitState, LoopedLM, LoopLayer
from loopscope.families.checkpoint import (
    CheckpointError,
    check_tensors,
    read_config,
    read_tensors,
    weight_files,
)
from loopscope.nn.layers import Edit, causal_attention

RavenVariant = Literal["huginn", "llama", "olmo2"]
RAVEN_VARIANTS: tuple[RavenVariant, ...] = ("huginn", "llama", "olmo2")
RopeStyle = Literal["pairs", "half"]

#: Tensors a raven checkpoint may carry besides the parameters: Huginn's rotary table (used
#: when present, exactly as the reference loads it into its buffer).
ROPE_TABLE = "freqs_cis"

# Defaults of the reference configuration class: a field missing from config.json takes these.
_DEFAULTS: dict[str, Any] = {
    "n_embd": 5280,
    "n_heads": 55,
    "block_size": 4096,
    "vocab_size": 65536,
    "tie_embeddings": True,
    "intermediate_size": 17920,
    "bias": False,
    "norm_eps": 1e-6,
    "n_layers_in_recurrent_block": 4,
    "mean_recurrence": 32,
    "n_layers_in_prelude": 2,
    "n_layers_in_coda": 2,
    "qk_bias": True,
    "rope_base": 50_000.0,
}
# Hugging Face names that the reference config class also accepts for these fields.
_ALIASES = {"num_attention_heads": "n_heads", "hidden_size": "n_embd"}


# --------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding: channel pairing (``pairs`` = Huginn's adjacent pairs, ``half`` = Hugging
    Face's rotate-half), base, and Llama-3 frequency scaling (None = plain)."""

    style: RopeStyle
    base: float
    scaling: tuple[tuple[str, float], ...] | None = None

    def inv_freq(self, head_dim: int) -> Tensor:
        """Per-pair angular frequencies (head_dim/2,), float32."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        inv = 1.0 / (self.base**exponents)
        if self.scaling is None:
            return inv
        return _llama3_scaled(inv, dict(self.scaling))


def _llama3_scaled(inv: Tensor, s: dict[str, float]) -> Tensor:
    """Llama-3 context extension: long wavelengths are slowed by ``factor``, short ones kept, the
    band between blended linearly in 1/wavelength."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv
    slowed = torch.where(wavelength > old_context / low, inv / factor, inv)
    blend = (old_context / wavelength - low) / (high - low)
    blended = (1 - blend) * slowed / factor + blend * slowed
    in_band = ~(wavelength < old_context / high) & ~(wavelength > old_context / low)
    return torch.where(in_band, blended, slowed)


@dataclass(frozen=True)
class RavenConfig:
    """What our model needs from a raven config.json, with the reference's defaults applied."""

    variant: RavenVariant
    n_embd: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    n_layers_in_prelude: int
    n_layers_in_recurrent_block: int
    n_layers_in_coda: int
    mean_recurrence: int
    tie_embeddings: bool
    qk_bias: bool
    adapter_bias: bool
    norm_eps: float
    rope: RopeSpec
    context_length: int
    embed_scale: float
    state_std: float
    name: str = "raven"

    def __post_init__(self) -> None:
        if self.variant not in RAVEN_VARIANTS:
            raise ValueError(f"unknown raven variant {self.variant!r}; use one of {RAVEN_VARIANTS}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}"
            )
        if self.qk_bias and self.n_kv_heads != self.n_heads:
            raise ValueError("qk_bias needs num_key_value_heads = n_heads (one bias row per head)")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_dim}")
        if self.variant != "olmo2" and self.n_heads * self.head_dim != self.n_embd:
            raise ValueError(
                f"{self.variant} layers need n_heads·head_dim = n_embd, got "
                f"{self.n_heads}·{self.head_dim} ≠ {self.n_embd}"
            )
        if self.n_layers_in_recurrent_block < 1:
            raise ValueError("n_layers_in_recurrent_block must be ≥ 1")


def is_raven_config(config: Mapping[str, Any]) -> bool:
    """True for a config.json written for the raven modeling code (Huginn or retrofitted)."""
    archs = config.get("architectures") or []
    return config.get("model_type") == "huginn_raven" or "RavenForCausalLM" in archs


def detect_variant(config: Mapping[str, Any], tensor_names: Iterable[str]) -> RavenVariant:
    """Block style. The retrofitting converters always write ``rope_theta`` (Huginn's config has
    only ``rope_base``), so its presence means a retrofitted model: q/k norms → olmo2, else llama.
    Without it, sandwich norms (norm_3/norm_4) mean Huginn."""
    names = list(tensor_names)
    if "rope_theta" in config:
        qk_norm = any(n.endswith((".attn.q_norm.weight", ".attn.k_norm.weight")) for n in names)
        return "olmo2" if qk_norm else "llama"
    if any(n.endswith((".norm_3.weight", ".norm_4.weight")) for n in names):
        return "huginn"
    raise CheckpointError(
        "cannot tell the raven block style: config.json has no rope_theta (which the "
        "retrofitting converters write) and the weights have no norm_3/norm_4 (which Huginn "
        "has). If this is Huginn, its sandwich norms are missing; if it is retrofitted, add the "
        "source model's rope_theta to config.json (or pass variant=... explicitly)"
    )


def _drop_converter_leftovers(tensors: dict[str, Tensor], variant: RavenVariant) -> None:
    """The retrofitting converter's first pass saves through Huginn's class, so a retrofitted
    checkpoint may carry Huginn's rotary table and never-written sandwich norms (all ones).
    Their own modeling code never reads these; we drop them, and only them."""
    if variant == "huginn":
        return
    tensors.pop(ROPE_TABLE, None)
    for name in [n for n in tensors if n.endswith((".norm_3.weight", ".norm_4.weight"))]:
        if bool((tensors[name] == 1).all()):
            del tensors[name]


def _field(config: Mapping[str, Any], key: str) -> Any:
    """A config value by its raven name, else by its Hugging Face alias, else the default."""
    if key in config:
        return config[key]
    aliases = [alias for alias, canonical in _ALIASES.items() if canonical == key]
    for alias in aliases:
        if alias in config:
            return config[alias]
    return _DEFAULTS.get(key)


def _rope_spec(config: Mapping[str, Any], variant: RavenVariant) -> RopeSpec:
    if variant == "huginn":
        return RopeSpec("pairs", float(_field(config, "rope_base")))
    if "rope_theta" not in config:
        raise CheckpointError(
            f"config.json of a retrofitted ({variant}) raven checkpoint needs rope_theta"
        )
    scaling = config.get("rope_scaling")
    if scaling is None:
        return RopeSpec("half", float(config["rope_theta"]))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeSpec("half", float(config["rope_theta"]))
    if kind != "llama3":
        raise CheckpointError(
            f"rope_scaling type {kind!r} is not supported for raven checkpoints; only 'llama3' "
            "(Llama-3.2) and none are"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise CheckpointError(f"rope_scaling (llama3) lacks {missing}")
    return RopeSpec(
        "half", float(config["rope_theta"]), tuple((k, float(scaling[k])) for k in keys)
    )


def raven_config_from_dict(
    config: Mapping[str, Any], variant: RavenVariant, name: str = "raven"
) -> RavenConfig:
    """Read the published config.json fields (reference defaults for missing ones); raises
    CheckpointError for settings we do not run and ValueError for inconsistent sizes."""
    if float(config.get("test_time_noise", 0) or 0) != 0:
        raise CheckpointError(
            "config.json sets test_time_noise; loopscope runs the deterministic model only — set "
            "it to 0"
        )
    n_embd = int(_field(config, "n_embd"))
    n_heads = int(_field(config, "n_heads"))
    head_dim = (
        n_embd // n_heads if variant != "olmo2" else int(config.get("head_dim", n_embd // n_heads))
    )
    init_values = config.get("init_values") or {}
    if variant == "huginn":
        embed_scale = math.sqrt(n_embd)  # Huginn's code always scales by √d
    else:
        embed_scale = float(init_values.get("embed_scale", math.sqrt(n_embd)))
    block_size = int(_field(config, "block_size"))
    context = (
        block_size
        if variant == "huginn"
        else int(config.get("max_position_embeddings", block_size))
    )
    return RavenConfig(
        variant=variant,
        n_embd=n_embd,
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads", n_heads)),
        head_dim=head_dim,
        intermediate_size=int(_field(config, "intermediate_size")),
        vocab_size=int(config.get("padded_vocab_size", _field(config, "vocab_size"))),
        n_layers_in_prelude=int(_field(config, "n_layers_in_prelude")),
        n_layers_in_recurrent_block=int(_field(config, "n_layers_in_recurrent_block")),
        n_layers_in_coda=int(_field(config, "n_layers_in_coda")),
        mean_recurrence=int(_field(config, "mean_recurrence")),
        tie_embeddings=bool(_field(config, "tie_embeddings")),
        qk_bias=bool(_field(config, "qk_bias")),
        adapter_bias=bool(_field(config, "bias")),
        norm_eps=float(_field(config, "norm_eps")),
        rope=_rope_spec(config, variant),
        context_length=context,
        embed_scale=embed_scale,
        state_std=float(init_values.get("std", math.sqrt(2 / (5 * n_embd)))),
        name=name,
    )


# --------------------------------------------------------------------------------- layers
class RavenRMSNorm(nn.Module):
    """RMS norm as the reference computes it: normalise in fp32, cast back, then apply the gain."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RavenRope:
    """Rotary tables for ``length`` positions (float32) in one of the two pairings."""

    def __init__(self, style: RopeStyle, angles: Tensor) -> None:
        self.style = style
        self.cos = angles.cos()
        self.sin = angles.sin()

    @classmethod
    def from_table(cls, table: Tensor) -> RavenRope:
        """From Huginn's stored ``freqs_cis`` (1, T, 1, head_dim/2, 2) = (cos, sin)."""
        rope = cls.__new__(cls)
        rope.style = "pairs"
        rope.cos = table[0, :, 0, :, 0].float()
        rope.sin = table[0, :, 0, :, 1].float()
        return rope

    def apply(self, x: Tensor) -> Tensor:
        """Rotate ``x`` of shape (batch, heads, T, head_dim)."""
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.device), self.sin[:t].to(x.device)
        if self.style == "pairs":  # Huginn: adjacent channels (2i, 2i+1), computed in fp32
            pairs = x.float().unflatten(-1, (-1, 2))
            a, b = pairs[..., 0], pairs[..., 1]
            out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
            return out.type_as(x)
        cos2 = torch.cat([cos, cos], dim=-1).to(x.dtype)  # Hugging Face: rotate-half, in x's dtype
        sin2 = torch.cat([sin, sin], dim=-1).to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos2 + rotated * sin2


class RavenAttention(nn.Module):
    """Causal self-attention with fused qkv (``Wqkv``), optional q/k bias and q/k norms, GQA."""

    def __init__(self, c: RavenConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.splits = [q_dim, kv_dim, kv_dim]
        self.Wqkv = nn.Linear(c.n_embd, q_dim + 2 * kv_dim, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, c.n_heads, c.head_dim)) if c.qk_bias else None
        self.q_norm = RavenRMSNorm(q_dim, c.norm_eps) if c.variant == "olmo2" else None
        self.k_norm = RavenRMSNorm(kv_dim, c.norm_eps) if c.variant == "olmo2" else None
        self.proj = nn.Linear(q_dim, c.n_embd, bias=False)

    def forward(
        self, x: Tensor, rope: RavenRope, return_attn: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        b, t, _ = x.shape
        q, k, v = self.Wqkv(x).split(self.splits, dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        if self.qk_bias is not None:
            q, k = (q + self.qk_bias[0]).to(q.dtype), (k + self.qk_bias[1]).to(q.dtype)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = rope.apply(q), rope.apply(k)
        out, probs = causal_attention(q, k, v, return_attn)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1)), probs


class RavenMLP(nn.Module):
    """SwiGLU with one fused input projection ``fc`` (gate rows first, then up) and ``proj``, the
    output projection whose columns the neuron-class analysis reads."""

    def __init__(self, c: RavenConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(c.n_embd, 2 * c.intermediate_size, bias=False)
        self.proj = nn.Linear(c.intermediate_size, c.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class RavenLayer(nn.Module):
    """One layer in the variant's norm placement; ``edit`` rewrites each branch output just
    before it joins the residual stream."""

    def __init__(self, c: RavenConfig) -> None:
        super().__init__()
        self.variant = c.variant
        self.norm_1 = RavenRMSNorm(c.n_embd, c.norm_eps)
        self.attn = RavenAttention(c)
        self.norm_2 = RavenRMSNorm(c.n_embd, c.norm_eps)
        self.mlp = RavenMLP(c)
        huginn = c.variant == "huginn"
        self.norm_3 = RavenRMSNorm(c.n_embd, c.norm_eps) if huginn else None
        self.norm_4 = RavenRMSNorm(c.n_embd, c.norm_eps) if huginn else None

    def forward(
        self, x: Tensor, rope: RavenRope, *, return_attn: bool = False, edit: Edit | None = None
    ) -> tuple[Tensor, Tensor | None]:
        if self.norm_3 is not None and self.norm_4 is not None:  # huginn sandwich
            a, probs = self.attn(self.norm_1(x), rope, return_attn)
            a = edit("attn", a) if edit is not None else a
            x = self.norm_2(a + x)
            m = self.mlp(self.norm_3(x))
            m = edit("mlp", m) if edit is not None else m
            return self.norm_4(m + x), probs
        if self.variant == "olmo2":  # norms on the branch outputs
            a, probs = self.attn(x, rope, return_attn)
            a = self.norm_1(a)
            a = edit("attn", a) if edit is not None else a
            x = a + x
            m = self.norm_2(self.mlp(x))
            m = edit("mlp", m) if edit is not None else m
            return m + x, probs
        a, probs = self.attn(self.norm_1(x), rope, return_attn)  # llama pre-norm
        a = edit("attn", a) if edit is not None else a
        x = a + x
        m = self.mlp(self.norm_2(x))
        m = edit("mlp", m) if edit is not None else m
        return m + x, probs


class _NormThenLayer:
    """Huginn's coda entry: ``ln_f`` on the final recurrent state, then the first coda layer."""

    def __init__(self, norm: nn.Module, layer: RavenLayer) -> None:
        self.norm = norm
        self.layer = layer

    def __call__(
        self, x: Tensor, rope: RavenRope, *, return_attn: bool = False, edit: Edit | None = None
    ) -> tuple[Tensor, Tensor | None]:
        return self.layer(self.norm(x), rope, return_attn=return_attn, edit=edit)

    def __getattr__(self, name: str) -> Any:
        """Everything else (``mlp``, ``attn``, norms) is the wrapped layer's."""
        return getattr(self.layer, name)


# --------------------------------------------------------------------------------- model
class RavenLM(LoopedLM):
    """A raven checkpoint behind the model-family interface. Module and parameter names equal the
    checkpoint's tensor names (``transformer.wte``, ``transformer.prelude.N``, …, ``lm_head``)."""

    def __init__(self, config: RavenConfig) -> None:
        super().__init__()
        c = self.config = config
        self.meta = FamilyMeta(
            family="raven",
            prelude_layers=c.n_layers_in_prelude,
            block_layers=c.n_layers_in_recurrent_block,
            coda_layers=c.n_layers_in_coda,
            train_recurrences=c.mean_recurrence,
            d_model=c.n_embd,
            n_heads=c.n_heads,
            vocab_size=c.vocab_size,
            context_length=c.context_length,
            default_init_state="random",
            name=c.name,
        )
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(c.vocab_size, c.n_embd),
                "prelude": nn.ModuleList(RavenLayer(c) for _ in range(c.n_layers_in_prelude)),
                "adapter": nn.Linear(2 * c.n_embd, c.n_embd, bias=c.adapter_bias),
                "core_block": nn.ModuleList(
                    RavenLayer(c) for _ in range(c.n_layers_in_recurrent_block)
                ),
                "coda": nn.ModuleList(RavenLayer(c) for _ in range(c.n_layers_in_coda)),
                "ln_f": RavenRMSNorm(c.n_embd, c.norm_eps),
            }
        )
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.tie_weights()
        self.rope_table: Tensor | None = (
            None  # Huginn's stored freqs_cis, when the checkpoint has one
        )
        self._rope_cache: dict[tuple[int, str], RavenRope] = {}

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = cast(nn.Embedding, self.transformer["wte"]).weight

    def _stack(self, key: str) -> list[RavenLayer]:
        return [cast(RavenLayer, layer) for layer in cast(nn.ModuleList, self.transformer[key])]

    # -- the family interface ------------------------------------------------------------
    @property
    def prelude(self) -> Sequence[LoopLayer]:
        return cast(Sequence[LoopLayer], self._stack("prelude"))

    @property
    def block(self) -> Sequence[LoopLayer]:
        return cast(Sequence[LoopLayer], self._stack("core_block"))

    @property
    def coda(self) -> Sequence[LoopLayer]:
        layers: list[Any] = self._stack("coda")
        if self.config.variant == "huginn" and layers:
            layers[0] = _NormThenLayer(self.transformer["ln_f"], layers[0])
        return cast(Sequence[LoopLayer], layers)

    @property
    def init_std(self) -> float:
        return self.config.state_std

    def embed(self, input_ids: Tensor) -> Tensor:
        vocab = self.config.vocab_size
        if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
            raise ValueError(
                f"token ids must lie in [0, {vocab}); got [{int(input_ids.min())}, "
                f"{int(input_ids.max())}] — was the prompt encoded with this model's tokenizer?"
            )
        x = self.transformer["wte"](input_ids)
        return x * self.config.embed_scale if self.config.embed_scale != 1 else x

    def positions(self, length: int, device: torch.device) -> RavenRope:
        key = (length, str(device))
        if key not in self._rope_cache:
            if self.rope_table is not None:
                rope = RavenRope.from_table(self.rope_table[:, :length].to(device))
            else:
                inv = self.config.rope.inv_freq(self.config.head_dim).to(device)
                angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv)
                rope = RavenRope(self.config.rope.style, angles)
            self._rope_cache[key] = rope
        return self._rope_cache[key]

    def initial_state(
        self, inputs: Tensor, mode: InitState, generator: torch.Generator | None, std: float
    ) -> Tensor:
        """``random`` follows the reference draw for draw: a discarded normal draw, then a normal
        truncated at ±3σ, times the embedding scale (σ = init_values.std). Drawn in fp32, so one
        seed gives the same state (up to rounding) in every dtype."""
        if mode != "random":
            return super().initial_state(inputs, mode, generator, std)
        if std <= 0:
            return torch.zeros_like(inputs)
        x = torch.randn(inputs.shape, generator=generator, device=inputs.device)
        nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        if self.config.embed_scale != 1:
            x = x * self.config.embed_scale
        return x.to(inputs.dtype)

    def inject(self, state: Tensor, inputs: Tensor) -> Tensor:
        return cast(Tensor, self.transformer["adapter"](torch.cat([state, inputs], dim=-1)))

    def head(self, hidden: Tensor) -> Tensor:
        ln_f = self.transformer["ln_f"]
        if self.config.variant == "huginn" and not self.config.n_layers_in_coda:
            hidden = ln_f(hidden)  # no coda layer to carry the post-recurrence norm
        return cast(Tensor, self.lm_head(ln_f(hidden)))

    def unembedding(self) -> Tensor:
        return self.lm_head.weight

    def final_norm_weight(self) -> Tensor:
        """Gain of ``ln_f``, which sits between the residual stream and the unembedding."""
        return cast(RavenRMSNorm, self.transformer["ln_f"]).weight

    def expected_tensors(self) -> dict[str, torch.Size]:
        """Checkpoint tensor names and shapes (a tied lm_head is not expected)."""
        return {name: p.shape for name, p in self.named_parameters()}


# --------------------------------------------------------------------------------- loading
def _tensor_names(files: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.extend(handle.keys())
    return names


def load_raven(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    variant: RavenVariant | None = None,
) -> RavenLM:
    """Load a raven checkpoint directory (config.json + safetensors, sharded or not).

    ``variant`` overrides the block style detected from the tensors. The model is built on the
    meta device and takes the checkpoint tensors as its parameters, so memory holds one copy in
    ``dtype`` only.
    """
    path = Path(directory)
    config_path, raw = read_config(path, "a raven")
    if not is_raven_config(raw):
        raise CheckpointError(
            f"{config_path} is not a raven config (model_type {raw.get('model_type')!r}, "
            f"architectures {raw.get('architectures')})"
        )
    files = weight_files(path)
    chosen = variant or detect_variant(raw, _tensor_names(files))
    try:
        config = raven_config_from_dict(raw, chosen, name=raw.get("name") or path.name)
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from err
    with torch.device("meta"):
        model = RavenLM(config)
    tensors = read_tensors(files, dtype, device, exact={ROPE_TABLE})
    _drop_converter_leftovers(tensors, config.variant)
    table = tensors.pop(ROPE_TABLE, None)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # re-tied to the embedding, as the reference does
    expected = model.expected_tensors()
    if table is not None:
        expected[ROPE_TABLE] = torch.Size((1, config.context_length, 1, config.head_dim // 2, 2))
        tensors[ROPE_TABLE] = table
    check_tensors(expected, tensors, str(path))
    tensors.pop(ROPE_TABLE, None)
    model.load_state_dict(tensors, strict=False, assign=True)  # names checked just above
    model.tie_weights()
    model.rope_table = None if table is None else table.float()
    model.eval()
    return model
