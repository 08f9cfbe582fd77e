"""Ouro (ByteDance/Ouro-1.4B, Ouro-2.6B and their -Thinking variants) behind the model-family
interface.

Ouro loops its *whole* decoder stack ``total_ut_steps`` times: layout (0, L⊗l, 0), no input
injection (the state simply carries over; it starts as the token embeddings), and the final
norm ``model.norm`` applied after *every* recurrence — the next recurrence takes the normed state,
and ``lm_head`` reads it without a further norm. Each layer has four RMS norms: ``input_layernorm``
before attention, ``input_layernorm_2`` on the attention output, ``post_attention_layernorm``
before the MLP and ``post_attention_layernorm_2`` on the MLP output (the sandwich of the "ouro"
norm scheme in :mod:`loopscope.nn.layers`).

The early-exit gate ``model.early_exit_gate`` (D → 1, with bias) reads the normed state after
recurrence t: λ_t = σ(gate). The exit distribution is p(t) = λ_t ∏_{s<t} (1 − λ_s) for t < R − 1
and the remainder ∏_{s<R−1} (1 − λ_s) at the last recurrence, so it sums to 1. The authors'
inference exits token by token at the first t whose cumulative probability reaches
``early_exit_threshold`` (1.0 in the published configs, i.e. the last recurrence).
:class:`OuroExitRecorder` (a probe) records λ_t during any engine run; :func:`exit_distribution`
and :func:`early_exit_logits` reproduce the authors' three readouts (fixed step, threshold,
expectation over the exit distribution).

Weights are read from safetensors only, with Hugging Face's tensor names
(``model.layers.N.self_attn.q_proj.weight``, …, ``model.early_exit_gate.bias``, ``lm_head.weight``);
the modeling code shipped with the checkpoint is never run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopscope.engine.contract import FamilyMeta, InitState, LoopedLM, LoopLayer
from loopscope.engine.sites import Site
from loopscope.families.checkpoint import (
    CheckpointError,
    ConfigFields,
    load_tied_head_model,
    read_family_checkpoint,
)
from loopscope.nn.kv_cache import KVSlot
from loopscope.nn.layers import Edit, rotary_attention
from loopscope.nn.norms import RMSNormCastBeforeGain
from loopscope.nn.rotary import RopeSpec, RotaryTable

__all__ = [
    "ExitDistribution",
    "OuroConfig",
    "OuroExitRecorder",
    "OuroLM",
    "early_exit_logits",
    "exit_distribution",
    "exit_probabilities",
    "is_ouro_config",
    "load_ouro",
    "ouro_config_from_dict",
]

# Defaults of the authors' configuration class: a field missing from config.json takes these.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "total_ut_steps": 4,
    "early_exit_threshold": 1.0,
}


# --------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class OuroConfig:
    """What our model needs from an Ouro config.json (the authors' defaults applied)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    total_ut_steps: int
    early_exit_threshold: float | None
    name: str = "ouro"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.num_hidden_layers < 1 or self.total_ut_steps < 1:
            raise ValueError("num_hidden_layers and total_ut_steps must both be ≥ 1")


def is_ouro_config(config: Mapping[str, Any]) -> bool:
    """True for a config.json written for the authors' Ouro modeling code."""
    archs = config.get("architectures") or []
    return config.get("model_type") == "ouro" or "OuroForCausalLM" in archs


def ouro_config_from_dict(config: Mapping[str, Any], name: str = "ouro") -> OuroConfig:
    """Read the published config.json fields; CheckpointError for a field of the wrong type or
    value and for settings we do not run."""
    fields = ConfigFields(config, _DEFAULTS)
    if fields.text("hidden_act") != "silu":
        raise CheckpointError(
            f"Ouro hidden_act {config.get('hidden_act')!r} is not supported; the published "
            "models use 'silu'"
        )
    scaling = fields.section("rope_scaling")
    if scaling.raw and scaling.value("rope_type", scaling.value("type", "default")) != "default":
        raise CheckpointError(
            f"Ouro rope_scaling {dict(scaling.raw)!r} is not supported; the published models "
            "use none"
        )
    kinds = config.get("layer_types") or []
    if not isinstance(kinds, list):
        raise CheckpointError(
            f'layer_types must be a list such as ["full_attention", ...], got {kinds!r}'
        )
    sliding = config.get("use_sliding_window") and config.get("sliding_window") is not None
    if sliding or any(kind != "full_attention" for kind in kinds):
        raise CheckpointError(
            "Ouro sliding-window attention is not supported; the published models use full "
            "attention in every layer (use_sliding_window false)"
        )
    hidden = fields.integer("hidden_size")
    heads = fields.integer("num_attention_heads")
    if fields.present("head_dim"):
        head_dim = fields.integer("head_dim")
    else:
        head_dim = fields.head_size("hidden_size", "num_attention_heads")
    # An explicit null threshold means "no threshold: read the last recurrence".
    no_threshold = "early_exit_threshold" in config and config["early_exit_threshold"] is None
    return OuroConfig(
        hidden_size=hidden,
        num_hidden_layers=fields.integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=fields.integer("num_key_value_heads", heads),
        head_dim=head_dim,
        intermediate_size=fields.integer("intermediate_size"),
        vocab_size=fields.integer("vocab_size"),
        rms_norm_eps=fields.number("rms_norm_eps", positive=True),
        rope_theta=fields.number("rope_theta", positive=True),
        max_position_embeddings=fields.integer("max_position_embeddings"),
        tie_word_embeddings=fields.flag("tie_word_embeddings"),
        total_ut_steps=fields.integer("total_ut_steps"),
        early_exit_threshold=None if no_threshold else fields.number("early_exit_threshold"),
        name=name,
    )


# --------------------------------------------------------------------------------- layers
class OuroAttention(nn.Module):
    """Causal self-attention with separate q/k/v/o projections (no biases), GQA and
    rotate-half rotary embeddings; returns probabilities on the eager path."""

    def __init__(self, c: OuroConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(
        self, x: Tensor, rope: RotaryTable, return_attn: bool = False, kv: KVSlot | None = None
    ) -> tuple[Tensor, Tensor | None]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        out, probs = rotary_attention(q, k, v, rope, return_attn, kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), probs


class OuroMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) · up_proj(x))."""

    def __init__(self, c: OuroConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    @property
    def down(self) -> nn.Linear:
        """The output projection under the name the neuron-class analysis looks for."""
        return self.down_proj

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class OuroLayer(nn.Module):
    """One decoder layer with its four norms; ``edit`` rewrites each branch output (after its
    post-norm) just before it joins the residual stream."""

    def __init__(self, c: OuroConfig) -> None:
        super().__init__()
        eps = c.rms_norm_eps
        self.self_attn = OuroAttention(c)
        self.mlp = OuroMLP(c)
        self.input_layernorm = RMSNormCastBeforeGain(c.hidden_size, eps)
        self.input_layernorm_2 = RMSNormCastBeforeGain(c.hidden_size, eps)
        self.post_attention_layernorm = RMSNormCastBeforeGain(c.hidden_size, eps)
        self.post_attention_layernorm_2 = RMSNormCastBeforeGain(c.hidden_size, eps)

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
        a, probs = self.self_attn(self.input_layernorm(x), rope, return_attn, kv)
        a = self.input_layernorm_2(a)
        a = edit("attn", a) if edit is not None else a
        x = x + a
        m = self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))
        m = edit("mlp", m) if edit is not None else m
        return x + m, probs


class _OuroBody(nn.Module):
    """The ``model.`` prefix of the checkpoint: embeddings, layers, final norm, exit gate."""

    def __init__(self, c: OuroConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(OuroLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNormCastBeforeGain(c.hidden_size, c.rms_norm_eps)
        self.early_exit_gate = nn.Linear(c.hidden_size, 1, bias=True)


# --------------------------------------------------------------------------------- model
class OuroLM(LoopedLM):
    """Ouro behind the family interface: p = c = 0, block = every decoder layer,
    ``recurrence_norm`` = ``model.norm``, ``head`` = ``lm_head`` on the normed state."""

    #: Its layers take a key/value cache slot (``kv=``) for incremental decoding.
    supports_kv_cache = True

    #: Ouro has no injection: its state is the embeddings, so only "prelude" reproduces it.
    supported_init_states: tuple[InitState, ...] = ("prelude",)

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        c = self.config = config
        self.meta = FamilyMeta(
            family="ouro",
            prelude_layers=0,
            block_layers=c.num_hidden_layers,
            coda_layers=0,
            train_recurrences=c.total_ut_steps,
            d_model=c.hidden_size,
            n_heads=c.num_attention_heads,
            vocab_size=c.vocab_size,
            context_length=c.max_position_embeddings,
            default_init_state="prelude",
            name=c.name,
        )
        self.model = _OuroBody(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.tie_weights()
        self._rope_cache: dict[tuple[int, str], RotaryTable] = {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- the family interface ------------------------------------------------------------
    @property
    def prelude(self) -> Sequence[LoopLayer]:
        return []

    @property
    def block(self) -> Sequence[LoopLayer]:
        return cast(Sequence[LoopLayer], list(self.model.layers))

    @property
    def coda(self) -> Sequence[LoopLayer]:
        return []

    def embed(self, input_ids: Tensor) -> Tensor:
        vocab = self.config.vocab_size
        if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
            raise ValueError(
                f"token ids must lie in [0, {vocab}); got [{int(input_ids.min())}, "
                f"{int(input_ids.max())}] — was the prompt encoded with this model's tokenizer?"
            )
        return cast(Tensor, self.model.embed_tokens(input_ids))

    def positions(self, length: int, device: torch.device) -> RotaryTable:
        key = (length, str(device))
        if key not in self._rope_cache:
            inv = RopeSpec("half", self.config.rope_theta).inv_freq(self.config.head_dim)
            steps = torch.arange(length, dtype=torch.float32)
            self._rope_cache[key] = RotaryTable("half", torch.outer(steps, inv).to(device))
        return self._rope_cache[key]

    def inject(self, state: Tensor, inputs: Tensor) -> Tensor:
        return state  # no injection: the embeddings enter once, as the initial state

    def recurrence_norm(self, state: Tensor) -> Tensor:
        """``model.norm`` after every recurrence; the next recurrence takes the normed state."""
        return cast(Tensor, self.model.norm(state))

    def head(self, hidden: Tensor) -> Tensor:
        return cast(Tensor, self.lm_head(hidden))

    def exit_gate_logits(self, state: Tensor) -> Tensor:
        """Early-exit gate logits (B, T) of a state after ``recurrence_norm``; λ = σ(logits)."""
        return cast(Tensor, self.model.early_exit_gate(state)).squeeze(-1)

    def unembedding(self) -> Tensor:
        return self.lm_head.weight

    def final_norm_weight(self) -> Tensor:
        """Gain of ``model.norm``, the norm between the residual stream and the unembedding."""
        return self.model.norm.weight

    def expected_tensors(self) -> dict[str, torch.Size]:
        """Checkpoint tensor names and shapes (a tied lm_head is not expected)."""
        return {name: p.shape for name, p in self.named_parameters()}


# --------------------------------------------------------------------------------- exits
def exit_probabilities(gate_logits: Tensor) -> Tensor:
    """Exit distribution over recurrences from gate logits (R, ...): λ_t ∏_{s<t} (1 − λ_s) for
    t < R − 1 and the remainder at the last recurrence, computed in fp32; sums to 1 over R."""
    lam = torch.sigmoid(gate_logits.float())
    stay = torch.cumprod(1 - lam, dim=0)  # stay[t] = ∏_{s≤t} (1 − λ_s)
    before = torch.cat([torch.ones_like(stay[:1]), stay[:-1]])  # ∏_{s<t} (1 − λ_s)
    probs = lam * before
    probs[-1] = before[-1]
    return probs


@dataclass
class ExitDistribution:
    """Per-recurrence gate readings: ``gate_logits``, ``lambdas`` = σ(gate_logits) and
    ``probabilities`` = p(exit at t), each (R, B, T) in fp32."""

    gate_logits: Tensor
    lambdas: Tensor
    probabilities: Tensor

    @classmethod
    def from_gate_logits(cls, gate_logits: Tensor) -> ExitDistribution:
        g = gate_logits.detach().float()
        return cls(g, torch.sigmoid(g), exit_probabilities(g))

    @property
    def cdf(self) -> Tensor:
        """Cumulative exit probability up to and including each recurrence (R, B, T)."""
        return self.probabilities.cumsum(0)

    def expected_recurrences(self) -> Tensor:
        """Mean number of recurrences a token runs under the exit distribution (B, T)."""
        steps = torch.arange(1, self.probabilities.shape[0] + 1, dtype=torch.float32)
        return (self.probabilities * steps.view(-1, 1, 1).to(self.probabilities.device)).sum(0)

    def exit_step(self, threshold: float) -> Tensor:
        """0-based recurrence (B, T) at which each token exits: the first whose cumulative
        probability reaches ``threshold``, else the last (the authors' rule)."""
        reached = self.cdf >= threshold
        first = reached.float().argmax(0)
        last = self.probabilities.shape[0] - 1
        return torch.where(reached.any(0), first, torch.full_like(first, last))


class OuroExitRecorder:
    """Probe that records the exit gate after every recurrence of an engine run.

    It watches the last block layer, applies the model's ``recurrence_norm`` (as the engine does
    right after) and reads ``exit_gate_logits``; so it works with any intervention or init state.
    """

    wants_attention = False

    def __init__(self, model: OuroLM) -> None:
        self.model = model
        self.last_layer = model.meta.block_layers - 1
        self.gate_logits: list[Tensor] = []

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if site.stage == "block" and site.layer == self.last_layer:
            normed = self.model.recurrence_norm(hidden.detach())
            self.gate_logits.append(self.model.exit_gate_logits(normed).detach())

    def result(self) -> ExitDistribution:
        if not self.gate_logits:
            raise RuntimeError("OuroExitRecorder saw no recurrence; pass it in probes=[...]")
        return ExitDistribution.from_gate_logits(torch.stack(self.gate_logits))


def exit_distribution(
    model: OuroLM, input_ids: Tensor, recurrences: int | None = None
) -> ExitDistribution:
    """λ_t and the exit distribution of every token over ``recurrences`` (default: the model's
    ``total_ut_steps``) from one run of the engine."""
    recorder = OuroExitRecorder(model)
    with torch.no_grad():
        model(input_ids, recurrences=recurrences, probes=[recorder])
    return recorder.result()


def early_exit_logits(
    model: OuroLM,
    input_ids: Tensor,
    recurrences: int | None = None,
    *,
    step: int | None = None,
    threshold: float | None = None,
    expected: bool = False,
) -> Tensor:
    """Logits as the authors' inference reads them out (choose at most one):

    * ``step``: every token exits after recurrence ``step`` (0-based);
    * ``threshold``: each token exits at the first recurrence whose cumulative exit probability
      reaches it (default: the config's ``early_exit_threshold``);
    * ``expected``: the exit-probability-weighted sum of every recurrence's logits.

    With none of them and no ``early_exit_threshold`` in the config: the last recurrence.
    """
    if sum((step is not None, threshold is not None, expected)) > 1:
        raise ValueError("choose at most one of step, threshold and expected")
    n_rec = model.meta.train_recurrences if recurrences is None else int(recurrences)
    if step is not None and not 0 <= step < n_rec:
        raise ValueError(f"step must lie in [0, {n_rec}) for {n_rec} recurrences, got {step}")
    recorder = OuroExitRecorder(model)
    with torch.no_grad():
        out = model(input_ids, recurrences=n_rec, probes=[recorder], exit_every_recurrence=True)
    per_step = torch.stack(out.recurrence_logits)  # (R, B, T, V)
    dist = recorder.result()
    if step is not None:
        return per_step[step]
    if expected:
        weights = dist.probabilities.to(per_step.device, per_step.dtype)
        return (per_step * weights.unsqueeze(-1)).sum(0)
    q = model.config.early_exit_threshold if threshold is None else threshold
    if q is None:
        return per_step[-1]
    chosen = dist.exit_step(q).to(per_step.device)  # (B, T)
    index = chosen[None, :, :, None].expand(1, *per_step.shape[1:])
    return per_step.gather(0, index)[0]


# --------------------------------------------------------------------------------- loading
def load_ouro(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> OuroLM:
    """Load an Ouro checkpoint directory (config.json + safetensors, sharded or not).

    Errors name every missing, unexpected or mis-shaped tensor; pickle-only checkpoints are
    refused. The model is built on the meta device and takes the tensors as its parameters."""
    path = Path(directory)
    config, files = read_family_checkpoint(
        path, "an Ouro", is_ouro_config, lambda raw, name: ouro_config_from_dict(raw, name=name)
    )
    model = load_tied_head_model(
        lambda: OuroLM(config),
        files,
        source=str(path),
        dtype=dtype,
        device=device,
        tie_word_embeddings=config.tie_word_embeddings,  # lm_head is model.embed_tokens
    )
    return model
