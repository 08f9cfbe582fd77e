"""The model-family interface: the eight pieces every looped LM is cut into.

embed → prelude → initial state → per recurrence {injection, block layers, per-recurrence norm}
→ coda → head. A family (our LoopLM, Huginn's raven format, Ouro, a retrofitted Hugging Face
decoder, …) is one subclass that provides these pieces; the engine (``loopscope.engine.loop``)
is the only code that drives recurrences, so every probe, trace and analysis works on every
family unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from loopscope.nn.layers import Edit

InitState = Literal["zeros", "random", "prelude"]
INIT_STATES: tuple[InitState, ...] = ("zeros", "random", "prelude")


@dataclass(frozen=True)
class FamilyMeta:
    """What an analysis needs to know about a model without looking inside it."""

    family: str
    prelude_layers: int
    block_layers: int
    coda_layers: int
    train_recurrences: int
    d_model: int
    n_heads: int
    vocab_size: int
    context_length: int
    default_init_state: InitState
    name: str = ""

    @property
    def layout(self) -> str:
        """The study's (p, k⊗l, c) notation with l left symbolic."""
        return f"({self.prelude_layers}, {self.block_layers}⊗l, {self.coda_layers})"


@dataclass(frozen=True)
class AttentionWeights:
    """What the attention-Lipschitz bound needs of one block layer (the attention maps of two
    recurrences differ by at most B·κ/√d times the difference of their inputs, B the largest
    token norm of the input and κ the largest ‖W_Q W_Kᵀ‖₂ over heads): the map from the
    residual stream to the attention input (its pre-attention norm) and the query/key weights
    in ``x @ W`` layout, (D, heads·head_dim)."""

    input_map: Callable[[Tensor], Tensor]
    w_q: Tensor
    w_k: Tensor
    n_heads: int
    n_kv_heads: int


class LoopLayer(Protocol):
    """A layer the engine can drive: returns the new residual stream and, when asked, the
    attention probabilities (batch, heads, T, T)."""

    def __call__(
        self, x: Tensor, positions: Any, *, return_attn: bool = False, edit: Edit | None = None
    ) -> tuple[Tensor, Tensor | None]: ...


class LoopedLM(nn.Module, ABC):
    """Base class of every model family; ``forward`` delegates to the one engine."""

    meta: FamilyMeta

    @property
    @abstractmethod
    def prelude(self) -> Sequence[LoopLayer]: ...

    @property
    @abstractmethod
    def block(self) -> Sequence[LoopLayer]: ...

    @property
    @abstractmethod
    def coda(self) -> Sequence[LoopLayer]: ...

    @abstractmethod
    def embed(self, input_ids: Tensor) -> Tensor:
        """Token ids (batch, T) → residual stream (batch, T, d_model)."""

    def embed_at(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """:meth:`embed` of tokens sitting at ``positions`` (batch or 1, T), as a key/value
        cache decodes them (the new tokens only). Only learned absolute position embeddings
        depend on the positions (GPT-2's), so by default it is :meth:`embed` itself."""
        return self.embed(input_ids)

    @abstractmethod
    def positions(self, length: int, device: torch.device) -> Any:
        """Whatever the layers need to know about positions (e.g. rotary tables)."""

    @abstractmethod
    def inject(self, state: Tensor, inputs: Tensor) -> Tensor:
        """Combine the recurrent state with the prelude output at the start of a recurrence."""

    @abstractmethod
    def head(self, hidden: Tensor) -> Tensor:
        """Final norm and unembedding: residual stream → logits."""

    def recurrence_norm(self, state: Tensor) -> Tensor:
        """Norm applied to the stream at the end of every recurrence (Ouro); identity here."""
        return state

    def initial_state(
        self, inputs: Tensor, mode: InitState, generator: torch.Generator | None, std: float
    ) -> Tensor:
        """Z0: zeros, seeded N(0, std²) or the prelude output itself."""
        if mode == "zeros":
            return torch.zeros_like(inputs)
        if mode == "prelude":
            return inputs
        if mode == "random":
            noise = torch.randn(
                inputs.shape, generator=generator, device=inputs.device, dtype=torch.float32
            )
            return (noise * std).to(inputs.dtype)
        raise ValueError(f"unknown init_state {mode!r}; choose one of {INIT_STATES}")

    #: The initial states this family's weights were trained for. The engine refuses any
    #: other unless the call passes ``allow_any_init_state=True`` (an experiment on purpose).
    supported_init_states: tuple[InitState, ...] = INIT_STATES

    #: Whether the state may be read out (recurrence norm, coda, head) after any recurrence,
    #: as if the run stopped there: what the logit lens records while tracing. A family sets
    #: False when its coda or head depend on more of the run than the state handed to them
    #: (Inkling-2's head mixes every block state of the run, kept in a per-prompt context
    #: that a mid-run read-out would rebuild); its traces then carry no logit lens.
    readout_between_recurrences: bool = True

    @property
    def init_std(self) -> float:
        return 1.0

    def forward(
        self,
        input_ids: Tensor,
        recurrences: int | None = None,
        init_state: InitState | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> Any:
        from loopscope.engine.loop import run_loop

        return run_loop(
            self, input_ids, recurrences=recurrences, init_state=init_state, seed=seed, **kwargs
        )

    def attention_weights(self, layer: int) -> AttentionWeights | None:
        """Query/key weights of block layer ``layer`` for the attention bound; families that
        do not expose them return None and the bound check is skipped."""
        return None

    def unembedding(self) -> Tensor:
        """The (vocab, d_model) unembedding matrix, for logit-lens and neuron analyses."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its unembedding")
