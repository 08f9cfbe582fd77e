"""Stages of inference end to end: profile a model over prompts, compare it with a feedforward
reference, classify MLP neurons, measure interventions, and write the report section.

    >>> from loopscope.studies.stages import run_stages
    >>> run_stages("demo", "prompts.jsonl", "out/", reference="demo-feedforward")  # doctest: +SKIP

``profile`` measures (streamed stage profiles, neuron classes, interventions), ``sections``
turns measurements into report sections and their numbers, ``report`` writes the stand-alone
report of ``loopscope stages``.
"""

from loopscope.studies.stages.profile import (
    InterventionResult,
    compare_intervention,
    neuron_classes_per_layer,
    pool_profiles,
    pooled_profile_from_trace,
    stages_profile,
)
from loopscope.studies.stages.report import run_stages
from loopscope.studies.stages.sections import stages_sections, stages_verdict

__all__ = [
    "InterventionResult",
    "compare_intervention",
    "neuron_classes_per_layer",
    "pool_profiles",
    "pooled_profile_from_trace",
    "run_stages",
    "stages_profile",
    "stages_sections",
    "stages_verdict",
]
