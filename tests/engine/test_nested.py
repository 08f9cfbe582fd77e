"""The nested-loop runner on hand-made stacks whose layers add constants, so every state at
every (h, l) is known in closed form; site names, their order, per-level counts and edits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.engine.nested import (
    Loop,
    NestedCyclesError,
    NestedSite,
    NestedStateRecorder,
    Stack,
    parse_site_name,
    resolve_cycles,
    run_nested,
    site_names,
)
from loopscope.nn.layers import Edit

HRM_TREE = Loop("h", (Loop("l", (Stack("L", ("L", "H")),), 3), Stack("H", ("H", "L"))), 2)


@dataclass
class AddConstant:
    """A layer x ↦ x + c whose addition goes through ``edit("mlp", ·)``."""

    constant: float

    def __call__(
        self, x: Tensor, context: Any, *, return_attn: bool = False, edit: Edit | None = None
    ) -> tuple[Tensor, Tensor | None]:
        delta = torch.full_like(x, self.constant)
        delta = edit("mlp", delta) if edit is not None else delta
        return x + delta, None


@dataclass
class ToyNested:
    """Stacks of constant-adding layers; each stack's output map halves its stream."""

    loop_tree: Loop
    constants: dict[str, list[float]]

    def stack_layers(self, stack: str) -> Sequence[AddConstant]:
        return [AddConstant(c) for c in self.constants[stack]]

    def stack_output(self, stack: str, hidden: Tensor) -> Tensor:
        return hidden / 2


@dataclass
class Everything:
    wants_attention: bool = False
    seen: list[tuple[NestedSite, float]] = field(default_factory=list)

    def observe(self, site: NestedSite, hidden: Tensor, attn: Tensor | None) -> None:
        self.seen.append((site, float(hidden.flatten()[0])))


def toy() -> ToyNested:
    return ToyNested(HRM_TREE, {"L": [1.0, 2.0], "H": [4.0, 8.0]})


def closed_form(h_count: int, l_count: int, z_h: float, z_l: float) -> dict[str, float]:
    """Every site value by the recurrence written out by hand: an L application's input is
    z_L + z_H, its layers add 1 then 2, its output is half; the H application's input is
    z_H + z_L, its layers add 4 then 8, its output is half. Powers of two: exact in float."""
    values = {"L@init": z_l, "H@init": z_h}
    for h in range(h_count):
        for step in range(l_count):
            x = z_l + z_h
            values[f"L.0@h{h}.l{step}"] = x + 1
            values[f"L.1@h{h}.l{step}"] = x + 3
            z_l = (x + 3) / 2
            values[f"L@h{h}.l{step}"] = z_l
        x = z_h + z_l
        values[f"H.0@h{h}"] = x + 4
        values[f"H.1@h{h}"] = x + 12
        z_h = (x + 12) / 2
        values[f"H@h{h}"] = z_h
    return values


def run(model: ToyNested, cycles: dict[str, int] | None = None, **kwargs: Any) -> Everything:
    probe = Everything()
    initial = {"H": torch.full((1, 2, 3), 0.5), "L": torch.full((1, 2, 3), -1.0)}
    run_nested(model, initial, None, cycles=cycles, probes=[probe], **kwargs)
    return probe


@pytest.mark.parametrize("cycles", [None, {"h": 3, "l": 1}, {"h": 1, "l": 5}, {"l": 2}])
def test_every_state_matches_the_closed_form(cycles: dict[str, int] | None) -> None:
    counts = resolve_cycles(HRM_TREE, cycles)
    probe = run(toy(), cycles)
    expected = closed_form(counts["h"], counts["l"], 0.5, -1.0)
    assert {site.name: value for site, value in probe.seen} == expected
    assert len(probe.seen) == len(expected)


def test_sites_run_in_the_documented_order() -> None:
    probe = run(toy(), {"h": 2, "l": 2})
    names = [site.name for site, _ in probe.seen]
    assert names[:8] == [
        "L@init",
        "H@init",
        "L.0@h0.l0",
        "L.1@h0.l0",
        "L@h0.l0",
        "L.0@h0.l1",
        "L.1@h0.l1",
        "L@h0.l1",
    ]
    assert names[8:12] == ["H.0@h0", "H.1@h0", "H@h0", "L.0@h1.l0"]
    assert names[-1] == "H@h1"
    assert names == site_names(HRM_TREE, {"L": 2, "H": 2}, {"h": 2, "l": 2})
    assert [site.depth for site, _ in probe.seen] == list(range(len(names)))


