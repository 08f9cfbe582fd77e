"""The random-init sweep's state probe: it holds exactly the states the engine hands over, in
(recurrence, layer, prompt, token, hidden) order, and refuses a run it did not see whole."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loopscope.engine.loop import prelude_output
from loopscope.engine.sites import Site
from loopscope.families.looplm import LoopLM
from loopscope.studies.ablation.measures import BlockStates
from loopscope.studies.ablation.presets import RANDOM_INIT_PRESETS
from loopscope.studies.ablation.random_init import Cell, bundled_prompt_ids, cell_config

SMALL = replace(RANDOM_INIT_PRESETS["quick"], d_model=16, n_heads=2, prompt_tokens=6)


def test_probe_holds_each_layers_output_of_each_recurrence() -> None:
    model = LoopLM(cell_config(Cell("huginn", "concat-linear", 3, 0), SMALL)).eval()
    ids, _ = bundled_prompt_ids(2, SMALL.prompt_tokens)
    probe = BlockStates(4, 3)
    with torch.no_grad():
        out = model(ids, recurrences=4, probes=[probe])
        x, positions = prelude_output(model, ids)
        state, expected = x, []  # init_state="prelude": Z0 = X
        for _ in range(4):  # the engine's recurrence, layer by layer, by hand
            hidden, row = model.inject(state, x), []
            for layer in model.block:
                hidden, _ = layer(hidden, positions)
                row.append(hidden)
            expected.append(torch.stack(row))
            state = model.recurrence_norm(hidden)
    states = probe.stacked()
    assert states.shape == (4, 3, 2, SMALL.prompt_tokens, SMALL.d_model)
    torch.testing.assert_close(states, torch.stack(expected), atol=0, rtol=0)  # the same ops
    torch.testing.assert_close(model.recurrence_norm(states[-1, -1]), out.state, atol=0, rtol=0)


def test_probe_refuses_an_incomplete_run() -> None:
    probe = BlockStates(2, 2)
    with pytest.raises(RuntimeError, match="recurrence 0"):
        probe.stacked()
    for layer in range(2):
        probe.observe(Site("block", layer, 0, layer), torch.ones(1, 3, 4), None)
    probe.observe(Site("block", 0, 1, 2), torch.ones(1, 3, 4), None)
    probe.observe(Site("prelude", 0, 0, 0), torch.zeros(1, 3, 4), None)  # not a block state
    with pytest.raises(RuntimeError, match="recurrence 1"):
        probe.stacked()
    probe.observe(Site("block", 1, 1, 3), 2 * torch.ones(1, 3, 4), None)
    assert probe.stacked().sum() == 3 * 12 + 2 * 12
