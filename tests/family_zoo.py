"""One tiny model of every family, built from the published-layout fixtures: the tests that
must hold for every family (batched tracing, device parity) walk this one table."""

from __future__ import annotations

from collections.abc import Callable

from helpers import FIXTURES, tiny_hf_model, tiny_inkling, tiny_trace_config

from loopscope.engine.contract import LoopedLM
from loopscope.families.looplm import LoopLM


def _raven(name: str) -> Callable[[], LoopedLM]:
    from loopscope.families.raven import load_raven

    return lambda: load_raven(FIXTURES / "raven" / name / "checkpoint")


def _ouro() -> LoopedLM:
    from loopscope.families.ouro import load_ouro

    return load_ouro(FIXTURES / "ouro" / "checkpoint")


def _parcae() -> LoopedLM:
    from loopscope.families.parcae import load_parcae

    return load_parcae(FIXTURES / "parcae" / "checkpoint")


def _retrofit() -> LoopedLM:
    from loopscope.families.hf_retrofit import RetrofitLM

    return RetrofitLM(tiny_hf_model("llama"), loop=(1, 3), recurrences=2)


def _feedforward() -> LoopedLM:
    from loopscope.families.hf_retrofit import feedforward_hf

    return feedforward_hf(tiny_hf_model("gpt2"))


def _inkling() -> LoopedLM:
    from loopscope.families.inkling2 import Inkling2LoopLM

    return Inkling2LoopLM(tiny_inkling())


#: Every family, by a name for the test id. LoopLM starts from a seeded random state (as
#: Huginn, its retrofits and Parcae do by default), so the per-row draw is tested everywhere.
FAMILIES: dict[str, Callable[[], LoopedLM]] = {
    "looplm": lambda: LoopLM(tiny_trace_config(init_state="random", context_length=32)),
    "huginn": _raven("huginn"),
    "raven-retro-llama": _raven("retro_llama"),
    "raven-retro-olmo": _raven("retro_olmo"),
    "ouro": _ouro,
    "parcae": _parcae,
    "hf-retrofit": _retrofit,
    "hf-feedforward": _feedforward,
    "inkling2": _inkling,
}
