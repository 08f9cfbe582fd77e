"""Loading checkpoints safely: safetensors only (never pickle, never code shipped with weights),
with errors that list exactly which tensors are missing, unexpected or mis-shaped.

Every family loader takes the same steps through this module: :func:`recognised_config`
(config.json parsed and recognised as the family's), :class:`ConfigFields` under
:func:`naming_the_file` (typed field reads with the family's defaults, so a wrong field is
named with the file, the value it needs and the fix), and :func:`load_weights` (tensors read,
checked against the model, and loaded). :func:`read_family_checkpoint` takes the first two steps
and lists the weight files in one call."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from loopscope.core.errors import CheckpointError

#: A family's parsed config type (what its ``*_config_from_dict`` returns).
ConfigT = TypeVar("ConfigT")

PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "consolidated.00.pth")
BUNDLED = {
    "demo": "demo-looped",
    "demo-looped": "demo-looped",
    "demo-feedforward": "demo-feedforward",
}


def read_config(directory: str | Path, what: str) -> tuple[Path, dict[str, Any]]:
    """``directory/config.json`` parsed: (its path, its object). Every loader starts here, so
    a missing, malformed or non-object config.json gets one clear error naming the file;
    ``what`` completes "is this ... checkpoint directory?" (e.g. "a raven")."""
    config_path = Path(directory) / "config.json"
    if not config_path.exists():
        raise CheckpointError(
            f"{Path(directory)} has no config.json; is this {what} checkpoint directory?"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{config_path} is not valid JSON (line {err.lineno}, column {err.colno}: "
            f"{err.msg}); repair it or copy the checkpoint's config.json again"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{config_path} must hold a JSON object of config fields, got {type(raw).__name__}"
        )
    _check_identity_fields(config_path, raw)
    return config_path, raw


def _check_identity_fields(config_path: Path, raw: Mapping[str, Any]) -> None:
    """``model_type`` (a string) and ``architectures`` (a list of strings), which every family
    detector reads before any loader runs, so that a wrong one is named, not a TypeError."""
    model_type, archs = raw.get("model_type"), raw.get("architectures")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(
            f'{config_path}: model_type must be a string such as "llama", got {model_type!r}; '
            "copy the checkpoint's config.json again"
        )
    if archs is not None and not (
        isinstance(archs, list) and all(isinstance(a, str) for a in archs)
    ):
        raise CheckpointError(
            f"{config_path}: architectures must be a list of class names such as "
            f'["LlamaForCausalLM"], got {archs!r}; copy the checkpoint\'s config.json again'
        )


def bundled_model_dir(name: str) -> Path:
    """Directory of a model shipped inside the package."""
    folder = BUNDLED[name]
    return Path(str(resources.files("loopscope") / "assets" / "models" / folder))


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: those the shard index names, else every one present.
    A directory with only pickle files is refused: unpickling can run arbitrary code."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index} names shards that are not there: {', '.join(absent)}")
        return files
    files = sorted(f for f in directory.glob("*.safetensors") if f.name != "optimizer.safetensors")
    if files:
        return files
    pickles = sorted(
        {n for n in PICKLE_NAMES if (directory / n).exists()}
        | {f.name for pattern in ("*.bin", "*.pt", "*.pth") for f in directory.glob(pattern)}
    )
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle-format weights ({', '.join(pickles)}); loopscope never "
            "unpickles checkpoints because unpickling can run arbitrary code. Convert them once "
            "with safetensors (e.g. `safetensors.torch.save_file(torch.load(path, "
            "weights_only=True), 'model.safetensors')`) and load the directory again"
        )
    raise CheckpointError(f"{directory} contains no *.safetensors weights")


def read_tensors(
    source: Path | Sequence[Path],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    exact: Collection[str] = (),
) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory (or of the given files), cast to ``dtype`` one at
    a time as it is read, so a bf16 load never holds an fp32 copy. Tensors named in ``exact``
    are copied uncast: a view into the memory map would keep its whole shard resident."""
    files = weight_files(source) if isinstance(source, Path) else list(source)
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = handle.get_tensor(key)
                    if key in exact:
                        tensor = tensor.clone()
                    elif dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    tensors[key] = tensor
        except (SafetensorError, OSError) as err:
            raise _unreadable(file, err) from None
    return tensors


def _unreadable(file: Path, err: Exception) -> CheckpointError:
    """A weights file safetensors cannot parse: cut short or damaged, most likely."""
    return CheckpointError(
        f"{file} is not a readable safetensors file ({err}); it is probably truncated or "
        "damaged: download or copy it again"
    )


#: How many names of each kind an error lists: a wrong width mis-shapes every tensor, and a
#: one-line error of sixty names hides the few that say what is wrong.
_NAMES_SHOWN = 8


def _first(names: Sequence[str], separator: str) -> str:
    """The first ``_NAMES_SHOWN`` of ``names`` and how many more there are."""
    shown = separator.join(names[:_NAMES_SHOWN])
    rest = len(names) - _NAMES_SHOWN
    return f"{shown}{separator}… and {rest} more" if rest > 0 else shown


