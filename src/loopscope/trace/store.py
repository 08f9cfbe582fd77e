"""Reading a trace directory: its chunks, wherever they lie, opened lazily.

Layout (one chunk per prompt; arrays are ``.npy`` so they open lazily with ``mmap_mode="r"``)::

    TRACE/trace.json          format, model fingerprint, run settings, labelled dimensions
    TRACE/prompts.jsonl       every prompt's text and token count
    TRACE/prompt_00000/       one finished chunk (see :mod:`loopscope.trace.writer`)
    TRACE/prompt_00001.partial/   a chunk being written (or left by a killed run): never read

A sharded run (:mod:`loopscope.trace.sharding`) writes the same chunks, keyed by the same prompt
index, under ``TRACE/shards/shard_<first>-<last>/prompt_NNNNN/``; readers see the top level and
every shard as one trace.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loopscope.engine.contract import LoopedLM
from loopscope.trace.settings import TraceError

FORMAT = "loopscope-trace/1"
SHARDS_DIR = "shards"
#: Suffix of a chunk directory still being written; renamed away when the chunk is complete.
PARTIAL = ".partial"
_CHUNK_RE = re.compile(r"prompt_(\d{5,})")


def chunk_name(index: int) -> str:
    """The directory name of prompt ``index``'s finished chunk."""
    return f"prompt_{index:05d}"


def model_fingerprint(model: LoopedLM) -> dict[str, Any]:
    """Identity of a model for trace compatibility: its metadata, a weight checksum and the
    dtype it runs in (another dtype gives other numbers, so a trace is not resumed in one).
    The device is not part of it: the same weights in the same dtype on another device may
    finish a trace, and ``trace.json`` records the device separately, under ``runtime``."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().float().flatten()
        digest.update(flat[:: max(1, flat.numel() // 64)].cpu().numpy().tobytes())
    return {
        "meta": asdict(model.meta),
        "weights_sha256": digest.hexdigest()[:16],
        "dtype": model_dtype(model),
    }


def model_dtype(model: LoopedLM) -> str:
    """The dtype of the model's floating-point weights, by torch's name (``bfloat16``)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return str(tensor.dtype).removeprefix("torch.")
    return "float32"


#: How states are stored on disk: float32 and float16 as themselves, bfloat16 (which numpy
#: lacks) as its raw 16 bits in a uint16 array.
STORED_STATE_DTYPES = ("float32", "float16", "bfloat16")


def stored_states(array: np.ndarray, state_dtype: str) -> np.ndarray:
    """``array`` (float32) in the form ``state_dtype`` is stored on disk."""
    if state_dtype == "float16":
        return array.astype(np.float16)
    if state_dtype == "bfloat16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        # round to nearest even on the 16 bits dropped (NaN stays NaN: its high bits are kept)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        keep = np.where(np.isnan(array), bits, rounded)
        return (keep >> np.uint32(16)).astype(np.uint16)
    return np.asarray(array, dtype=np.float32)


def read_states(array: np.ndarray) -> np.ndarray:
    """A stored state array as float32, what every measurement computes in (float32 arrays
    stay memory-mapped; a float16 or bfloat16 one is widened in memory)."""
    if array.dtype == np.uint16:
        return (np.asarray(array).astype(np.uint32) << np.uint32(16)).view(np.float32)
    if array.dtype == np.float16:
        return np.asarray(array, dtype=np.float32)
    return array


def chunk_paths(out: str | Path) -> dict[int, Path]:
    """Finished chunks by prompt index: the top level first, then every shard in name order
    (a prompt found twice keeps its first place). Unfinished ``.partial`` chunks never match."""
    root = Path(out)
    dirs = [root]
    shards = root / SHARDS_DIR
    if shards.is_dir():
        dirs += sorted(d for d in shards.iterdir() if d.is_dir())
    found: dict[int, Path] = {}
    for directory in dirs:
        with os.scandir(directory) as entries:
            for entry in entries:
                match = _CHUNK_RE.fullmatch(entry.name)
                if match and entry.is_dir():
                    found.setdefault(int(match.group(1)), Path(entry.path))
    return found


@dataclass
class PromptTrace:
    """One prompt's chunk; arrays open lazily (memory-mapped) on first access."""

    path: Path
    text: str
    _cache: dict[str, Any] = field(default_factory=dict)

    def array(self, name: str) -> np.ndarray | None:
        file = self.path / f"{name}.npy"
        if not file.exists():
            return None
        return read_states(np.load(file, mmap_mode="r"))

    @property
    def tokens(self) -> np.ndarray:
        arr = self.array("tokens")
        assert arr is not None
        return np.asarray(arr)

    @property
    def block(self) -> np.ndarray | None:
        return self.array("block")

    @property
    def attn(self) -> np.ndarray | None:
        return self.array("attn")

    @property
    def summary(self) -> dict[str, np.ndarray]:
        if "summary" not in self._cache:
            with np.load(self.path / "summary.npz") as data:
                self._cache["summary"] = {k: data[k] for k in data.files}
        return dict(self._cache["summary"])

    @property
    def stages(self) -> dict[str, Any]:
        return dict(json.loads((self.path / "stages.json").read_text()))

    @property
    def stability(self) -> dict[str, Any] | None:
        file = self.path / "stability.json"
        return json.loads(file.read_text()) if file.exists() else None


class TraceStore:
    """A trace directory opened for reading."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = self.path / "trace.json"
        if not meta.exists():
            raise TraceError(f"{self.path} is not a loopscope trace (no trace.json)")
        self.header: dict[str, Any] = json.loads(meta.read_text())
        if self.header.get("format") != FORMAT:
            raise TraceError(f"{self.path}: unsupported trace format {self.header.get('format')}")
        lines = (self.path / "prompts.jsonl").read_text().splitlines()
        self.texts = [json.loads(line)["text"] for line in lines if line.strip()]
        self._found: dict[int, Path] = {}

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.header["model"]["meta"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.header["settings"])

    def _chunks(self) -> dict[int, Path]:
        """Rescanned on every call (a trace being written grows); remembered for lookups."""
        self._found = {i: p for i, p in chunk_paths(self.path).items() if i < len(self.texts)}
        return self._found

    def completed(self) -> list[int]:
        return sorted(self._chunks())

    def __len__(self) -> int:
        return len(self._chunks())

    def prompt(self, index: int) -> PromptTrace:
        """One prompt's chunk, wherever it lies (top level or a shard)."""
        path = self.path / chunk_name(index)
        if not path.is_dir():
            path = self._found.get(index, path)
        if not path.is_dir():
            path = self._chunks().get(index, path)
        if not path.is_dir() or not 0 <= index < len(self.texts):
            raise TraceError(f"prompt {index} has not been traced yet in {self.path}")
        return PromptTrace(path, self.texts[index])

    def __iter__(self) -> Iterator[PromptTrace]:
        chunks = self._chunks()
        for index in sorted(chunks):
            yield PromptTrace(chunks[index], self.texts[index])

    def check_model(self, model: LoopedLM) -> None:
        """Refuse to mix a trace with a different model."""
        if self.header["model"] != model_fingerprint(model):
            raise TraceError(
                f"{self.path} was traced with another model "
                f"({self.header['model']['meta'].get('name')}); use a fresh directory"
            )
