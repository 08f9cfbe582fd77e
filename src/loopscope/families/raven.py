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
from torch import Tensor, nn

from loopscope.engine.contract import FamilyMeta, InitState, LoopedLM, LoopLayer
from loopscope.families.checkpoint import (
    CheckpointError,
    ConfigFields,
    load_weights,
    naming_the_file,
    recognised_config,
    tensor_names,
    weight_files,
)
from loopscope.nn.kv_cache import KVSlot
from loopscope.nn.layers import Edit, rotary_attention
from loopscope.nn.norms import RMSNormCastBeforeGain
from loopscope.nn.rotary import ROPE_TABLE, RopeSpec, RotaryTable

RavenVariant = Literal["huginn", "llama", "olmo2"]
RAVEN_VARIANTS: tuple[RavenVariant, ...] = ("huginn", "llama", "olmo2")
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


def _rope_spec(fields: ConfigFields, variant: RavenVariant) -> RopeSpec:
    if variant == "huginn":
        return RopeSpec("pairs", fields.number("rope_base", positive=True))
    if not fields.present("rope_theta"):
        raise CheckpointError(
            f"config.json of a retrofitted ({variant}) raven checkpoint needs rope_theta"
        )
    theta = fields.number("rope_theta", positive=True)
    scaling = fields.section("rope_scaling")
    kind = scaling.text("rope_type", scaling.value("type", "default"))
    if not scaling.raw or kind == "default":
        return RopeSpec("half", theta)
    if kind != "llama3":
        raise CheckpointError(
            f"rope_scaling type {kind!r} is not supported for raven checkpoints; only 'llama3' "
            "(Llama-3.2) and none are"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if not scaling.present(k)]
    if missing:
        raise CheckpointError(f"rope_scaling (llama3) lacks {missing}")
    return RopeSpec("half", theta, tuple((k, scaling.number(k, positive=True)) for k in keys))


def raven_config_from_dict(
    config: Mapping[str, Any], variant: RavenVariant, name: str = "raven"
) -> RavenConfig:
    """Read the published config.json fields (reference defaults for missing ones); raises
    CheckpointError for a field of the wrong type or value and settings we do not run, and
    ValueError for inconsistent sizes."""
    fields = ConfigFields(config, _DEFAULTS, _ALIASES)
    if fields.number("test_time_noise", 0) != 0:
        raise CheckpointError(
            "config.json sets test_time_noise; loopscope runs the deterministic model only — set "
            "it to 0"
        )
    n_embd = fields.integer("n_embd")
    n_heads = fields.integer("n_heads")
    if variant == "olmo2" and fields.present("head_dim"):
        head_dim = fields.integer("head_dim")
    else:
        head_dim = fields.head_size("n_embd", "n_heads")
    init_values = fields.section("init_values")
    if variant == "huginn":
        embed_scale = math.sqrt(n_embd)  # Huginn's code always scales by √d
    else:
        embed_scale = init_values.number("embed_scale", math.sqrt(n_embd))
    block_size = fields.integer("block_size")
    context = (
        block_size if variant == "huginn" else fields.integer("max_position_embeddings", block_size)
    )
    return RavenConfig(
        variant=variant,
        n_embd=n_embd,
        n_heads=n_heads,
        n_kv_heads=fields.integer("num_key_value_heads", n_heads),
        head_dim=head_dim,
        intermediate_size=fields.integer("intermediate_size"),
        vocab_size=fields.integer("padded_vocab_size", fields.integer("vocab_size")),
        n_layers_in_prelude=fields.integer("n_layers_in_prelude", minimum=0),
        n_layers_in_recurrent_block=fields.integer("n_layers_in_recurrent_block"),
        n_layers_in_coda=fields.integer("n_layers_in_coda", minimum=0),
        mean_recurrence=fields.integer("mean_recurrence"),
        tie_embeddings=fields.flag("tie_embeddings"),
        qk_bias=fields.flag("qk_bias"),
        adapter_bias=fields.flag("bias"),
        norm_eps=fields.number("norm_eps", positive=True),
        rope=_rope_spec(fields, variant),
        context_length=context,
        embed_scale=embed_scale,
        state_std=init_values.number("std", math.sqrt(2 / (5 * n_embd))),
        name=name,
    )