def check_tensors(expected: dict[str, torch.Size], found: dict[str, Tensor], source: str) -> None:
    """Raise one error naming every missing, unexpected, mis-shaped and non-float tensor (every
    weight of every family is floating point; an integer one would be cast silently)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    not_float = sorted(
        f"{k} ({str(found[k].dtype).removeprefix('torch.')})"
        for k in set(expected) & set(found)
        if not found[k].is_floating_point()
    )
    if missing or unexpected or misshaped or not_float:
        parts = [f"non-float tensors: {_first(not_float, ', ')}"] if not_float else []
        if missing:
            parts.append(f"missing tensors: {_first(missing, ', ')}")
        if unexpected:
            parts.append(f"unexpected tensors: {_first(unexpected, ', ')}")
        if misshaped:
            parts.append(f"mis-shaped tensors: {_first(misshaped, '; ')}")
        raise CheckpointError(
            f"{source} does not match its config.json — "
            + " | ".join(parts)
            + ". Check that config.json belongs to these weights."
        )


def expected_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Parameter names and shapes, one name per shared (tied) tensor."""
    seen: set[int] = set()
    shapes: dict[str, torch.Size] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        shapes[name] = tensor.shape
    return shapes


def parameter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Parameter names and shapes, a tied (shared) parameter under its first name only. Unlike
    :func:`expected_shapes` it works on the meta device, where every tensor has address 0."""
    return {name: p.shape for name, p in model.named_parameters()}


def tensor_names(files: Sequence[Path]) -> list[str]:
    """The tensor names stored in ``files``, without reading any tensor."""
    names: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                names.extend(handle.keys())
        except (SafetensorError, OSError) as err:
            raise _unreadable(file, err) from None
    return names


def load_weights(
    model: nn.Module,
    files: Sequence[Path],
    *,
    source: str,
    dtype: torch.dtype | None,
    device: str | torch.device,
    expected: Mapping[str, torch.Size] | None = None,
    tied: Collection[str] = (),
    set_aside: Mapping[str, torch.Size] | None = None,
    tidy: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """Read ``files`` into ``model`` after checking every name and shape; the one weight loader
    of every family.

    Tensors are cast to ``dtype`` as they are read and placed on ``device``. ``tidy`` first
    removes what the family knows to be harmless leftovers; names in ``tied`` are dropped (the
    model re-ties them to the tensor they share); names in ``set_aside`` are optional tensors
    that are not parameters (a stored rotary table): read uncast, checked against their
    shapes and returned instead of loaded. ``expected`` defaults to the model's parameters.
    One error (naming ``source``) lists every missing, unexpected and mis-shaped tensor. A
    model built on the meta device takes the tensors as its parameters, so memory holds one
    copy; a materialised one copies them in."""
    aside_shapes = dict(set_aside or {})
    tensors = read_tensors(files, dtype, device, exact=set(aside_shapes))
    if tidy is not None:
        tidy(tensors)
    for name in tied:
        tensors.pop(name, None)
    aside = {name: tensors.pop(name) for name in aside_shapes if name in tensors}
    wanted = dict(parameter_shapes(model) if expected is None else expected)
    wanted.update({name: aside_shapes[name] for name in aside})
    check_tensors(wanted, {**tensors, **aside}, source)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(tensors, strict=False, assign=on_meta)  # names checked just above
    return aside


def recognised_config(
    directory: Path, what: str, detect: Callable[[Mapping[str, Any]], bool]
) -> tuple[Path, dict[str, Any]]:
    """:func:`read_config`, refused unless ``detect`` accepts it as this family's config.
    ``what`` is "a raven", "an Ouro", … as in :func:`read_config`."""
    config_path, raw = read_config(directory, what)
    if not detect(raw):
        raise CheckpointError(
            f"{config_path} is not {what} config (model_type {raw.get('model_type')!r}, "
            f"architectures {raw.get('architectures')})"
        )
    return config_path, raw


@contextlib.contextmanager
def naming_the_file(config_path: Path) -> Iterator[None]:
    """Turn a ValueError raised while a config is read (a field of the wrong type or value,
    sizes that do not fit together) into a CheckpointError that starts with the file's path."""
    try:
        yield
    except ValueError as err:  # CheckpointError included: it gains the path too
        raise CheckpointError(f"{config_path}: {err}") from err


def read_family_checkpoint(
    directory: Path,
    what: str,
    detect: Callable[[Mapping[str, Any]], bool],
    parse: Callable[[dict[str, Any], str], ConfigT],
) -> tuple[ConfigT, list[Path]]:
    """The steps a family loader starts with: the config.json this family recognises, parsed by
    ``parse(raw, name)`` with errors that name the file (``name`` is the config's own ``name``
    field, else the directory's), then the checkpoint's weight files."""
    config_path, raw = recognised_config(directory, what, detect)
    with naming_the_file(config_path):
        config = parse(raw, raw.get("name") or directory.name)
    return config, weight_files(directory)