def test_names_parse_back() -> None:
    for name in site_names(HRM_TREE, {"L": 2, "H": 2}, {"h": 2, "l": 3}):
        assert parse_site_name(name).name == name
    site = parse_site_name("L.1@h2.l3")
    assert (site.stack, site.layer, site.path) == ("L", 1, (("h", 2), ("l", 3)))
    assert site.count("l") == 3 and parse_site_name("H@h2").count("l") is None
    for bad in ("L1@h2", "L.1@", "L.x@h1", "L_2.0@h1", "L@h2.3", "L@H2"):
        with pytest.raises(LoopscopeError, match="malformed"):
            parse_site_name(bad)


def test_deeper_trees_get_longer_paths() -> None:
    tree = Loop("a", (Loop("b", (Stack("X", ("X",)),), 2), Stack("Y", ("Y", "X"))), 2)
    model = ToyNested(tree, {"X": [1.0], "Y": [2.0]})
    probe = Everything()
    initial = {"X": torch.zeros(1, 1, 1), "Y": torch.zeros(1, 1, 1)}
    run_nested(model, initial, None, probes=[probe])
    names = [site.name for site, _ in probe.seen]
    assert names[:5] == ["X@init", "Y@init", "X.0@a0.b0", "X@a0.b0", "X.0@a0.b1"]
    # X: (0 + 1)/2 = 0.5, then (0.5 + 1)/2 = 0.75; Y: (0 + 0.75 + 2)/2 = 1.375.
    values = dict((site.name, value) for site, value in probe.seen)
    assert values["X@a0.b1"] == 0.75 and values["Y@a0"] == 1.375


def test_edits_reach_exactly_their_site() -> None:
    def plan(site: NestedSite) -> Edit | None:
        if site.name == "L.1@h1.l0":
            return lambda component, delta: delta * 0
        return None

    seen = run(toy(), edit_plan=plan).seen
    edited = {site.name: v for site, v in seen}
    plain = closed_form(2, 3, 0.5, -1.0)
    assert edited["L.1@h1.l0"] == plain["L.0@h1.l0"]  # layer 1 added nothing
    order = [site.name for site, _ in seen]
    before = order[: order.index("L.1@h1.l0")]
    assert before and all(edited[name] == plain[name] for name in before)
    assert all(edited[name] != plain[name] for name in order[len(before) :])


def test_recorder_stacks_states_per_level() -> None:
    recorder = NestedStateRecorder()
    initial = {"H": torch.full((1, 2, 3), 0.5), "L": torch.full((1, 2, 3), -1.0)}
    run_nested(toy(), initial, None, cycles={"h": 3, "l": 2}, probes=[recorder])
    expected = closed_form(3, 2, 0.5, -1.0)
    z_l, z_h = recorder.trajectory("L"), recorder.trajectory("H")
    assert z_l.shape == (3, 2, 1, 2, 3) and z_h.shape == (3, 1, 2, 3)
    assert float(z_l[2, 1, 0, 0, 0]) == expected["L@h2.l1"]
    assert float(z_h[1, 0, 1, 2]) == expected["H@h1"]
    assert float(recorder.initial("L").flatten()[0]) == -1.0
    with pytest.raises(LoopscopeError, match="no state"):
        recorder.trajectory("Q")


def test_trees_keep_names_parseable() -> None:
    for bad in ("H", "hh", "1", ""):
        with pytest.raises(ValueError, match="one lower-case letter"):
            Loop(bad, (Stack("L", ("L",)),), 1)
    with pytest.raises(ValueError, match="distinct"):
        Loop("h", (Loop("h", (Stack("L", ("L",)),), 2),), 2)
    with pytest.raises(ValueError, match="letters only"):
        Stack("L2", ("L2",))
    with pytest.raises(ValueError, match="reads no state"):
        Stack("L", ())


def test_counts_are_checked() -> None:
    assert resolve_cycles(HRM_TREE, None) == {"h": 2, "l": 3}
    assert resolve_cycles(HRM_TREE, {"l": 7}) == {"h": 2, "l": 7}
    with pytest.raises(NestedCyclesError, match="no loop named 'H'"):
        resolve_cycles(HRM_TREE, {"H": 2})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(NestedCyclesError, match="integer ≥ 1"):
            resolve_cycles(HRM_TREE, {"h": bad})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="initial states missing for L"):
        run_nested(toy(), {"H": torch.zeros(1, 1, 1)}, None)
