"""transformers' own Inkling-2 loop model (``inkling2_loop``) through the model-family
interface: its prelude, looped core and coda layers and its message gates are called as they
are. Unlike a retrofit, each pass restarts from the prelude output and reads the previous pass
through learned message gates; the layers take no edits. :func:`load_inkling2` reads a local
directory or the local Hugging Face cache only, safetensors only, never with
``trust_remote_code``. With a key/value cache slot (``kv=``) a layer decodes the new tokens
only: transformers' attention appends to that slot, and the short convolutions read their past
inputs from it (:class:`InklingSlotCache`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from loopscope.engine.contract import FamilyMeta, LoopedLM, LoopLayer
from loopscope.families.hf_common import (
    CACHEABLE_ATTENTION,
    EAGER,
    HFPositions,
    LazyMasks,
    SlotCache,
    attn_implementation,
    cached_layer_kwargs,
    layer_hooks,
    read_transformers_model,
    ready,
)
from loopscope.nn.kv_cache import KVSlot, key_positions, query_positions
from loopscope.nn.layers import Edit

INKLING_TYPES = ("inkling2_loop", "inkling2_loop_text")

__all__ = ["INKLING_TYPES", "Inkling2LoopLM", "InklingLayer", "is_inkling2_config", "load_inkling2"]


def is_inkling2_config(config: Mapping[str, Any]) -> bool:
    """True for the config.json of a transformers Inkling-2 loop model."""
    return config.get("model_type") in INKLING_TYPES


class InklingSlotCache(SlotCache):
    """A slot as transformers' Inkling-2 layers use their cache: keys and values, and the past
    inputs of each short convolution (``state_idx``), kept whole in ``slot.extra`` so that a
    padded row can take its own last real ones."""

    def get_conv_state(self, *_: Any, **__: Any) -> None:
        """None: every convolution then reads its past through :meth:`update_conv_state`."""
        return None

    def update_conv_state(
        self, context: Tensor, *_: Any, state_idx: int = 0, conv_kernel_size: int = 1, **__: Any
    ) -> Tensor:
        """The new inputs ``context`` (batch, channels, t) behind the last kernel − 1 past
        ones of each row (zeros before the start, as the uncached convolution pads)."""
        key = ("conv", state_idx)
        past = self.slot.extra.get(key)
        self.slot.extra[key] = context if past is None else torch.cat([past, context], -1)
        if past is None:
            return context
        width = conv_kernel_size - 1
        rows = self.slot.rows
        if rows is None:
            return torch.cat(
                [past[..., past.shape[-1] - min(width, past.shape[-1]) :], context], -1
            )
        recent = []
        for row in range(past.shape[0]):
            real = past[row][:, rows.visible[row].to(past.device).bool()][:, -width:]
            recent.append(torch.nn.functional.pad(real, (width - real.shape[-1], 0)))
        return torch.cat([torch.stack(recent), context], -1)


def _relative_distance(slot: KVSlot, t: int, device: torch.device) -> Tensor:
    """Query minus key position (batch or 1, 1, t, cached + t) of the new tokens."""
    queries = query_positions(slot, t, device)[:, None, :, None]
    return queries - key_positions(slot, t, device)[:, None, None, :]


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
        kv: KVSlot | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``kv``: this layer application's key/value cache slot when decoding incrementally
        (the new tokens of ``x`` follow the cached ones)."""
        if edit is not None:
            raise NotImplementedError(
                "edits are not supported on Inkling-2 layers (their branches are mixed through "
                "attention residuals and short convolutions); use a RetrofitLM model for "
                "interventions"
            )
        owner, layer = self.owner, cast(Any, self.module)
        ctx = positions.extra
        impl = EAGER if return_attn else owner.fast_attn
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
        if kv is not None:
            if return_attn:
                raise ValueError("attention probabilities are not kept with a key/value cache")
            prefill = kv.length == 0 and kv.rows is None
            if not prefill:  # the prompt's own distances and padding mask serve the prefill
                kwargs["relative_distance"] = _relative_distance(kv, x.shape[1], x.device)
                kwargs["conv_mask"] = None
            window = cfg.sliding_window_size
            kwargs.update(
                cached_layer_kwargs(
                    positions,
                    kv,
                    x,
                    implementation=impl,
                    kind=kind,
                    window=window,
                    cache=InklingSlotCache(kv),
                )
            )
        if start <= self.index < end and ctx["previous"] is not None:
            previous_blocks, previous_hidden = ctx["previous"]
            args.append(
                owner.text_model.message_input(previous_blocks, previous_hidden, self.index - start)
            )
        captured: list[Tensor] | None = [] if return_attn else None
        with (
            attn_implementation(owner.hf.config, impl),
            layer_hooks(layer, attention="self_attn", capture=captured, edit=None),
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

    #: Its coda and head read the per-prompt context of the whole run (every block state of
    #: the last pass), so a read-out between recurrences is not defined: no logit lens.
    readout_between_recurrences = False

    @property
    def supports_kv_cache(self) -> bool:
        """Its layers take a key/value cache slot (``kv=``) on the attention paths whose masks
        loopscope builds for the new tokens (eager, its default, and SDPA)."""
        return self.fast_attn in CACHEABLE_ATTENTION

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
        masks = LazyMasks(cfg, dummy, ids)
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


def load_inkling2(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    recurrences: int | None = None,
    attn_implementation: str | None = None,
) -> Inkling2LoopLM:
    """Load an Inkling-2 loop checkpoint from a local directory or the local cache; it keeps its
    own loop (``recurrences`` overrides its pass count). Safetensors only, never
    ``trust_remote_code``; the directory's tokenizer is attached as ``model.tokenizer``."""
    fast = attn_implementation or EAGER
    directory, hf_model = read_transformers_model(
        path_or_id,
        detect=is_inkling2_config,
        supported=f"an Inkling-2 loop model ({INKLING_TYPES[0]!r})",
        dtype=dtype,
        attn_implementation=fast,
    )
    model = Inkling2LoopLM(hf_model, recurrences=recurrences, attn_implementation=fast)
    return ready(model, directory, device)
