"""Architecture ablations as one command each (``loopscope ablate random-init|trained``).

Two sweeps, each a grid of *cells* computed one at a time, saved as one JSON file per cell
(written atomically) and skipped when a rerun finds them, so a killed sweep resumes. The parts,
in the order a sweep uses them:

- :mod:`.presets`: the named presets (``quick``, ``paper``), their narrowing and validation, and
  the init each cell starts from (``cell_init``: by default its norm scheme's family);
- :mod:`.measures`: scale-free measures of a block's states (step, distance, degeneracy);
- :mod:`.verdict`: the one verdict rule both sweeps use: four parts (direction, magnitude, norm
  trend, certificate) and the label they give (stable distinct / degenerate / not);
- :mod:`.random_init`: untrained stacks over norm × injection × block size × seed, measured
  and pooled over seeds;
- :mod:`.trained`: the study's small models and their feedforward twin, trained, evaluated,
  traced and profiled;
- :mod:`.store`: the resumable cell store and the outputs-are-current mark;
- :mod:`.study`, :mod:`.random_init_outputs`, :mod:`.trained_outputs`, :mod:`.formatting`:
  the study comparison, tables, prose, figures and reports;
- :mod:`.sweeps`: ``run_random_init`` and ``run_trained``, which tie the parts together.
"""

from __future__ import annotations

from loopscope.studies.ablation.formatting import markdown_table
from loopscope.studies.ablation.measures import StateMeasures, measure_states
from loopscope.studies.ablation.presets import (
    INIT_CHOICES,
    RANDOM_INIT_PRESETS,
    TRAINED_PRESETS,
    RandomInitPreset,
    TrainedPreset,
    cell_init,
    random_init_preset,
    trained_preset,
)
from loopscope.studies.ablation.random_init import (
    Cell,
    CellResult,
    GroupSummary,
    bundled_prompt_ids,
    cell_config,
    measure_cell,
    random_init_grid,
    run_cell,
    summarise_groups,
)
from loopscope.studies.ablation.random_init_outputs import factor_summary
from loopscope.studies.ablation.store import CellStore, SweepRun
from loopscope.studies.ablation.study import STUDY_VERDICTS, compare_with_study
from loopscope.studies.ablation.sweeps import run_random_init, run_trained
from loopscope.studies.ablation.trained import (
    TrainedCell,
    TrainedResult,
    trained_configs,
    trained_grid,
)
from loopscope.studies.ablation.verdict import (
    NOT_STABLE,
    STABLE_DEGENERATE,
    STABLE_DISTINCT,
    VERDICTS,
    Verdict,
    VerdictRule,
    judge,
    judge_parts,
    verdict_of,
)

__all__ = [
    "INIT_CHOICES",
    "NOT_STABLE",
    "RANDOM_INIT_PRESETS",
    "STABLE_DEGENERATE",
    "STABLE_DISTINCT",
    "STUDY_VERDICTS",
    "TRAINED_PRESETS",
    "VERDICTS",
    "Cell",
    "CellResult",
    "CellStore",
    "GroupSummary",
    "RandomInitPreset",
    "StateMeasures",
    "SweepRun",
    "TrainedCell",
    "TrainedPreset",
    "TrainedResult",
    "Verdict",
    "VerdictRule",
    "bundled_prompt_ids",
    "cell_config",
    "cell_init",
    "compare_with_study",
    "factor_summary",
    "judge",
    "judge_parts",
    "markdown_table",
    "measure_cell",
    "measure_states",
    "random_init_grid",
    "random_init_preset",
    "run_cell",
    "run_random_init",
    "run_trained",
    "summarise_groups",
    "trained_configs",
    "trained_grid",
    "trained_preset",
    "verdict_of",
]
