"""A model from ``loopscope.load`` keeps its checkpoint's tokenizer, and every pipeline entry
point handed the model object tokenises prompts with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import FIXTURES

import loopscope
from loopscope.data import ByteTokenizer
from loopscope.families.checkpoint import CheckpointError
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.families.tokenizers import model_tokenizer
from loopscope.trace.settings import TraceSettings

#: "<s> w1 w2 w3" in the word-level vocabulary below: BOS 1, then w_i → i + 2.
WORDS_IDS = [1, 3, 4, 5]


def _word_level_llama(directory: Path) -> Path:
    """A tiny Llama checkpoint with a word-level tokenizer (ids no byte tokenizer gives)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "<s>": 1, **{f"w{i}": i + 2 for i in range(30)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>"
    ).save_pretrained(directory)
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=32,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def test_our_models_keep_the_byte_tokenizer() -> None:
    model = loopscope.load("demo")
    tokenizer = model_tokenizer(model)
    assert tokenizer.name == "byte" and tokenizer.bos
    assert tokenizer.encode("hi") == ByteTokenizer().encode("hi", bos=True)
    built = LoopLM(LoopConfig(d_model=16, n_heads=2))  # built in Python: nothing attached
    assert model_tokenizer(built).name == "byte"


def test_a_checkpoint_without_tokenizer_files_loads_and_refuses_only_when_asked() -> None:
    model = loopscope.load(FIXTURES / "raven" / "huginn" / "checkpoint")
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        model_tokenizer(model).encode("a")


def test_a_loaded_checkpoint_tokenises_with_its_own_word_level_tokenizer(tmp_path: Path) -> None:
    model: Any = loopscope.load(str(_word_level_llama(tmp_path / "llama")))
    tokenizer = model_tokenizer(model)
    assert tokenizer.encode("w1 w2 w3") == WORDS_IDS and tokenizer.bos
    assert tokenizer.name.endswith(":llama")
    assert model.tokenizer.convert_tokens_to_ids(["w3"]) == [5]  # the library's own stays


def test_pipeline_trace_and_analyze_use_the_tokenizer_of_a_model_object(tmp_path: Path) -> None:
    from loopscope.pipeline import analyze, trace

    model = loopscope.load(str(_word_level_llama(tmp_path / "llama")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3\n")
    settings = TraceSettings(recurrences=2, stability_prompts=0, attention=False)
    store = trace(model, prompts, tmp_path / "trace", settings, progress=False)
    assert store.prompt(0).tokens.tolist() == WORDS_IDS
    header = json.loads((store.path / "trace.json").read_text())
    assert header["tokenizer"] == {"name": model_tokenizer(model).name, "bos": True}
    analyze(model, prompts, tmp_path / "analysis", recurrences=2, settings=settings, progress=False)
    analysed = tmp_path / "analysis" / "trace" / "prompt_00000" / "tokens.npy"
    assert np.load(analysed).tolist() == WORDS_IDS


def test_stages_use_the_tokenizer_of_a_model_object(tmp_path: Path) -> None:
    from loopscope.families.tokenizers import byte_tokenizer
    from loopscope.studies.stages import run_stages
    from loopscope.trace.settings import PromptInput

    model = loopscope.load(str(_word_level_llama(tmp_path / "llama")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3\n")
    paths = run_stages(model, prompts, tmp_path / "stages", recurrences=2, progress=False)
    assert json.loads(paths.metrics_json.read_text())["stages"]["looped"]["meta"]["n_prompts"] == 1
    # byte ids lie outside this 32-word vocabulary: what the prompt file gave before
    as_bytes = [PromptInput("w1 w2 w3", byte_tokenizer().encode("w1 w2 w3"))]
    with pytest.raises(ValueError, match="encoded with this model's tokenizer"):
        run_stages(model, as_bytes, tmp_path / "bytes", recurrences=2, progress=False)
