"""Pieces shared by the families that wrap a transformers model (:mod:`.hf_retrofit` and
:mod:`.inkling2`): attribute paths, per-prompt positions and masks, the switch between the
eager and the fast attention path, forward hooks that capture attention probabilities or apply
an edit, and loading from a local directory or the local Hugging Face cache (safetensors only,
through the one gate :mod:`.hub`).

Attention probabilities come from the eager attention path, switched on per call (the fast
path, normally SDPA, is used otherwise). Edits rewrite a branch output just before it joins the
residual stream, through temporary forward hooks. A key/value cache slot reaches transformers'
attention as the ``cache`` it calls ``update`` on (:class:`SlotCache`), with the new tokens'
positions, rotary tables and masks (:func:`cached_layer_kwargs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from loopscope.core.errors import CheckpointError
from loopscope.engine.contract import LoopedLM
from loopscope.families.checkpoint import (
    PICKLE_NAMES,
    ConfigFields,
    naming_the_file,
    read_config,
)
from loopscope.families.hub import (
    auto_tokenizer,
    cached_snapshot,
    causal_lm,
    fetch_hint,
    looks_like_hub_id,
)
from loopscope.families.tokenizers import TOKENIZER_FILES
from loopscope.nn.kv_cache import KVSlot, key_visibility, query_positions
from loopscope.nn.layers import Component, Edit

#: The attention implementation that can return probabilities.
EAGER = "eager"

Wrapped = TypeVar("Wrapped", bound=LoopedLM)


def get_path(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b`` for ``path='a.b'`` (the modules an adapter names)."""
    module: Any = root
    for part in path.split("."):
        module = getattr(module, part)
    return cast(nn.Module, module)


# --------------------------------------------------------------------------- layer calls
@dataclass
class HFPositions:
    """Per-prompt position data: ids (1, T), rotary (cos, sin) when the model has rotary
    embeddings, causal masks keyed by (attention implementation, mask kind), and whatever else
    a family carries through one prompt's layers (``extra``)."""

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


class LazyMasks(dict[tuple[str, str], Any]):
    """The causal masks of :func:`causal_masks`, each built on first use.

    Why: a cached decoding step never reads them, and building (T, T) masks for the whole text
    at every new token would make cached decoding quadratic again."""

    def __init__(self, config: Any, dummy: Tensor, position_ids: Tensor) -> None:
        super().__init__()
        self.config, self.dummy, self.position_ids = config, dummy, position_ids

    def __missing__(self, key: tuple[str, str]) -> Any:
        impl, kind = key
        mask = causal_masks(self.config, (kind,), (impl,), self.dummy, self.position_ids)[key]
        self[key] = mask
        return mask


# ------------------------------------------------------------------------ key/value cache
class SlotCache:
    """One layer application's :class:`~loopscope.nn.kv_cache.KVSlot` in the shape
    transformers' attention expects of its ``cache``: ``update`` appends the new keys and
    values and returns every position's. Each (stage, layer, recurrence) gets its own, so the
    layer index transformers passes along is not needed."""

    def __init__(self, slot: KVSlot) -> None:
        self.slot = slot

    def update(self, keys: Tensor, values: Tensor, *_: Any, **__: Any) -> tuple[Tensor, Tensor]:
        return self.slot.extend(keys, values)


#: Attention implementations whose masks :func:`cached_layer_kwargs` can build.
CACHEABLE_ATTENTION = ("sdpa", EAGER)


