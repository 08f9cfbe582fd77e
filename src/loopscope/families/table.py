"""The one table of model families that ``loopscope.load`` walks.

Each row says how to recognise a family from its ``config.json`` (``detect``), how to load it
(``load``) and which tokenizer turns prompt text into its ids. Rows are tried in order and the
first whose ``detect`` accepts the config wins, so more specific layouts come first (raven
before Parcae, which shares some of its field names). Adding a family is one file in this
folder plus one row here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from loopscope.core.errors import CheckpointError, LoopscopeError
from loopscope.engine.contract import LoopedLM
from loopscope.families.checkpoint import BUNDLED, bundled_model_dir, read_config
from loopscope.families.hf_retrofit import is_retrofit_config, load_retrofit
from loopscope.families.hrm_text import is_hrm_text_config, load_hrm_text
from loopscope.families.hub import cached_snapshot, looks_like_hub_id
from loopscope.families.inkling2 import is_inkling2_config, load_inkling2
from loopscope.families.looplm import is_looplm_config, load_looplm
from loopscope.families.ouro import is_ouro_config, load_ouro
from loopscope.families.parcae import is_parcae_config, load_parcae
from loopscope.families.raven import is_raven_config, load_raven
from loopscope.families.tokenizers import (
    DeferredTokenizer,
    PromptTokenizer,
    TextTokenizer,
    attach_tokenizer,
    byte_tokenizer,
    checkpoint_tokenizer,
)


@dataclass(frozen=True)
class Family:
    """One row: a family's name, its config detector, its loader and its tokenizer kind.

    ``options`` lists the extra keyword arguments the loader honours (``loop=`` for a
    retrofitted Hugging Face decoder); any other option is refused with that list."""

    name: str
    detect: Callable[[Mapping[str, Any]], bool]
    load: Callable[..., LoopedLM]
    tokenizer: Literal["byte", "checkpoint"]
    describes: str
    options: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family(
        "raven",
        is_raven_config,
        load_raven,
        "checkpoint",
        "raven (Huginn-0125 and the retrofitted-recurrence models)",
    ),
    Family("ouro", is_ouro_config, load_ouro, "checkpoint", "ouro (Ouro-1.4B/2.6B)"),
    Family(
        "parcae", is_parcae_config, load_parcae, "checkpoint", "parcae (SandyResearch/parcae-*)"
    ),
    Family(
        "hrm_text",
        is_hrm_text_config,
        load_hrm_text,
        "checkpoint",
        "hrm_text (sapientinc/HRM-Text-1B, two nested loops)",
    ),
    Family("looplm", is_looplm_config, load_looplm, "byte", "loopscope LoopLM"),
    Family(
        "hf",
        is_retrofit_config,
        load_retrofit,
        "checkpoint",
        "Hugging Face decoders (llama, mistral, qwen2, qwen3, olmo2, gpt2)",
        options=("loop", "recurrences", "injection", "adapter_scale", "attn_implementation"),
    ),
    Family(
        "inkling2_loop",
        is_inkling2_config,
        load_inkling2,
        "checkpoint",
        "Hugging Face Inkling-2 loop (inkling2_loop)",
        options=("recurrences", "attn_implementation"),
    ),
)


def resolve_directory(source: str | Path) -> Path:
    """A bundled model's directory, a local directory, or a hub id's snapshot in the local
    Hugging Face cache (never online)."""
    name = str(source)
    if name in BUNDLED:
        return bundled_model_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if looks_like_hub_id(name):
        return cached_snapshot(name)
    raise CheckpointError(
        f"cannot load {name!r}: not a bundled model ({', '.join(sorted(BUNDLED))}), not a local "
        "directory and not a hub id like 'org/name'"
    )


def family_of(directory: Path) -> Family:
    """The first row whose detector accepts ``directory/config.json``."""
    config_path, config = read_config(directory, "a model")
    for family in FAMILIES:
        if family.detect(config):
            return family
    supported = "; ".join(family.describes for family in FAMILIES)
    raise CheckpointError(
        f"{config_path}: unknown model family (model_type {config.get('model_type')!r}); "
        f"supported: {supported}"
    )


def load(
    source: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu", **options: Any
) -> LoopedLM:
    """Load ``source`` with its family's loader (see ``loopscope.load``)."""
    directory = resolve_directory(source)
    family = family_of(directory)
    unknown = sorted(set(options) - set(family.options))
    if unknown:
        allowed = ", ".join(family.options) or "none"
        raise CheckpointError(
            f"{source}: the {family.name} family takes no option {', '.join(unknown)}; "
            f"its options: {allowed}"
        )
    model = family.load(directory, dtype=dtype or torch.float32, device=device, **options)
    attach_tokenizer(model, _family_tokenizer(family, directory))
    return model


def _family_tokenizer(family: Family, directory: Path) -> TextTokenizer:
    """The byte tokenizer, or the checkpoint's own read on first use."""
    if family.tokenizer == "byte":
        return byte_tokenizer()
    return DeferredTokenizer(directory)


def tokenizer_for(source: str | Path) -> PromptTokenizer:
    """The tokenizer that belongs to ``source`` (anything ``loopscope.load`` accepts)."""
    directory = resolve_directory(source)
    if family_of(directory).tokenizer == "byte":
        return byte_tokenizer()
    return checkpoint_tokenizer(directory)


#: The dtypes a model may be loaded in, by the name torch gives them.
LOAD_DTYPES = ("float32", "bfloat16", "float16")


def default_device() -> str:
    """Where a model runs unless told: the GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def checkpoint_dtype(source: str | Path) -> str | None:
    """The dtype ``source``'s ``config.json`` declares (``torch_dtype`` or ``dtype``), when it
    names one of :data:`LOAD_DTYPES`; None when it names none or cannot be read (loading then
    reports the problem)."""
    try:
        _, config = read_config(resolve_directory(source), "a model")
    except LoopscopeError:
        return None
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and value in LOAD_DTYPES:
            return value
    return None


def default_dtype(source: str | Path, device: str) -> torch.dtype:
    """The dtype to load ``source`` in unless told: float32 off the GPU (CPU kernels are
    fastest and exact there), on a GPU the checkpoint's own dtype (bfloat16 when it names
    none)."""
    if not device.startswith("cuda"):
        return torch.float32
    dtype: torch.dtype = getattr(torch, checkpoint_dtype(source) or "bfloat16")
    return dtype


def as_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype given by name (``"bfloat16"``) or as itself; an unknown name is refused."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in LOAD_DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(LOAD_DTYPES)}, got {dtype!r}")
    chosen: torch.dtype = getattr(torch, dtype)
    return chosen
