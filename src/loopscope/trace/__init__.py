"""Recording runs: the trace settings, the resumable on-disk store and its writer, and the
sharding of a trace over Ray workers.

``from loopscope.trace import TraceSettings, TraceStore, trace_prompts`` is the public surface;
the modules below hold the rest: ``settings`` (what to run and keep), ``store`` (reading a
trace), ``writer`` (writing one), ``sharding`` (writing one with Ray workers).
"""

from loopscope.trace.settings import PromptInput, TraceError, TraceSettings
from loopscope.trace.store import TraceStore
from loopscope.trace.writer import trace_prompts

__all__ = ["PromptInput", "TraceError", "TraceSettings", "TraceStore", "trace_prompts"]