def cached_layer_kwargs(
    positions: HFPositions,
    slot: KVSlot,
    x: Tensor,
    *,
    implementation: str,
    kind: str,
    window: int | None,
    cache: SlotCache | None = None,
) -> dict[str, Any]:
    """The keyword arguments of a transformers decoder layer for the new tokens ``x`` (batch,
    t, d) decoded with ``slot``: its cache, the new tokens' position ids and rotary tables,
    and the mask over cached plus new keys (boolean for SDPA, additive for eager). ``cache``:
    a family's own view of the slot (default: :class:`SlotCache`).

    The first call of an empty, aligned slot is the prompt itself: it takes the masks of the
    uncached forward, so the prefill runs the very same kernels."""
    t, device = x.shape[1], x.device
    ids = query_positions(slot, t, device)
    view = SlotCache(slot) if cache is None else cache
    kwargs: dict[str, Any] = {"cache": view, "position_ids": ids}
    if positions.rotary is not None:
        cos, sin = positions.rotary
        kwargs["position_embeddings"] = (cos[0][ids], sin[0][ids])
    if slot.length == 0 and slot.rows is None:
        kwargs["attention_mask"] = positions.masks[(implementation, kind)]
        return kwargs
    window = window if kind == "sliding_attention" else None
    if t == 1 and slot.rows is None and window is None:  # one new token sees every key
        kwargs["attention_mask"] = None
        return kwargs
    visible = key_visibility(slot, t, device, window)
    if implementation == EAGER:
        blocked = torch.finfo(x.dtype).min
        kwargs["attention_mask"] = torch.zeros(visible.shape, dtype=x.dtype, device=device)
        kwargs["attention_mask"].masked_fill_(~visible, blocked)
    else:
        kwargs["attention_mask"] = visible
    return kwargs


def _replace_first(output: Any, new: Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _edit_hook(edit: Edit, component: Component) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        branch = output[0] if isinstance(output, tuple) else output
        return _replace_first(output, edit(component, branch))

    return hook


@contextlib.contextmanager
def layer_hooks(
    layer: nn.Module,
    *,
    attention: str,
    branches: Sequence[tuple[str, Component]] = (),
    capture: list[Tensor] | None,
    edit: Edit | None,
) -> Iterator[None]:
    """Forward hooks for one call: capture the probabilities the ``attention`` module returns,
    and apply ``edit`` to the outputs of the ``branches`` modules (path, component)."""
    handles = []
    if capture is not None:

        def grab(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                capture.append(output[1])

        handles.append(get_path(layer, attention).register_forward_hook(grab))
    if edit is not None:
        for path, component in branches:
            handles.append(get_path(layer, path).register_forward_hook(_edit_hook(edit, component)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


#: Size fields of Hugging Face decoder configs (llama's names, then gpt2's): whole numbers ≥ 1
#: wherever they are given, checked here so that a bad one is named (transformers would fail
#: deep inside torch with a negative dimension or a division by zero).
HF_SIZES = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "n_embd",
    "n_head",
    "n_layer",
    "n_positions",
    "n_inner",
)


def _check_sizes(raw: Mapping[str, Any]) -> None:
    fields = ConfigFields(raw)
    for key in HF_SIZES:
        if raw.get(key) is not None:
            fields.integer(key)


def read_transformers_model(
    path_or_id: str | Path,
    *,
    detect: Callable[[Mapping[str, Any]], bool],
    supported: str,
    dtype: torch.dtype | None,
    attn_implementation: str,
) -> tuple[Path, Any]:
    """(directory, transformers' own model) for a local directory or a cached hub id whose
    config.json ``detect`` accepts; safetensors only, never code shipped with the checkpoint.
    ``supported`` names what the family accepts, for the error."""
    directory = resolve_hf_directory(path_or_id)
    config_path, raw = read_config(directory, "a Hugging Face model")
    if not detect(raw):
        raise CheckpointError(
            f"{config_path}: model_type {raw.get('model_type')!r} is not {supported}; loopscope "
            "never runs code shipped with a checkpoint (trust_remote_code)"
        )
    with naming_the_file(config_path):
        _check_sizes(raw)
    _check_weights(directory, str(path_or_id))
    model = causal_lm(
        directory, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    return directory, model


def ready(model: Wrapped, directory: Path, device: str | torch.device) -> Wrapped:
    """The wrapped model on ``device`` in eval mode, with the directory's own tokenizer (when
    it has one) attached as ``model.tokenizer``."""
    model.to(device).eval()
    if any((directory / name).exists() for name in TOKENIZER_FILES):
        cast(Any, model).tokenizer = auto_tokenizer(directory)
    return model
