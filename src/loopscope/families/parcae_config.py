"""Parcae's config.json: the authors' config dataclass (``_class_name: ParcaeConfig``) read into
:class:`ParcaeConfig`, with their defaults for absent fields, a clear error for a field of the
wrong type or value, and a refusal that lists every setting of their code we do not run. The
model itself is in :mod:`loopscope.families.parcae`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from loopscope.families.checkpoint import CheckpointError, ConfigFields

Injection = Literal["diagonal", "linear", "add"]
StateInit = Literal["like-init", "zero", "normal", "embed", "unit"]
STATE_INITS: tuple[StateInit, ...] = ("like-init", "zero", "normal", "embed", "unit")
#: Init schemes whose embedding / logit scales are 1 and whose embedding std is √(2 / 5d): the
#: only numbers of the init scheme that matter once weights are loaded.
SCALED_INITS = ("scaled", "scaled-zero", "scaled-geiping")

# Defaults of the authors' config dataclasses: a field missing from config.json takes these.
_DEFAULTS: dict[str, Any] = {
    "block_size": 4096,
    "n_embd": 4096,
    "num_attention_heads": 32,
    "vocab_size": 50254,
    "padding_multiple": 512,
    "norm_class_name": "LayerNorm",
    "block_class_name": "TransformerPreNormBlock",
    "norm_eps": 1e-5,
    "mlp_class_name": "BaseMLP",
    "nonlin_name": "GELU",
    "bias": False,
    "qk_bias": False,
    "qk_norm": False,
    "init_strategy": "scaled",
    "mup_model_scaling_factor": 1,
    "use_fused_head": "pytorch",
    "injection_type": "diagonal",
    "n_layers_in_recurrent_block": 4,
    "n_layers_in_prelude": 1,
    "n_layers_in_coda": 1,
    "state_init": "like-init",
    "recurrent_embedding_dimension": 1024,
    "recurrent_intermediation_embedding_dimension": 3520,
    "prelude_norm": False,
    "mean_recurrence": 32,
    "mean_backprop_depth": 8,
    "tie_embeddings": False,
}
_ROPE_DEFAULTS = {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50_000}


def _relu2(x: Tensor) -> Tensor:
    return F.relu(x).pow(2).mul(0.5)


#: Activations by the names the authors' config uses (``nonlin_name``).
NONLINEARITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "ReLU2": _relu2,
    "GELU": F.gelu,
    "SiLU": F.silu,
    "ReLU": F.relu,
    "Tanh": torch.tanh,
}


@dataclass(frozen=True)
class ParcaeConfig:
    """What our model needs from a Parcae config.json (the authors' defaults applied)."""

    n_embd: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    rec_dim: int
    rec_heads: int
    rec_intermediate_size: int
    vocab_size: int  # padded, as the embedding and the head are
    n_layers_in_prelude: int
    n_layers_in_recurrent_block: int
    n_layers_in_coda: int
    mean_recurrence: int
    mean_backprop_depth: int
    injection_type: Injection
    state_init: StateInit
    prelude_norm: bool
    qk_norm: bool
    qk_bias: bool
    bias: bool
    clip_qkv: float | None
    norm_eps: float
    gated_mlp: bool
    nonlin: str
    tie_embeddings: bool
    block_size: int
    rope_table_length: int
    use_rope: bool
    rope_base: float
    rope_condense_ratio: float
    logit_softcap: float | None
    state_std: float
    name: str = "parcae"

    def __post_init__(self) -> None:
        for width, heads, what in (
            (self.n_embd, self.n_heads, "n_embd / num_attention_heads"),
            (self.rec_dim, self.rec_heads, "recurrent_embedding_dimension / recurrent heads"),
        ):
            if width % heads:
                raise ValueError(f"{what} = {width} / {heads} is not a whole head size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.n_heads} is not a multiple of "
                f"num_key_value_heads={self.n_kv_heads}"
            )
        if self.head_dim != self.rec_dim // self.rec_heads:
            raise ValueError(
                "the core block's head size must equal the prelude's (one rotary table serves "
                f"both), got {self.rec_dim // self.rec_heads} and {self.head_dim}"
            )
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_dim}")
        if self.injection_type == "add" and self.rec_dim != self.n_embd:
            raise ValueError("additive injection needs recurrent_embedding_dimension = n_embd")
        if self.n_layers_in_recurrent_block < 1:
            raise ValueError("n_layers_in_recurrent_block must be ≥ 1")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def ve_dim(self) -> int:
        """Width of a value embedding: the prelude's key/value width."""
        return self.n_kv_heads * self.head_dim

    @property
    def n_effective_layers(self) -> int:
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda


