"""Data for training and probing our own small looped models: a byte tokenizer, seeded synthetic
GSM8K-style problems, loaders for GSM8K / HellaSwag / text prompt files, and the one text format."""

from __future__ import annotations

from loopscope.data.formatting import (
    extract_final_answer,
    format_prompt,
    format_training_example,
    parse_model_answer,
    strip_calculator_annotations,
)
from loopscope.data.loaders import (
    DataFormatError,
    GSM8KExample,
    HellaSwagExample,
    PromptRecord,
    load_gsm8k_jsonl,
    load_hellaswag_jsonl,
    load_prompt_records,
    load_prompts,
    load_text_prompts,
)
from loopscope.data.synthetic import (
    CONTEXT_BYTES,
    MAX_STEPS,
    Problem,
    generate_problems,
    write_jsonl,
)
from loopscope.data.tokenizer import ByteTokenizer

__all__ = [
    "CONTEXT_BYTES",
    "MAX_STEPS",
    "ByteTokenizer",
    "DataFormatError",
    "GSM8KExample",
    "HellaSwagExample",
    "Problem",
    "PromptRecord",
    "extract_final_answer",
    "format_prompt",
    "format_training_example",
    "generate_problems",
    "load_gsm8k_jsonl",
    "load_hellaswag_jsonl",
    "load_prompt_records",
    "load_prompts",
    "load_text_prompts",
    "parse_model_answer",
    "strip_calculator_annotations",
    "write_jsonl",
]
