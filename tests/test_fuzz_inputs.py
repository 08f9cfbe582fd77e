"""Bad input never ends in a bare traceback: property-based tests feed malformed checkpoint
configs, prompt files, intervention specs, command-line values and safetensors files, and require
either a normal result or a ``LoopscopeError`` whose message names the input at fault (the file
and line, the field or the flag) and says what it should be.

Example counts are small and the search is derandomised, so the file runs in well under a
minute and fails the same way on every machine."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import DEMO_PROMPTS, FIXTURES, REPO_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from safetensors.torch import load_file, save_file

import loopscope
from loopscope.cli.main import main as cli_main
from loopscope.core.errors import LoopscopeError
from loopscope.data import (
    DataFormatError,
    load_gsm8k_jsonl,
    load_hellaswag_jsonl,
    load_prompts,
    load_text_prompts,
)
from loopscope.engine.interventions import InterventionError, parse_intervention
from loopscope.families.looplm import LoopConfig, LoopLM
from loopscope.training.config import TrainConfig
from loopscope.training.loop import save_checkpoint

ROOT = REPO_ROOT

# Hypothesis caches what it learns under .hypothesis/ in the working directory; keep the
# working tree clean.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "loopscope-hypothesis")


def fuzz(examples: int) -> Any:
    """Hypothesis settings of this file: few examples, no deadline, the same run every time,
    and no example database written into the working tree."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A fresh directory per hypothesis example (tmp_path is shared by all of a test's)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def _fresh(scratch: Path, name: str) -> Path:
    directory = Path(tempfile.mkdtemp(dir=scratch))
    return directory / name


# ------------------------------------------------------------------- checkpoint config.json

TINY_LOOPLM = LoopConfig(
    name="fuzz-looplm",
    vocab_size=64,
    d_model=16,
    n_heads=2,
    prelude_layers=1,
    block_layers=2,
    coda_layers=1,
    train_recurrences=2,
    context_length=32,
)


def _tiny_llama(directory: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small real checkpoint per family: the test fixtures, our own LoopLM, a llama."""
    root = tmp_path_factory.mktemp("checkpoints")
    save_checkpoint(root / "looplm", LoopLM(TINY_LOOPLM), TrainConfig())
    return {
        "looplm": root / "looplm",
        "huginn": FIXTURES / "raven" / "huginn" / "checkpoint",
        "retro_olmo": FIXTURES / "raven" / "retro_olmo" / "checkpoint",
        "ouro": FIXTURES / "ouro" / "checkpoint",
        "parcae": FIXTURES / "parcae" / "checkpoint",
        "llama": _tiny_llama(root / "llama"),
    }


#: Per family: fields that are sizes (whole numbers ≥ 1), its width and its head count.
SIZES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "looplm": (
        ("vocab_size", "d_model", "n_heads", "block_layers", "context_length"),
        "d_model",
        "n_heads",
    ),
    "huginn": (
        ("n_embd", "n_heads", "intermediate_size", "n_layers_in_recurrent_block", "block_size"),
        "n_embd",
        "n_heads",
    ),
    "retro_olmo": (
        ("n_embd", "n_heads", "intermediate_size", "num_key_value_heads", "head_dim"),
        "n_embd",
        "n_heads",
    ),
    "ouro": (
        (
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "num_hidden_layers",
            "intermediate_size",
            "vocab_size",
            "total_ut_steps",
        ),
        "hidden_size",
        "num_attention_heads",
    ),
    "parcae": (
        (
            "n_embd",
            "num_attention_heads",
            "intermediate_size",
            "n_layers_in_recurrent_block",
            "padded_vocab_size",
            "block_size",
        ),
        "n_embd",
        "num_attention_heads",
    ),
    "llama": (
        (
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "num_hidden_layers",
            "intermediate_size",
            "vocab_size",
        ),
        "hidden_size",
        "num_attention_heads",
    ),
}
FAMILIES = sorted(SIZES)
MISSING = object()

#: Values of the wrong type for a size, or out of its range (null is not among them: a family
#: may read it as "absent", which takes the family's default size).
NOT_A_SIZE = st.one_of(
    st.sampled_from(["x", "", "3", True, False, 1.5, -0.5, [], [4], {}, {"a": 1}]),
    st.integers(min_value=-5, max_value=0),
)
#: Any replacement for any field (small numbers only: a config may build what it says).
ANY_VALUE = st.one_of(
    NOT_A_SIZE,
    st.none(),
    st.integers(min_value=1, max_value=6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.just(MISSING),
)


def _with_config(source: Path, directory: Path, config: dict[str, Any]) -> Path:
    """``source``'s files (linked, not copied) under ``config`` as config.json."""
    directory.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), directory / item.name)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _mutated(source: Path, directory: Path, key: str, value: Any) -> Path:
    config = json.loads((source / "config.json").read_text())
    if value is MISSING:
        config.pop(key, None)
    else:
        config[key] = value
    return _with_config(source, directory, config)


