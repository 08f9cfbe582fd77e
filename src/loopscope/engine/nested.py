"""Nested recurrence: a family whose loops form a small tree, and the one runner that drives it.

A single-loop family (``engine/loop.py``) applies one block R times. A two-timescale family
such as HRM-Text declares its loops as a tree instead::

    h × [ l × [L-stack], H-stack ]

Each leaf is a *stack application*: the stack named ``L`` reads the sum of the states it lists
(``z_L + z_H``), runs its layers, applies its output map (HRM-Text: a weightless RMS norm) and
writes the result back as state ``L``. Loops name their counter with a lower-case letter (``h``,
``l``); the counts are set per loop at call time (``cycles={"h": 4, "l": 1}``), the trained
counts are the defaults.

Site names (every one is handed to every probe, in the order it ran):

====================================  ==============================================
``L@init``, ``H@init``                 the initial states, in the order the stacks first
                                       read them
``L.1@h2.l3``                          residual stream after L-stack layer 1, at H cycle 2,
                                       L cycle 3 (0-based)
``L@h2.l3``                            state z_L written by that L-stack application
``H.0@h2``                             residual stream after H-stack layer 0 at H cycle 2
``H@h2``                               state z_H written at the end of H cycle 2
====================================  ==============================================

The path after ``@`` lists the enclosing loops, outermost first, each as letter + 0-based
count (the tree's root is always a loop, so only initial states have no path: ``@init``).
:func:`parse_site_name` reads a name back and refuses a malformed one. The single-loop engine
(``engine/loop.py``) and its site names (``block.2@r5``) are separate and unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.nn.layers import Edit

__all__ = [
    "Loop",
    "NestedCyclesError",
    "NestedModel",
    "NestedOutput",
    "NestedProbe",
    "NestedSite",
    "NestedStateRecorder",
    "Stack",
    "apply_body",
    "apply_stack",
    "parse_site_name",
    "resolve_cycles",
    "run_nested",
    "site_names",
]

Path = tuple[tuple[str, int], ...]


class NestedCyclesError(LoopscopeError):
    """A cycle count that names no loop of the model, or is not a positive integer."""


@dataclass(frozen=True)
class Stack:
    """One stack application: ``name`` is the state it writes (and its sites' prefix),
    ``reads`` the states summed, in this order, to form its input."""

    name: str
    reads: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name.isascii() or not self.name.isalpha():
            raise ValueError(
                f"a stack is named by letters only (site names parse), got {self.name!r}"
            )
        if not self.reads:
            raise ValueError(f"stack {self.name!r} reads no state")


@dataclass(frozen=True)
class Loop:
    """A loop named by its counter letter, running ``body`` ``trained`` times by default."""

    name: str
    body: tuple[Stack | Loop, ...]
    trained: int

    def __post_init__(self) -> None:
        if len(self.name) != 1 or not ("a" <= self.name <= "z"):
            raise ValueError(f"a loop is named by one lower-case letter, got {self.name!r}")
        if not self.body:
            raise ValueError(f"loop {self.name!r} has an empty body")
        names = [loop.name for loop in self.loops()]
        if len(set(names)) != len(names):
            raise ValueError(f"loop letters must be distinct in one tree, got {names}")

    def loops(self) -> Iterator[Loop]:
        """This loop and every loop inside it, outermost first."""
        yield self
        for node in self.body:
            if isinstance(node, Loop):
                yield from node.loops()

    def stacks(self) -> Iterator[Stack]:
        """Every stack application in the tree, in the order a pass first meets it."""
        for node in self.body:
            if isinstance(node, Loop):
                yield from node.stacks()
            else:
                yield node


@dataclass(frozen=True)
class NestedSite:
    """One recorded state: the ``stack``, its ``layer`` (None: the state the stack writes) and
    the loop ``path`` ((letter, count), outermost first; empty for an initial state).
    ``depth`` is its position in the order the pass ran."""

    stack: str
    layer: int | None
    path: Path
    depth: int = 0

    @property
    def name(self) -> str:
        head = self.stack if self.layer is None else f"{self.stack}.{self.layer}"
        where = ".".join(f"{letter}{count}" for letter, count in self.path) or "init"
        return f"{head}@{where}"

    def count(self, loop: str) -> int | None:
        """The count of ``loop`` on this site's path (None when the site is outside it)."""
        return dict(self.path).get(loop)


_SITE_NAME = re.compile(r"^([A-Za-z]+)(?:\.(\d+))?@(init|[a-z]\d+(?:\.[a-z]\d+)*)$")


def parse_site_name(name: str) -> NestedSite:
    """The site a name denotes (depth 0); LoopscopeError for a malformed name."""
    match = _SITE_NAME.match(name)
    if match is None:
        raise LoopscopeError(
            f"malformed nested site name {name!r}; write STACK[.LAYER]@PATH such as "
            "'L.1@h2.l3', 'H@h0' or 'L@init'"
        )
    stack, layer, where = match.groups()
    path: Path = ()
    if where != "init":
        path = tuple((part[0], int(part[1:])) for part in where.split("."))
    return NestedSite(stack, None if layer is None else int(layer), path)


class NestedProbe(Protocol):
    """Anything fed states during a nested pass; it must not modify the tensors."""

    wants_attention: bool

    def observe(self, site: NestedSite, hidden: Tensor, attn: Tensor | None) -> None: ...


class NestedModel(Protocol):
    """What the runner needs of a family: its loop tree, each stack's layers (the engine's
    layer protocol) and each stack's output map."""

    @property
    def loop_tree(self) -> Loop: ...

    def stack_layers(self, stack: str) -> Sequence[Any]: ...

    def stack_output(self, stack: str, hidden: Tensor) -> Tensor: ...


NestedEditPlan = Callable[[NestedSite], "Edit | None"]


def resolve_cycles(tree: Loop, cycles: Mapping[str, int] | None) -> dict[str, int]:
    """Every loop's count: the trained one unless ``cycles`` sets it. An unknown loop name or
    a count below 1 is refused naming the loops there are."""
    counts = {loop.name: loop.trained for loop in tree.loops()}
    for name, value in (cycles or {}).items():
        if name not in counts:
            raise NestedCyclesError(
                f"no loop named {name!r}; this model's loops are {', '.join(counts)} "
                f"(trained counts {counts})"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NestedCyclesError(f"cycles[{name!r}] must be an integer ≥ 1, got {value!r}")
        counts[name] = value
    return counts


def site_names(tree: Loop, layers: Mapping[str, int], cycles: Mapping[str, int]) -> list[str]:
    """Every site name of a pass, in the order the runner feeds them to probes (without the
    model: ``layers`` gives each stack's layer count)."""
    names = [f"{stack}@init" for stack in _initial_order(tree)]
    for stack, path in _applications(tree, resolve_cycles(tree, cycles), ()):
        where = ".".join(f"{letter}{count}" for letter, count in path)
        names += [f"{stack.name}.{j}@{where}" for j in range(layers[stack.name])]
        names.append(f"{stack.name}@{where}")
    return names


def _initial_order(tree: Loop) -> list[str]:
    """State names in the order the stacks first read them (their initial states' order)."""
    seen: list[str] = []
    for stack in tree.stacks():
        for name in (*stack.reads, stack.name):
            if name not in seen:
                seen.append(name)
    return seen


def _applications(
    node: Loop, counts: Mapping[str, int], path: Path
) -> Iterator[tuple[Stack, Path]]:
    """Every stack application of a pass with its loop path, in the order it runs."""
    for index in range(counts[node.name]):
        here = (*path, (node.name, index))
        for child in node.body:
            if isinstance(child, Loop):
                yield from _applications(child, counts, here)
            else:
                yield child, here


@dataclass
class NestedOutput:
    """The states after the pass (by stack name) and the loop counts it ran."""

    states: dict[str, Tensor]
    cycles: dict[str, int]


@dataclass
class _Feed:
    """Hands states to probes and numbers the sites in the order they ran."""

    probes: Sequence[NestedProbe]
    depth: int = 0

    def site(self, stack: str, layer: int | None, path: Path) -> NestedSite:
        site = NestedSite(stack, layer, path, self.depth)
        self.depth += 1
        return site

    def __call__(self, site: NestedSite, hidden: Tensor, attn: Tensor | None) -> None:
        for probe in self.probes:
            probe.observe(site, hidden, attn if probe.wants_attention else None)


def run_nested(
    model: NestedModel,
    initial: Mapping[str, Tensor],
    context: Any,
    *,
    cycles: Mapping[str, int] | None = None,
    probes: Sequence[NestedProbe] = (),
    return_attn: bool | None = None,
    edit_plan: NestedEditPlan | None = None,
) -> NestedOutput:
    """Run ``model``'s loop tree from the ``initial`` states, feeding every state to
    ``probes``. ``context`` is what the layers need about positions (rotary tables, the
    attention mask); ``cycles`` sets loop counts by letter (default: the trained counts)."""
    tree = model.loop_tree
    counts = resolve_cycles(tree, cycles)
    missing = [name for name in _initial_order(tree) if name not in initial]
    if missing:
        raise ValueError(f"initial states missing for {', '.join(missing)}")
    want_attn = any(p.wants_attention for p in probes) if return_attn is None else return_attn
    feed = _Feed(probes)
    states = dict(initial)
    for name in _initial_order(tree):
        feed(feed.site(name, None, ()), states[name], None)
    for stack, path in _applications(tree, counts, ()):
        hidden = states[stack.reads[0]]
        for other in stack.reads[1:]:
            hidden = hidden + states[other]
        for j, layer in enumerate(model.stack_layers(stack.name)):
            site = feed.site(stack.name, j, path)
            edit = edit_plan(site) if edit_plan is not None else None
            hidden, attn = layer(hidden, context, return_attn=want_attn, edit=edit)
            feed(site, hidden, attn)
        states[stack.name] = model.stack_output(stack.name, hidden)
        feed(feed.site(stack.name, None, path), states[stack.name], None)
    return NestedOutput(states=states, cycles=counts)


def apply_stack(
    model: NestedModel, stack: Stack, states: Mapping[str, Tensor], context: Any
) -> Tensor:
    """One application of ``stack`` to ``states`` without probes: the state it writes. As a
    function of one state with the others held fixed, this is the map whose fixed points and
    Jacobian the two-scale analyses study."""
    hidden = states[stack.reads[0]]
    for other in stack.reads[1:]:
        hidden = hidden + states[other]
    for layer in model.stack_layers(stack.name):
        hidden, _ = layer(hidden, context)
    return model.stack_output(stack.name, hidden)


def apply_body(
    model: NestedModel,
    loop: Loop,
    states: Mapping[str, Tensor],
    context: Any,
    counts: Mapping[str, int],
) -> dict[str, Tensor]:
    """One pass of ``loop``'s body (its inner loops run ``counts`` times), without probes:
    for HRM-Text's outer loop, one whole H step."""
    out = dict(states)
    for child in loop.body:
        if isinstance(child, Loop):
            for _ in range(counts[child.name]):
                out = apply_body(model, child, out, context, counts)
        else:
            out[child.name] = apply_stack(model, child, out, context)
    return out


@dataclass
class NestedStateRecorder:
    """Probe that keeps every state a stack writes (the ``STACK@PATH`` sites), detached, on
    the CPU and in float32 at least (float64 stays float64), so the two-scale analyses can
    stack them into trajectories."""

    wants_attention: bool = False
    states: dict[str, dict[Path, Tensor]] = field(default_factory=dict)

    def observe(self, site: NestedSite, hidden: Tensor, attn: Tensor | None) -> None:
        if site.layer is None:
            kept = hidden.detach().to("cpu", torch.promote_types(hidden.dtype, torch.float32))
            self.states.setdefault(site.stack, {})[site.path] = kept

    def trajectory(self, stack: str) -> Tensor:
        """The states ``stack`` wrote, stacked along one axis per enclosing loop: for HRM-Text
        ``L`` gives (h, l, batch, tokens, d) and ``H`` gives (h, batch, tokens, d). The
        initial state is left out (it is ``self.initial(stack)``)."""
        written = {path: t for path, t in self.states.get(stack, {}).items() if path}
        if not written:
            raise LoopscopeError(f"the recorder saw no state written by stack {stack!r}")
        depth = len(next(iter(written)))
        sizes = [1 + max(path[i][1] for path in written) for i in range(depth)]
        sample = next(iter(written.values()))
        out = torch.full((*sizes, *sample.shape), float("nan"), dtype=sample.dtype)
        for path, tensor in written.items():
            out[tuple(count for _, count in path)] = tensor
        return out

    def initial(self, stack: str) -> Tensor:
        """The initial state of ``stack`` (its ``STACK@init`` site)."""
        return self.states[stack][()]
