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
from typing import Any

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
    """``org/name`` that is not an existing local path."""
    return source.count("/") == 1 and not Path(source).expanduser().exists()


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


def _refusal(directory: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{directory}: transformers cannot load this without running code shipped with the "
        f"checkpoint ({err}); loopscope never runs such code. Use a checkpoint whose classes "
        "transformers ships, or a loopscope family that reads this layout"
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
        raise CheckpointError(f"{directory}: its tokenizer cannot be loaded: {err}") from None


def causal_lm(directory: Path, **options: Any) -> Any:
    """transformers' own ``AutoModelForCausalLM`` from safetensors, with no remote code."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise _hf_extra_missing(f"{directory}") from None
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(directory), use_safetensors=True, **SAFE_LOAD, **options
        )
    except ValueError as err:
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise _refusal(directory, err) from None
        raise
