"""LoopLM: our configurable looped transformer (p, k⊗l, c), readable top to bottom.

Every architectural choice of a looped transformer is a field of :class:`LoopConfig`: prelude /
block / coda sizes, injection, norm scheme, residual scaling, initial state, norm type, MLP type. A
feedforward model is the same code with p = c = 0, one pass and no injection.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, cast, get_args

import torch
from torch import Tensor, nn

from loopscope.core.errors import CheckpointError
from loopscope.engine.contract import (
    INIT_STATES,
    AttentionWeights,
    FamilyMeta,
    InitState,
    LoopedLM,
    LoopLayer,
)
from loopscope.families.checkpoint import (
    ConfigFields,
    expected_shapes,
    load_weights,
    read_config,
    weight_files,
)
from loopscope.nn.inits import InitParts, InitScheme, InitSizes, apply_init
from loopscope.nn.injection import INJECTIONS, InjectionKind, make_injection
from loopscope.nn.layers import NORM_SCHEMES, BlockLayer, MLPType, NormScheme
from loopscope.nn.norms import NormType, make_norm
from loopscope.nn.rotary import RopeSpec, RotaryTable


@dataclass(frozen=True)
class LoopConfig:
    """Architecture of a LoopLM. ``train_recurrences`` is the recurrence count it was trained
    with (the default at inference). ``adapter_init_noise``: the standard deviation σ of the
    noise on a concat-linear adapter's (Z + X)/√2 start. Its Z half then has spectral radius
    ≈ 1/√2 + σ√d (circular law), so the default 0.02 contracts only below width ≈ 215; choose
    σ = c/√d (c < 0.29) for a start that contracts alike at every width. ``embed_init_std``: σ
    of the token embeddings (tied to the head by default); 0.02 makes the injected input about
    0.02× a normalised stream, so weak injection cannot pin a normalised state at init."""

    name: str = "custom"
    vocab_size: int = 259
    d_model: int = 128
    n_heads: int = 4
    prelude_layers: int = 2
    block_layers: int = 4
    coda_layers: int = 2
    train_recurrences: int = 4
    injection: InjectionKind = "add"
    norm_scheme: NormScheme = "pre"
    norm_type: NormType = "rms"
    mlp_type: MLPType = "gated"
    mlp_ratio: float = 4.0
    residual_scale: float = 1.0
    init_state: InitState = "zeros"
    init_std: float = 1.0
    context_length: int = 384
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    recurrence_norm: bool | None = None
    norm_eps: float = 1e-6
    init_seed: int = 0
    adapter_init_noise: float = 0.02
    embed_init_std: float = 0.02

    def __post_init__(self) -> None:
        checks = [
            (self.injection in INJECTIONS, f"injection must be one of {INJECTIONS}"),
            (self.norm_scheme in NORM_SCHEMES, f"norm_scheme must be one of {NORM_SCHEMES}"),
            (self.init_state in INIT_STATES, f"init_state must be one of {INIT_STATES}"),
            (self.block_layers >= 1, "block_layers must be ≥ 1"),
            (self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads"),
            ((self.d_model // self.n_heads) % 2 == 0, "head size d_model/n_heads must be even"),
            (self.adapter_init_noise >= 0, "adapter_init_noise (a standard deviation) must be ≥ 0"),
            (self.embed_init_std >= 0, "embed_init_std (a standard deviation) must be ≥ 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"config {self.name!r}: {message}")
        if self.injection == "none" and self.init_state != "prelude":
            raise ValueError(
                f"config {self.name!r}: with injection='none' the state never sees the input "
                f"unless init_state='prelude' (got {self.init_state!r})"
            )

    @property
    def uses_recurrence_norm(self) -> bool:
        """Ouro's sandwich normalises the stream once at the end of every recurrence."""
        return self.norm_scheme == "ouro" if self.recurrence_norm is None else self.recurrence_norm

    @property
    def is_feedforward(self) -> bool:
        return self.train_recurrences == 1 and self.prelude_layers == self.coda_layers == 0

    def with_(self, **changes: Any) -> LoopConfig:
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown LoopConfig fields {unknown}; known fields are {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> LoopConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


class LoopLM(LoopedLM):
    """Our looped transformer; see :class:`LoopConfig` for the knobs."""

    #: Its layers take a key/value cache slot (``kv=``) for incremental decoding.
    supports_kv_cache = True

    def __init__(self, config: LoopConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.meta = FamilyMeta(
            family="looplm",
            prelude_layers=c.prelude_layers,
            block_layers=c.block_layers,
            coda_layers=c.coda_layers,
            train_recurrences=c.train_recurrences,
            d_model=c.d_model,
            n_heads=c.n_heads,
            vocab_size=c.vocab_size,
            context_length=c.context_length,
            default_init_state=c.init_state,
            name=c.name,
        )
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.d_model)
        self.prelude_stack = nn.ModuleList([self._layer() for _ in range(c.prelude_layers)])
        self.injection = make_injection(c.injection, c.d_model)
        self.block_stack = nn.ModuleList([self._layer() for _ in range(c.block_layers)])
        self.state_norm = (
            make_norm(c.norm_type, c.d_model, c.norm_eps) if c.uses_recurrence_norm else None
        )
        self.coda_stack = nn.ModuleList([self._layer() for _ in range(c.coda_layers)])
        self.final_norm = make_norm(c.norm_type, c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self._rotary_cache: dict[tuple[int, str], RotaryTable] = {}
        self.reset_parameters(c.init_seed)

    def _layer(self) -> BlockLayer:
        c = self.config
        return BlockLayer(
            c.d_model,
            c.n_heads,
            int(c.mlp_ratio * c.d_model),
            scheme=c.norm_scheme,
            norm_type=c.norm_type,
            mlp_type=c.mlp_type,
            residual_scale=c.residual_scale,
            eps=c.norm_eps,
        )

    def reset_parameters(
        self, seed: int, scheme: InitScheme = "identity-adapter", parts: InitParts = ()
    ) -> None:
        """Deterministic init. The default, ``identity-adapter``, is LoopLM's own: N(0, 0.02)
        weights, output projections scaled down by depth (GPT-2 style), concat-linear adapters
        start as (Z + X)/√2 plus noise. Another ``scheme`` starts every weight as that family's
        training code does (:mod:`loopscope.nn.inits`), the kinds in ``parts`` as theirs."""
        if parts and scheme == "identity-adapter":
            raise ValueError("init parts replace kinds of a family scheme, not identity-adapter")
        generator = torch.Generator().manual_seed(seed)
        depth = (
            self.config.prelude_layers + self.config.block_layers * self.config.train_recurrences
        )
        depth += self.config.coda_layers
        if scheme != "identity-adapter":
            sizes = InitSizes(self.config.d_model, depth)
            apply_init(self.named_parameters(), scheme, sizes, generator, parts)
            return
        out_std = 0.02 / (2 * max(depth, 1)) ** 0.5
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.dim() < 2:
                    if name.endswith("log_rate"):
                        param.fill_(-1.0)
                    elif name.endswith("bias"):
                        param.zero_()
                    else:
                        param.fill_(1.0)
                    continue
                std = out_std if name.endswith(("proj.weight", "down.weight")) else 0.02
                if name.endswith("adapter.weight"):
                    std = self.config.adapter_init_noise
                elif name == "tok_embeddings.weight":
                    std = self.config.embed_init_std
                noise = torch.randn(param.shape, generator=generator) * std
                if name.endswith("adapter.weight"):
                    d = self.config.d_model
                    eye = torch.eye(d) / 2**0.5
                    noise += torch.cat([eye, eye], dim=1)
                param.copy_(noise)

    # -- the family interface ------------------------------------------------------------
    @property
    def prelude(self) -> Sequence[LoopLayer]:
        return cast(Sequence[LoopLayer], self.prelude_stack)

    @property
    def block(self) -> Sequence[LoopLayer]:
        return cast(Sequence[LoopLayer], self.block_stack)

    @property
    def coda(self) -> Sequence[LoopLayer]:
        return cast(Sequence[LoopLayer], self.coda_stack)

    @property
    def init_std(self) -> float:
        return self.config.init_std

    def embed(self, input_ids: Tensor) -> Tensor:
        if int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}); got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}] — was the prompt encoded "
                "with this model's tokenizer?"
            )
        return self.tok_embeddings(input_ids)

    def positions(self, length: int, device: torch.device) -> RotaryTable:
        """Rotate-half tables for at least ``context_length`` positions, built on ``device``."""
        key = (max(length, self.config.context_length), str(device))
        if key not in self._rotary_cache:
            head_dim = self.config.d_model // self.config.n_heads
            inv = RopeSpec("half", self.config.rope_base).inv_freq(head_dim, device)
            steps = torch.arange(key[0], device=device).float()
            self._rotary_cache[key] = RotaryTable("half", torch.outer(steps, inv))
        return self._rotary_cache[key]

    def inject(self, state: Tensor, inputs: Tensor) -> Tensor:
        return self.injection(state, inputs)

    def recurrence_norm(self, state: Tensor) -> Tensor:
        return state if self.state_norm is None else self.state_norm(state)

    def head(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.final_norm(hidden))

    def unembedding(self) -> Tensor:
        return self.lm_head.weight

    def attention_weights(self, layer: int) -> AttentionWeights:
        block = cast(BlockLayer, self.block_stack[layer])
        d = self.config.d_model
        qkv = block.attn.qkv.weight
        return AttentionWeights(
            input_map=block.norms[0],
            w_q=qkv[:d].T,
            w_k=qkv[d : 2 * d].T,
            n_heads=self.config.n_heads,
            n_kv_heads=self.config.n_heads,
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def is_looplm_config(config: Mapping[str, Any]) -> bool:
    """True for a config.json written by loopscope's own training."""
    return "block_layers" in config and "norm_scheme" in config


#: LoopConfig fields by what they must hold; LoopConfig itself checks how they fit together.
_SIZES = ("vocab_size", "d_model", "n_heads", "block_layers", "train_recurrences", "context_length")
_COUNTS = ("prelude_layers", "coda_layers", "init_seed")
_POSITIVE = ("mlp_ratio", "rope_base", "norm_eps")
_NUMBERS = ("residual_scale", "init_std", "adapter_init_noise", "embed_init_std")
_CHOICES = {"norm_type": get_args(NormType), "mlp_type": get_args(MLPType)}
#: Fields that fix the shapes of the weights. loopscope's export always writes them; without
#: one, LoopConfig's default would be used and every tensor would then be reported mis-shaped.
_SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_heads",
    "prelude_layers",
    "block_layers",
    "coda_layers",
)