def is_parcae_config(config: Mapping[str, Any]) -> bool:
    """True for a config.json written by the authors' Parcae code (never a raven/Huginn one,
    which shares some field names but has none of Parcae's recurrent-state fields)."""
    if config.get("model_type") == "huginn_raven":
        return False
    if config.get("_class_name") == "ParcaeConfig" or config.get("model_class_name") == "Parcae":
        return True
    return "recurrent_embedding_dimension" in config and "injection_type" in config


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _check_supported(fields: ConfigFields) -> None:
    """CheckpointError for the settings of the authors' code that we do not run."""
    checks = [
        (fields.value("block_class_name") == "TransformerPreNormBlock", "block_class_name"),
        (fields.value("norm_class_name") == "RMSNorm", "norm_class_name"),
        (fields.value("mlp_class_name") in ("BaseMLP", "GatedMLP"), "mlp_class_name"),
        (fields.text("nonlin_name") in NONLINEARITIES, "nonlin_name"),
        (fields.value("injection_type") in ("diagonal", "linear", "add"), "injection_type"),
        (fields.text("state_init") in STATE_INITS, "state_init"),
        (fields.value("use_fused_head") in ("pytorch", "cce"), "use_fused_head"),
        (fields.value("mup_model_scaling_factor") == 1, "mup_model_scaling_factor"),
        (fields.value("init_strategy") in SCALED_INITS, "init_strategy"),
    ]
    bad = [f"{key}={fields.raw.get(key, _DEFAULTS.get(key))!r}" for ok, key in checks if not ok]
    if bad:
        raise CheckpointError(
            f"Parcae settings not supported by loopscope: {', '.join(bad)}. Supported: "
            "TransformerPreNormBlock, RMSNorm, BaseMLP/GatedMLP with "
            f"{sorted(NONLINEARITIES)}, injection diagonal/linear/add, state_init {STATE_INITS}, "
            f"use_fused_head pytorch/cce, mup_model_scaling_factor 1, init_strategy {SCALED_INITS}"
        )


def _optional_number(fields: ConfigFields, key: str) -> float | None:
    """A positive number, or None where the field is absent or null (the feature is off)."""
    return fields.number(key, positive=True) if fields.present(key) else None


def parcae_config_from_dict(config: Mapping[str, Any], name: str = "parcae") -> ParcaeConfig:
    """Read the published config.json fields; CheckpointError for a field of the wrong type or
    value and settings we do not run, ValueError for inconsistent sizes."""
    fields = ConfigFields(config, _DEFAULTS)
    _check_supported(fields)
    n_embd = fields.integer("n_embd")
    heads = fields.integer("num_attention_heads")
    fields.head_size("n_embd", "num_attention_heads")
    rec_heads = fields.integer("recurrent_num_attention_heads", heads)
    if fields.present("padded_vocab_size"):
        vocab = fields.integer("padded_vocab_size")
    else:
        vocab = _find_multiple(fields.integer("vocab_size"), fields.integer("padding_multiple"))
    rope = ConfigFields(
        fields.section("rope_settings").raw, _ROPE_DEFAULTS, prefix="rope_settings."
    )
    block_size = fields.integer("block_size")
    return ParcaeConfig(
        n_embd=n_embd,
        n_heads=heads,
        n_kv_heads=fields.integer("num_key_value_heads", heads),
        intermediate_size=fields.integer("intermediate_size", 4 * n_embd),
        rec_dim=fields.integer("recurrent_embedding_dimension"),
        rec_heads=rec_heads,
        rec_intermediate_size=fields.integer("recurrent_intermediation_embedding_dimension"),
        vocab_size=vocab,
        n_layers_in_prelude=fields.integer("n_layers_in_prelude", minimum=0),
        n_layers_in_recurrent_block=fields.integer("n_layers_in_recurrent_block"),
        n_layers_in_coda=fields.integer("n_layers_in_coda", minimum=0),
        mean_recurrence=fields.integer("mean_recurrence"),
        mean_backprop_depth=fields.integer("mean_backprop_depth"),
        injection_type=cast(Injection, fields.text("injection_type")),
        state_init=cast(StateInit, fields.text("state_init")),
        prelude_norm=fields.flag("prelude_norm"),
        qk_norm=fields.flag("qk_norm"),
        qk_bias=fields.flag("qk_bias"),
        bias=fields.flag("bias"),
        clip_qkv=_optional_number(fields, "clip_qkv"),
        norm_eps=fields.number("norm_eps", positive=True),
        gated_mlp=fields.text("mlp_class_name") == "GatedMLP",
        nonlin=fields.text("nonlin_name"),
        tie_embeddings=fields.flag("tie_embeddings"),
        block_size=block_size,
        rope_table_length=fields.integer("randomize_positions_from", block_size),
        use_rope=rope.flag("use_rope"),
        rope_base=rope.number("rope_base", positive=True),
        rope_condense_ratio=rope.number("rope_condense_ratio", positive=True),
        logit_softcap=_optional_number(fields, "logit_softcap"),
        state_std=math.sqrt(2 / (5 * n_embd)),
        name=name,
    )