# --------------------------------------------------------------------------------- layers
class RavenAttention(nn.Module):
    """Causal self-attention with fused qkv (``Wqkv``), optional q/k bias and q/k norms, GQA."""

    def __init__(self, c: RavenConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.splits = [q_dim, kv_dim, kv_dim]
        self.Wqkv = nn.Linear(c.n_embd, q_dim + 2 * kv_dim, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, c.n_heads, c.head_dim)) if c.qk_bias else None
        self.q_norm = RMSNormCastBeforeGain(q_dim, c.norm_eps) if c.variant == "olmo2" else None
        self.k_norm = RMSNormCastBeforeGain(kv_dim, c.norm_eps) if c.variant == "olmo2" else None
        self.proj = nn.Linear(q_dim, c.n_embd, bias=False)

    def forward(
        self, x: Tensor, rope: RotaryTable, return_attn: bool = False, kv: KVSlot | None = None
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
        out, probs = rotary_attention(q, k, v, rope, return_attn, kv)
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
        self.norm_1 = RMSNormCastBeforeGain(c.n_embd, c.norm_eps)
        self.attn = RavenAttention(c)
        self.norm_2 = RMSNormCastBeforeGain(c.n_embd, c.norm_eps)
        self.mlp = RavenMLP(c)
        huginn = c.variant == "huginn"
        self.norm_3 = RMSNormCastBeforeGain(c.n_embd, c.norm_eps) if huginn else None
        self.norm_4 = RMSNormCastBeforeGain(c.n_embd, c.norm_eps) if huginn else None

    def forward(
        self,
        x: Tensor,
        rope: RotaryTable,
        *,
        return_attn: bool = False,
        edit: Edit | None = None,
        kv: KVSlot | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``kv``: this layer application's key/value cache slot when decoding incrementally."""
        if self.norm_3 is not None and self.norm_4 is not None:  # huginn sandwich
            a, probs = self.attn(self.norm_1(x), rope, return_attn, kv)
            a = edit("attn", a) if edit is not None else a
            x = self.norm_2(a + x)
            m = self.mlp(self.norm_3(x))
            m = edit("mlp", m) if edit is not None else m
            return self.norm_4(m + x), probs
        if self.variant == "olmo2":  # norms on the branch outputs
            a, probs = self.attn(x, rope, return_attn, kv)
            a = self.norm_1(a)
            a = edit("attn", a) if edit is not None else a
            x = a + x
            m = self.norm_2(self.mlp(x))
            m = edit("mlp", m) if edit is not None else m
            return m + x, probs
        a, probs = self.attn(self.norm_1(x), rope, return_attn, kv)  # llama pre-norm
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
        self,
        x: Tensor,
        rope: RotaryTable,
        *,
        return_attn: bool = False,
        edit: Edit | None = None,
        kv: KVSlot | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        return self.layer(self.norm(x), rope, return_attn=return_attn, edit=edit, kv=kv)

    def __getattr__(self, name: str) -> Any:
        """Everything else (``mlp``, ``attn``, norms) is the wrapped layer's."""
        return getattr(self.layer, name)


# --------------------------------------------------------------------------------- model
class RavenLM(LoopedLM):
    """A raven checkpoint behind the model-family interface. Module and parameter names equal the
    checkpoint's tensor names (``transformer.wte``, ``transformer.prelude.N``, …, ``lm_head``)."""

    #: Its layers take a key/value cache slot (``kv=``) for incremental decoding.
    supports_kv_cache = True

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
                "ln_f": RMSNormCastBeforeGain(c.n_embd, c.norm_eps),
            }
        )
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.tie_weights()
        self.rope_table: Tensor | None = (
            None  # Huginn's stored freqs_cis, when the checkpoint has one
        )
        self._rope_cache: dict[tuple[int, str], RotaryTable] = {}

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

    def positions(self, length: int, device: torch.device) -> RotaryTable:
        key = (length, str(device))
        if key not in self._rope_cache:
            if self.rope_table is not None:
                rope = RotaryTable.from_table(self.rope_table[:, :length].to(device))
            else:
                inv = self.config.rope.inv_freq(self.config.head_dim).to(device)
                angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv)
                rope = RotaryTable(self.config.rope.style, angles)
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
        return cast(RMSNormCastBeforeGain, self.transformer["ln_f"]).weight

    def expected_tensors(self) -> dict[str, torch.Size]:
        """Checkpoint tensor names and shapes (a tied lm_head is not expected)."""
        return {name: p.shape for name, p in self.named_parameters()}


# --------------------------------------------------------------------------------- loading
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
    ``dtype`` only. Huginn's stored rotary table is used when present, exactly as the reference
    loads it into its buffer.
    """
    path = Path(directory)
    config_path, raw = recognised_config(path, "a raven", is_raven_config)
    files = weight_files(path)
    chosen = variant or detect_variant(raw, tensor_names(files))
    with naming_the_file(config_path):
        config = raven_config_from_dict(raw, chosen, name=raw.get("name") or path.name)
    with torch.device("meta"):
        model = RavenLM(config)
    table_shape = torch.Size((1, config.context_length, 1, config.head_dim // 2, 2))
    aside = load_weights(
        model,
        files,
        source=str(path),
        dtype=dtype,
        device=device,
        expected=model.expected_tensors(),
        tied=("lm_head.weight",) if config.tie_embeddings else (),  # re-tied, as the reference
        set_aside={ROPE_TABLE: table_shape},
        tidy=lambda tensors: _drop_converter_leftovers(tensors, config.variant),
    )
    model.tie_weights()
    table = aside.get(ROPE_TABLE)
    model.rope_table = None if table is None else table.float()
    model.eval()
    return model
