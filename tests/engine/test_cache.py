"""The site-keyed activation cache and the capture probe built on it, on a model whose layers
add known constants, so every cached state is known in closed form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from loopscope.core.errors import LoopscopeError
from loopscope.engine.cache import ActivationCache, SiteNameError
from loopscope.engine.contract import FamilyMeta, LoopedLM
from loopscope.engine.probes import CaptureProbe
from loopscope.engine.sites import Site

D, HEADS = 3, 2
PRELUDE_ADDS, BLOCK_ADDS, CODA_ADDS = [1.0], [10.0, 20.0], [100.0]
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])  # two rows that differ everywhere


class AddConstant(nn.Module):
    """A layer that adds ``value`` to the stream; its attention is uniform over the causal
    past (row t is 1/(t+1) on keys 0..t)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(
        self, x: Tensor, positions: Any, *, return_attn: bool = False, edit: Any = None
    ) -> tuple[Tensor, Tensor | None]:
        attn = None
        if return_attn:
            b, t, _ = x.shape
            causal = torch.tril(torch.ones(t, t))
            attn = (causal / causal.sum(-1, keepdim=True)).expand(b, HEADS, t, t).clone()
        return x + self.value, attn


class ConstantsLM(LoopedLM):
    """embed(id) = id in every coordinate; inject adds the prelude output to the state;
    starting from zeros, the state after block layer j at recurrence r is
    r·(x + Σc) + x + (c_0 + … + c_j), with x = id + 1 and Σc = 30."""

    meta = FamilyMeta("constants", 1, 2, 1, 3, D, HEADS, 16, 16, "zeros", name="constants")

    def __init__(self) -> None:
        super().__init__()
        self.prelude_layers = nn.ModuleList(AddConstant(v) for v in PRELUDE_ADDS)
        self.block_layers = nn.ModuleList(AddConstant(v) for v in BLOCK_ADDS)
        self.coda_layers = nn.ModuleList(AddConstant(v) for v in CODA_ADDS)

    @property
    def prelude(self) -> Sequence[Any]:
        return list(self.prelude_layers)

    @property
    def block(self) -> Sequence[Any]:
        return list(self.block_layers)

    @property
    def coda(self) -> Sequence[Any]:
        return list(self.coda_layers)

    def embed(self, input_ids: Tensor) -> Tensor:
        return input_ids[..., None].float().expand(*input_ids.shape, D).contiguous()

    def positions(self, length: int, device: torch.device) -> Any:
        return None

    def inject(self, state: Tensor, inputs: Tensor) -> Tensor:
        return state + inputs

    def head(self, hidden: Tensor) -> Tensor:
        return hidden


def expected_block(r: int, j: int) -> Tensor:
    """The known state after block layer ``j`` at recurrence ``r``, (batch, tokens, D)."""
    x = IDS[..., None].float().expand(*IDS.shape, D) + sum(PRELUDE_ADDS)
    return r * (x + sum(BLOCK_ADDS)) + x + sum(BLOCK_ADDS[: j + 1])


def run(cache: Any, recurrences: int = 3) -> None:
    ConstantsLM()(IDS, recurrences=recurrences, probes=[cache])


def test_every_site_holds_its_known_state_for_every_batch_row() -> None:
    cache = ActivationCache()
    run(cache)
    assert list(cache) == [
        "prelude.0",
        "block.0@r0",
        "block.1@r0",
        "block.0@r1",
        "block.1@r1",
        "block.0@r2",
        "block.1@r2",
        "coda.0",
    ]
    assert len(cache) == 8 and "block.1@r2" in cache and "block.2@r0" not in cache
    prelude = IDS[..., None].float().expand(2, 4, D) + 1
    torch.testing.assert_close(cache["prelude.0"], prelude, atol=0, rtol=0)
    for r in range(3):
        for j in range(2):
            torch.testing.assert_close(cache[f"block.{j}@r{r}"], expected_block(r, j))
    torch.testing.assert_close(cache["block.1@r2"][1, 0], torch.full((D,), 3 * (6 + 30.0)))
    torch.testing.assert_close(cache["coda.0"], expected_block(2, 1) + 100)
    # a Site works as a key too, and items() walks realised depth
    site = Site("block", 0, 1, 3)
    torch.testing.assert_close(cache[site], expected_block(1, 0))
    assert [s.depth for s, _ in cache.items()] == list(range(8))


