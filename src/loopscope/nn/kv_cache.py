"""A key/value cache for incremental decoding of a looped model, one slot per attention call.

In a looped model every recurrence of a block layer is a distinct attention call over the
sequence: a new token at recurrence r of block layer j attends to the keys and values that the
earlier tokens had at that same recurrence r and layer j. So the cache keeps one
:class:`KVSlot` per layer application (the engine keys them by site: stage, layer,
recurrence), and decoding a new token costs one pass over the depth instead of a whole forward
over the sequence.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from loopscope.nn.rotary import RotaryTable

__all__ = [
    "KVCache",
    "KVSlot",
    "RowLayout",
    "cached_attention",
    "key_positions",
    "key_visibility",
    "query_positions",
    "rotate_new",
]


@dataclass
class RowLayout:
    """Where each row's tokens sit in a cache filled from right-padded prompts of different
    lengths: ``visible`` (batch, cached) marks the cached keys a row may attend to (its own
    prompt and what it generated, not its padding) and ``positions`` (batch,) the position of
    each row's next token."""

    visible: Tensor
    positions: Tensor

    def advanced(self) -> RowLayout:
        """The layout after one more token per row."""
        new = torch.ones_like(self.visible[:, :1])
        return RowLayout(torch.cat([self.visible, new], dim=1), self.positions + 1)


@dataclass
class KVSlot:
    """Keys and values (batch, kv_heads, T, head_dim) one attention call has seen so far."""

    keys: Tensor | None = None
    values: Tensor | None = None
    #: Set while decoding a padded batch (see :class:`RowLayout`); None: every row is aligned.
    rows: RowLayout | None = None
    #: Other per-token history a layer application keeps, by name (Inkling-2's short
    #: convolutions keep their past inputs here).
    extra: dict[Hashable, Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """How many positions are cached: the position of the next token."""
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def extend(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions' keys and values; returns every position's."""
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
        return self.keys, self.values


@dataclass
class KVCache:
    """Every slot of one generation, keyed by the layer application it belongs to.

    ``tokens`` is how many positions the cache holds (advanced by the engine after each call),
    ``recurrences`` the recurrence count it was filled with: a cache is only valid for the same
    count, since the block's slots at recurrence r exist only for r below it."""

    slots: dict[Hashable, KVSlot] = field(default_factory=dict)
    tokens: int = 0
    recurrences: int | None = None
    rows: RowLayout | None = None

    def slot(self, key: Hashable) -> KVSlot:
        """The slot of one layer application, made empty on first use, carrying the cache's
        current row layout."""
        if key not in self.slots:
            self.slots[key] = KVSlot()
        slot = self.slots[key]
        slot.rows = self.rows
        return slot

    def token_positions(self, t: int, device: torch.device) -> Tensor:
        """Positions (batch or 1, t) of the next ``t`` tokens: what learned absolute position
        embeddings are looked up at."""
        return _positions_after(self.tokens, self.rows, t, device)


def _positions_after(cached: int, rows: RowLayout | None, t: int, device: torch.device) -> Tensor:
    if rows is None:
        return torch.arange(cached, cached + t, device=device)[None]
    if t != 1:
        raise ValueError("a padded batch is decoded one token per row at a time")
    return rows.positions.to(device)[:, None]


def query_positions(slot: KVSlot, t: int, device: torch.device) -> Tensor:
    """Positions (batch or 1, t) of the ``t`` new tokens a layer application is about to add
    to ``slot``: right after the cached ones, or each row's own position in a padded batch."""
    return _positions_after(slot.length, slot.rows, t, device)


def _real_keys(slot: KVSlot, t: int, device: torch.device) -> Tensor | None:
    """Which of the cached plus ``t`` new keys (batch, cached + t) are a padded row's real
    tokens; None when every row is aligned."""
    if slot.rows is None:
        return None
    new = torch.ones_like(slot.rows.visible[:, :1]).expand(-1, t)
    return torch.cat([slot.rows.visible, new], 1).to(device).bool()


def key_positions(slot: KVSlot, t: int, device: torch.device) -> Tensor:
    """Positions (batch or 1, cached + t) of the cached keys and of ``t`` new ones.

    A padded row's real keys are its tokens in order, so a key's position is the count of
    real keys up to it, minus one (its padding gets the position of the token before)."""
    real = _real_keys(slot, t, device)
    if real is None:
        return torch.arange(slot.length + t, device=device)[None]
    return real.long().cumsum(-1) - 1


def key_visibility(slot: KVSlot, t: int, device: torch.device, window: int | None = None) -> Tensor:
    """Which keys (batch or 1, 1, t, cached + t) each of ``t`` new queries may attend to,
    computed before the new keys join ``slot``: the causal ones, never a row's padding, and
    with a sliding ``window`` only keys fewer than ``window`` positions back."""
    queries = query_positions(slot, t, device)[:, None, :, None]
    keys = key_positions(slot, t, device)[:, None, None, :]
    visible = keys <= queries
    real = _real_keys(slot, t, device)
    if real is not None:
        visible = visible & real[:, None, None, :]
    if window is not None:
        visible = visible & (queries - keys < window)
    return visible


def rotate_new(rotary: RotaryTable, x: Tensor, slot: KVSlot) -> Tensor:
    """Rotate the new tokens' queries or keys (batch, heads, t, head_dim) at their positions:
    right after the cached ones, or each row's own in a padded batch (:class:`RowLayout`)."""
    if slot.rows is not None:
        return rotary.apply_at(x, slot.rows.positions)
    return rotary.apply(x, slot.length)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, slot: KVSlot) -> Tensor:
    """Causal attention of new queries (batch, heads, t, head_dim) over the cached positions
    and the new keys/values, which are appended to ``slot``.

    The new queries sit at positions ``slot.length`` onwards, so query i may see keys up to
    ``slot.length + i``. Non-finite values are zeroed first, as the uncached attention does, so
    a diverged token cannot poison later ones through zero-probability entries."""
    offset = slot.length
    v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)  # where(isfinite(v), v, 0)
    keys, values = slot.extend(k, v)
    gqa = keys.shape[1] != q.shape[1]
    if offset == 0:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
    t, s = q.shape[-2], keys.shape[-2]
    if slot.rows is not None:  # a padded batch: one new token per row, padding hidden
        if t != 1:
            raise ValueError("a padded batch is decoded one token per row at a time")
        visible = torch.cat([slot.rows.visible, torch.ones_like(slot.rows.visible[:, :1])], 1)
        mask = visible[:, None, None, :]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
    if t == 1:  # one new token sees every cached position: no mask to build
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
    query_pos = torch.arange(offset, offset + t, device=q.device)[:, None]
    visible = torch.arange(s, device=q.device)[None, :] <= query_pos
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=gqa)
