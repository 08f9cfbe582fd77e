"""Tracing: run a model over prompts and write one chunked, resumable trace directory.

Layout (one chunk per prompt; arrays are ``.npy`` so they open lazily with ``mmap_mode="r"``)::

    TRACE/trace.json          format, model fingerprint, run settings, labelled dimensions
    TRACE/prompt_00000/       written under a temporary name, renamed when complete
        tokens.npy            (T,) token ids
        block.npy             (R, L, T, D) residual stream after each block layer  [full capture]
        prelude.npy, coda.npy (layers, T, D)                                       [full capture]
        attn.npy              (R, L, H, T, T) attention probabilities      [full capture + attn]
        summary.npz           online reductions (successive differences, norms, distances to
                              the fixed point, attention changes, divergent tokens)
        stages.json           stages-of-inference profile of this prompt
        stability.json        spectral radii at the fixed point (first prompts only)

An interrupted run resumes at the first prompt without a finished chunk; a directory traced
with another model or other settings is refused rather than mixed.

A sharded run (:mod:`loopscope.trace.sharding`) writes the same chunks, keyed by the same prompt
index, under ``TRACE/shards/shard_<first>-<last>/prompt_NNNNN/``; readers see the top level and
every shard as one trace, and ``*.partial`` directories are never part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loopscope.engine.contract import LoopedLM
from loopscope.engine.loop import ContextLengthError, EditPlan, block_step, prelude_output
from loopscope.engine.probes import CaptureProbe, DynamicsProbe, DynamicsSummary
from loopscope.engine.sites import Site

FORMAT = "loopscope-trace/1"
SHARDS_DIR = "shards"
_CHUNK_RE = re.compile(r"prompt_(\d{5,})")
DIMS = {
    "tokens": ["token"],
    "block": ["recurrence", "layer", "token", "hidden"],
    "prelude": ["layer", "token", "hidden"],
    "coda": ["layer", "token", "hidden"],
    "attn": ["recurrence", "layer", "head", "query", "key"],
    "fixed_point": ["layer", "token", "hidden"],
}


class TraceError(ValueError):
    """A trace that cannot be written or read as asked."""


@dataclass(frozen=True)
class TraceSettings:
    """What to run and what to keep. ``positions``: "all", "last" or explicit indices;
    ``layers``: block layers to keep (None = all); ``keep_recurrences``: recurrences whose
    states are stored (None = all; the online reductions still cover every recurrence, and the
    report then uses them); ``capture``: "full" writes states,
    "summary" keeps only online reductions (then a second pass measures distances to the
    fixed point). Attention is kept for the first ``attention_recurrences`` recurrences and the
    last one. ``fixed_point``: the reference X* the distances are measured against — the state
    after the last recurrence ("last", the study's choice) or the fixed point of the block map
    solved by Anderson acceleration to ``fixed_point_tol`` ("anderson"), mixing
    ``fixed_point_memory`` past steps with relaxation ``fixed_point_beta`` (memory 20 and β 2
    need ~1.7× fewer block applications on slowly contracting pre-norm stacks; the defaults
    are the safer choice for sandwich and Ouro norms, see ``benchmarks/fixed_point.py``)."""

    recurrences: int = 64
    init_state: str | None = None
    seed: int = 0
    positions: str | list[int] = "all"
    layers: list[int] | None = None
    keep_recurrences: list[int] | None = None
    capture: str = "full"
    attention: bool = True
    attention_recurrences: int = 16
    stability_prompts: int = 2
    stability_iters: int = 40
    state_dtype: str = "float32"
    fixed_point: str = "last"
    fixed_point_tol: float = 1e-5
    fixed_point_memory: int = 5
    fixed_point_beta: float = 1.0

    def validate(self, model: LoopedLM) -> None:
        if self.capture not in ("full", "summary"):
            raise TraceError(f"capture must be 'full' or 'summary', got {self.capture!r}")
        if self.recurrences < 2:
            raise TraceError("recurrences must be ≥ 2 to measure any dynamics")
        k = model.meta.block_layers
        late = [r for r in self.keep_recurrences or [] if not 0 <= r < self.recurrences]
        if late:
            raise TraceError(
                f"recurrences to keep {late} lie outside 0..{self.recurrences - 1}; pass "
                "indices below --recurrences"
            )
        bad = [layer for layer in self.layers or [] if not 0 <= layer < k]
        if bad:
            raise TraceError(
                f"unknown block layer index {bad}: {model.meta.name or model.meta.family} has "
                f"{k} block layers (0..{k - 1})"
            )
        if self.state_dtype not in ("float16", "float32"):
            raise TraceError("state_dtype must be 'float16' or 'float32'")
        if self.fixed_point not in ("last", "anderson"):
            raise TraceError(
                f"fixed_point must be 'last' (the state after the last recurrence) or "
                f"'anderson' (solved with Anderson acceleration), got {self.fixed_point!r}"
            )
        if not self.fixed_point_tol > 0:
            raise TraceError(f"fixed_point_tol must be > 0, got {self.fixed_point_tol}")
        if self.fixed_point_memory < 1:
            raise TraceError(
                f"fixed_point_memory (past steps Anderson mixes) must be ≥ 1, "
                f"got {self.fixed_point_memory}"
            )
        if not self.fixed_point_beta > 0:
            raise TraceError(
                f"fixed_point_beta (Anderson's relaxation) must be > 0, got {self.fixed_point_beta}"
            )


@dataclass
class PromptInput:
    text: str
    ids: list[int]


def model_fingerprint(model: LoopedLM) -> dict[str, Any]:
    """Identity of a model for trace compatibility: its metadata and a weight checksum."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().float().flatten()
        digest.update(flat[:: max(1, flat.numel() // 64)].cpu().numpy().tobytes())
    return {"meta": asdict(model.meta), "weights_sha256": digest.hexdigest()[:16]}


def _positions(settings: TraceSettings, length: int) -> list[int] | None:
    if settings.positions == "all":
        return None
    if settings.positions == "last":
        return [length - 1]
    if isinstance(settings.positions, list):
        bad = [p for p in settings.positions if not -length <= p < length]
        if bad:
            raise TraceError(f"token positions {bad} lie outside a prompt of {length} tokens")
        return [p % length for p in settings.positions]
    raise TraceError(f"positions must be 'all', 'last' or a list of ints, got {settings.positions}")


def _attention_kept(settings: TraceSettings) -> list[int]:
    """The first ``attention_recurrences`` recurrences plus the last (the fixed-point
    reference for attention distances)."""
    first = list(range(min(settings.attention_recurrences, settings.recurrences)))
    return sorted(set(first) | {settings.recurrences - 1})


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True))
    os.replace(tmp, path)


def _chunk_name(index: int) -> str:
    return f"prompt_{index:05d}"


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


def _summary_arrays(summary: DynamicsSummary) -> dict[str, np.ndarray]:
    return {k: v for k, v in asdict(summary).items() if v is not None}


# -- writing ------------------------------------------------------------------------------


def _open_trace_dir(out: Path, header: dict[str, Any]) -> None:
    """Create the directory or check that it holds a trace of the same model and settings."""
    meta_path = out / "trace.json"
    if meta_path.exists():
        existing = json.loads(meta_path.read_text())
        for key in ("format", "model", "settings", "prompts_sha256"):
            if existing.get(key) != header.get(key):
                raise TraceError(
                    f"{out} already holds a trace with a different {key} "
                    f"({existing.get(key)!r} vs {header.get(key)!r}); choose another --out "
                    "directory, or delete it to start afresh"
                )
        return
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(meta_path, header)


def _prompts_digest(prompts: Sequence[PromptInput]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps(p.ids).encode())
    return digest.hexdigest()[:16]


def trace_header(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    settings: TraceSettings,
    *,
    tokenizer_name: str = "byte",
    bos: bool = True,
) -> dict[str, Any]:
    """Check the settings and prompts against the model and return the ``trace.json`` header
    (the same whether one process or many trace the prompts)."""
    settings.validate(model)
    if not prompts:
        raise TraceError("no prompts to trace: the prompt file is empty")
    for index, prompt in enumerate(prompts):
        if len(prompt.ids) > model.meta.context_length:
            raise ContextLengthError(
                f"prompt {index} has {len(prompt.ids)} tokens but the model's context is "
                f"{model.meta.context_length}; shorten it or remove it from the prompt file"
            )
        if not prompt.ids:
            raise TraceError(f"prompt {index} is empty after tokenisation")
    return {
        "format": FORMAT,
        "model": model_fingerprint(model),
        "settings": asdict(settings),
        "tokenizer": {"name": tokenizer_name, "bos": bos},
        "prompts_sha256": _prompts_digest(prompts),
        "n_prompts": len(prompts),
        "dims": DIMS,
    }


def open_trace(out: Path, header: dict[str, Any], prompts: Sequence[PromptInput]) -> None:
    """Create ``out`` (or check it holds the same trace) and write the prompt list."""
    _open_trace_dir(out, header)
    (out / "prompts.jsonl").write_text(
        "".join(json.dumps({"text": p.text, "n_tokens": len(p.ids)}) + "\n" for p in prompts)
    )


def trace_prompts(
    model: LoopedLM,
    prompts: Sequence[PromptInput],
    out_dir: str | Path,
    settings: TraceSettings,
    *,
    tokenizer_name: str = "byte",
    bos: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    edit_plan: EditPlan | None = None,
) -> TraceStore:
    """Trace every prompt into ``out_dir`` (resuming where a previous run stopped).

    ``edit_plan`` applies interventions while tracing; ``stop_after`` ends after that many
    new prompts (what an interrupted run looks like, for tests)."""
    from tqdm.auto import tqdm

    header = trace_header(model, prompts, settings, tokenizer_name=tokenizer_name, bos=bos)
    out = Path(out_dir)
    open_trace(out, header, prompts)
    done = 0
    finished = chunk_paths(out)
    todo = [i for i in range(len(prompts)) if i not in finished]
    model.eval()
    bar = tqdm(
        total=len(prompts), initial=len(prompts) - len(todo), disable=not progress, desc="trace"
    )
    try:
        for index in todo:
            if stop_after is not None and done >= stop_after:
                break
            _trace_one(model, prompts[index], out, index, settings, edit_plan)
            done += 1
            bar.update(1)
    finally:
        bar.close()
    return TraceStore(out)


def _trace_one(
    model: LoopedLM,
    prompt: PromptInput,
    out: Path,
    index: int,
    settings: TraceSettings,
    edit_plan: EditPlan | None = None,
) -> None:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=device)
    keep = _positions(settings, len(prompt.ids))
    capture = None
    if settings.capture == "full":
        capture = CaptureProbe(
            positions=keep,
            layers=settings.layers,
            recurrences=settings.keep_recurrences,
            attention=settings.attention,
            attention_recurrences=_attention_kept(settings),
            dtype=torch.float16 if settings.state_dtype == "float16" else torch.float32,
        )
    from loopscope.analysis.stages import StagesAccumulator

    stages = StagesAccumulator()
    dynamics = DynamicsProbe(
        settings.recurrences, model.meta.block_layers, track_attention=settings.attention
    )
    probes: list[Any] = [dynamics, stages] + ([capture] if capture is not None else [])
    with torch.no_grad():
        model(
            ids,
            recurrences=settings.recurrences,
            init_state=settings.init_state,
            seed=settings.seed,
            probes=probes,
            return_attn=settings.attention,
            edit_plan=edit_plan,
        )
    summary = dynamics.result()
    solved = None
    if settings.fixed_point == "anderson":
        solved = solve_reference(model, ids, settings, edit_plan)
    if settings.capture == "summary":
        summary = _second_pass(model, ids, settings, edit_plan, solved)
    chunk = out / (_chunk_name(index) + ".partial")
    if chunk.exists():
        shutil.rmtree(chunk)
    chunk.mkdir()
    np.save(chunk / "tokens.npy", np.asarray(prompt.ids, dtype=np.int64))
    if solved is not None:
        reference = solved[0].float().cpu().numpy()
        if settings.layers is not None:
            reference = reference[settings.layers]
        if keep is not None:
            reference = reference[:, keep]
        np.save(chunk / "fixed_point.npy", reference)
        _atomic_json(chunk / "fixed_point.json", solved[1])
    if capture is not None:
        for stage in ("prelude", "block", "coda"):
            np.save(chunk / f"{stage}.npy", capture.stage_array(stage))
        if settings.keep_recurrences is not None:
            np.save(chunk / "block_recurrences.npy", np.asarray(sorted(settings.keep_recurrences)))
        attn = capture.attention_array()
        if attn is not None:
            np.save(chunk / "attn.npy", attn)
            np.save(chunk / "attn_recurrences.npy", np.asarray(_attention_kept(settings)))
    save_npz: Any = np.savez  # numpy's stub mistypes **arrays
    save_npz(chunk / "summary.npz", **_summary_arrays(summary))
    _atomic_json(chunk / "stages.json", stages.result().to_dict())
    if index < settings.stability_prompts:
        record = stability_at_fixed_point(model, ids, settings)
        if capture is not None:
            record["attention_bound"] = attention_bound_terms(model, ids, capture, settings)
        _atomic_json(chunk / "stability.json", record)
    os.replace(chunk, out / _chunk_name(index))


def _final_layer_states(
    model: LoopedLM, ids: Tensor, settings: TraceSettings, edit_plan: EditPlan | None
) -> Tensor:
    """Per-layer states (L, T, D) at the last recurrence: the approximate fixed point X*."""
    capture = CaptureProbe(recurrences=[settings.recurrences - 1])
    with torch.no_grad():
        model(
            ids,
            recurrences=settings.recurrences,
            init_state=settings.init_state,
            seed=settings.seed,
            probes=[capture],
            edit_plan=edit_plan,
        )
    return torch.from_numpy(capture.stage_array("block")[0]).to(ids.device)


def solve_reference(
    model: LoopedLM, ids: Tensor, settings: TraceSettings, edit_plan: EditPlan | None
) -> tuple[Tensor, dict[str, Any]]:
    """Per-layer fixed point (L, T, D) from the block map's fixed point z* = F(z*), found by
    Anderson acceleration: one more recurrence from z* gives every layer's X*."""
    from loopscope.analysis.fixed_point import block_map, solve_fixed_point

    if edit_plan is not None:
        raise TraceError("fixed_point='anderson' cannot be combined with interventions yet")
    f, z0 = block_map(model, ids, init_state=settings.init_state, seed=settings.seed)  # type: ignore[arg-type]
    result = solve_fixed_point(
        f,
        z0,
        tol=settings.fixed_point_tol,
        max_iter=500,
        memory=settings.fixed_point_memory,
        beta=settings.fixed_point_beta,
    )
    capture = CaptureProbe()
    inputs, positions = prelude_output(model, ids)
    state = model.inject(result.state, inputs)
    with torch.no_grad():
        for site_layer, layer in enumerate(model.block):
            state, _ = layer(state, positions)
            capture.observe(Site("block", site_layer, 0, site_layer), state, None)
    info = {
        "method": result.method,
        "memory": settings.fixed_point_memory,
        "beta": settings.fixed_point_beta,
        "block_applications": result.iterations,
        "relative_residual": result.residual,
        "converged": result.converged,
        "drifting": result.drifting,
        "fell_back": result.fell_back,
    }
    return torch.from_numpy(capture.stage_array("block")[0]).to(ids.device), info


def _second_pass(
    model: LoopedLM,
    ids: Tensor,
    settings: TraceSettings,
    edit_plan: EditPlan | None,
    solved: tuple[Tensor, dict[str, Any]] | None = None,
) -> DynamicsSummary:
    """Distances to the fixed point without storing states: one pass finds X* (unless it was
    solved for), the next measures every recurrence against it."""
    if solved is not None:
        reference = solved[0]
    else:
        reference = _final_layer_states(model, ids, settings, edit_plan)
    probe = DynamicsProbe(
        settings.recurrences,
        model.meta.block_layers,
        reference=reference,
        track_attention=settings.attention,
    )
    with torch.no_grad():
        model(
            ids,
            recurrences=settings.recurrences,
            init_state=settings.init_state,
            seed=settings.seed,
            probes=[probe],
            return_attn=settings.attention,
            edit_plan=edit_plan,
        )
    return probe.result()


def stability_at_fixed_point(
    model: LoopedLM, ids: Tensor, settings: TraceSettings
) -> dict[str, Any]:
    """Spectral radius of the whole block map and of each block layer's Jacobian at the
    approximate fixed point reached after ``settings.recurrences`` recurrences."""
    from loopscope.analysis.stability import spectral_radius

    with torch.no_grad():
        inputs, positions = prelude_output(model, ids)
        out = model(
            ids,
            recurrences=settings.recurrences,
            init_state=settings.init_state,
            seed=settings.seed,
        )
    z_star = out.state[0]
    x = inputs[0]

    def block_map(z: Tensor) -> Tensor:
        return block_step(model, z[None], x[None], positions)[0]

    whole = spectral_radius(block_map, z_star, iters=settings.stability_iters, seed=settings.seed)
    layer_inputs = [model.inject(z_star[None], x[None])]
    with torch.no_grad():
        for layer in list(model.block)[:-1]:
            layer_inputs.append(layer(layer_inputs[-1], positions)[0])
    per_layer = []
    for j, layer in enumerate(model.block):

        def layer_map(z: Tensor, layer: Any = layer) -> Tensor:
            return layer(z[None], positions)[0][0]

        est = spectral_radius(
            layer_map,
            layer_inputs[j][0],
            iters=settings.stability_iters,
            seed=settings.seed + j + 1,
        )
        per_layer.append(asdict(est))
    return {"block": asdict(whole), "layers": per_layer}


def attention_bound_terms(
    model: LoopedLM, ids: Tensor, capture: CaptureProbe, settings: TraceSettings
) -> list[dict[str, Any]] | None:
    """Per block layer, what Proposition 4.2 compares: the attention input's step norms
    ‖X_r − X_{r−1}‖_F, the attention maps' step norms (mean over heads), the input bound B
    (largest token norm of the attention input) and κ = max_h ‖W_Q^h W_Kᵀ^h‖₂."""
    from loopscope.analysis.dynamics import kappa_from_weights

    kept = _attention_kept(settings)
    attn = capture.attention_array()
    block = capture.stage_array("block")
    if (
        attn is None
        or block.ndim != 4
        or settings.layers is not None
        or settings.positions != "all"
        or settings.keep_recurrences is not None
    ):
        return None
    steps = [r for r in range(1, len(kept)) if kept[r] == kept[r - 1] + 1]
    if not steps or model.attention_weights(0) is None:
        return None
    with torch.no_grad():
        inputs, _ = prelude_output(model, ids)
        generator = torch.Generator(device=ids.device).manual_seed(settings.seed)
        mode = settings.init_state or model.meta.default_init_state
        init = model.initial_state(inputs, mode, generator, model.init_std)  # type: ignore[arg-type]
    states = torch.from_numpy(block).to(inputs.device, inputs.dtype)
    terms = []
    for layer in range(model.meta.block_layers):
        weights = model.attention_weights(layer)
        assert weights is not None
        with torch.no_grad():
            x_in = [
                _layer_input(model, states, inputs[0], init[0], kept[r], layer)
                for r in range(len(kept))
            ]
            att_in = [weights.input_map(x[None])[0].float() for x in x_in]
        kappa = kappa_from_weights(
            weights.w_q.detach().float().cpu().numpy(),
            weights.w_k.detach().float().cpu().numpy(),
            weights.n_heads,
            weights.n_kv_heads,
        )
        terms.append(
            {
                "layer": layer,
                "recurrences": [kept[r] for r in steps],
                "input_steps": [float((att_in[r] - att_in[r - 1]).norm()) for r in steps],
                "attention_steps": [
                    float(
                        np.sqrt(
                            ((attn[r, layer] - attn[r - 1, layer]) ** 2).sum(axis=(-2, -1))
                        ).mean()
                    )
                    for r in steps
                ],
                "bound_B": float(max(float(a.norm(dim=-1).max()) for a in att_in)),
                "kappa": float(kappa.max()),
                "d_head": int(weights.w_q.shape[1] // weights.n_heads),
            }
        )
    return terms


def _layer_input(
    model: LoopedLM, states: Tensor, inputs: Tensor, init: Tensor, recurrence: int, layer: int
) -> Tensor:
    """The residual stream entering block ``layer`` at ``recurrence``, rebuilt from the
    captured states (layer 0 sees the injected state of the previous recurrence)."""
    if layer > 0:
        return states[recurrence, layer - 1]
    previous = (
        init if recurrence == 0 else model.recurrence_norm(states[recurrence - 1, -1][None])[0]
    )
    return model.inject(previous[None], inputs[None])[0]


# -- reading ------------------------------------------------------------------------------


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
        return np.load(file, mmap_mode="r")

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
        path = self.path / _chunk_name(index)
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