class TiedHeadModel(Protocol):
    """A family model whose output head may share the token embedding's tensor."""

    def expected_tensors(self) -> dict[str, torch.Size]: ...

    def tie_weights(self) -> None: ...

    def eval(self) -> Any: ...


TiedModelT = TypeVar("TiedModelT", bound=TiedHeadModel)


def load_tied_head_model(
    build: Callable[[], TiedModelT],
    files: Sequence[Path],
    *,
    source: str,
    dtype: torch.dtype,
    device: str | torch.device,
    tie_word_embeddings: bool,
) -> TiedModelT:
    """Build the model on the meta device (no memory, no init), take the checkpoint's tensors
    as its parameters (``lm_head.weight`` is not expected when the head is tied to the
    embedding), tie the head and switch to eval mode."""
    with torch.device("meta"):
        model = build()
    load_weights(
        cast(nn.Module, model),
        files,
        source=source,
        dtype=dtype,
        device=device,
        expected=model.expected_tensors(),
        tied=("lm_head.weight",) if tie_word_embeddings else (),
    )
    model.tie_weights()
    model.eval()
    return model


_ABSENT = object()


@dataclass(frozen=True)
class ConfigFields:
    """Typed reads of config.json fields, shared by the family loaders.

    A field that is absent or null takes the family's default (from ``defaults``, or the one a
    read passes); ``aliases`` maps other names the authors' config class accepts to ours. A
    value of the wrong type, a non-positive size or an absent field without a default raises
    a CheckpointError naming the field, what it must be and what was found (the loader adds
    the file's path)."""

    raw: Mapping[str, Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    prefix: str = ""

    def _named(self, key: str) -> tuple[str, Any]:
        """(the name the file uses for ``key``, its value or _ABSENT)."""
        names = [key, *(alias for alias, canonical in self.aliases.items() if canonical == key)]
        for name in names:
            if self.raw.get(name) is not None:
                return name, self.raw[name]
        return key, _ABSENT

    def _read(self, key: str, default: Any, expected: str) -> tuple[str, Any]:
        name, value = self._named(key)
        if value is _ABSENT:
            value = self.defaults.get(key) if default is _ABSENT else default
            if value is None:
                raise CheckpointError(
                    f"config.json has no {self.prefix}{key}; add it ({expected}, the value "
                    "the weights were trained with)"
                )
        return name, value

    def _refuse(self, name: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(
            f"{self.prefix}{name} must be {expected}, got {value!r} ({type(value).__name__}); "
            f"set it in config.json to {expected}, the value the weights were trained with"
        )

    def value(self, key: str, default: Any = _ABSENT) -> Any:
        """The raw value (any type), else the default."""
        return self._read(key, default, "a value")[1]

    def integer(self, key: str, default: Any = _ABSENT, *, minimum: int = 1) -> int:
        """An integer ≥ ``minimum`` (1: a size or count; 0: a layer count that may be empty)."""
        expected = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        name, value = self._read(key, default, expected)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._refuse(name, value, expected)
        return value

    def number(self, key: str, default: Any = _ABSENT, *, positive: bool = False) -> float:
        """A finite number (``positive``: > 0, as an epsilon or a rotary base must be)."""
        expected = "a positive number" if positive else "a finite number"
        name, value = self._read(key, default, expected)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or (positive and value <= 0):
            raise self._refuse(name, value, expected)
        return float(value)

    def flag(self, key: str, default: Any = _ABSENT) -> bool:
        name, value = self._read(key, default, "true or false")
        if not isinstance(value, bool):
            raise self._refuse(name, value, "true or false")
        return value

    def text(self, key: str, default: Any = _ABSENT) -> str:
        name, value = self._read(key, default, "a string")
        if not isinstance(value, str):
            raise self._refuse(name, value, "a string")
        return value

    def section(self, key: str) -> ConfigFields:
        """The nested object ``key`` (absent: empty), its fields named ``key.field``."""
        name, value = self._named(key)
        if value is _ABSENT:
            value = {}
        if not isinstance(value, Mapping):
            raise self._refuse(name, value, "a JSON object")
        return ConfigFields(value, prefix=f"{self.prefix}{name}.")

    def present(self, key: str) -> bool:
        """Whether the file sets ``key`` (or an alias of it) to something other than null."""
        return self._named(key)[1] is not _ABSENT

    def head_size(self, width_key: str, heads_key: str) -> int:
        """width / heads, refused unless the heads divide the width into whole heads."""
        width, heads = self.integer(width_key), self.integer(heads_key)
        if width % heads:
            width_name, heads_name = self._named(width_key)[0], self._named(heads_key)[0]
            raise CheckpointError(
                f"{self.prefix}{width_name} = {width} is not divisible by "
                f"{self.prefix}{heads_name} = {heads}: every attention head needs the same whole "
                "number of channels; set both in config.json to the values the weights were "
                "trained with"
            )
        return width // heads