def _load_or_explain(directory: Path) -> str | None:
    """Load ``directory``; the error's message if it is refused (anything else fails)."""
    try:
        loopscope.load(directory)
    except LoopscopeError as err:
        message = str(err)
        assert str(directory) in message, f"the message does not name the checkpoint: {message}"
        return message
    return None


@pytest.mark.parametrize("family", FAMILIES)
@fuzz(12)
@given(data=st.data())
def test_any_malformed_config_field_loads_or_is_explained(
    family: str, data: st.DataObject, checkpoints: dict[str, Path], scratch: Path
) -> None:
    source = checkpoints[family]
    key = data.draw(st.sampled_from(sorted(json.loads((source / "config.json").read_text()))))
    value = data.draw(ANY_VALUE, label="value")
    _load_or_explain(_mutated(source, _fresh(scratch, family), key, value))


@pytest.mark.parametrize("family", FAMILIES)
@fuzz(10)
@given(data=st.data())
def test_a_size_that_is_not_a_positive_whole_number_is_named(
    family: str, data: st.DataObject, checkpoints: dict[str, Path], scratch: Path
) -> None:
    source = checkpoints[family]
    key = data.draw(st.sampled_from(SIZES[family][0]), label="field")
    value = data.draw(NOT_A_SIZE, label="value")
    message = _load_or_explain(_mutated(source, _fresh(scratch, family), key, value))
    assert message is not None, f"{key}={value!r} was accepted"
    assert key in message, message


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_that_do_not_divide_the_width_are_named(
    family: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    source = checkpoints[family]
    _, width_key, heads_key = SIZES[family]
    width = json.loads((source / "config.json").read_text())[width_key]
    heads = next(h for h in range(3, width) if width % h)
    message = _load_or_explain(_mutated(source, tmp_path / family, heads_key, heads))
    assert message is not None, f"{heads_key}={heads} with width {width} was accepted"
    assert heads_key in message or "attention heads" in message, message  # transformers' words


@pytest.mark.parametrize("family", FAMILIES)
def test_a_config_that_is_not_an_object_is_explained(
    family: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    for name, text in {"list": "[1, 2]", "broken": '{"n_embd": 3', "empty": ""}.items():
        directory = _with_config(checkpoints[family], tmp_path / name, {})
        (directory / "config.json").write_text(text)
        message = _load_or_explain(directory)
        assert message is not None and "config.json" in message, message


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("key", "value"), [("architectures", 3), ("architectures", [1]), ("model_type", ["llama"])]
)
def test_identity_fields_of_the_wrong_type_are_named(
    family: str, key: str, value: Any, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Every family's detector reads these before any loader runs."""
    message = _load_or_explain(_mutated(checkpoints[family], tmp_path / family, key, value))
    assert message is not None and key in message, message


LAYER_COUNTS = {
    "looplm": "block_layers",
    "huginn": "n_layers_in_recurrent_block",
    "retro_olmo": "n_layers_in_coda",
    "ouro": "num_hidden_layers",
    "parcae": "n_layers_in_prelude",
    "llama": "num_hidden_layers",
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("change", [1, -1], ids=["one more", "one fewer"])
def test_a_layer_count_the_weights_do_not_have_is_refused_by_tensor(
    family: str, change: int, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A config that asks for more (or fewer) layers than the weights hold is refused, with
    the tensors named: never filled with random weights or silently cut short."""
    key = LAYER_COUNTS[family]
    count = json.loads((checkpoints[family] / "config.json").read_text())[key]
    assert count >= 2, f"the {family} checkpoint needs two {key} for this test"
    directory = _mutated(checkpoints[family], tmp_path / family, key, count + change)
    message = _load_or_explain(directory)
    assert message is not None, f"{key}={count + change} was loaded with weights for {count}"
    assert ("missing tensors" if change > 0 else "unexpected tensors") in message, message


# ------------------------------------------------------------------- safetensors weights


@pytest.fixture(scope="module")
def weights(checkpoints: dict[str, Path]) -> bytes:
    return (checkpoints["looplm"] / "model.safetensors").read_bytes()


def _with_weights(source: Path, directory: Path, blob: bytes) -> Path:
    directory.mkdir(parents=True)
    for name in ("config.json", "train_config.json"):
        os.symlink(source / name, directory / name)
    (directory / "model.safetensors").write_bytes(blob)
    return directory


@fuzz(25)
@given(data=st.data())
def test_truncated_or_corrupted_weights_are_refused_or_load(
    data: st.DataObject, weights: bytes, checkpoints: dict[str, Path], scratch: Path
) -> None:
    header = struct.unpack("<Q", weights[:8])[0]
    how = data.draw(st.sampled_from(["truncate", "header byte", "header length"]), label="how")
    blob = bytearray(weights)
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(weights) - 1), label="keep")]
    elif how == "header byte":
        at = data.draw(st.integers(8, 8 + header - 1), label="at")
        blob[at] = data.draw(st.integers(0, 255).filter(lambda b: b != weights[at]), label="to")
    else:
        length = data.draw(st.sampled_from([0, 1, header - 1, header + 1, 2**40, 2**64 - 1]))
        blob[:8] = struct.pack("<Q", length)
    directory = _with_weights(checkpoints["looplm"], _fresh(scratch, "weights"), bytes(blob))
    message = _load_or_explain(directory)
    if how != "header byte":  # a flipped byte may still spell valid JSON (a digit of a shape)
        assert message is not None and "model.safetensors" in message, message


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_weights_of_a_non_float_dtype_are_named(
    dtype: torch.dtype, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    tensors = load_file(str(checkpoints["looplm"] / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(dtype)
    directory = _with_weights(checkpoints["looplm"], tmp_path / "run", b"")
    (directory / "model.safetensors").unlink()
    save_file(tensors, str(directory / "model.safetensors"))
    message = _load_or_explain(directory)
    assert message is not None and name in message and str(dtype).split(".")[1] in message


def test_weights_of_the_wrong_shape_are_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    tensors = load_file(str(checkpoints["looplm"] / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][..., :-1].contiguous()
    directory = _with_weights(checkpoints["looplm"], tmp_path / "run", b"")
    (directory / "model.safetensors").unlink()
    save_file(tensors, str(directory / "model.safetensors"))
    message = _load_or_explain(directory)
    assert message is not None and name in message and "mis-shaped" in message


# ------------------------------------------------------------------- prompt files

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
FIELDS = ["question", "answer", "ctx", "ctx_a", "ctx_b", "endings", "label", "activity_label"]
#: Lines of a JSONL file: near-valid records with any field values, raw text and raw bytes,
#: including the shapes that break ``json`` itself (a number too long, nesting too deep) and
#: escapes that leave half a surrogate pair.
LINES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5).map(json.dumps),
    st.text(max_size=30),
    st.sampled_from(
        [
            '{"question": "\\ud800", "answer": "#### 1"}',
            '{"ctx": "c", "endings": ["a", "\\udfff"]}',
            '{"ctx": "c", "endings": ["a", "b"], "label": "\u00b2"}',
            '{"question": "q", "answer": "#### 1", "n": ' + "9" * 5000 + "}",
            "[" * 5000,
            '{"ctx": "", "endings": ["a", "b"]}',
        ]
    ),
)
LOADERS = [load_gsm8k_jsonl, load_hellaswag_jsonl, load_prompts, load_text_prompts]


def _file(directory: Path, suffix: str, lines: list[str | bytes]) -> Path:
    path = directory / f"prompts{suffix}"
    raw = [
        line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass") for line in lines
    ]
    path.write_bytes(b"\n".join(raw))
    return path


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
@fuzz(30)
@given(
    lines=st.lists(st.one_of(LINES, st.binary(max_size=12)), min_size=0, max_size=4),
    suffix=st.sampled_from([".jsonl", ".txt", ""]),
)
def test_malformed_prompt_lines_are_explained_with_file_and_line(
    loader: Any, lines: list[str | bytes], suffix: str, scratch: Path
) -> None:
    path = _file(_fresh(scratch, "x").parent, suffix, lines)
    try:
        loaded = loader(path)
    except DataFormatError as err:
        assert str(err).startswith(str(path)), err
        if err.line is not None:
            written = path.read_bytes().count(b"\n") + 1
            assert f" line {err.line}: " in str(err) and 1 <= err.line <= written
        return
    for item in loaded:  # whatever loads can be tokenised: real characters, never empty
        text = item if isinstance(item, str) else getattr(item, "question", None) or item.ctx
        assert text and text.encode("utf-8")


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
def test_a_missing_file_or_a_directory_is_explained(loader: Any, tmp_path: Path) -> None:
    for path, why in [(tmp_path / "absent.jsonl", "no such file"), (tmp_path, "is a directory")]:
        with pytest.raises(DataFormatError, match=why) as info:
            loader(path)
        assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"question": "\\ud800", "answer": "#### 1"}', 'field "question" holds an unpaired'),
        ('{"question": "q", "answer": "#### 1", "n": ' + "9" * 5000 + "}", "unreadable JSON"),
        ("[" * 5000, "unreadable JSON"),
    ],
)
def test_json_that_breaks_the_json_module_is_explained(
    line: str, problem: str, tmp_path: Path
) -> None:
    path = _file(tmp_path, ".jsonl", ['{"question": "fine", "answer": "#### 2"}', line])
    with pytest.raises(DataFormatError, match=problem) as info:
        load_gsm8k_jsonl(path)
    assert info.value.line == 2


def test_hellaswag_label_digits_other_than_ascii_are_refused(tmp_path: Path) -> None:
    for label in ["\u00b2", "\uff11", "\u0661"]:  # superscript two, fullwidth one, Arabic one
        path = _file(
            tmp_path, ".jsonl", [json.dumps({"ctx": "c", "endings": ["a", "b"], "label": label})]
        )
        with pytest.raises(DataFormatError, match='"label" must be an index 0..1'):
            load_hellaswag_jsonl(path)


def test_an_empty_hellaswag_context_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, ".jsonl", ['{"ctx_a": "", "endings": ["a", "b"]}'])
    for loader in (load_hellaswag_jsonl, load_prompts):
        with pytest.raises(DataFormatError, match="the context is empty"):
            loader(path)


# ------------------------------------------------------------------- intervention specs

SPEC_PARTS = st.one_of(
    st.sampled_from(["prelude", "block", "coda", "mlp", "attn", "all", "zero", "scale", "replace"]),
    st.sampled_from(["0", "1", "12", "-1", "\u00b2", "\u0661", "1_0", "9" * 30, " ", ""]),
    st.sampled_from([".", "@", ":", "=", ",", "-", "nan", "inf", "1e400", "0-3", "5-2"]),
    st.text(max_size=3),
)


@fuzz(150)
@given(st.one_of(st.lists(SPEC_PARTS, max_size=9).map("".join), st.text(max_size=20)))
def test_any_intervention_text_parses_or_is_explained(text: str) -> None:
    try:
        spec = parse_intervention(text)
    except InterventionError as err:
        assert repr(text.strip()) in str(err) or "empty intervention" in str(err), err
        return
    assert parse_intervention(spec.label).label == spec.label  # the label is the syntax


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("block.\u00b2.mlp", "bad layer"),
        ("block.\u0661.mlp", "bad layer"),
        ("block.1.mlp@0-99999999999", "beyond any run"),
        ("block.1.mlp@1_0", "bad recurrence"),
        ("block.1.mlp@3-1", "bad recurrence"),
        ("block.1.mlp:scale=inf", "must be finite"),
        ("coda.0.attn@2", "run once"),
    ],
)
def test_intervention_mistakes_are_named(text: str, problem: str) -> None:
    with pytest.raises(InterventionError, match=problem):
        parse_intervention(text)


# ------------------------------------------------------------------- command-line values

FLAG_TEXT = st.one_of(
    st.lists(
        st.sampled_from(["0", "1", "-1", "2", "x", "", " ", "1.5", "\u00b2", ":", "9" * 25]),
        max_size=4,
    ).map(",".join),
    st.text(max_size=8).filter(lambda t: not t.startswith("-")),
)
TRACE_FLAGS = ["--positions", "--layers", "--keep-recurrences", "--loop"]


@pytest.mark.parametrize("flag", TRACE_FLAGS)
@fuzz(20)
@given(value=FLAG_TEXT)
def test_a_malformed_trace_flag_is_one_line_naming_the_flag(
    flag: str, value: str, scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flags are read before any model is loaded, so the model here does not exist: a value
    that parses gets the one-line error about the model instead."""
    absent = scratch / "no-such-model"
    argv = ["trace", str(absent), "--prompts", str(DEMO_PROMPTS), "--out", str(scratch / "t")]
    assert cli_main([*argv, f"{flag}={value}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loopscope: error: "), err
    assert flag in err[0] or str(absent) in err[0], err[0]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["trace", "demo", "--layers", "a,b"], "--layers"),
        (["trace", "demo", "--keep-recurrences", "1,,2"], "--keep-recurrences"),
        (["trace", "demo", "--positions", "first"], "--positions"),
        (["trace", "demo", "--loop", "1:2:3"], "--loop"),
        (["stages", "demo", "--intervene", "block.x.mlp"], "'block.x.mlp'"),
    ],
    ids=["layers", "keep-recurrences", "positions", "loop", "intervene"],
)
def test_the_command_exits_2_with_one_line(argv: list[str], named: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loopscope.cli.main", *argv]
        + ["--prompts", str(DEMO_PROMPTS), "--out", str(tmp_path / "t"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("loopscope: error: ") and named in lines[0], lines[0]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--steps", "0"),
        ("--batch-size", "0"),
        ("--lr", "nan"),
        ("--lr", "-1"),
        ("--config", "nope"),
    ],
)
def test_a_bad_training_value_is_one_line_naming_it(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--config", "smoke-tiny", "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli_main([*argv, flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loopscope: error: "), err
    assert (flag if flag != "--config" else "no config named 'nope'") in err[0], err[0]
    assert not (tmp_path / "run").exists()
