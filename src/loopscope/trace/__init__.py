"""Recording runs: the trace settings, the resumable on-disk store and its writer, and the
sharding of a trace over Ray workers.

``from loopscope.trace import TraceSettings, TraceStore, trace_prompts`` is the public surface;
the modules below hold the rest.
"""

from loopscope.trace.writer import PromptInput, TraceError, TraceSettings, TraceStore, trace_prompts

__all__ = ["PromptInput", "TraceError", "TraceSettings", "TraceStore", "trace_prompts"]
