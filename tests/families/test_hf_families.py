"""Hugging Face decoders through the family interface: retrofit, feedforward, Inkling-2 loop,
and safe loading. Tiny random models built from configs; no network."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HF_VOCAB, tiny_hf_config, tiny_hf_model, tiny_inkling
from tolerances import (
    forward_tolerance,
    magnitude,
    model_tolerance,
    rounding_tolerance,
    widest_sum,
)

transformers = pytest.importorskip("transformers")

from loopscope.engine.loop import block_step, prelude_output  # noqa: E402
from loopscope.engine.probes import CaptureProbe  # noqa: E402
from loopscope.engine.sites import Site  # noqa: E402
from loopscope.families.checkpoint import CheckpointError  # noqa: E402
from loopscope.families.hf_retrofit import (  # noqa: E402
    RetrofitLM,
    feedforward_hf,
    is_retrofit_config,
    load_retrofit,
)
from loopscope.families.inkling2 import Inkling2LoopLM, is_inkling2_config  # noqa: E402

VOCAB = HF_VOCAB
tiny_config = tiny_hf_config
tiny_model = tiny_hf_model


def prompt(batch: int = 2, length: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "olmo2"])
def test_one_recurrence_reproduces_hf_logits(model_type: str) -> None:
    hf = tiny_model(model_type)
    ids = prompt()
    with torch.no_grad():
        reference = hf(ids).logits
        looped = RetrofitLM(hf, loop=(1, 3), recurrences=1)(ids).logits
        single = feedforward_hf(hf)(ids).logits
    depth = hf.config.num_hidden_layers + 1  # the decoder layers and the head
    tol = forward_tolerance(torch.float32, magnitude(reference), depth, widest_sum(hf))
    assert torch.allclose(looped, reference, atol=tol, rtol=0)
    assert torch.allclose(single, reference, atol=tol, rtol=0)
    assert reference.abs().max() > 0.1  # not a trivially zero model


@pytest.mark.parametrize(
    ("injection", "scale"), [("add", 1.0), ("concat-linear", 1.0), ("none", 1.0)]
)
def test_injections_at_one_recurrence_are_the_original(injection: Any, scale: float) -> None:
    hf = tiny_model("llama")
    ids = prompt()
    model = RetrofitLM(hf, loop=(1, 3), injection=injection, adapter_scale=scale)
    with torch.no_grad():
        reference = hf(ids).logits
        tol = model_tolerance(model, reference, model.meta.train_recurrences)
        assert torch.allclose(model(ids).logits, reference, atol=tol, rtol=0)


def test_concat_linear_scaled_init_is_mean_of_state_and_input() -> None:
    model = RetrofitLM(tiny_model("qwen2"), loop=(1, 3), injection="concat-linear")
    z, x = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    with torch.no_grad():
        tol = rounding_tolerance(torch.float32, magnitude(z, x), 2 * 32)  # [z, x]·W: 64 terms
        assert torch.allclose(model.inject(z, x), (z + x) / 2**0.5, atol=tol, rtol=0)
    assert model.meta.default_init_state == "zeros"


def test_meta_describes_the_layout() -> None:
    model = RetrofitLM(tiny_model("gpt2"), loop=(1, 3), recurrences=4)
    meta = model.meta
    assert (meta.family, meta.prelude_layers, meta.block_layers, meta.coda_layers) == (
        "retrofit-gpt2",
        1,
        2,
        1,
    )
    assert (meta.train_recurrences, meta.d_model, meta.vocab_size) == (4, 32, VOCAB)
    assert feedforward_hf(tiny_model("gpt2")).meta.layout == "(0, 4⊗l, 0)"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_three_recurrences_through_the_engine_with_probes(model_type: str) -> None:
    hf = tiny_model(model_type)
    model = RetrofitLM(hf, loop=(1, 3), recurrences=3)
    ids = prompt(batch=1, length=6)
    probe = CaptureProbe(attention=True)
    with torch.no_grad():
        out = model(ids, probes=[probe])
    states = probe.stage_array("block")
    attn = probe.attention_array()
    assert states.shape == (3, 2, 1, 6, 32)  # (recurrences, layers, batch, tokens, d)
    assert attn is not None and attn.shape == (3, 2, 1, 4, 6, 6)
    assert abs(attn.sum(-1) - 1).max() < rounding_tolerance(torch.float32, 1.0, 6)  # 6 terms
    assert abs(torch.triu(torch.from_numpy(attn), diagonal=1)).max() == 0  # causal
    assert probe.stage_array("prelude").shape == (1, 1, 6, 32)
    assert probe.stage_array("coda").shape == (1, 1, 6, 32)
    # the last block state is the engine's state; looping changes the output
    tol = model_tolerance(model, out.state, 3)
    assert torch.allclose(torch.from_numpy(states[-1, -1]), out.state, atol=tol, rtol=0)
    with torch.no_grad():
        rounding = model_tolerance(model, out.logits, 3)  # looping moves more than rounding
        assert not torch.allclose(out.logits, hf(ids).logits, atol=rounding, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "olmo2"])
def test_eager_and_sdpa_paths_agree(model_type: str) -> None:
    model = RetrofitLM(tiny_model(model_type), loop=(0, 2), recurrences=3)
    ids = prompt()
    with torch.no_grad():
        fast = model(ids, return_attn=False).logits
        eager = model(ids, return_attn=True).logits
    assert torch.allclose(fast, eager, atol=model_tolerance(model, eager, 3), rtol=0)
    assert model.hf.config._attn_implementation == "sdpa"  # switched back after every call


@pytest.mark.parametrize("model_type", ["llama", "olmo2"])
def test_mlp_zeroing_edit_equals_zeroed_down_projection(model_type: str) -> None:
    hf = tiny_model(model_type)
    model = RetrofitLM(hf, loop=(1, 3), recurrences=3)
    ids = prompt()

    def zero_mlp(component: str, branch: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(branch) if component == "mlp" else branch

    def plan(site: Site) -> Any:
        return zero_mlp if site.stage == "block" and site.layer == 1 else None

    ablated_hf = copy.deepcopy(hf)
    ablated = RetrofitLM(ablated_hf, loop=(1, 3), recurrences=3)
    with torch.no_grad():
        weight = ablated.down_projection(2).weight  # block layer 1 = decoder layer 2
        assert isinstance(weight, torch.Tensor)
        weight.zero_()
        edited = model(ids, edit_plan=plan).logits
        expected = ablated(ids).logits
        plain = model(ids).logits
    tol = model_tolerance(model, expected, 3)
    assert torch.allclose(edited, expected, atol=tol, rtol=0)
    assert not torch.allclose(edited, plain, atol=tol, rtol=0)


def test_attention_edit_is_applied_to_the_branch() -> None:
    hf = tiny_model("gpt2")
    model = RetrofitLM(hf, loop=(0, 4))
    ids = prompt()
    calls: list[str] = []

    def record(component: str, branch: torch.Tensor) -> torch.Tensor:
        calls.append(component)
        return branch

    with torch.no_grad():
        same = model(ids, edit_plan=lambda site: record).logits
        reference = hf(ids).logits
        tol = model_tolerance(model, reference, model.meta.train_recurrences)
        assert torch.allclose(same, reference, atol=tol, rtol=0)
    assert calls == ["attn", "mlp"] * 4


def test_bad_arguments_are_named() -> None:
    hf = tiny_model("llama")
    with pytest.raises(ValueError, match="0 ≤ a < b ≤ 4"):
        RetrofitLM(hf, loop=(2, 6))
    with pytest.raises(ValueError, match="injection"):
        RetrofitLM(hf, loop=(1, 3), injection="gated")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token ids"):
        RetrofitLM(hf)(torch.tensor([[VOCAB]]))
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match="not supported"):
        RetrofitLM(transformers.BertForMaskedLM(bert))


# ------------------------------------------------------------------------------------ loading
def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_save_pretrained_then_load_retrofit_round_trips(tmp_path: Path) -> None:
    hf = tiny_model("qwen2")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _word_tokenizer().save_pretrained(tmp_path)
    model = load_retrofit(tmp_path, loop=(1, 3), recurrences=2)
    assert isinstance(model, RetrofitLM)
    assert model.meta.layout == "(1, 2⊗l, 1)" and model.meta.train_recurrences == 2
    ids = prompt()
    with torch.no_grad():
        reference = hf(ids).logits
        tol = model_tolerance(model, reference, 1)
        assert torch.allclose(model(ids, recurrences=1).logits, reference, atol=tol, rtol=0)
        original = RetrofitLM(hf, loop=(1, 3), recurrences=2)(ids).logits
        tol = model_tolerance(model, original, 2)
        assert torch.allclose(model(ids).logits, original, atol=tol, rtol=0)
    assert model.tokenizer is not None  # the directory's vocabulary, not a downloaded one
    assert model.tokenizer.convert_tokens_to_ids(["w3", "w7"]) == [3, 7]


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    hf = tiny_model("llama")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_retrofit(tmp_path)


def test_absent_weights_say_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="hf download"):
        load_retrofit("loopscope-tests/absent-model")
    tiny_config("llama").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_retrofit(tmp_path)


def test_hf_decoder_config_detection(tmp_path: Path) -> None:
    tiny_config("gpt2").save_pretrained(tmp_path)
    assert is_retrofit_config(json.loads((tmp_path / "config.json").read_text()))
    assert is_retrofit_config({"model_type": "llama"})
    assert not is_inkling2_config({"model_type": "llama"})
    assert is_inkling2_config({"model_type": "inkling2_loop"})
    assert not is_retrofit_config({"model_type": "inkling2_loop"})
    for detect in (is_retrofit_config, is_inkling2_config):
        assert not detect({"model_type": "bert"})
        assert not detect({"model_type": "huginn_raven"})
        assert not detect({"model_type": "llama", "architectures": ["RavenForCausalLM"]})


# ------------------------------------------------------------------------------ Inkling-2 loop
def test_inkling2_loop_matches_transformers_at_several_recurrences() -> None:
    hf = tiny_inkling()
    model = Inkling2LoopLM(hf)
    assert model.meta.layout == "(2, 4⊗l, 2)" and model.meta.train_recurrences == 3
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(2))
    outputs = {}
    with torch.no_grad():
        for passes in (1, 2, 3, 5):
            hf.config.loop_num_passes = passes
            reference = hf(input_ids=ids).logits
            outputs[passes] = model(ids, recurrences=passes).logits
            tol = model_tolerance(model, reference, passes)
            assert torch.allclose(outputs[passes], reference, atol=tol, rtol=0), passes
    rounding = model_tolerance(model, outputs[3], 3)  # more passes move more than rounding
    assert not torch.allclose(outputs[1], outputs[3], atol=rounding, rtol=0)


def test_inkling2_loop_probes_and_early_exits() -> None:
    hf = tiny_inkling()
    model = Inkling2LoopLM(hf)
    ids = torch.randint(0, 120, (1, 9), generator=torch.Generator().manual_seed(4))
    probe = CaptureProbe(attention=True)
    with torch.no_grad():
        out = model(ids, recurrences=3, probes=[probe], exit_every_recurrence=True)
        for passes in (1, 2, 3):
            hf.config.loop_num_passes = passes
            reference = hf(input_ids=ids).logits
            tol = model_tolerance(model, reference, passes)
            assert torch.allclose(out.recurrence_logits[passes - 1], reference, atol=tol, rtol=0)
    assert probe.stage_array("block").shape == (3, 4, 1, 9, 32)
    attn = probe.attention_array()
    assert attn is not None and attn.shape == (3, 4, 1, 4, 9, 9)
    sums = attn.sum(-1)
    at_most_one = 1 + rounding_tolerance(torch.float32, 1.0, 9)  # a sum of 9 probabilities
    assert (sums <= at_most_one).all() and (sums > 0).all()  # the sink takes the rest
    with torch.no_grad():
        inputs, positions = prelude_output(model, ids)
        first = block_step(model, inputs, inputs, positions)
    assert first.shape == (1, 9, 32)


def test_an_inkling2_checkpoint_loads_through_its_own_table_row(tmp_path: Path) -> None:
    import loopscope

    hf = tiny_inkling()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = loopscope.load(tmp_path, recurrences=2)
    assert isinstance(model, Inkling2LoopLM) and model.meta.train_recurrences == 2
    ids = torch.randint(0, 120, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hf.config.loop_num_passes = 2
        reference = hf(input_ids=ids).logits
        tol = model_tolerance(model, reference, 2)
        assert torch.allclose(model(ids).logits, reference, atol=tol, rtol=0)
    with pytest.raises(CheckpointError, match="inkling2_loop family takes no option loop"):
        loopscope.load(tmp_path, loop=(1, 3))
    with pytest.raises(CheckpointError, match="is not a supported Hugging Face decoder"):
        load_retrofit(tmp_path)


def test_inkling2_loop_refuses_edits() -> None:
    model = Inkling2LoopLM(tiny_inkling())
    with pytest.raises(NotImplementedError, match="edits"):
        model(torch.tensor([[1, 2, 3]]), edit_plan=lambda site: lambda c, t: t)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "olmo2"])
def test_a_diverged_token_never_reaches_earlier_ones(model_type: str) -> None:
    # Causality must survive a NaN token: fused kernels multiply its masked zero weight by its
    # NaN value unless the values are sanitised.
    model = RetrofitLM(tiny_model(model_type), loop=(1, 3), recurrences=2)
    ids = prompt(batch=1, length=6)
    with torch.no_grad():
        inputs, positions = prelude_output(model, ids)
        state = inputs.clone()
        before = block_step(model, state, inputs, positions)
        state[:, -1] = float("nan")
        after = block_step(model, state, inputs, positions)
    layers = model.meta.block_layers
    tol = forward_tolerance(torch.float32, magnitude(before), layers, widest_sum(model))
    torch.testing.assert_close(after[:, :-1], before[:, :-1], atol=tol, rtol=0)
    assert not torch.isfinite(after[:, -1]).all()
