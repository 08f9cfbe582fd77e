"""LoopLM: every architectural variant runs, is deterministic, and means what it says."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tolerances import (
    forward_tolerance,
    magnitude,
    model_tolerance,
    rounding_tolerance,
    widest_sum,
)

from loopscope.core.errors import CheckpointError
from loopscope.engine.loop import ContextLengthError, block_step, prelude_output
from loopscope.families.checkpoint import bundled_model_dir, expected_shapes
from loopscope.families.looplm import LoopConfig, LoopLM, load_looplm
from loopscope.nn.injection import INJECTIONS
from loopscope.nn.layers import NORM_SCHEMES
from loopscope.training.config import TrainConfig
from loopscope.training.loop import save_checkpoint
from loopscope.training.named_configs import REGISTRY, get_config

TINY = LoopConfig(
    name="tiny",
    vocab_size=50,
    d_model=16,
    n_heads=2,
    prelude_layers=1,
    block_layers=2,
    coda_layers=1,
    train_recurrences=3,
    context_length=32,
)


def _ids(seed: int = 0, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("injection", "scheme"), list(itertools.product(INJECTIONS, NORM_SCHEMES)))
def test_every_variant_runs_forward_backward_and_is_deterministic(
    injection: str, scheme: str
) -> None:
    init = "prelude" if injection == "none" else "random"
    cfg = TINY.with_(injection=injection, norm_scheme=scheme, init_state=init)
    model = LoopLM(cfg)
    out = model(_ids(), seed=3)
    assert out.logits.shape == (2, 9, 50)
    assert torch.isfinite(out.logits).all()
    out.logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    again = LoopLM(cfg)(_ids(), seed=3).logits
    torch.testing.assert_close(out.logits.detach(), again.detach(), rtol=0, atol=0)


def test_random_initial_state_depends_on_seed_only() -> None:
    model = LoopLM(TINY.with_(init_state="random"))
    a = model(_ids(), seed=1).logits
    b = model(_ids(), seed=1).logits
    c = model(_ids(), seed=2).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    rounding = model_tolerance(model, a, TINY.train_recurrences)  # seeds differ by more
    assert not torch.allclose(a, c, atol=rounding, rtol=0)


def test_different_init_seed_gives_different_weights() -> None:
    a = LoopLM(TINY.with_(init_seed=0)).block[0].attn.qkv.weight
    b = LoopLM(TINY.with_(init_seed=1)).block[0].attn.qkv.weight
    assert not torch.equal(a, b)


@pytest.mark.parametrize("injection", ["none", "add"])
def test_single_recurrence_equals_feedforward_stack(injection: str) -> None:
    init = "prelude" if injection == "none" else "zeros"
    looped = LoopLM(TINY.with_(injection=injection, init_state=init, train_recurrences=1))
    ff = LoopLM(
        TINY.with_(
            prelude_layers=0,
            coda_layers=0,
            block_layers=4,
            train_recurrences=1,
            injection="none",
            init_state="prelude",
        )
    )
    layers = list(looped.prelude) + list(looped.block) + list(looped.coda)
    for target, source in zip(ff.block, layers):
        target.load_state_dict(source.state_dict())
    ff.tok_embeddings.load_state_dict(looped.tok_embeddings.state_dict())
    ff.final_norm.load_state_dict(looped.final_norm.state_dict())
    expected = ff(_ids()).logits
    tol = model_tolerance(looped, expected, 1)
    torch.testing.assert_close(looped(_ids(), recurrences=1).logits, expected, atol=tol, rtol=0)


@pytest.mark.parametrize("injection", ["add", "concat-linear", "gated", "diagonal"])
def test_recurrences_equal_applying_block_by_hand(injection: str) -> None:
    model = LoopLM(TINY.with_(injection=injection, norm_scheme="huginn", init_state="zeros"))
    ids = _ids()
    with torch.no_grad():
        inputs, positions = prelude_output(model, ids)
        state = torch.zeros_like(inputs)
        for _ in range(5):
            state = model.injection(state, inputs)
            for layer in model.block:
                state, _ = layer(state, positions)
        hand = state
        for layer in model.coda:
            hand, _ = layer(hand, positions)
        expected = model.head(hand)
        out = model(ids, recurrences=5)
    tol = model_tolerance(model, expected, 5)
    torch.testing.assert_close(out.logits, expected, atol=tol, rtol=0)
    torch.testing.assert_close(out.state, state, atol=model_tolerance(model, state, 5), rtol=0)


def test_block_step_is_one_recurrence() -> None:
    model = LoopLM(TINY.with_(norm_scheme="ouro", injection="add"))
    ids = _ids()
    with torch.no_grad():
        inputs, positions = prelude_output(model, ids)
        state = torch.zeros_like(inputs)
        for _ in range(2):
            state = block_step(model, state, inputs, positions)
        tol = model_tolerance(model, state, 2)
        assert torch.allclose(state, model(ids, recurrences=2).state, atol=tol, rtol=0)


def test_eager_attention_matches_fused_and_is_row_stochastic() -> None:
    model = LoopLM(TINY)
    captured: list[torch.Tensor] = []

    class Grab:
        wants_attention = True

        def observe(self, site: object, hidden: torch.Tensor, attn: torch.Tensor | None) -> None:
            assert attn is not None
            captured.append(attn)

    fused = model(_ids()).logits
    eager = model(_ids(), probes=[Grab()]).logits
    tol = model_tolerance(model, eager, TINY.train_recurrences)
    torch.testing.assert_close(fused, eager, atol=tol, rtol=0)
    assert len(captured) == 1 + 2 * 3 + 1
    attn = captured[0]
    tol = rounding_tolerance(torch.float32, 1.0, attn.shape[-1])  # a sum of T probabilities
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=tol, rtol=0)
    assert float(attn.detach().triu(1).abs().max()) == 0.0


def test_truncated_backprop_stops_gradient_to_early_recurrences() -> None:
    model = LoopLM(TINY.with_(injection="add"))
    out = model(_ids(), recurrences=4, grad_depth=1)
    out.logits.sum().backward()
    assert model.block[0].attn.qkv.weight.grad is not None
    full = LoopLM(TINY.with_(injection="add"))
    full(_ids(), recurrences=4).logits.sum().backward()
    full_grad = full.block[0].attn.qkv.weight.grad
    rounding = model_tolerance(full, full_grad, 4)  # backward runs the same layers reversed
    assert not torch.allclose(model.block[0].attn.qkv.weight.grad, full_grad, atol=rounding, rtol=0)


def test_exit_every_recurrence_returns_one_logit_per_pass() -> None:
    out = LoopLM(TINY)(_ids(), recurrences=3, exit_every_recurrence=True)
    assert len(out.recurrence_logits) == 3
    tol = model_tolerance(LoopLM(TINY), out.logits, 3)
    torch.testing.assert_close(out.recurrence_logits[-1], out.logits, atol=tol, rtol=0)


def test_bad_inputs_get_clear_errors() -> None:
    model = LoopLM(TINY)
    with pytest.raises(ContextLengthError, match="context of 32"):
        model(_ids(length=40))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.full((1, 4), 99))
    with pytest.raises(ValueError, match="recurrences must be"):
        model(_ids(), recurrences=0)
    with pytest.raises(ValueError, match="never sees the input"):
        TINY.with_(injection="none", init_state="zeros")
    with pytest.raises(ValueError, match="unknown LoopConfig fields"):
        LoopConfig.from_dict({"d_modle": 3})


def test_checkpoint_round_trip_and_errors(tmp_path: Path) -> None:
    model = LoopLM(TINY)
    save_checkpoint(tmp_path / "ok", model, TrainConfig())
    loaded = load_looplm(tmp_path / "ok")
    expected = model(_ids()).logits
    tol = model_tolerance(model, expected, TINY.train_recurrences)
    torch.testing.assert_close(loaded(_ids()).logits, expected, atol=tol, rtol=0)

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "ok" / "model.safetensors"))
    tensors.pop("block_stack.0.attn.proj.weight")
    tensors["extra.weight"] = torch.zeros(2)
    tensors["coda_stack.0.mlp.up.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_looplm(bad)
    message = str(err.value)
    assert "block_stack.0.attn.proj.weight" in message
    assert "extra.weight" in message
    assert "coda_stack.0.mlp.up.weight" in message

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_looplm(pickled)


def test_registry_has_the_study_models() -> None:
    for name in [
        "demo-looped",
        "demo-feedforward",
        "study-2-4x4-2",
        "study-2-8x4-2",
        "study-2-12x4-2",
        "study-feedforward-12",
    ]:
        assert name in REGISTRY
    study = get_config("study-2-12x4-2").model
    assert (
        study.d_model,
        study.n_heads,
        study.prelude_layers,
        study.block_layers,
        study.coda_layers,
        study.train_recurrences,
    ) == (512, 4, 2, 12, 2, 4)
    with pytest.raises(KeyError, match="known configs"):
        get_config("nope")


def test_adapter_init_noise_sets_the_start_of_a_concat_linear_adapter() -> None:
    base = LoopConfig(name="adapter", d_model=256, n_heads=4, injection="concat-linear")
    d = base.d_model

    def z_half(noise: float) -> torch.Tensor:
        model = LoopLM(base.with_(adapter_init_noise=noise))
        return model.injection.adapter.weight.detach()[:, :d].double()

    exact = z_half(0.0)
    assert torch.equal(exact, (torch.eye(d) / 2**0.5).double())
    # Circular law: spectral radius ≈ 1/√2 + σ√d. The default 0.02 expands at width 256,
    # σ = 0.2/√d contracts; the other weights are drawn alike either way.
    radius = {
        noise: float(torch.linalg.eigvals(z_half(noise)).abs().max())
        for noise in (0.02, 0.2 / d**0.5)
    }
    assert radius[0.02] == pytest.approx(2**-0.5 + 0.02 * d**0.5, rel=0.05)
    assert radius[0.02] > 1.0 > radius[0.2 / d**0.5]
    noisy = LoopLM(base.with_(adapter_init_noise=0.05)).state_dict()
    default = LoopLM(base).state_dict()
    same = [k for k in default if "adapter" not in k]
    assert all(torch.equal(noisy[k], default[k]) for k in same)
    with pytest.raises(ValueError, match="adapter_init_noise"):
        base.with_(adapter_init_noise=-1.0)


@pytest.mark.parametrize("loader", ["load", "looplm", "raven", "ouro", "parcae", "hf", "inkling2"])
def test_a_malformed_config_json_names_the_file_and_line(tmp_path: Path, loader: str) -> None:
    import loopscope
    from loopscope.families.hf_retrofit import load_retrofit
    from loopscope.families.inkling2 import load_inkling2
    from loopscope.families.ouro import load_ouro
    from loopscope.families.parcae import load_parcae
    from loopscope.families.raven import load_raven

    loaders = {
        "load": loopscope.load,
        "looplm": load_looplm,
        "raven": load_raven,
        "ouro": load_ouro,
        "parcae": load_parcae,
        "hf": load_retrofit,
        "inkling2": load_inkling2,
    }
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}\n')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON \(line 3"):
        loaders[loader](tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        loaders[loader](tmp_path)


def test_config_fields_read_defaults_aliases_and_refuse_wrong_values() -> None:
    from loopscope.families.checkpoint import ConfigFields

    raw = {"hidden_size": 64, "n_heads": 8, "eps": None, "flag": True, "sub": {"k": 0}}
    fields = ConfigFields(raw, {"eps": 1e-5, "layers": 2}, {"hidden_size": "n_embd"})
    assert fields.integer("n_embd") == 64  # read under the alias the file uses
    assert fields.number("eps", positive=True) == 1e-5  # null takes the default
    assert fields.integer("layers") == 2 and fields.flag("flag") is True
    assert fields.head_size("n_embd", "n_heads") == 8
    assert fields.section("sub").integer("k", minimum=0) == 0
    assert fields.present("n_embd") and not fields.present("eps")
    with pytest.raises(CheckpointError, match=r"config\.json has no vocab; add it"):
        fields.integer("vocab")
    with pytest.raises(CheckpointError, match=r"^flag must be a positive integer, got True"):
        fields.integer("flag")  # a bool is not a count
    with pytest.raises(CheckpointError, match=r"^sub\.k must be a positive integer, got 0"):
        fields.section("sub").integer("k")
    with pytest.raises(CheckpointError, match=r"hidden_size = 64 is not divisible by n_heads = 6"):
        ConfigFields({**raw, "n_heads": 6}, {}, {"hidden_size": "n_embd"}).head_size(
            "n_embd", "n_heads"
        )
    with pytest.raises(CheckpointError, match="must be a finite number, got inf"):
        ConfigFields({"x": float("inf")}).number("x")


@pytest.mark.parametrize("return_attn", [False, True])
def test_a_diverged_token_never_reaches_earlier_ones_on_either_attention_path(
    return_attn: bool,
) -> None:
    # Causality: earlier tokens' outputs cannot depend on a later token, not even when that
    # token is NaN (fused kernels multiply its masked zero weight by its NaN value).
    from loopscope.nn.layers import causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8, generator=g) for _ in range(3))
    clean, _ = causal_attention(q, k[:, :2], v[:, :2], return_attn)  # grouped-query too
    q[:, :, -1], k[:, :, -1], v[:, :, -1] = float("nan"), float("nan"), float("inf")
    out, _ = causal_attention(q, k[:, :2], v[:, :2], return_attn)
    tol = rounding_tolerance(torch.float32, magnitude(clean), 10)  # a sum over 10 positions
    torch.testing.assert_close(out[:, :, :-1], clean[:, :, :-1], atol=tol, rtol=0)

    model = LoopLM(LoopConfig(name="nan", d_model=32, n_heads=2, block_layers=2)).eval()
    ids = torch.randint(0, 256, (1, 9), generator=g)
    inputs, positions = prelude_output(model, ids)
    state = torch.randn(inputs.shape, generator=g)
    before = block_step(model, state, inputs, positions)
    state[:, -1] = float("nan")
    after = block_step(model, state, inputs, positions)
    layers = model.meta.block_layers
    tol = forward_tolerance(torch.float32, magnitude(before), layers, widest_sum(model))
    torch.testing.assert_close(after[:, :-1], before[:, :-1], atol=tol, rtol=0)
    assert torch.isnan(after[:, -1]).all()  # the diverged token itself stays diverged


def test_embed_init_std_scales_only_the_token_embeddings() -> None:
    base = LoopConfig(name="embed", d_model=64, n_heads=4)
    default = LoopLM(base).state_dict()
    scaled = LoopLM(base.with_(embed_init_std=1.0)).state_dict()
    key = "tok_embeddings.weight"
    # Same draws, another scale: exactly 50× the default's embeddings, nothing else touched.
    tol = rounding_tolerance(torch.float32, magnitude(scaled[key]), 3)  # z·σ, then ·50
    torch.testing.assert_close(scaled[key], default[key] * 50.0, atol=tol, rtol=0)
    assert float(scaled[key].std()) == pytest.approx(1.0, rel=0.05)
    tied = {key, "lm_head.weight"}  # the head shares the embedding matrix
    assert all(torch.equal(scaled[k], default[k]) for k in default if k not in tied)
    with pytest.raises(ValueError, match="embed_init_std"):
        base.with_(embed_init_std=-0.5)


def _demo_copy(tmp_path: Path, change: Callable[[dict[str, Any]], object]) -> Path:
    """The bundled looped model's checkpoint with its config.json changed by ``change``."""
    directory = tmp_path / "demo-copy"
    shutil.copytree(bundled_model_dir("demo-looped"), directory)
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_missing_shape_field_is_named_rather_than_defaulted(tmp_path: Path) -> None:
    directory = _demo_copy(tmp_path, lambda c: c.pop("d_model"))
    with pytest.raises(CheckpointError, match=r"config\.json: no d_model; add it to config\.json"):
        load_looplm(directory)


def test_a_wrong_width_lists_a_few_mis_shaped_tensors_and_counts_the_rest(tmp_path: Path) -> None:
    directory = _demo_copy(tmp_path, lambda c: c.update(d_model=128))
    with pytest.raises(CheckpointError) as err:
        load_looplm(directory)
    message = str(err.value)
    assert "mis-shaped tensors: " in message
    listed = message.split("mis-shaped tensors: ")[1].split("; … and ")[0].split("; ")
    assert len(listed) == 8
    more = int(message.split("; … and ")[1].split(" more")[0])
    wide = expected_shapes(LoopLM(load_config(directory)))
    stored = load_file(str(directory / "model.safetensors"))
    assert len(listed) + more == sum(tuple(stored[k].shape) != tuple(wide[k]) for k in wide)


def load_config(directory: Path) -> LoopConfig:
    return LoopConfig.from_dict(json.loads((directory / "config.json").read_text()))
