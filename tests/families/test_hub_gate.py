"""The Hugging Face gate: ``families/hub.py`` is the one module that asks transformers or
huggingface_hub to load anything, and it never lets code shipped with a checkpoint run.

Checked twice: on the package source (no other module calls a loading entry point, and every
call in hub.py passes ``trust_remote_code=False`` and ``local_files_only=True``), and end to end
on a checkpoint in the published Huginn layout whose config and tokenizer point at custom code
that would leave a marker file if it were ever imported: ``loopscope.load`` and the commands
``trace``, ``analyze``, ``stages`` and ``adaptive`` run with stdin closed, never import it and
never ask whether to."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, SOURCE_PACKAGE

PACKAGE = SOURCE_PACKAGE
GATE = PACKAGE / "families" / "hub.py"
FIXTURE = FIXTURES / "raven" / "huginn" / "checkpoint"

#: Entry points that make transformers / huggingface_hub read a checkpoint or the hub cache.
LOADING_NAMES = ("from_pretrained", "snapshot_download", "hf_hub_download", "AutoTokenizer")
LOADING_PREFIXES = ("AutoConfig", "AutoModel")
#: What transformers prints when it asks whether to run a checkpoint's code.
QUESTIONS = ("[y/N]", "Do you wish to run the custom code")


# ------------------------------------------------------------------------- the source scan
def _is_loading_name(name: str) -> bool:
    return name in LOADING_NAMES or name.startswith(LOADING_PREFIXES)


def loading_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of every name, attribute or import of a loading entry point in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and _is_loading_name(node.id):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute) and _is_loading_name(node.attr):
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.alias) and _is_loading_name(node.name.rsplit(".", 1)[-1]):
            found.append((node.lineno, node.name))
    return found


def test_the_scan_finds_every_kind_of_loading_call() -> None:
    source = (
        "from transformers import AutoModelForCausalLM\n"
        "import huggingface_hub\n"
        "def f(t):\n"
        "    huggingface_hub.snapshot_download('a/b')\n"
        "    return t.from_pretrained('x'), AutoConfig\n"
    )
    names = sorted(name for _, name in loading_uses(source))
    assert names == ["AutoConfig", "AutoModelForCausalLM", "from_pretrained", "snapshot_download"]
    assert loading_uses("def from_config(tokenizer):\n    return tokenizer('a')\n") == []


def test_only_the_gate_calls_into_the_hugging_face_loaders() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}: {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != GATE
        for line, name in loading_uses(path.read_text())
    ]
    assert offenders == [], "load through loopscope.families.hub instead"
    assert loading_uses(GATE.read_text()), "the gate itself must be where the calls are"


def _keywords(call: ast.Call, safe_load: dict[str, object]) -> dict[str, object]:
    """The constant keyword arguments of ``call``, ``**SAFE_LOAD`` expanded."""
    given: dict[str, object] = {}
    for keyword in call.keywords:
        if keyword.arg is None and isinstance(keyword.value, ast.Name):
            if keyword.value.id == "SAFE_LOAD":
                given.update(safe_load)
        elif isinstance(keyword.value, ast.Constant):
            given[str(keyword.arg)] = keyword.value.value
    return given


def test_every_gate_call_refuses_remote_code_and_the_network() -> None:
    from loopscope.families import hub

    assert hub.SAFE_LOAD == {"trust_remote_code": False, "local_files_only": True}
    calls = [
        node
        for node in ast.walk(ast.parse(GATE.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and _is_loading_name(getattr(node.func, "attr", getattr(node.func, "id", "")))
    ]
    assert len(calls) >= 3  # tokenizer, model, cache snapshot
    for call in calls:
        given = _keywords(call, hub.SAFE_LOAD)
        assert given.get("local_files_only") is True, ast.unparse(call)
        if isinstance(call.func, ast.Attribute) and call.func.attr == "from_pretrained":
            assert given.get("trust_remote_code") is False, ast.unparse(call)


# ------------------------------------------------------------------- a booby-trapped checkpoint
def _trap(marker: Path, what: str) -> str:
    """A module that leaves ``marker`` behind the moment anything imports it."""
    return (
        f'"""Custom {what} shipped with the checkpoint; importing it leaves a marker."""\n'
        "from pathlib import Path\n\n"
        f"Path({str(marker)!r}).write_text({what!r})\n"
    )


#: The tokenizer classes tokenizer_config.json names: one transformers ships (the tokenizer
#: loads, its custom code ignored), and one only the shipped code defines (loading is refused).
TOKENIZER_CLASSES = {
    "shipped-class": "PreTrainedTokenizerFast",
    "custom-only": "HuginnTokenizerFast",
}


def _word_tokenizer(directory: Path, vocab_size: int, tokenizer_class: str) -> None:
    """A word-level tokenizer made with the ``tokenizers`` library (BOS prepended), whose
    tokenizer_config.json also points AutoTokenizer at custom classes, as published
    checkpoints with their own tokenizer code do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "<s>": 1} | {f"w{i}": i + 2 for i in range(vocab_size - 2)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": "<s>",
        "unk_token": "[UNK]",
        "model_max_length": 32,
        "auto_map": {
            "AutoTokenizer": [
                "tokenization_huginn.HuginnTokenizer",
                "tokenization_huginn.HuginnTokenizerFast",
            ]
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module", params=sorted(TOKENIZER_CLASSES))
def trapped(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, bool]:
    """(checkpoint, marker, whether its tokenizer loads): the Huginn fixture's real weights
    and config.json, whose ``auto_map`` names modules that sit beside it, plus a tokenizer that
    names one more."""
    root = tmp_path_factory.mktemp(str(request.param))
    marker = root / "custom-code-ran"
    checkpoint = root / "huginn"
    shutil.copytree(FIXTURE, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    modules = {ref.split(".")[0] for ref in config["auto_map"].values()}
    assert modules == {"raven_config_minimal", "raven_modeling_minimal"}  # the published names
    for module in (*modules, "tokenization_huginn"):
        (checkpoint / f"{module}.py").write_text(_trap(marker, module))
    tokenizer_class = TOKENIZER_CLASSES[str(request.param)]
    _word_tokenizer(checkpoint, int(config["padded_vocab_size"]), tokenizer_class)
    return checkpoint, marker, request.param == "shipped-class"


def _isolated_env(root: Path) -> dict[str, str]:
    """No network, and Hugging Face caches (where remote code would be copied) inside ``root``."""
    env = dict(os.environ)
    env.update(HF_HOME=str(root / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _run(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        env=_isolated_env(root),
        cwd=root,
    )


def _assert_nothing_ran_or_asked(result: subprocess.CompletedProcess[str], marker: Path) -> None:
    output = result.stdout + result.stderr
    assert not marker.exists(), f"custom code ran ({marker.read_text()}):\n{output}"
    for question in QUESTIONS:
        assert question not in output, output
    assert "Traceback" not in output, output
    if result.returncode != 0:  # refusing is fine, with one clear line, the last one
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("loopscope: error:")]
        assert errors == lines[-1:], output


#: How loopscope refuses a tokenizer that only the checkpoint's own code could build.
REFUSAL = "loopscope never runs such code"


def test_load_reads_the_weights_and_never_imports_the_shipped_code(
    trapped: tuple[Path, Path, bool], capfd: pytest.CaptureFixture[str]
) -> None:
    import loopscope
    from loopscope.core.errors import CheckpointError
    from loopscope.families.table import tokenizer_for

    checkpoint, marker, tokenizer_loads = trapped
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        logits = loopscope.load(checkpoint)(ids, recurrences=2).logits
        original = loopscope.load(FIXTURE)(ids, recurrences=2).logits
    torch.testing.assert_close(logits, original, rtol=0, atol=0)
    if tokenizer_loads:  # the real path through transformers' tokenizer
        tokenizer = tokenizer_for(checkpoint)
        assert tokenizer.encode("w3 w7") == [1, 5, 9] and tokenizer.bos
    else:
        with pytest.raises(CheckpointError, match=REFUSAL) as err:
            tokenizer_for(checkpoint)
        assert "\n" not in str(err.value)
    assert not marker.exists()
    printed = "".join(capfd.readouterr())
    assert not any(question in printed for question in QUESTIONS), printed


def test_load_in_a_fresh_process_with_stdin_closed(trapped: tuple[Path, Path, bool]) -> None:
    checkpoint, marker, tokenizer_loads = trapped
    code = (
        "import sys, loopscope\n"
        "from loopscope.families.table import tokenizer_for\n"
        "model = loopscope.load(sys.argv[1])\n"
        "print(model.meta.layout)\n"
        "print(tokenizer_for(sys.argv[1]).encode('w1 w2'))\n"
    )
    result = _run([sys.executable, "-c", code, str(checkpoint)], checkpoint.parent)
    assert not marker.exists() and "(1, 2⊗l, 2)" in result.stdout, result.stderr
    for question in QUESTIONS:
        assert question not in result.stdout + result.stderr
    if tokenizer_loads:
        assert result.returncode == 0 and "[1, 3, 4]" in result.stdout, result.stderr
    else:
        assert result.returncode != 0 and REFUSAL in result.stderr


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("trace", ["--no-progress", "--stability-prompts", "0"]),
        ("analyze", ["--no-progress", "--stability-prompts", "0"]),
        ("stages", ["--no-progress"]),
        ("adaptive", []),
    ],
)
def test_commands_never_run_or_offer_to_run_the_shipped_code(
    trapped: tuple[Path, Path, bool], command: str, extra: list[str]
) -> None:
    checkpoint, marker, tokenizer_loads = trapped
    root = checkpoint.parent
    prompts = root / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4\nw5 w6 w7\n")
    out = root / f"out-{command}"
    args = [str(checkpoint), "--prompts", str(prompts), "--out", str(out), "--recurrences", "2"]
    cli = [sys.executable, "-m", "loopscope.cli.main", command, *args, *extra]
    result = _run(cli, root)
    _assert_nothing_ran_or_asked(result, marker)
    if tokenizer_loads:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 2 and REFUSAL in result.stderr, result.stderr


@pytest.mark.parametrize("source", ["/no-such-model", "./no/such", "~/no-such/model"])
def test_a_missing_path_is_reported_as_a_missing_path_not_as_a_hub_id(source: str) -> None:
    import loopscope
    from loopscope.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a local directory and not a hub id"):
        loopscope.load(source)


def test_an_org_name_pair_is_looked_up_in_the_local_cache_only() -> None:
    import loopscope
    from loopscope.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        loopscope.load("no-such-org/no-such-model")
