"""Parcae (SandyResearch/parcae-*, Prairie et al. 2026) behind the model-family interface.

Layout (p, k⊗l, c) = (2, 2⊗l, 2) for Parcae-140M, up to (8, 8⊗l, 8) for 1.3B. Every layer is a
pre-norm block (``norm_1`` → attention, ``norm_2`` → MLP) with parameter-free RMS norms on the
rotated queries and keys (``qk_norm``), ReLU² MLPs and rotary embeddings on adjacent channel pairs.
The prelude output goes through ``ln_prelude`` and is the injected input e. Each recurrence
starts with the *diagonal injection*

    h ← exp(−Δ·A) ⊙ h + Δ ⊙ (B e),   Δ = softplus(dt_bias),  A = exp(A_log),

a zero-order-hold discretisation of ḣ = −A h + B e whose decay lies in (0, 1) per channel, so
the linear part of the loop is stable by construction. After the last recurrence the state is
projected by ``C`` into the coda, and ``ln_f`` → ``lm_head`` (tied to the embedding, times the
init scheme's logit scale) reads the logits.

Two more pieces of the authors' code are reproduced: *value embeddings* (a per-token table added
to the attention values through a learned gate 2σ(W x[:32]), in alternating layers) and the
random initial state, a normal truncated at ±3σ (σ from the init scheme) drawn after one
discarded normal draw. Value embeddings need the prompt's token ids inside every layer, so
:meth:`ParcaeLM.embed` remembers them for the layers of that forward pass (as the authors'
model does).

Checkpoint: ``config.json`` is the authors' config dataclass (``_class_name: ParcaeConfig``,
read in :mod:`loopscope.families.parcae_config`); tensor names follow their module tree
(``transformer.wte``, ``transformer.prelude.N``, ``transformer.adapter.{A_log,dt_bias,B}``,
``transformer.core_block.N``, ``transformer.C``, ``transformer.coda.N``, ``transformer.ln_f``,
``transformer.ln_prelude``, ``value_embeds.N``, ``lm_head``, ``freqs_cis``). The authors
publish pickled weights (``model.pt`` / ``pytorch_model.bin``); loopscope reads safetensors
only, so convert them once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopscope.engine.contract import FamilyMeta, InitState, LoopedLM, LoopLayer
from loopscope.families.checkpoint import (
    load_weights,
    read_family_checkpoint,
)
from loopscope.families.parcae_config import (
    NONLINEARITIES,
    ParcaeConfig,
    is_parcae_config,
    parcae_config_from_dict,
)
from loopscope.nn.injection import AddInjection, ConcatLinearInjection, DiscretisedDiagonalInjection
from loopscope.nn.kv_cache import KVSlot, cached_attention, rotate_new
from loopscope.nn.layers import Edit, causal_attention
from loopscope.nn.norms import RMSNormCastBeforeGain
from loopscope.nn.rotary import ROPE_TABLE, RopeSpec, RotaryTable

__all__ = [
    "ParcaeConfig",
    "ParcaeLM",
    "is_parcae_config",
    "load_parcae",
    "parcae_config_from_dict",
]

#: Width of the slice of the attention input that drives the value-embedding gate.
VE_GATE_CHANNELS = 32


def has_value_embedding(index: int, n_layers: int) -> bool:
    """The authors' alternation: every other layer, always including the last one."""
    return index % 2 == (n_layers - 1) % 2


# --------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class _Width:
    """The sizes of one stage's layers (prelude/coda use the model width, the core its own)."""

    dim: int
    heads: int
    kv_heads: int
    intermediate: int


