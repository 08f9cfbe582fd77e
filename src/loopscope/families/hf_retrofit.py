"""Hugging Face decoders looped through the model-family interface, without reimplementing
them: :class:`RetrofitLM` wraps transformers' own ``AutoModelForCausalLM`` of a supported model
type (Llama, Mistral, Qwen2/3, OLMo-2, GPT-2). Decoder layers [a, b) become the looped block,
[0, a) the prelude, [b, n) the coda; the embeddings (with GPT-2's learned positions) are
``embed`` and the final norm plus ``lm_head`` the ``head``. With one recurrence and no
injection the logits are the Hugging Face model's own. :func:`feedforward_hf` is the unlooped
model seen as one pass. :func:`load_retrofit` reads a local directory or the local Hugging Face
cache only, safetensors only, never with ``trust_remote_code``.

Every wrapped layer follows the engine's protocol ``layer(x, positions, *, return_attn, edit)``;
edits rewrite the attention and MLP branch outputs just before they join the residual stream
(after OLMo-2's branch norms). With a key/value cache slot (``kv=``) a layer decodes the new
tokens only, transformers' attention appending to that slot (one per stage, layer and
recurrence) as it would to its own cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from loopscope.engine.contract import INIT_STATES, FamilyMeta, InitState, LoopedLM, LoopLayer
from loopscope.families.hf_common import (
    CACHEABLE_ATTENTION,
    EAGER,
    HFPositions,
    LazyMasks,
    attn_implementation,
    cached_layer_kwargs,
    get_path,
    layer_hooks,
    read_transformers_model,
    ready,
)
from loopscope.nn.injection import AddInjection, ConcatLinearInjection, NoInjection
from loopscope.nn.kv_cache import KVSlot
from loopscope.nn.layers import Component, Edit

HFInjection = Literal["none", "add", "concat-linear"]
HF_INJECTIONS: tuple[HFInjection, ...] = ("none", "add", "concat-linear")

__all__ = [
    "ARCHS",
    "HF_INJECTIONS",
    "HFArch",
    "HFLayer",
    "RetrofitLM",
    "arch_for",
    "feedforward_hf",
    "is_retrofit_config",
    "load_retrofit",
]


# ---------------------------------------------------------------------- architecture adapters
@dataclass(frozen=True)
class HFArch:
    """Where a model type keeps its pieces (dotted attribute paths) and how its layers are
    called. ``attn_out`` / ``mlp_out`` are the modules whose outputs are the branches as they
    join the residual stream (what an edit rewrites); ``attn_module`` returns (output, probs)."""

    decoder: str
    layers: str
    embed: str
    final_norm: str
    attn_module: str
    attn_out: str
    mlp_out: str
    down_proj: str
    rotary: bool
    learned_positions: str | None = None
    embed_dropout: str | None = None
    sliding_from_config: bool = False

    @property
    def branches(self) -> tuple[tuple[str, Component], ...]:
        """(module path, component) of the two branch outputs an edit rewrites."""
        return ((self.attn_out, "attn"), (self.mlp_out, "mlp"))


_LLAMA = HFArch(
    decoder="model",
    layers="layers",
    embed="embed_tokens",
    final_norm="norm",
    attn_module="self_attn",
    attn_out="self_attn",
    mlp_out="mlp",
    down_proj="mlp.down_proj",
    rotary=True,
)
ARCHS: dict[str, HFArch] = {
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, sliding_from_config=True),
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "olmo2": replace(
        _LLAMA, attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm"
    ),
    "gpt2": HFArch(
        decoder="transformer",
        layers="h",
        embed="wte",
        final_norm="ln_f",
        attn_module="attn",
        attn_out="attn",
        mlp_out="mlp",
        down_proj="mlp.c_proj",
        rotary=False,
        learned_positions="wpe",
        embed_dropout="drop",
    ),
}


def arch_for(model_type: str) -> HFArch:
    """The adapter for a model type, or an error listing the supported ones."""
    if model_type not in ARCHS:
        raise ValueError(
            f"model_type {model_type!r} is not supported by RetrofitLM; supported decoders are "
            f"{sorted(ARCHS)} (and 'inkling2_loop' through Inkling2LoopLM)"
        )
    return ARCHS[model_type]


def is_retrofit_config(config: Mapping[str, Any]) -> bool:
    """True for a Hugging Face config.json that :func:`load_retrofit` can wrap: a supported
    decoder ``model_type`` that is not a raven (Huginn / retrofitted) checkpoint."""
    archs = config.get("architectures") or []
    if config.get("model_type") == "huginn_raven" or "RavenForCausalLM" in archs:
        return False
    return config.get("model_type") in ARCHS


def _first(output: Any) -> Tensor:
    """Layers return a tensor in transformers ≥ 5 and a tuple before."""
    return cast(Tensor, output[0] if isinstance(output, tuple) else output)


#: Attention projections whose output holds the values V (GPT-2's c_attn holds Q, K and V).
_VALUE_PROJECTIONS = ("v_proj", "c_attn")


def _finite_values(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    return torch.where(torch.isfinite(output), output, torch.zeros_like(output))


def _guard_attention_values(layers: nn.ModuleList) -> None:
    """Zero non-finite attention values as they are projected, once per model.

    Why: transformers' fused causal attention multiplies a later token's masked, zero weight by
    its value, and 0 · NaN is NaN, so one diverged token would turn every earlier token NaN and
    hide which tokens really diverged. A diverged token still stays diverged through its own
    residual stream; finite values are untouched, so outputs are bit-for-bit unchanged."""
    for layer in layers:
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] not in _VALUE_PROJECTIONS:
                continue
            if getattr(module, "_loopscope_value_guard", False):
                continue  # wrapped twice (e.g. RetrofitLM over the same hf model): one hook
            module.register_forward_hook(_finite_values)
            module._loopscope_value_guard = True


class HFLayer:
    """One Hugging Face decoder layer under the engine's layer protocol.

    It is a plain callable (not a module) so the wrapped model's parameters keep their Hugging
    Face names exactly once in the state dict."""

    def __init__(self, owner: RetrofitLM, index: int, kind: str) -> None:
        self.owner = owner
        self.index = index
        self.kind = kind

    @property
    def module(self) -> nn.Module:
        return self.owner.hf_layers[self.index]

    def __call__(
        self,
        x: Tensor,
        positions: HFPositions,
        *,
        return_attn: bool = False,
        edit: Edit | None = None,
        kv: KVSlot | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``kv``: this layer application's key/value cache slot when decoding incrementally
        (the new tokens of ``x`` follow the cached ones)."""
        owner = self.owner
        impl = EAGER if return_attn else owner.fast_attn
        captured: list[Tensor] | None = [] if return_attn else None
        kwargs: dict[str, Any]
        if kv is not None:
            if return_attn:
                raise ValueError("attention probabilities are not kept with a key/value cache")
            window = getattr(owner.hf.config, "sliding_window", None)
            kwargs = cached_layer_kwargs(
                positions, kv, x, implementation=impl, kind=self.kind, window=window
            )
            if not owner.arch.rotary:  # GPT-2's positions were added by embed_at
                kwargs.pop("position_ids")
        else:
            kwargs = {"attention_mask": positions.masks[(impl, self.kind)]}
            if owner.arch.rotary:
                kwargs["position_ids"] = positions.position_ids
                kwargs["position_embeddings"] = positions.rotary
        with (
            attn_implementation(owner.hf.config, impl),
            layer_hooks(
                self.module,
                attention=owner.arch.attn_module,
                branches=owner.arch.branches,
                capture=captured,
                edit=edit,
            ),
        ):
            out = _first(self.module(x, **kwargs))
        return out, (captured[-1] if captured else None)


