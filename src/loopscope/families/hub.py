"""The one gate between loopscope and the Hugging Face libraries.

Every call that makes transformers or huggingface_hub read a checkpoint (its tokenizer, its
weights, its config, its chat template, its place in the local cache) goes through a function
here, and each one passes ``trust_remote_code=False`` and ``local_files_only=True``. So no code
shipped with a checkpoint is ever imported, no network is ever touched, and no library ever
asks an interactive question (transformers asks only when ``trust_remote_code`` is left unset).
Keeping the calls in one file lets a test and a reviewer check that promise in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from loopscope.core.errors import CheckpointError

#: Keyword arguments every loading call into transformers gets.
SAFE_LOAD: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}


def _hf_extra_missing(what: str) -> CheckpointError:
    return CheckpointError(f"{what} needs the hf extra: pip install 'loopscope[hf]'")


def fetch_hint(repo_id: str) -> str:
    """How to get ``repo_id`` into the local cache once, on a machine with network."""
    return (
        f"fetch it once with `hf download {repo_id}` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id}`) and run again, or pass the directory"
    )


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` that is not an existing local path. An absolute, home or dot-relative path
    (``/x/y``, ``~/x``, ``./x``) is a path even when it does not exist, so that a mistyped
    directory is reported as a missing directory, not as a malformed repository id."""
    org, _, name = source.partition("/")
    return (
        source.count("/") == 1
        and bool(org)
        and bool(name)
        and not source.startswith((".", "~"))
        and not Path(source).expanduser().exists()
    )


def cached_snapshot(repo_id: str) -> Path:
    """The local-cache snapshot directory of ``repo_id``; never downloads."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise _hf_extra_missing(
            f"{repo_id!r} looks like a hub id; resolving it in the cache"
        ) from None
    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and loopscope never downloads; "
            + fetch_hint(repo_id)
        ) from err


def _one_line(err: Exception) -> str:
    """A library's message on one line: the command line reports each error as one line."""
    return " ".join(str(err).split())


def _refusal(directory: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{directory}: transformers cannot load this without running code shipped with the "
        f"checkpoint ({_one_line(err)}); loopscope never runs such code. Use a checkpoint whose "
        "classes transformers ships, or a loopscope family that reads this layout"
    )


def auto_tokenizer(directory: Path) -> Any:
    """The checkpoint's own tokenizer, from local files, with no remote code."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise _hf_extra_missing(f"{directory}'s own tokenizer") from None
    try:
        return AutoTokenizer.from_pretrained(str(directory), **SAFE_LOAD)
    except ValueError as err:
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise _refusal(directory, err) from None
        raise CheckpointError(
            f"{directory}: its tokenizer cannot be loaded: {_one_line(err)}"
        ) from None


def causal_lm(directory: Path, **options: Any) -> Any:
    """transformers' own ``AutoModelForCausalLM`` from safetensors, with no remote code."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise _hf_extra_missing(f"{directory}") from None
    from huggingface_hub.errors import StrictDataclassError  # a config field transformers refuses
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is a table; the error below is one line
    try:
        model, loaded = cast(Any, AutoModelForCausalLM).from_pretrained(
            str(directory),
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported (and refused) below, by name and shape
            **SAFE_LOAD,
            **options,
        )
    except StrictDataclassError as err:
        raise _unbuildable(directory, err) from err
    except ValueError as err:
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise _refusal(directory, err) from None
        raise _unbuildable(directory, err) from err
    except (TypeError, RuntimeError, ZeroDivisionError, KeyError, AttributeError) as err:
        if "out of memory" in str(err):  # the machine's limit, not the checkpoint's fault
            raise
        raise _unbuildable(directory, err) from err
    finally:
        hf_logging.set_verbosity(verbosity)
    _refuse_partial_load(directory, loaded)
    return model


def _refuse_partial_load(directory: Path, loaded: dict[str, Any]) -> None:
    """transformers fills a tensor the weights lack (or mis-shape) with random values and drops
    one they have in excess; loopscope refuses both, naming every such tensor."""
    parts = []
    if loaded.get("missing_keys"):
        parts.append(f"missing tensors: {', '.join(sorted(loaded['missing_keys']))}")
    if loaded.get("unexpected_keys"):
        parts.append(f"unexpected tensors: {', '.join(sorted(loaded['unexpected_keys']))}")
    if loaded.get("mismatched_keys"):
        shapes = sorted(
            f"{key}: checkpoint {tuple(found)} vs model {tuple(wanted)}"
            for key, found, wanted in loaded["mismatched_keys"]
        )
        parts.append(f"mis-shaped tensors: {'; '.join(shapes)}")
    if parts:
        raise CheckpointError(
            f"{directory} does not match its config.json — {' | '.join(parts)}. Check that "
            "config.json belongs to these weights"
        )


def _unbuildable(directory: Path, err: Exception) -> CheckpointError:
    """transformers could not build the model from the files: a config field of the wrong type
    or value, sizes that do not fit together, or weights that do not fit the config."""
    return CheckpointError(
        f"{directory}: transformers cannot build the model from its config.json and weights "
        f"({type(err).__name__}: {_one_line(err)}); correct that field of config.json (compare "
        "it with the model's published config.json) or download the checkpoint again"
    )


def chat_template_of(tokenizer: Any) -> str | None:
    """The chat template a loaded tokenizer carries (its Jinja source), None when it has none.
    A tokenizer with several named templates gives its ``default`` one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def render_chat_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` rendered by the tokenizer's own chat template as text, with the prompt
    that opens the assistant's turn. transformers renders templates in a sandboxed Jinja
    environment, so a template cannot run code; no file is read here."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # a template error is the checkpoint's, reported as one line
        raise CheckpointError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')} "
            f"fails on a {'/'.join(m['role'] for m in messages)} conversation "
            f"({type(err).__name__}: {_one_line(err)}); use --format raw"
        ) from None
    if not isinstance(text, str):
        raise CheckpointError("the chat template did not render to text; use --format raw")
    return text