class ParcaeAttention(nn.Module):
    """Causal self-attention: optional value embedding through ``ve_gate``, optional clipping
    and q/k bias, rotary embeddings on adjacent pairs, then parameter-free q/k RMS norms."""

    def __init__(self, c: ParcaeConfig, w: _Width, value_gate: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = w.heads, w.kv_heads, w.dim // w.heads
        self.qk_norm, self.clip = c.qk_norm, c.clip_qkv
        self.c_q = nn.Linear(w.dim, w.heads * self.head_dim, bias=c.bias)
        self.c_k = nn.Linear(w.dim, w.kv_heads * self.head_dim, bias=c.bias)
        self.c_v = nn.Linear(w.dim, w.kv_heads * self.head_dim, bias=c.bias)
        self.c_proj = nn.Linear(w.dim, w.dim, bias=c.bias)
        self.qk_bias = (
            nn.Parameter(torch.zeros(2, 1, w.heads, self.head_dim)) if c.qk_bias else None
        )
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, w.kv_heads, bias=False) if value_gate else None

    def forward(
        self,
        x: Tensor,
        rope: RotaryTable | None,
        ve: Tensor | None,
        return_attn: bool = False,
        kv: KVSlot | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``kv``: this layer application's key/value cache slot when decoding incrementally
        (the new tokens of ``x`` follow the cached ones)."""
        b, t, d = x.shape
        q = self.c_q(x).view(b, t, self.n_heads, self.head_dim)
        k = self.c_k(x).view(b, t, self.n_kv, self.head_dim)
        v = self.c_v(x).view(b, t, self.n_kv, self.head_dim)
        if ve is not None and self.ve_gate is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(b, t, self.n_kv, self.head_dim)
        if self.clip is not None:
            q, k, v = (z.clamp(min=-self.clip, max=self.clip) for z in (q, k, v))
        if self.qk_bias is not None:
            q, k = (q + self.qk_bias[0]).to(q.dtype), (k + self.qk_bias[1]).to(q.dtype)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if rope is not None and kv is None:
            q, k = rope.apply(q), rope.apply(k)
        elif rope is not None and kv is not None:
            q, k = rotate_new(rope, q, kv), rotate_new(rope, k, kv)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if kv is not None:
            if return_attn:
                raise ValueError("attention probabilities are not kept with a key/value cache")
            out, probs = cached_attention(q, k, v, kv), None
        else:
            out, probs = causal_attention(q, k, v, return_attn)
        return self.c_proj(out.transpose(1, 2).reshape(b, t, d)), probs


class ParcaeMLP(nn.Module):
    """``proj(σ(fc(x)))`` or, gated, ``proj(σ(a)·b)`` with ``fc`` giving [a; b]; ``proj`` is the
    output projection the neuron-class analysis reads."""

    def __init__(self, c: ParcaeConfig, w: _Width) -> None:
        super().__init__()
        self.gated = c.gated_mlp
        self.act = NONLINEARITIES[c.nonlin]
        self.fc = nn.Linear(w.dim, w.intermediate * (2 if c.gated_mlp else 1), bias=c.bias)
        self.proj = nn.Linear(w.intermediate, w.dim, bias=c.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            a, b = self.fc(x).chunk(2, dim=-1)
            return cast(Tensor, self.proj(self.act(a) * b))
        return cast(Tensor, self.proj(self.act(self.fc(x))))


class ParcaeLayer(nn.Module):
    """Pre-norm block; ``edit`` rewrites each branch output before it joins the stream."""

    def __init__(self, c: ParcaeConfig, w: _Width, value_gate: bool) -> None:
        super().__init__()
        self.norm_1 = RMSNormCastBeforeGain(w.dim, c.norm_eps)
        self.attn = ParcaeAttention(c, w, value_gate)
        self.norm_2 = RMSNormCastBeforeGain(w.dim, c.norm_eps)
        self.mlp = ParcaeMLP(c, w)

    def forward(
        self,
        x: Tensor,
        rope: RotaryTable | None,
        ve: Tensor | None = None,
        *,
        return_attn: bool = False,
        edit: Edit | None = None,
        kv: KVSlot | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``kv``: this layer application's key/value cache slot when decoding incrementally."""
        a, probs = self.attn(self.norm_1(x), rope, ve, return_attn, kv)
        a = edit("attn", a) if edit is not None else a
        x = a + x
        m = self.mlp(self.norm_2(x))
        m = edit("mlp", m) if edit is not None else m
        return m + x, probs


def _make_injection(c: ParcaeConfig) -> nn.Module:
    """``transformer.adapter``: the config's injection between the state and the input."""
    if c.injection_type == "diagonal":
        return DiscretisedDiagonalInjection(c.rec_dim, c.n_embd)
    if c.injection_type == "linear":
        return ConcatLinearInjection(c.rec_dim, c.n_embd, c.bias)
    return AddInjection()


class _LayerCall:
    """A layer as the engine calls it: the value embedding of this prompt is looked up, and the
    stage boundaries of the authors' forward pass are folded in — ``ln_prelude`` after the last
    prelude layer, ``C`` before the first coda layer. Not a module, so every parameter keeps
    its one checkpoint name."""

    def __init__(
        self,
        owner: ParcaeLM,
        layer: ParcaeLayer,
        ve_key: str | None,
        before: nn.Module | None = None,
        after: nn.Module | None = None,
    ) -> None:
        self.owner, self.layer, self.ve_key = owner, layer, ve_key
        self.before, self.after = before, after

    def __call__(
        self,
        x: Tensor,
        positions: Any,
        *,
        return_attn: bool = False,
        edit: Edit | None = None,
        kv: KVSlot | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if self.before is not None:
            x = self.before(x)
        ve = self.owner.value_embedding(self.ve_key, x)
        out, probs = self.layer(x, positions, ve, return_attn=return_attn, edit=edit, kv=kv)
        if self.after is not None:
            out = self.after(out)
        return out, probs

    def __getattr__(self, name: str) -> Any:
        """Everything else (``mlp``, ``attn``, norms) is the wrapped layer's."""
        if name in ("owner", "layer", "ve_key", "before", "after"):
            raise AttributeError(name)  # not set yet: never recurse
        return getattr(self.layer, name)


# --------------------------------------------------------------------------------- model
class ParcaeLM(LoopedLM):
    """A Parcae checkpoint behind the family interface; module and parameter names equal the
    checkpoint's tensor names."""

    #: Its layers take a key/value cache slot (``kv=``) for incremental decoding; the value
    #: embeddings look up the new tokens only, which is all a cached step passes to ``embed``.
    supports_kv_cache = True

    def __init__(self, config: ParcaeConfig) -> None:
        super().__init__()
        c = self.config = config
        p, k = c.n_layers_in_prelude, c.n_layers_in_recurrent_block
        self.meta = FamilyMeta(
            family="parcae",
            prelude_layers=p,
            block_layers=k,
            coda_layers=c.n_layers_in_coda,
            train_recurrences=c.mean_recurrence,
            d_model=c.n_embd,
            n_heads=c.n_heads,
            vocab_size=c.vocab_size,
            context_length=c.block_size,
            default_init_state="zeros" if c.state_init == "zero" else "random",
            name=c.name,
        )
        outer = _Width(c.n_embd, c.n_heads, c.n_kv_heads, c.intermediate_size)
        inner = _Width(c.rec_dim, c.rec_heads, c.rec_heads, c.rec_intermediate_size)
        n_layer = k * c.mean_backprop_depth  # the authors' count behind the ve_gate alternation
        coda_start = p + k * c.mean_recurrence  # the authors' layer ids of the coda

        def stack(width: _Width, ids: range) -> nn.ModuleList:
            return nn.ModuleList(
                ParcaeLayer(c, width, has_value_embedding(i, n_layer)) for i in ids
            )

        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(c.vocab_size, c.n_embd),
            "prelude": stack(outer, range(p)),
            "adapter": _make_injection(c),
            "core_block": stack(inner, range(p, p + k)),
            "C": nn.Linear(c.rec_dim, c.n_embd, bias=c.bias),
            "coda": stack(outer, range(coda_start, coda_start + c.n_layers_in_coda)),
            "ln_f": RMSNormCastBeforeGain(c.n_embd, c.norm_eps),
        }
        if c.prelude_norm:
            modules["ln_prelude"] = RMSNormCastBeforeGain(c.n_embd, c.norm_eps)
        self.transformer = nn.ModuleDict(modules)
        n_eff = c.n_effective_layers
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(c.vocab_size, c.ve_dim)
                for i in range(n_eff)
                if has_value_embedding(i, n_eff)
            }
        )
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.tie_weights()
        self.rope_table: Tensor | None = None  # the checkpoint's freqs_cis, when it has one
        self._rope_cache: dict[tuple[int, str], RotaryTable] = {}
        self._ids: Tensor | None = None
        self._calls = self._layer_calls()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = cast(nn.Embedding, self.transformer["wte"]).weight

    def _stack(self, key: str) -> list[ParcaeLayer]:
        return [cast(ParcaeLayer, layer) for layer in cast(nn.ModuleList, self.transformer[key])]

    def _ve_key(self, index: int, layer: ParcaeLayer) -> str | None:
        """Value-embedding table of effective layer ``index``, if it has one and a gate."""
        key = str(index)
        return key if key in self.value_embeds and layer.attn.ve_gate is not None else None

    def _layer_calls(self) -> dict[str, list[_LayerCall]]:
        c = self.config
        p, k = c.n_layers_in_prelude, c.n_layers_in_recurrent_block
        ln_prelude = self.transformer["ln_prelude"] if c.prelude_norm else None
        prelude = [
            _LayerCall(
                self, layer, self._ve_key(i, layer), after=ln_prelude if i == p - 1 else None
            )
            for i, layer in enumerate(self._stack("prelude"))
        ]
        block = [
            _LayerCall(self, layer, self._ve_key(p + j, layer))
            for j, layer in enumerate(self._stack("core_block"))
        ]
        coda = [
            _LayerCall(
                self,
                layer,
                self._ve_key(p + k + i, layer),
                before=self.transformer["C"] if i == 0 else None,
            )
            for i, layer in enumerate(self._stack("coda"))
        ]
        return {"prelude": prelude, "block": block, "coda": coda}

    # -- the family interface ------------------------------------------------------------
    @property
    def prelude(self) -> Sequence[LoopLayer]:
        return cast(Sequence[LoopLayer], self._calls["prelude"])

    @property
    def block(self) -> Sequence[LoopLayer]:
        return cast(Sequence[LoopLayer], self._calls["block"])

    @property
    def coda(self) -> Sequence[LoopLayer]:
        return cast(Sequence[LoopLayer], self._calls["coda"])

    @property
    def init_std(self) -> float:
        return self.config.state_std

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings; also remembers ``input_ids`` for the value embeddings of the layers
        that run next (``ln_prelude`` is applied here when there is no prelude layer)."""
        vocab = self.config.vocab_size
        if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
            raise ValueError(
                f"token ids must lie in [0, {vocab}); got [{int(input_ids.min())}, "
                f"{int(input_ids.max())}] — was the prompt encoded with this model's tokenizer?"
            )
        self._ids = input_ids
        x = cast(Tensor, self.transformer["wte"](input_ids))
        if self.config.prelude_norm and not self.config.n_layers_in_prelude:
            x = cast(Tensor, self.transformer["ln_prelude"](x))
        return x

    def value_embedding(self, key: str | None, x: Tensor) -> Tensor | None:
        """The value embedding ``key`` of the prompt last passed to :meth:`embed`."""
        if key is None:
            return None
        ids = self._ids
        if ids is None or tuple(ids.shape) != tuple(x.shape[:2]):
            raise RuntimeError(
                "Parcae's value embeddings need the prompt's token ids: call model.embed("
                "input_ids) for this prompt before running its layers (the engine, "
                "prelude_output and block_step do)"
            )
        return cast(Tensor, self.value_embeds[key](ids.to(x.device))).to(x.dtype)

    def positions(self, length: int, device: torch.device) -> RotaryTable | None:
        if not self.config.use_rope:
            return None
        key = (length, str(device))
        if key not in self._rope_cache:
            if self.rope_table is not None:
                rope = RotaryTable.from_table(self.rope_table[:, :length].to(device))
            else:
                c = self.config
                inv = RopeSpec("pairs", c.rope_base).inv_freq(c.head_dim)
                steps = torch.arange(length, dtype=torch.float32) / c.rope_condense_ratio
                rope = RotaryTable("pairs", torch.outer(steps, inv).to(device))
            self._rope_cache[key] = rope
        return self._rope_cache[key]

    def initial_state(
        self, inputs: Tensor, mode: InitState, generator: torch.Generator | None, std: float
    ) -> Tensor:
        """(B, T, recurrent width). ``random`` follows the config's ``state_init`` draw for draw
        (``like-init``: a discarded normal draw, then a normal truncated at ±3σ); drawn in fp32,
        so one seed gives the same state in every dtype."""
        shape = (*inputs.shape[:-1], self.config.rec_dim)
        kind = self.config.state_init
        if mode == "prelude":
            if self.config.rec_dim != self.config.n_embd:
                raise ValueError(
                    "init_state='prelude' needs recurrent_embedding_dimension = n_embd; use "
                    "'zeros' or 'random'"
                )
            return inputs
        if mode == "zeros" or (mode == "random" and kind == "zero"):
            return inputs.new_zeros(shape)
        if mode != "random":
            return super().initial_state(inputs, mode, generator, std)
        x = torch.randn(shape, generator=generator, device=inputs.device)
        if kind == "like-init":
            nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        elif kind == "embed":
            x = x / math.sqrt(self.config.n_embd)
        elif kind == "unit":
            sd, mean = torch.std_mean(x, dim=-1, keepdim=True)
            x = (x - mean) / (sd + 1e-8)
        return x.to(inputs.dtype)

    def inject(self, state: Tensor, inputs: Tensor) -> Tensor:
        return cast(Tensor, self.transformer["adapter"](state, inputs))

    def head(self, hidden: Tensor) -> Tensor:
        """``ln_f`` → ``lm_head`` in fp32 (with ``C`` first when there is no coda layer to carry
        it), then the optional soft cap."""
        if not self.config.n_layers_in_coda:
            hidden = cast(Tensor, self.transformer["C"](hidden))
        logits = self.lm_head(self.transformer["ln_f"](hidden)).float()
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def unembedding(self) -> Tensor:
        return self.lm_head.weight

    def final_norm_weight(self) -> Tensor:
        """Gain of ``ln_f``, which sits between the residual stream and the unembedding."""
        return cast(RMSNormCastBeforeGain, self.transformer["ln_f"]).weight

    def injection_decay(self) -> Tensor | None:
        """exp(−Δ·A) per state channel for the diagonal injection (the linear part's spectrum),
        else None."""
        adapter = self.transformer["adapter"]
        return (
            adapter.decay().detach() if isinstance(adapter, DiscretisedDiagonalInjection) else None
        )

    def expected_tensors(self) -> dict[str, torch.Size]:
        """Checkpoint tensor names and shapes (a tied lm_head is not expected)."""
        return {name: p.shape for name, p in self.named_parameters()}


# --------------------------------------------------------------------------------- loading
def load_parcae(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ParcaeLM:
    """Load a Parcae checkpoint directory (config.json + safetensors, sharded or not).

    The stored rotary table ``freqs_cis`` is used when present, exactly as the authors' loader
    does; errors name every missing, unexpected or mis-shaped tensor; pickle-only checkpoints
    (the form the authors publish) are refused with the conversion to do."""
    path = Path(directory)
    config, files = read_family_checkpoint(
        path,
        "a Parcae",
        is_parcae_config,
        lambda raw, name: parcae_config_from_dict(raw, name=name),
    )
    with torch.device("meta"):
        model = ParcaeLM(config)
    table_shape = torch.Size((1, config.rope_table_length, 1, config.head_dim // 2, 2))
    aside = load_weights(
        model,
        files,
        source=str(path),
        dtype=dtype,
        device=device,
        expected=model.expected_tensors(),
        tied=("lm_head.weight",) if config.tie_embeddings else (),  # transformer.wte.weight
        set_aside={ROPE_TABLE: table_shape},
    )
    model.tie_weights()
    table = aside.get(ROPE_TABLE)
    model.rope_table = None if table is None else table.float()
    model.eval()
    return model