def _check_field_types(raw: Mapping[str, Any]) -> None:
    """Refuse a config.json field of the wrong type or range, by name, before a model is built
    from it (a string layer count would otherwise fail deep inside torch)."""
    fields_ = ConfigFields(raw)
    absent = [key for key in _SHAPE_FIELDS if key not in raw]
    if absent:
        raise CheckpointError(
            f"no {', '.join(absent)}; add {'them' if len(absent) > 1 else 'it'} to config.json "
            "with the value the weights were trained with"
        )
    for key in raw:
        if raw[key] is None and key != "recurrence_norm":  # the one field that may be null
            raise CheckpointError(f"{key} is null; give it its value, or remove it for the default")
        if key in _SIZES or key in _COUNTS:
            fields_.integer(key, minimum=1 if key in _SIZES else 0)
        elif key in _POSITIVE or key in _NUMBERS:
            fields_.number(key, positive=key in _POSITIVE)
        elif key == "tie_embeddings" or (key == "recurrence_norm" and raw[key] is not None):
            fields_.flag(key)
        elif key in _CHOICES and raw[key] not in _CHOICES[key]:
            raise CheckpointError(f"{key} must be one of {_CHOICES[key]}, got {raw[key]!r}")


def load_looplm(
    directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LoopLM:
    """Load one of our checkpoints (``config.json`` + ``model.safetensors``)."""
    path = Path(directory)
    config_path, raw = read_config(path, "a loopscope")
    try:
        _check_field_types(raw)
        config = LoopConfig.from_dict(raw)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: {err}") from err
    model = LoopLM(config)
    files = weight_files(path)
    shapes = expected_shapes(model)
    load_weights(model, files, source=str(path), dtype=torch.float32, device="cpu", expected=shapes)
    model.eval()
    return model.to(device=device, dtype=dtype)