# --------------------------------------------------------------------------- RetrofitLM
def make_hf_injection(kind: str, d_model: int, adapter_scale: float) -> nn.Module:
    """none / add / concat-linear with W = adapter_scale·[I, I] (1/√2 keeps the norm of
    (Z + X)/√2, 1 gives exactly Z + X), no noise, so a retrofit starts from known behaviour."""
    if kind == "none":
        return NoInjection()
    if kind == "add":
        return AddInjection()
    if kind == "concat-linear":
        injection = ConcatLinearInjection(d_model)
        eye = torch.eye(d_model) * adapter_scale
        with torch.no_grad():
            injection.adapter.weight.copy_(torch.cat([eye, eye], dim=1))
        return injection
    raise ValueError(f"unknown injection {kind!r} for a retrofit; choose one of {HF_INJECTIONS}")


def _layer_kinds(config: Any, arch: HFArch, n: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return [str(t) for t in types[:n]]
    sliding = arch.sliding_from_config and getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * n


class RetrofitLM(LoopedLM):
    """A Hugging Face decoder with layers [a, b) looped: (a, (b−a)⊗l, n−b).

    ``injection`` combines the state with the prelude output at every recurrence; with "none"
    the state starts as the prelude output (``init_state="prelude"``), otherwise as zeros, so a
    single recurrence reproduces the original model (exactly for "none" / "add" and for
    "concat-linear" with ``adapter_scale=1``). ``attn_implementation`` is the fast path used when
    no attention probabilities are asked for (default "sdpa")."""

    @property
    def supports_kv_cache(self) -> bool:
        """Its layers take a key/value cache slot (``kv=``) on the attention paths whose masks
        loopscope builds for the new tokens (SDPA and eager)."""
        return self.fast_attn in CACHEABLE_ATTENTION

    def __init__(
        self,
        hf_model: nn.Module,
        *,
        loop: tuple[int, int] | None = None,
        recurrences: int = 1,
        injection: HFInjection = "none",
        adapter_scale: float = 2**-0.5,
        init_state: InitState | None = None,
        attn_implementation: str | None = None,
        name: str = "",
        family: str | None = None,
    ) -> None:
        super().__init__()
        config: Any = getattr(hf_model, "config", None)
        if config is None or not hasattr(config, "model_type"):
            raise TypeError(
                f"RetrofitLM wraps a transformers causal LM, got {type(hf_model).__name__}"
            )
        self.arch = arch_for(config.model_type)
        self.hf: Any = hf_model
        self.fast_attn = attn_implementation or "sdpa"
        n = len(self.hf_layers)
        a, b = loop if loop is not None else (0, n)
        if not 0 <= a < b <= n:
            raise ValueError(
                f"loop=({a}, {b}) must satisfy 0 ≤ a < b ≤ {n} (the model has {n} layers)"
            )
        if recurrences < 1:
            raise ValueError(f"recurrences must be ≥ 1, got {recurrences}")
        mode = init_state or ("prelude" if injection == "none" else "zeros")
        if mode not in INIT_STATES:
            raise ValueError(f"unknown init_state {mode!r}; choose one of {INIT_STATES}")
        self.loop = (a, b)
        self.injection_kind = injection
        d = int(config.hidden_size)
        param = next(hf_model.parameters())
        self.injection = make_hf_injection(injection, d, adapter_scale).to(
            device=param.device, dtype=param.dtype
        )
        kinds = _layer_kinds(config, self.arch, n)
        self._layers = [HFLayer(self, i, kinds[i]) for i in range(n)]
        _guard_attention_values(self.hf_layers)
        self.meta = FamilyMeta(
            family=family or f"retrofit-{config.model_type}",
            prelude_layers=a,
            block_layers=b - a,
            coda_layers=n - b,
            train_recurrences=recurrences,
            d_model=d,
            n_heads=int(config.num_attention_heads),
            vocab_size=int(config.vocab_size),
            context_length=int(getattr(config, "max_position_embeddings", 2048)),
            default_init_state=mode,
            name=name or str(getattr(config, "name_or_path", "") or ""),
        )
        self.tokenizer: Any = None

    # -- pieces of the Hugging Face model ---------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return get_path(self.hf, self.arch.decoder)

    @property
    def hf_layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, get_path(self.decoder, self.arch.layers))

    def down_projection(self, layer: int) -> nn.Module:
        """The MLP output projection of decoder layer ``layer`` (GPT-2's is a Conv1D)."""
        return get_path(self.hf_layers[layer], self.arch.down_proj)

    # -- the family interface ---------------------------------------------------------------
    @property
    def prelude(self) -> Sequence[LoopLayer]:
        return self._layers[: self.loop[0]]

    @property
    def block(self) -> Sequence[LoopLayer]:
        return self._layers[self.loop[0] : self.loop[1]]

    @property
    def coda(self) -> Sequence[LoopLayer]:
        return self._layers[self.loop[1] :]

    def embed(self, input_ids: Tensor) -> Tensor:
        ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self.embed_at(input_ids, ids)

    def embed_at(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings, plus GPT-2's learned position embeddings at ``positions``."""
        vocab = self.meta.vocab_size
        if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
            raise ValueError(
                f"token ids must lie in [0, {vocab}); got [{int(input_ids.min())}, "
                f"{int(input_ids.max())}] — was the prompt encoded with this model's tokenizer?"
            )
        decoder = self.decoder
        hidden = get_path(decoder, self.arch.embed)(input_ids)
        if self.arch.learned_positions is not None:
            learned = get_path(decoder, self.arch.learned_positions)(positions)
            hidden = hidden + learned.to(hidden.dtype)
        if self.arch.embed_dropout is not None:
            hidden = get_path(decoder, self.arch.embed_dropout)(hidden)
        return cast(Tensor, hidden)

    def positions(self, length: int, device: torch.device) -> HFPositions:
        config: Any = self.hf.config
        param = next(self.hf.parameters())
        dummy = torch.zeros(1, length, self.meta.d_model, dtype=param.dtype, device=device)
        ids = torch.arange(length, device=device)[None]
        rotary = None
        if self.arch.rotary:
            cos, sin = get_path(self.decoder, "rotary_emb")(dummy, ids)
            rotary = (cos, sin)
        return HFPositions(position_ids=ids, rotary=rotary, masks=LazyMasks(config, dummy, ids))

    def inject(self, state: Tensor, inputs: Tensor) -> Tensor:
        return cast(Tensor, self.injection(state, inputs))

    def head(self, hidden: Tensor) -> Tensor:
        normed = get_path(self.decoder, self.arch.final_norm)(hidden)
        return cast(Tensor, cast(Any, self.hf).lm_head(normed))

    def unembedding(self) -> Tensor:
        return cast(Tensor, cast(Any, self.hf).lm_head.weight)


def feedforward_hf(hf_model: nn.Module, **kwargs: Any) -> RetrofitLM:
    """The unlooped Hugging Face model as one pass: every layer in the block, one recurrence,
    no prelude or coda, so stages-of-inference profiles read it with ``as_single_pass``."""
    model_type = cast(Any, hf_model).config.model_type
    return RetrofitLM(
        hf_model, loop=None, recurrences=1, injection="none", family=f"hf-{model_type}", **kwargs
    )


# ------------------------------------------------------------------------------------ loading
def load_retrofit(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    loop: tuple[int, int] | None = None,
    recurrences: int | None = None,
    injection: HFInjection = "none",
    adapter_scale: float = 2**-0.5,
    attn_implementation: str | None = None,
) -> RetrofitLM:
    """Load a Hugging Face decoder from a local directory or the local cache and loop it.

    Safetensors only, never ``trust_remote_code``. ``loop=(a, b)`` loops layers [a, b) (default:
    all layers, one pass). The tokenizer, when the directory has one, is attached as
    ``model.tokenizer``."""
    fast = attn_implementation or "sdpa"
    directory, hf_model = read_transformers_model(
        path_or_id,
        detect=is_retrofit_config,
        supported=f"a supported Hugging Face decoder ({sorted(ARCHS)})",
        dtype=dtype,
        attn_implementation=fast,
    )
    model = RetrofitLM(
        hf_model,
        loop=loop,
        recurrences=recurrences or 1,
        injection=injection,
        adapter_scale=adapter_scale,
        attn_implementation=fast,
        name=directory.name,
    )
    return ready(model, directory, device)
