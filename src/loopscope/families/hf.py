"""Hugging Face decoders through the model-family interface, without reimplementing them.

* :class:`RetrofitLM` wraps any supported ``AutoModelForCausalLM`` (Llama, Mistral, Qwen2/3,
  OLMo-2, GPT-2): decoder layers [a, b) become the looped block, [0, a) the prelude, [b, n) the
  coda; the embeddings (with GPT-2's learned positions) are ``embed`` and the final norm plus
  ``lm_head`` the ``head``. With one recurrence and no injection the logits are the Hugging
  Face model's own. :func:`feedforward_hf` is the unlooped model seen as one pass.
* :class:`Inkling2LoopLM` exposes transformers' own ``inkling2_loop`` model (prelude, looped
  core, coda) to the engine, calling its layers and message gates as they are.
* :func:`load_hf` reads a local directory or the local Hugging Face cache only, safetensors
  only, never with ``trust_remote_code``.

Every wrapped layer follows the engine's protocol ``layer(x, positions, *, return_attn, edit)``.
Attention probabilities come from the eager attention path, switched on per call (the fast path,
normally SDPA, is used otherwise). Edits rewrite the attention and MLP branch outputs just
before they join the residual stream (after OLMo-2's branch norms), through temporary forward
hooks; Inkling-2 layers take no edits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from loopscope.core.errors import CheckpointError
from loopscope.engine.contract import INIT_STATES, FamilyMeta, InitState, LoopedLM, LoopLayer
from loopscope.families.checkpoint import PICKLE_NAMES, read_config
from loopscope.families.hub import (
    auto_tokenizer,
    cached_snapshot,
    causal_lm,
    fetch_hint,
    looks_like_hub_id,
)
from loopscope.nn.injection import AddInjection, ConcatLinearInjection, NoInjection
from loopscope.nn.layers import Edit

HFInjection = Literal["none", "add", "concat-linear"]
HF_INJECTIONS: tuple[HFInjection, ...] = ("none", "add", "concat-linear")
INKLING_TYPES = ("inkling2_loop", "inkling2_loop_text")
_EAGER = "eager"


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
            f"{sorted(ARCHS)} (and {INKLING_TYPES[0]!r} through Inkling2LoopLM)"
        )
    return ARCHS[model_type]


def get_path(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b`` for ``path='a.b'`` (the modules an adapter names)."""
    module: Any = root
    for part in path.split("."):
        module = getattr(module, part)
    return cast(nn.Module, module)


def is_hf_decoder_config(config: Mapping[str, Any]) -> bool:
    """True for a Hugging Face config.json that :func:`load_hf` can wrap: a supported decoder
    ``model_type`` (or Inkling-2 loop) that is not a raven (Huginn / retrofitted) checkpoint."""
    archs = config.get("architectures") or []
    if config.get("model_type") == "huginn_raven" or "RavenForCausalLM" in archs:
        return False
    return config.get("model_type") in (*ARCHS, *INKLING_TYPES)


# --------------------------------------------------------------------------- layer calls
@dataclass
class HFPositions:
    """Per-prompt position data: ids (1, T), rotary (cos, sin) when the model has rotary
    embeddings, and causal masks keyed by (attention implementation, mask kind)."""

    position_ids: Tensor
    rotary: tuple[Tensor, Tensor] | None
    masks: dict[tuple[str, str], Any]
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def attn_implementation(config: Any, implementation: str) -> Iterator[None]:
    """Temporarily switch a config's attention implementation (every layer reads it per call)."""
    old = config._attn_implementation
    if old == implementation:
        yield
        return
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = old


def _mask_makers() -> dict[str, Callable[..., Any]]:
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    return {
        "full_attention": create_causal_mask,
        "sliding_attention": create_sliding_window_causal_mask,
    }


def causal_masks(
    config: Any,
    kinds: Sequence[str],
    implementations: Sequence[str],
    dummy: Tensor,
    position_ids: Tensor,
) -> dict[tuple[str, str], Any]:
    """The masks Hugging Face's own forward would build, for every (implementation, kind).

    ``dummy`` (1, T, D) only carries the length, dtype and device."""
    makers = _mask_makers()
    masks: dict[tuple[str, str], Any] = {}
    for impl in dict.fromkeys(implementations):
        with attn_implementation(config, impl):
            for kind in dict.fromkeys(kinds):
                if kind not in makers:
                    raise ValueError(f"unsupported attention layer type {kind!r}")
                masks[(impl, kind)] = makers[kind](
                    config=config,
                    inputs_embeds=dummy,
                    attention_mask=None,
                    cache=None,
                    position_ids=position_ids,
                )
    return masks


