"""A site-keyed activation cache: the residual stream (and, on request, attention) of every
kept site of one forward pass, looked up by site name.

Pass it to the engine as a probe, then index it like a dict: ``cache["block.1@r2"]`` is the
residual stream after block layer 1 at recurrence 2, shape (batch, tokens, d_model), every
batch row kept. ``cache.stage("block")`` stacks a stage into one grid, iteration runs in
realised-depth order, and ``keep`` (a predicate on sites, or site names) bounds memory: a run of
R recurrences over a k-layer block holds R·k states unless told to keep fewer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Sequence

import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.engine.host_copy import HostStager
from loopscope.engine.sites import Site, Stage

#: What a site name looks like: ``prelude.0``, ``block.2@r5``, ``coda.1``.
SITE_NAME = re.compile(r"(?:prelude|coda)\.\d+|block\.\d+@r\d+")

SitePredicate = Callable[[Site], bool]


class SiteNameError(LoopscopeError, KeyError):
    """A site name that is malformed, or names a site the cache did not keep."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _check_names(names: Collection[str]) -> None:
    """Refuse malformed names up front: a typo would otherwise keep nothing, silently."""
    bad = sorted(n for n in names if not SITE_NAME.fullmatch(n))
    if bad:
        raise SiteNameError(
            f"unknown site names {bad}: sites are written 'prelude.I', 'block.J@rR' or 'coda.I' "
            "(layer index within the stage, 0-based recurrence), e.g. 'block.1@r2'"
        )


def _selector(keep: SitePredicate | Collection[str | Site] | None) -> SitePredicate:
    """A predicate from ``keep``: None keeps everything, names keep exactly those sites."""
    if keep is None:
        return lambda site: True
    if callable(keep):
        return keep
    names = {k.name if isinstance(k, Site) else k for k in keep}
    _check_names(names)
    return lambda site: site.name in names


def _attention_selector(attention: bool | SitePredicate) -> SitePredicate | None:
    if attention is True:
        return lambda site: True
    if attention is False:
        return None
    return attention


