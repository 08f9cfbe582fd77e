"""Each model's prompts are tokenised with its own tokenizer, and the trace records which."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES

from loopscope.data import ByteTokenizer
from loopscope.families.checkpoint import CheckpointError
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.families.table import tokenizer_for
from loopscope.training.config import TrainConfig
from loopscope.training.loop import save_checkpoint


def test_our_models_use_the_byte_tokenizer(tmp_path: Path) -> None:
    assert tokenizer_for("demo").name == "byte"
    save_checkpoint(tmp_path, LoopLM(LoopConfig(d_model=16, n_heads=2)), TrainConfig())
    tokenizer = tokenizer_for(tmp_path)
    assert tokenizer.bos and tokenizer.encode("hi") == ByteTokenizer().encode("hi", bos=True)


def test_a_checkpoint_without_tokenizer_files_is_refused() -> None:
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        tokenizer_for(FIXTURES / "raven" / "huginn" / "checkpoint")


def test_hf_checkpoint_uses_its_own_tokenizer_and_trace_records_it(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "<s>": 1, **{f"w{i}": i + 2 for i in range(30)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>"
    )
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=32,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    fast.save_pretrained(tmp_path)
    tokenizer = tokenizer_for(tmp_path)
    assert tokenizer.encode("w3 w7") == [1, 5, 9]
    assert tokenizer.bos is True

    from loopscope.pipeline import trace
    from loopscope.trace.settings import TraceSettings

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3\n")
    store = trace(
        str(tmp_path),
        prompts,
        tmp_path / "trace",
        TraceSettings(recurrences=2, stability_prompts=0),
        progress=False,
    )
    header = json.loads((store.path / "trace.json").read_text())
    assert header["tokenizer"]["bos"] is True
    assert header["tokenizer"]["name"].endswith(":" + tmp_path.name)
    assert store.prompt(0).tokens.tolist() == [1, 3, 4, 5]


def test_cli_retrofits_a_hf_decoder_with_a_loop(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from loopscope.cli.main import main

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(30)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]"
    ).save_pretrained(tmp_path / "llama")
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=32,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(
        tmp_path / "llama", safe_serialization=True
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4\n")
    code = main(
        [
            "trace",
            str(tmp_path / "llama"),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "trace"),
            "--recurrences",
            "3",
            "--loop",
            "1:3",
            "--injection",
            "add",
            "--no-progress",
            "--stability-prompts",
            "0",
        ]
    )
    assert code == 0
    header = json.loads((tmp_path / "trace" / "trace.json").read_text())
    meta = header["model"]["meta"]
    assert (meta["family"], meta["prelude_layers"], meta["block_layers"]) == (
        "retrofit-llama",
        1,
        2,
    )
    block = np.load(tmp_path / "trace" / "prompt_00000" / "block.npy")
    assert block.shape == (3, 2, 4, 16)
    assert (
        main(
            [
                "trace",
                str(tmp_path / "llama"),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "t2"),
                "--loop",
                "x",
            ]
        )
        == 2
    )