def _replace_first(output: Any, new: Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _edit_hook(edit: Edit, component: Literal["attn", "mlp"]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        branch = output[0] if isinstance(output, tuple) else output
        return _replace_first(output, edit(component, branch))

    return hook


@contextlib.contextmanager
def layer_hooks(
    layer: nn.Module, arch: HFArch, *, capture: list[Tensor] | None, edit: Edit | None
) -> Iterator[None]:
    """Forward hooks for one call: capture the attention probabilities, apply an edit."""
    handles = []
    if capture is not None:

        def grab(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                capture.append(output[1])

        handles.append(get_path(layer, arch.attn_module).register_forward_hook(grab))
    if edit is not None:
        for path, component in ((arch.attn_out, "attn"), (arch.mlp_out, "mlp")):
            hook = _edit_hook(edit, cast(Literal["attn", "mlp"], component))
            handles.append(get_path(layer, path).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    ) -> tuple[Tensor, Tensor | None]:
        owner = self.owner
        impl = _EAGER if return_attn else owner.fast_attn
        captured: list[Tensor] | None = [] if return_attn else None
        kwargs: dict[str, Any] = {"attention_mask": positions.masks[(impl, self.kind)]}
        if owner.arch.rotary:
            kwargs["position_ids"] = positions.position_ids
            kwargs["position_embeddings"] = positions.rotary
        with (
            attn_implementation(owner.hf.config, impl),
            layer_hooks(self.module, owner.arch, capture=captured, edit=edit),
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
        vocab = self.meta.vocab_size
        if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
            raise ValueError(
                f"token ids must lie in [0, {vocab}); got [{int(input_ids.min())}, "
                f"{int(input_ids.max())}] — was the prompt encoded with this model's tokenizer?"
            )
        decoder = self.decoder
        hidden = get_path(decoder, self.arch.embed)(input_ids)
        if self.arch.learned_positions is not None:
            ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            hidden = hidden + get_path(decoder, self.arch.learned_positions)(ids).to(hidden.dtype)
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
        kinds = sorted({layer.kind for layer in self._layers})
        masks = causal_masks(config, kinds, (self.fast_attn, _EAGER), dummy, ids)
        return HFPositions(position_ids=ids, rotary=rotary, masks=masks)

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


# ------------------------------------------------------------------------------ Inkling-2 loop
class InklingLayer:
    """One Inkling-2 loop decoder layer under the engine's protocol.

    The residual stream it passes on is the layer's own output (the partial sum of the current
    attention-residual block, as Hugging Face records it); the completed block states, and in
    passes after the first the messages from the previous pass, travel in ``positions.extra``."""

    def __init__(self, owner: Inkling2LoopLM, index: int) -> None:
        self.owner = owner
        self.index = index

    @property
    def module(self) -> nn.Module:
        return self.owner.text_model.layers[self.index]

    def __call__(
        self,
        x: Tensor,
        positions: HFPositions,
        *,
        return_attn: bool = False,
        edit: Edit | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if edit is not None:
            raise NotImplementedError(
                "edits are not supported on Inkling-2 layers (their branches are mixed through "
                "attention residuals and short convolutions); use a RetrofitLM model for "
                "interventions"
            )
        owner, layer = self.owner, cast(Any, self.module)
        ctx = positions.extra
        impl = _EAGER if return_attn else owner.fast_attn
        kind = layer.attention_type
        args: list[Any] = [x, ctx["block_states"]]
        cfg = owner.text_config
        start, end = cfg.loop_layer_index_start, cfg.loop_layer_index_end
        kwargs: dict[str, Any] = {
            "attention_mask": positions.masks[(impl, kind)],
            "relative_distance": ctx["relative_distance"][kind],
            "conv_mask": ctx["conv_mask"],
            "cache": None,
            "position_ids": positions.position_ids,
        }
        if start <= self.index < end and ctx["previous"] is not None:
            previous_blocks, previous_hidden = ctx["previous"]
            args.append(
                owner.text_model.message_input(previous_blocks, previous_hidden, self.index - start)
            )
        captured: list[Tensor] | None = [] if return_attn else None
        with (
            attn_implementation(owner.hf.config, impl),
            layer_hooks(layer, _LLAMA, capture=captured, edit=None),  # probs from self_attn
        ):
            out = cast(Tensor, layer(*args, **kwargs))
        if layer.is_block_boundary:
            ctx["block_states"] = torch.cat([ctx["block_states"], x.unsqueeze(-2)], dim=-2)
        return out, (captured[-1] if captured else None)


class Inkling2LoopLM(LoopedLM):
    """transformers' Inkling-2 loop model (``inkling2_loop``) under the family interface.

    Layers [loop_layer_index_start, loop_layer_index_end) are the block. Unlike a retrofit, each
    pass restarts from the prelude output and block states and reads the previous pass through
    learned message gates, so :meth:`inject` ignores the numbers in the state except as the
    message source, and the previous pass's block states travel in the per-prompt context
    (``positions.extra``). Consequently ``block_step`` is not a pure map of the state for this
    family. Attention probabilities exclude the attention sink's share (rows sum to ≤ 1); the
    short convolutions are not visible to probes; edits are not supported."""

    def __init__(
        self,
        hf_model: nn.Module,
        *,
        recurrences: int | None = None,
        attn_implementation: str | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.hf: Any = hf_model
        outer: Any = cast(Any, hf_model).model
        self.text_model: Any = getattr(outer, "language_model", outer)
        cfg: Any = self.text_model.config
        if getattr(cfg, "model_type", None) not in INKLING_TYPES:
            raise TypeError(f"Inkling2LoopLM wraps an inkling2_loop model, got {type(hf_model)}")
        self.text_config = cfg
        self.fast_attn = attn_implementation or cast(Any, hf_model).config._attn_implementation
        n = cfg.num_hidden_layers
        a, b = cfg.loop_layer_index_start, cfg.loop_layer_index_end
        self._layers = [InklingLayer(self, i) for i in range(n)]
        self.meta = FamilyMeta(
            family="inkling2_loop",
            prelude_layers=a,
            block_layers=b - a,
            coda_layers=n - b,
            train_recurrences=int(recurrences or cfg.loop_num_passes),
            d_model=int(cfg.hidden_size),
            n_heads=int(cfg.num_attention_heads),
            vocab_size=int(cfg.unpadded_vocab_size),
            context_length=int(cfg.max_position_embeddings),
            default_init_state="prelude",
            name=name or str(getattr(hf_model.config, "name_or_path", "") or ""),
        )
        self._context: dict[str, Any] | None = None
        self.tokenizer: Any = None

    @property
    def prelude(self) -> Sequence[LoopLayer]:
        return self._layers[: self.meta.prelude_layers]

    @property
    def block(self) -> Sequence[LoopLayer]:
        p = self.meta.prelude_layers
        return self._layers[p : p + self.meta.block_layers]

    @property
    def coda(self) -> Sequence[LoopLayer]:
        return self._layers[self.meta.prelude_layers + self.meta.block_layers :]

    def embed(self, input_ids: Tensor) -> Tensor:
        vocab = self.meta.vocab_size
        if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {vocab}); use this model's tokenizer")
        hidden = cast(Tensor, self.text_model.embed_tokens(input_ids))
        if self._context is not None:
            self._context["block_states"] = hidden.new_zeros(
                *hidden.shape[:-1], 0, hidden.shape[-1]
            )
        return hidden

    def positions(self, length: int, device: torch.device) -> HFPositions:
        from transformers.masking_utils import create_recurrent_attention_mask
        from transformers.models.inkling2.modeling_inkling2 import get_relative_distance

        cfg = self.text_config
        param = next(self.hf.parameters())
        dummy = torch.zeros(1, length, self.meta.d_model, dtype=param.dtype, device=device)
        ids = torch.arange(length, device=device)[None]
        kinds = ("full_attention", "sliding_attention")
        masks = causal_masks(cfg, kinds, (self.fast_attn, _EAGER), dummy, ids)
        conv_mask = create_recurrent_attention_mask(
            config=cfg, inputs_embeds=dummy, attention_mask=None, cache=None, position_ids=ids
        )
        extra: dict[str, Any] = {
            "relative_distance": {
                "full_attention": get_relative_distance(dummy, None, is_sliding=False),
                "sliding_attention": get_relative_distance(dummy, None, is_sliding=True),
            },
            "conv_mask": conv_mask,
            "block_states": None,
            "prelude": None,
            "pass_blocks": None,
            "previous": None,
        }
        self._context = extra
        return HFPositions(position_ids=ids, rotary=None, masks=masks, extra=extra)

    def _ctx(self) -> dict[str, Any]:
        if self._context is None:
            raise RuntimeError("Inkling2LoopLM runs only through the engine (call the model)")
        return self._context

    def inject(self, state: Tensor, inputs: Tensor) -> Tensor:
        """Start a pass: the first keeps the prelude output; later ones restart from it and
        take messages from the previous pass (its completed inner blocks and final state)."""
        ctx = self._ctx()
        if ctx["prelude"] is None:
            ctx["prelude"] = ctx["block_states"]
        else:
            skip = ctx["prelude"].shape[-2] + 1  # the block the pass opened with is the prelude's
            ctx["previous"] = (ctx["pass_blocks"][..., skip:, :], state)
            ctx["block_states"] = ctx["prelude"]
        return inputs

    def recurrence_norm(self, state: Tensor) -> Tensor:
        """No norm; remembers the pass's block states, which an early-exit coda would extend."""
        ctx = self._ctx()
        ctx["pass_blocks"] = ctx["block_states"]
        return state

    def head(self, hidden: Tensor) -> Tensor:
        ctx = self._ctx()
        tm = self.text_model
        mixed = tm.final_input(ctx["block_states"], hidden)[0]
        normed = tm.norm(mixed).to(hidden.dtype)
        hf: Any = self.hf
        return cast(Tensor, hf.logit_softcap(hf.lm_head(normed).float()))

    def unembedding(self) -> Tensor:
        return cast(Tensor, cast(Any, self.hf).lm_head.weight)


def wrap_hf(model: nn.Module, **kwargs: Any) -> LoopedLM:
    """Inkling-2 loop models through :class:`Inkling2LoopLM`, other decoders as a retrofit."""
    model_type = cast(Any, model).config.model_type
    if model_type in INKLING_TYPES:
        keep = {k: v for k, v in kwargs.items() if k in ("recurrences", "attn_implementation")}
        return Inkling2LoopLM(model, **keep)
    return RetrofitLM(model, **kwargs)


# ------------------------------------------------------------------------------------ loading
def resolve_hf_directory(path_or_id: str | Path) -> Path:
    """A local directory as is, else the snapshot of a hub id in the local cache (no network)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if not looks_like_hub_id(name):
        raise CheckpointError(f"{name!r} is neither a local directory nor a hub id like 'org/name'")
    return cached_snapshot(name)


def _check_weights(directory: Path, label: str) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickles = [p.name for p in directory.iterdir() if p.name in PICKLE_NAMES or p.suffix == ".bin"]
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle-format weights ({', '.join(sorted(pickles))}); "
            "loopscope never unpickles checkpoints because unpickling can run arbitrary code. "
            "Convert them once to safetensors (e.g. load with transformers in a trusted "
            "environment and save_pretrained(dir, safe_serialization=True)) and load again"
        )
    raise CheckpointError(f"{directory} has no *.safetensors weights; " + fetch_hint(label))


def _has_tokenizer(directory: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any((directory / n).exists() for n in names)


def load_hf(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    loop: tuple[int, int] | None = None,
    recurrences: int | None = None,
    injection: HFInjection = "none",
    adapter_scale: float = 2**-0.5,
    attn_implementation: str | None = None,
) -> LoopedLM:
    """Load a Hugging Face decoder from a local directory or the local cache and wrap it.

    Safetensors only, never ``trust_remote_code``. ``loop=(a, b)`` loops layers [a, b) (default:
    all layers, one pass); Inkling-2 loop checkpoints keep their own loop. The tokenizer, when
    the directory has one, is attached as ``model.tokenizer``."""
    directory = resolve_hf_directory(path_or_id)
    config_path, raw = read_config(directory, "a Hugging Face model")
    if not is_hf_decoder_config(raw):
        raise CheckpointError(
            f"{config_path}: model_type {raw.get('model_type')!r} is not a supported Hugging "
            f"Face decoder ({sorted(ARCHS)} or {INKLING_TYPES[0]!r}); loopscope never runs "
            "code shipped with a checkpoint (trust_remote_code)"
        )
    _check_weights(directory, str(path_or_id))
    is_inkling = raw.get("model_type") in INKLING_TYPES
    fast = attn_implementation or (_EAGER if is_inkling else "sdpa")
    hf_model = causal_lm(directory, dtype=dtype or torch.float32, attn_implementation=fast)
    model: LoopedLM
    if is_inkling:
        model = Inkling2LoopLM(hf_model, recurrences=recurrences, attn_implementation=fast)
    else:
        model = RetrofitLM(
            hf_model,
            loop=loop,
            recurrences=recurrences or 1,
            injection=injection,
            adapter_scale=adapter_scale,
            attn_implementation=fast,
            name=directory.name,
        )
    model.to(device).eval()
    if _has_tokenizer(directory):
        cast(Any, model).tokenizer = auto_tokenizer(directory)
    return model


__all__ = [
    "ARCHS",
    "HF_INJECTIONS",
    "HFArch",
    "HFLayer",
    "HFPositions",
    "Inkling2LoopLM",
    "RetrofitLM",
    "arch_for",
    "feedforward_hf",
    "is_hf_decoder_config",
    "load_hf",
    "wrap_hf",
]