def test_stage_stacks_recurrences_layers_and_batch() -> None:
    cache = ActivationCache()
    run(cache)
    block = cache.stage("block")
    assert block.shape == (3, 2, 2, 4, D)  # (recurrences, layers, batch, tokens, d)
    for r in range(3):
        for j in range(2):
            torch.testing.assert_close(block[r, j], expected_block(r, j))
    assert cache.stage("prelude").shape == (1, 2, 4, D)
    torch.testing.assert_close(cache.stage("coda")[0], cache["coda.0"])
    assert cache.stage_index("block") == ([0, 1, 2], [0, 1])


def test_keep_bounds_what_is_held_by_predicate_or_by_name() -> None:
    last = ActivationCache(lambda s: s.stage == "block" and s.recurrence == 4)
    run(last, recurrences=5)
    assert list(last) == ["block.0@r4", "block.1@r4"]
    assert last.stage("block").shape == (1, 2, 2, 4, D)
    torch.testing.assert_close(last.stage("block")[0, 1], expected_block(4, 1))
    named = ActivationCache(["block.1@r0", "coda.0"])
    run(named)
    assert list(named) == ["block.1@r0", "coda.0"]
    torch.testing.assert_close(named["block.1@r0"], expected_block(0, 1))
    with pytest.raises(SiteNameError, match="'block.0@r0' was not recorded"):
        named["block.0@r0"]
    with pytest.raises(SiteNameError, match="unknown site names"):
        ActivationCache(["block.1r2"])  # a typo would otherwise keep nothing
    with pytest.raises(SiteNameError, match="no prelude site"):
        named.stage("prelude")


def test_stage_refuses_kept_block_sites_that_are_not_a_grid() -> None:
    ragged = ActivationCache(["block.0@r0", "block.1@r1"])
    run(ragged)
    with pytest.raises(LoopscopeError, match="do not form a grid"):
        ragged.stage("block")


def test_attention_and_positions_are_kept_where_asked() -> None:
    cache = ActivationCache(attention=lambda s: s.stage == "block", positions=[1, 3])
    assert cache.wants_attention
    run(cache, recurrences=2)
    assert cache["block.0@r1"].shape == (2, 2, D)
    torch.testing.assert_close(cache["block.0@r1"], expected_block(1, 0)[:, [1, 3]])
    attn = cache.attention("block.1@r0")
    assert attn.shape == (2, HEADS, 2, 2)
    # queries 1 and 3 over keys 1 and 3 of the causal uniform map
    expected = torch.tensor([[0.5, 0.0], [0.25, 0.25]]).expand(2, HEADS, 2, 2)
    torch.testing.assert_close(attn, expected)
    assert [s.name for s in cache.attention_sites()] == [
        f"block.{j}@r{r}" for r in (0, 1) for j in (0, 1)
    ]
    assert cache.attention_stage("block").shape == (2, 2, 2, HEADS, 2, 2)
    with pytest.raises(SiteNameError, match="no attention kept at 'prelude.0'"):
        cache.attention("prelude.0")
    assert not ActivationCache().wants_attention


def test_cached_tensors_are_copies_in_the_asked_dtype() -> None:
    cache = ActivationCache(dtype=torch.float16)
    hidden = torch.ones(1, 2, D)
    cache.observe(Site("prelude", 0, 0, 0), hidden, None)
    hidden += 5  # the run goes on changing its own tensors
    assert cache["prelude.0"].dtype == torch.float16
    torch.testing.assert_close(cache["prelude.0"], torch.ones(1, 2, D, dtype=torch.float16))
    cache.clear()
    assert len(cache) == 0


def test_capture_probe_keeps_every_batch_row() -> None:
    probe = CaptureProbe(recurrences=[0, 2], layers=[1], attention=True, attention_recurrences=[2])
    run(probe)
    block = probe.stage_array("block")
    assert block.shape == (2, 1, 2, 4, D)  # (kept recurrences, kept layers, batch, T, D)
    torch.testing.assert_close(torch.from_numpy(block[1, 0]), expected_block(2, 1))
    assert probe.stage_array("prelude").shape == (1, 2, 4, D)
    assert probe.stage_array("coda").shape == (1, 2, 4, D)
    attn = probe.attention_array()
    assert attn is not None and attn.shape == (1, 1, 2, HEADS, 4, 4)
    assert list(probe.attn) == [Site("block", 1, 2, 1 + 2 * 2 + 1)]
    assert probe.states[Site("coda", 0, 0, 7)].shape == (2, 4, D)
