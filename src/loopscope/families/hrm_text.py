"""HRM-Text (sapientinc/HRM-Text-1B; transformers' ``hrm_text``) behind the nested-loop engine.

Two stacks of identical-shape decoder layers, L (fast) and H (slow), each ending in a
weightless RMS norm, run as the loop tree ``h × [l × [L-stack], H-stack]``:

    z_H ← embed(ids) · embedding_scale,   z_L ← z_L_init (a frozen vector, zeros as published)
    for h < H_cycles:
        for l < L_cycles:  z_L ← norm(L-stack(z_L + z_H))
        z_H ← norm(H-stack(z_H + z_L))
    logits = lm_head(z_H)

z_L is carried from one H cycle into the next, never reset. Every layer is pre-norm with
weightless RMS norms: ``x + Attn(norm(x))`` then ``x + MLP(norm(x))``; attention has rotary
positions (rotate-half), one key/value head per query head and an output gate
``σ(gate_proj(x)) ⊙ attention`` before ``o_proj``; the MLP is SwiGLU. With ``prefix_lm`` the
tokens whose ``token_type_ids`` are 1 attend to each other in both directions (one
bidirectional block, wherever they lie); every other pair is causal.

The cycle counts are set per loop at call time: ``model(ids, cycles={"h": 4, "l": 1})``
(``recurrences=`` is the H count). Site names are those of :mod:`loopscope.engine.nested`:
``L.1@h2.l3``, ``L@h2.l3``, ``H.0@h2``, ``H@h2``, ``H@init``, ``L@init``.

The model has two loops, so the single-loop engine pieces (``block``, ``inject``) and
single-loop probes are refused with an error that says so; the two-scale analyses
(:mod:`loopscope.analysis.two_scale`) read nested runs instead.

Checkpoint: ``config.json`` as transformers' ``HrmTextConfig`` writes it (``num_hidden_layers``
is then the inflated cache count and ``num_layers_per_stack`` the real one) and safetensors with
the stored tensor names, whose projections are fused: ``model.L_module.layers.N.attn.gqkv_proj``
(gate, query, key, value stacked along the output rows), ``….attn.o_proj``,
``….mlp.gate_up_proj`` (gate, up), ``….mlp.down_proj``, ``model.embed_tokens``,
``model.z_L_init`` and ``lm_head``. No code shipped with a checkpoint is run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopscope.core.errors import LoopscopeError
from loopscope.engine.contract import FamilyMeta, InitState, LoopedLM, LoopLayer
from loopscope.engine.loop import LoopOutput
from loopscope.engine.nested import (
    Loop,
    NestedEditPlan,
    NestedOutput,
    NestedProbe,
    Stack,
    run_nested,
)
from loopscope.families.checkpoint import (
    CheckpointError,
    ConfigFields,
    load_tied_head_model,
    read_family_checkpoint,
)
from loopscope.nn.layers import Edit
from loopscope.nn.rotary import RopeSpec, RotaryTable

__all__ = [
    "HrmTextConfig",
    "HrmTextLM",
    "HrmTextOutput",
    "NestedOnlyError",
    "hrm_text_config_from_dict",
    "is_hrm_text_config",
    "load_hrm_text",
    "prefix_lm_mask",
]

# Defaults of transformers' HrmTextConfig: a field missing from config.json takes these.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151808,
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": 128,
    "H_cycles": 2,
    "L_cycles": 3,
    "prefix_lm": True,
    "rope_theta": 10000.0,
}


class NestedOnlyError(LoopscopeError):
    """A single-loop entry point used on a model whose loops are nested."""


# --------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class HrmTextConfig:
    """What our model needs from an hrm_text config.json (transformers' defaults applied)."""

    hidden_size: int
    layers_per_stack: int
    num_attention_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    h_cycles: int
    l_cycles: int
    embedding_scale: float
    prefix_lm: bool
    name: str = "hrm_text"

    def __post_init__(self) -> None:
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")


def is_hrm_text_config(config: Mapping[str, Any]) -> bool:
    """True for a config.json written by transformers' HrmTextConfig."""
    archs = config.get("architectures") or []
    return config.get("model_type") == "hrm_text" or "HrmTextForCausalLM" in archs


def _rope_theta(fields: ConfigFields, config: Mapping[str, Any]) -> float:
    """The rotary base from ``rope_parameters`` (or a top-level ``rope_theta``); only the
    plain ("default") rotary embedding is run."""
    rope = fields.section("rope_parameters")
    kind = rope.value("rope_type", rope.value("type", "default"))
    if kind != "default":
        raise CheckpointError(
            f"hrm_text rope_type {kind!r} is not supported; the published model uses 'default'"
        )
    if rope.present("rope_theta"):
        return rope.number("rope_theta", positive=True)
    return fields.number("rope_theta", positive=True)


def hrm_text_config_from_dict(config: Mapping[str, Any], name: str = "hrm_text") -> HrmTextConfig:
    """Read the config.json fields; CheckpointError for a field of the wrong type or value and
    for settings we do not run."""
    fields = ConfigFields(config, _DEFAULTS)
    if fields.text("hidden_act") != "silu":
        raise CheckpointError(
            f"hrm_text hidden_act {config.get('hidden_act')!r} is not supported; the published "
            "model uses 'silu'"
        )
    for bias in ("attention_bias", "mlp_bias"):
        if fields.flag(bias):
            raise CheckpointError(
                f"hrm_text {bias} true is not supported; the published model has no biases"
            )
    # Written configs carry the real per-stack count in num_layers_per_stack (num_hidden_layers
    # is then the cache's count of attention calls); older ones only in num_hidden_layers.
    if fields.present("num_layers_per_stack"):
        per_stack = fields.integer("num_layers_per_stack")
    else:
        per_stack = fields.integer("num_hidden_layers")
    if fields.present("embedding_scale"):
        scale = fields.number("embedding_scale")
    else:
        scale = 1.0 / fields.number("initializer_range", positive=True)
    return HrmTextConfig(
        hidden_size=fields.integer("hidden_size"),
        layers_per_stack=per_stack,
        num_attention_heads=fields.integer("num_attention_heads"),
        head_dim=fields.integer("head_dim"),
        intermediate_size=fields.integer("intermediate_size"),
        vocab_size=fields.integer("vocab_size"),
        rms_norm_eps=fields.number("rms_norm_eps", positive=True),
        rope_theta=_rope_theta(fields, config),
        max_position_embeddings=fields.integer("max_position_embeddings"),
        tie_word_embeddings=fields.flag("tie_word_embeddings"),
        h_cycles=fields.integer("H_cycles"),
        l_cycles=fields.integer("L_cycles"),
        embedding_scale=scale,
        prefix_lm=fields.flag("prefix_lm"),
        name=name,
    )


# --------------------------------------------------------------------------------- layers
def rms_normalise(x: Tensor, eps: float) -> Tensor:
    """Weightless RMS norm, computed in fp32 and cast back to the input's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def prefix_lm_mask(token_type_ids: Tensor) -> Tensor:
    """Allowed (query, key) pairs (batch, 1, T, T): causal, plus every pair of tokens whose
    ``token_type_ids`` are both 1 (one bidirectional block)."""
    t = token_type_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=token_type_ids.device).tril()
    prefix = token_type_ids == 1
    return (causal[None] | (prefix[:, :, None] & prefix[:, None, :]))[:, None]


@dataclass(frozen=True)
class HrmContext:
    """What every layer needs about positions: the rotary table and the allowed
    (query, key) pairs (None: plain causal)."""

    rope: RotaryTable
    allowed: Tensor | None


class HrmTextAttention(nn.Module):
    """Gated multi-head attention: ``o_proj(σ(g) ⊙ Attn(q, k, v))``, with g, q, k, v read by
    one fused projection ``gqkv_proj`` (in that order along its output rows, as stored)."""

    def __init__(self, c: HrmTextConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = c.num_attention_heads, c.head_dim
        inner = c.num_attention_heads * c.head_dim
        self.gqkv_proj = nn.Linear(c.hidden_size, 4 * inner, bias=False)
        self.o_proj = nn.Linear(inner, c.hidden_size, bias=False)

    def forward(
        self, x: Tensor, ctx: HrmContext, return_attn: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        gate, q, k, v = (part.reshape(shape) for part in self.gqkv_proj(x).chunk(4, dim=-1))
        q = ctx.rope.apply(q.transpose(1, 2))
        k = ctx.rope.apply(k.transpose(1, 2))
        v = v.transpose(1, 2)
        probs: Tensor | None = None
        if return_attn:
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5
            allowed = ctx.allowed
            if allowed is None:
                allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            out = probs.to(v.dtype) @ v
        elif ctx.allowed is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.allowed)
        gated = torch.sigmoid(gate) * out.transpose(1, 2)
        return self.o_proj(gated.reshape(b, t, -1)), probs


class HrmTextMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(g) · u)``, g and u read by one fused ``gate_up_proj``."""

    def __init__(self, c: HrmTextConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    @property
    def down(self) -> nn.Linear:
        """The output projection under the name the neuron-class analysis looks for."""
        return self.down_proj

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return cast(Tensor, self.down_proj(F.silu(gate) * up))


class HrmTextLayer(nn.Module):
    """One pre-norm decoder layer with weightless norms; ``edit`` rewrites each branch output
    just before it joins the residual stream."""

    def __init__(self, c: HrmTextConfig) -> None:
        super().__init__()
        self.eps = c.rms_norm_eps
        self.attn = HrmTextAttention(c)
        self.mlp = HrmTextMLP(c)

    def forward(
        self, x: Tensor, ctx: HrmContext, *, return_attn: bool = False, edit: Edit | None = None
    ) -> tuple[Tensor, Tensor | None]:
        a, probs = self.attn(rms_normalise(x, self.eps), ctx, return_attn)
        a = edit("attn", a) if edit is not None else a
        x = x + a
        m = self.mlp(rms_normalise(x, self.eps))
        m = edit("mlp", m) if edit is not None else m
        return x + m, probs


class HrmTextStack(nn.Module):
    """The layers of one stack (its final norm has no weights)."""

    def __init__(self, c: HrmTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HrmTextLayer(c) for _ in range(c.layers_per_stack))


class _HrmTextBody(nn.Module):
    """The ``model.`` prefix of the checkpoint."""

    def __init__(self, c: HrmTextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.L_module = HrmTextStack(c)
        self.H_module = HrmTextStack(c)
        self.z_L_init = nn.Parameter(torch.zeros(c.hidden_size), requires_grad=False)


# --------------------------------------------------------------------------------- model
@dataclass
class HrmTextOutput:
    """Logits (batch, T, vocab), the final states ``z_H``/``z_L`` and the counts run."""

    logits: Tensor
    z_h: Tensor
    z_l: Tensor
    cycles: dict[str, int]


def hrm_loop_tree(h_cycles: int, l_cycles: int) -> Loop:
    """``h × [l × [L-stack reads z_L + z_H], H-stack reads z_H + z_L]``."""
    inner = Loop("l", (Stack("L", ("L", "H")),), l_cycles)
    return Loop("h", (inner, Stack("H", ("H", "L"))), h_cycles)


class HrmTextLM(LoopedLM):
    """HRM-Text behind the family interface; ``forward`` runs the nested engine."""

    supported_init_states: tuple[InitState, ...] = ("zeros", "random")

    def __init__(self, config: HrmTextConfig) -> None:
        super().__init__()
        c = self.config = config
        self.meta = FamilyMeta(
            family="hrm_text",
            prelude_layers=0,
            # The layer applications of one H cycle at the trained counts (L-stack × L, H-stack).
            block_layers=c.l_cycles * c.layers_per_stack + c.layers_per_stack,
            coda_layers=0,
            train_recurrences=c.h_cycles,
            d_model=c.hidden_size,
            n_heads=c.num_attention_heads,
            vocab_size=c.vocab_size,
            context_length=c.max_position_embeddings,
            default_init_state="zeros",
            name=c.name,
        )
        self.loop_tree = hrm_loop_tree(c.h_cycles, c.l_cycles)
        self.model = _HrmTextBody(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.tie_weights()
        self._rope_cache: dict[tuple[int, str], RotaryTable] = {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- the nested interface ------------------------------------------------------------
    def stack_layers(self, stack: str) -> Sequence[LoopLayer]:
        module = {"L": self.model.L_module, "H": self.model.H_module}[stack]
        return cast(Sequence[LoopLayer], list(module.layers))

    def stack_output(self, stack: str, hidden: Tensor) -> Tensor:
        return rms_normalise(hidden, self.config.rms_norm_eps)

    def context(self, length: int, device: torch.device, token_type_ids: Tensor | None) -> Any:
        """Rotary table and attention mask of a prompt (``token_type_ids``: prefix-LM)."""
        allowed = None
        if token_type_ids is not None:
            if not self.config.prefix_lm:
                raise LoopscopeError(
                    f"{self.meta.name}: config.json sets prefix_lm false, so token_type_ids "
                    "would change nothing; leave them out"
                )
            allowed = prefix_lm_mask(token_type_ids.to(device))
        return HrmContext(self.positions(length, device), allowed)

    def initial_states(
        self, input_ids: Tensor, init_state: InitState | None, seed: int
    ) -> dict[str, Tensor]:
        """z_H = scaled embeddings; z_L = the checkpoint's ``z_L_init`` ("zeros", the trained
        start: HRM-Text keeps it at zero) or seeded N(0, 1) noise ("random")."""
        z_h = self.embed(input_ids)
        mode = init_state or self.meta.default_init_state
        if mode not in self.supported_init_states:
            raise LoopscopeError(
                f"{self.meta.name} does not support init_state={mode!r}; choose one of "
                f"{', '.join(self.supported_init_states)}"
            )
        if mode == "random":
            generator = torch.Generator(device=z_h.device).manual_seed(seed)
            noise = torch.randn(z_h.shape, generator=generator, device=z_h.device)
            z_l = noise.to(z_h.dtype)
        else:
            z_l = self.model.z_L_init.to(z_h.dtype).expand_as(z_h).contiguous()
        return {"H": z_h, "L": z_l}

    def run(
        self,
        input_ids: Tensor,
        *,
        cycles: Mapping[str, int] | None = None,
        token_type_ids: Tensor | None = None,
        init_state: InitState | None = None,
        seed: int = 0,
        probes: Sequence[NestedProbe] = (),
        return_attn: bool | None = None,
        edit_plan: NestedEditPlan | None = None,
    ) -> HrmTextOutput:
        """One nested pass: ``cycles`` sets the loop counts by letter (``h``, ``l``)."""
        _check_ids(self, input_ids, token_type_ids)
        ctx = self.context(input_ids.shape[1], input_ids.device, token_type_ids)
        out: NestedOutput = run_nested(
            self,
            self.initial_states(input_ids, init_state, seed),
            ctx,
            cycles=cycles,
            probes=probes,
            return_attn=return_attn,
            edit_plan=edit_plan,
        )
        logits = self.head(out.states["H"])
        return HrmTextOutput(logits, out.states["H"], out.states["L"], out.cycles)

    def forward(
        self,
        input_ids: Tensor,
        recurrences: int | None = None,
        init_state: InitState | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> Any:
        """``model(ids, recurrences=H, cycles={"l": L}, token_type_ids=...)``: a
        :class:`LoopOutput` whose ``state`` is z_H. Nested probes go in ``nested_probes``."""
        if kwargs.get("probes") or kwargs.get("edit_plan") is not None:
            raise _single_loop_refusal(self, "single-loop probes and interventions")
        unknown = sorted(
            set(kwargs)
            - {"cycles", "token_type_ids", "nested_probes", "return_attn", "probes"}
            - {"edit_plan", "nested_edit_plan"}
        )
        if unknown:
            raise _single_loop_refusal(self, f"the single-loop options {', '.join(unknown)}")
        cycles = dict(kwargs.get("cycles") or {})
        if recurrences is not None:
            cycles["h"] = int(recurrences)
        out = self.run(
            input_ids,
            cycles=cycles,
            token_type_ids=kwargs.get("token_type_ids"),
            init_state=init_state,
            seed=seed,
            probes=kwargs.get("nested_probes") or (),
            return_attn=kwargs.get("return_attn"),
            edit_plan=kwargs.get("nested_edit_plan"),
        )
        return LoopOutput(logits=out.logits, state=out.z_h, recurrences=out.cycles["h"])

    # -- the single-loop interface: refused, the loops are nested -------------------------
    @property
    def prelude(self) -> Sequence[LoopLayer]:
        return []

    @property
    def block(self) -> Sequence[LoopLayer]:
        raise _single_loop_refusal(self, "the single-loop block")

    @property
    def coda(self) -> Sequence[LoopLayer]:
        return []

    def inject(self, state: Tensor, inputs: Tensor) -> Tensor:
        raise _single_loop_refusal(self, "the single-loop injection")

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings times ``embedding_scale`` (the initial z_H)."""
        vocab = self.config.vocab_size
        if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
            raise ValueError(
                f"token ids must lie in [0, {vocab}); got [{int(input_ids.min())}, "
                f"{int(input_ids.max())}] — was the prompt encoded with this model's tokenizer?"
            )
        return cast(Tensor, self.model.embed_tokens(input_ids)) * self.config.embedding_scale

    def positions(self, length: int, device: torch.device) -> RotaryTable:
        key = (length, str(device))
        if key not in self._rope_cache:
            inv = RopeSpec("half", self.config.rope_theta).inv_freq(self.config.head_dim)
            steps = torch.arange(length, dtype=torch.float32)
            self._rope_cache[key] = RotaryTable("half", torch.outer(steps, inv).to(device))
        return self._rope_cache[key]

    def head(self, hidden: Tensor) -> Tensor:
        """``lm_head`` on z_H (already normed by the H stack)."""
        return cast(Tensor, self.lm_head(hidden))

    def unembedding(self) -> Tensor:
        return self.lm_head.weight

    def expected_tensors(self) -> dict[str, torch.Size]:
        """Checkpoint tensor names and shapes (a tied lm_head is not expected)."""
        return {name: p.shape for name, p in self.named_parameters()}


def _single_loop_refusal(model: HrmTextLM, what: str) -> NestedOnlyError:
    return NestedOnlyError(
        f"{model.meta.name} (hrm_text) runs two nested loops (H × [L-stack × L, H-stack]); "
        f"{what} cannot describe it. Run it with model.run(ids, cycles={{'h': H, 'l': L}}, "
        "probes=[...]) and analyse it with loopscope.analysis.two_scale "
        "(loopscope.studies.two_scale.analyze_two_scale writes the report)"
    )


def _check_ids(model: HrmTextLM, input_ids: Tensor, token_type_ids: Tensor | None) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have shape (batch, tokens) with at least one token, got "
            f"{tuple(input_ids.shape)}"
        )
    if input_ids.shape[1] > model.meta.context_length:
        raise LoopscopeError(
            f"prompt has {input_ids.shape[1]} tokens but {model.meta.name} has a context of "
            f"{model.meta.context_length}; shorten the prompt"
        )
    if token_type_ids is not None and tuple(token_type_ids.shape) != tuple(input_ids.shape):
        raise LoopscopeError(
            f"token_type_ids has shape {tuple(token_type_ids.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}; give one type (0 causal, 1 bidirectional) per token"
        )


# --------------------------------------------------------------------------------- loading
def load_hrm_text(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> HrmTextLM:
    """Load an hrm_text checkpoint directory (config.json + safetensors, sharded or not)."""
    path = Path(directory)
    config, files = read_family_checkpoint(
        path,
        "an hrm_text",
        is_hrm_text_config,
        lambda raw, name: hrm_text_config_from_dict(raw, name=name),
    )
    model = load_tied_head_model(
        lambda: HrmTextLM(config),
        files,
        source=str(path),
        dtype=dtype,
        device=device,
        tie_word_embeddings=config.tie_word_embeddings,  # lm_head is model.embed_tokens
    )
    model.model.z_L_init.requires_grad_(False)
    return model