class ActivationCache:
    """A probe that keeps the residual stream of chosen sites (and optionally their attention).

    ``keep``: which sites to record, a predicate on :class:`Site` or a collection of site
    names (None: every site). ``attention``: also keep attention probabilities, at every kept
    site (True) or where a predicate says so. ``positions``: token positions to keep (None:
    all; attention keeps those queries and keys). ``dtype`` / ``device``: where the copies live
    (None: as computed). Tensors are copies, so later edits of the run cannot change them.
    """

    def __init__(
        self,
        keep: SitePredicate | Collection[str | Site] | None = None,
        *,
        attention: bool | SitePredicate = False,
        positions: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self._keeps = _selector(keep)
        self._keeps_attention = _attention_selector(attention)
        self.wants_attention = self._keeps_attention is not None
        self.positions = None if positions is None else list(positions)
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._sites: dict[str, Site] = {}
        self._hidden: dict[str, Tensor] = {}
        self._attn: dict[str, Tensor] = {}
        self._stager = HostStager(self.device, self.dtype)  # non-blocking CUDA → host copies

    # -- the probe side ------------------------------------------------------------------

    def _copy(self, tensor: Tensor) -> Tensor:
        return self._stager.copy(tensor)

    @property
    def _settled_hidden(self) -> dict[str, Tensor]:
        """The recorded states, every copy in flight finished (what every read goes through)."""
        self._stager.settle()
        return self._hidden

    @property
    def _settled_attn(self) -> dict[str, Tensor]:
        self._stager.settle()
        return self._attn

    def observe(self, site: Site, hidden: Tensor, attn: Tensor | None) -> None:
        if not self._keeps(site):
            return
        h = hidden if self.positions is None else hidden[:, self.positions]
        self._sites[site.name] = site
        self._hidden[site.name] = self._copy(h)
        if attn is not None and self._keeps_attention is not None and self._keeps_attention(site):
            if self.positions is not None:
                attn = attn[:, :, self.positions][:, :, :, self.positions]
            self._attn[site.name] = self._copy(attn)

    def clear(self) -> None:
        """Forget every recorded state (to reuse the cache for another run)."""
        self._stager.settle()
        self._sites.clear()
        self._hidden.clear()
        self._attn.clear()

    # -- lookups -------------------------------------------------------------------------

    def _name(self, key: str | Site) -> str:
        name = key.name if isinstance(key, Site) else key
        if name in self._hidden:
            return name
        _check_names([name])
        kept = list(self)
        shown = ", ".join(kept[:6]) + (", …" if len(kept) > 6 else "")
        raise SiteNameError(
            f"site {name!r} was not recorded (kept: {shown or 'none'}); the run had no such "
            "site, or pass it in keep= when building the cache"
        )

    def __getitem__(self, key: str | Site) -> Tensor:
        """The residual stream after ``key``'s layer, (batch, tokens, d_model)."""
        return self._settled_hidden[self._name(key)]

    def attention(self, key: str | Site) -> Tensor:
        """The attention probabilities of ``key``'s layer, (batch, heads, tokens, tokens)."""
        name = self._name(key)
        if name not in self._attn:
            raise SiteNameError(
                f"no attention kept at {name!r}: build the cache with attention=True (or a "
                "predicate that selects this site)"
            )
        return self._settled_attn[name]

    def __contains__(self, key: object) -> bool:
        name = key.name if isinstance(key, Site) else key
        return name in self._hidden

    def __len__(self) -> int:
        return len(self._hidden)

    def sites(self, stage: Stage | None = None) -> list[Site]:
        """Kept sites in realised-depth order (the order they ran), optionally of one stage."""
        chosen = (s for s in self._sites.values() if stage is None or s.stage == stage)
        return sorted(chosen, key=lambda s: s.depth)

    def __iter__(self) -> Iterator[str]:
        """Site names in realised-depth order."""
        return iter([s.name for s in self.sites()])

    def items(self) -> Iterator[tuple[Site, Tensor]]:
        """(site, residual stream) in realised-depth order."""
        hidden = self._settled_hidden
        for site in self.sites():
            yield site, hidden[site.name]

    def attention_sites(self) -> list[Site]:
        """Sites with kept attention, in realised-depth order."""
        return [s for s in self.sites() if s.name in self._attn]

    # -- stacked views -------------------------------------------------------------------

    def stage_index(self, stage: Stage) -> tuple[list[int], list[int]]:
        """The kept (recurrences, layers) of a stage: what :meth:`stage`'s first two axes (the
        block) or its first axis (prelude, coda: recurrences is [0]) index."""
        sites = self.sites(stage)
        return sorted({s.recurrence for s in sites}), sorted({s.layer for s in sites})

    def stage(self, stage: Stage) -> Tensor:
        """A stage's kept states stacked: the block as (recurrences, layers, batch, tokens,
        d_model), prelude and coda as (layers, batch, tokens, d_model)."""
        return self._stack(stage, self.sites(stage), self._settled_hidden)

    def attention_stage(self, stage: Stage = "block") -> Tensor:
        """A stage's kept attention stacked like :meth:`stage`: the block as (recurrences,
        layers, batch, heads, tokens, tokens)."""
        sites = [s for s in self.sites(stage) if s.name in self._attn]
        return self._stack(stage, sites, self._settled_attn)

    def _stack(self, stage: Stage, sites: list[Site], values: dict[str, Tensor]) -> Tensor:
        if not sites:
            raise SiteNameError(f"the cache kept no {stage} site to stack")
        stacked = torch.stack([values[s.name] for s in sites])
        if stage != "block":
            return stacked
        recurrences = sorted({s.recurrence for s in sites})
        layers = sorted({s.layer for s in sites})
        if len(sites) != len(recurrences) * len(layers):
            raise LoopscopeError(
                f"the kept block sites do not form a grid ({len(sites)} sites over recurrences "
                f"{recurrences} and layers {layers}); keep the same layers at every kept "
                "recurrence, or read single sites with cache[name]"
            )
        return stacked.reshape(len(recurrences), len(layers), *stacked.shape[1:])
