"""The canonical model: a spec, canonical tensors, and where they came from.  ``load`` reads any supported
checkpoint into it; ``save`` writes it out in any family's layout."""

from __future__ import annotations

import collections.abc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .checkpoint import (PlannedTensor, TensorReader, atomic_folder, carry_files, carry_sentence_transformers,
                         read_config, resolve_source, write_sharded)
from .descriptors import QUANTISATION_SUFFIXES, Descriptor, Mapping, detect_family, get_descriptor, shape_to_disk
from .errors import LigoError
from .spec import Spec


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or infinity: one min/max pass (NaN propagates through both), without the
    tensor-sized mask of ``isfinite(t).all()``, which made that check most of a conversion's time.  float32/64 go
    through numpy, whose reductions run on the calling thread: torch's thread pool costs milliseconds per call
    when the cores are busy, ten times the work itself (benchmarks/convert_io.py)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in (torch.float32, torch.float64) and t.device.type == "cpu":
        a = t.detach().numpy()
        return bool(np.isfinite(a.min())) and bool(np.isfinite(a.max()))
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class LazyTensors(collections.abc.Mapping):
    """Canonical tensors read from a checkpoint on first use, checked to be finite, never all held at once."""

    def __init__(self, reader: TensorReader, mapping: Mapping, check_finite: bool = True):
        self.reader = reader
        self.locations = mapping.locations
        self.check_finite = check_finite
        self._last: tuple[str, torch.Tensor] | None = None  # fused tensors feed several names in a row

    def __getitem__(self, name: str) -> torch.Tensor:
        loc = self.locations[name]
        if self._last is not None and self._last[0] == loc.key:
            disk = self._last[1]
        else:
            disk = self.reader.get(loc.key)
            if self.check_finite and not all_finite(disk):
                raise LigoError(f"{self.reader.file_of(loc.key)}: tensor {loc.key} has NaN or infinite values; "
                                f"the checkpoint is damaged — use an earlier copy")
            self._last = (loc.key, disk) if loc.fused else None
        return loc.extract(disk)

    def __iter__(self):
        return iter(self.locations)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self.locations

    def __len__(self):
        return len(self.locations)

    def meta(self, name: str) -> tuple[tuple, torch.dtype]:
        loc = self.locations[name]
        return loc.canonical_shape(self.reader.shape(loc.key)), self.reader.dtype(loc.key)


@dataclass
class CanonicalModel:
    """A model in canonical form.  ``tensors`` maps canonical names to tensors (possibly read lazily)."""

    spec: Spec
    tensors: collections.abc.Mapping
    family: str
    config: dict = field(default_factory=dict)  # the config it was read from, in its family's terms
    source: Path | None = None
    mapping: Mapping | None = None
    reader: TensorReader | None = None

    def meta(self, name: str) -> tuple[tuple, torch.dtype]:
        if hasattr(self.tensors, "meta"):  # lazy mappings (read from disk, or made by growth) answer without reading
            return self.tensors.meta(name)
        t = self.tensors[name]
        return tuple(t.shape), t.dtype

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the first canonical tensor present (None if none is: an incomplete checkpoint)."""
        name = next((n for n in self.spec.tensor_names() if n in self.tensors), None)
        return self.meta(name)[1] if name is not None else None

    def materialize(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every canonical tensor in memory (optionally cast)."""
        out = {}
        for name in self.spec.tensor_names():
            t = self.tensors[name]
            out[name] = t.to(dtype) if dtype is not None else t.clone()
        return out

    def parameter_count(self) -> int:
        return self.spec.parameter_count()

    def report(self) -> dict:
        """The mapping report: every source tensor and the canonical name(s) it feeds, plus what was dropped,
        left unmapped, or is missing."""
        if self.mapping is None:
            return {}
        by_key = self.mapping.by_key()
        expected = set(self.spec.tensor_names()) if self.spec else set()
        rows = []
        for key in self.reader.keys():
            rows.append({"key": key, "shape": list(self.reader.shape(key)), "dtype": str(self.reader.dtype(key))
                         .removeprefix("torch."), "canonical": sorted(by_key.get(key, []))})
        return {
            "prefix": self.mapping.prefix,
            "tensors": rows,
            "dropped": self.mapping.dropped,
            "unmapped": self.mapping.unmapped,
            "unsupported": [{"key": k, "feature": f} for k, f in self.mapping.unsupported],
            "missing": sorted(expected - set(self.mapping.locations)),
            "renamed": self.mapping.renamed,
        }


def load(source, family: str | None = None, strict: bool = True, tower: str | None = None) -> CanonicalModel:
    """Read a checkpoint (folder, zoo name or hub id) into canonical form.

    With ``strict`` (the default) unmapped, missing or mis-shaped tensors raise :class:`LigoError`; ``inspect``
    passes ``strict=False`` to report them instead.  A composite checkpoint (CLIPModel: several towers in one
    file, ``ligo_convert.composite``) is read one ``tower`` at a time.
    """
    from .composite import composite_of, read_tower

    folder = resolve_source(source)
    config = read_config(folder)
    reader = TensorReader(folder)
    comp = composite_of(config, family)  # None for a single model, or a family that is not a composite
    if comp is not None:
        family, config, reader = read_tower(comp, tower, folder, config, reader, strict)
    elif tower is not None:
        raise LigoError(f"{folder}: --tower {tower}: this checkpoint is one model, not a composite of towers; "
                        f"leave --tower out")
    keys = reader.keys()
    for key in keys:
        if key.endswith(QUANTISATION_SUFFIXES):
            raise LigoError(f"{reader.file_of(key)}: tensor {key} is a quantisation side tensor; ligo-convert "
                            f"needs unquantised weights — dequantise the checkpoint first")
    descriptor = get_descriptor(family) if family else detect_family(config, keys, str(folder))
    mapping = descriptor.match(keys)
    if mapping.unsupported and strict:
        key, feature = mapping.unsupported[0]
        raise LigoError(f"{reader.file_of(key)}: tensor {key} belongs to {feature}, which ligo-convert does not "
                        f"support for {descriptor.name}; use a checkpoint without it")
    if mapping.unmapped and strict:
        n = len(mapping.unmapped)
        raise LigoError(f"{reader.file_of(mapping.unmapped[0])}: tensor {mapping.unmapped[0]} "
                        f"{'(and ' + str(n - 1) + ' more) ' if n > 1 else ''}is not part of a {descriptor.name} "
                        f"model; run `ligo-convert inspect` to list them, or remove them from the file")
    where = {name: loc.key for name, loc in mapping.locations.items()}
    for key in mapping.locations.values():
        dtype = reader.dtype(key.key)
        if not dtype.is_floating_point:
            raise LigoError(f"{reader.file_of(key.key)}: tensor {key.key} is {dtype}, not floating point; "
                            f"quantised or integer weights cannot be grown — dequantise first")
    try:
        descriptor.resolve_locations(mapping, config)
        shapes = {name: loc.canonical_shape(reader.shape(loc.key)) for name, loc in mapping.locations.items()}
        spec = descriptor.infer_spec(config, shapes, where)
    except LigoError as e:  # these name tensors or config keys: say which checkpoint they are in
        raise LigoError(str(e) if str(e).startswith(str(folder)) else f"{folder}: {e}") from None
    model = CanonicalModel(spec, LazyTensors(reader, mapping), descriptor.name, config, folder, mapping, reader)
    if strict:
        check_complete(model, descriptor)
    return model


def check_complete(model: CanonicalModel, descriptor: Descriptor) -> None:
    spec = model.spec
    present = set(model.mapping.locations)
    for name in spec.tensor_names():
        if name not in present:
            layout = descriptor.file_layout([name], model.mapping.prefix)
            raise LigoError(f"{model.source}: tensor {next(iter(layout))} is missing (a {descriptor.name} model "
                            f"with this config needs it); the checkpoint is incomplete")
        shape, _ = model.meta(name)
        if tuple(shape) != spec.shape_of(name):
            key = model.mapping.locations[name].key
            raise LigoError(f"{model.source}: tensor {key} has shape {tuple(shape)}, expected "
                            f"{spec.shape_of(name)} from the config")
    extra = sorted(present - set(spec.tensor_names()))
    if extra:
        key = model.mapping.locations[extra[0]].key
        raise LigoError(f"{model.source}: tensor {key} does not fit this {descriptor.name} config; remove it or fix "
                        f"the config")


def from_tensors(spec: Spec, tensors: dict[str, torch.Tensor], family: str, config: dict | None = None,
                 source: Path | None = None) -> CanonicalModel:
    """A canonical model from tensors in memory (e.g. a grown model)."""
    return CanonicalModel(spec, tensors, family, dict(config or {}), source)


def save(model: CanonicalModel, out, family: str | None = None, dtype: torch.dtype | None = None,
         shard_size: int | str = "5GB", overwrite: bool = False, extra_files: dict[str, str] | None = None,
         progress: Callable[[int], None] | None = None,
         progress_total: Callable[[int], None] | None = None, allow_eps_change: bool = False) -> Path:
    """Write ``model`` to folder ``out`` in ``family``'s layout (default: the family it came from), atomically.

    ``progress_total(n)`` is called once with the number of file tensors to write, then ``progress(k)`` as ``k``
    more are written (e.g. a tqdm bar's ``total`` and ``update``).  ``allow_eps_change``: a family that fixes the
    norm epsilon (timm's ViT: 1e-6) may hold a model with another one; the output difference that causes is
    measured (:func:`measure_eps_change`) and written to ``conversion.json``."""
    planned, config, more = planned_files(model, family, dtype, allow_eps_change)
    extra_files = {**(extra_files or {}), **more}
    protect = [model.source] if model.source is not None else []
    if progress_total:
        progress_total(len(planned))
    with atomic_folder(Path(out), overwrite=overwrite, protect=protect) as tmp:
        write_sharded(tmp, planned, shard_size, progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if model.source is not None:
            carry_files(model.source, tmp)
            carry_sentence_transformers(model.source, tmp, model.spec.width)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def planned_files(model: CanonicalModel, family: str | None = None, dtype: torch.dtype | None = None,
                  allow_eps_change: bool = False) -> tuple[list[PlannedTensor], dict, dict[str, str]]:
    """What :func:`save` writes, planned: the file tensors (made as they are written), the config, and extra
    files (``conversion.json`` where the family's norm epsilon replaces the model's)."""
    extra_files = {}
    descriptor = get_descriptor(family or model.family)
    spec = model.spec
    reason = descriptor.supports(spec)
    if reason:
        changed = with_family_eps(descriptor, spec)
        if changed is None:
            raise LigoError(f"cannot write this model as {descriptor.name}: {reason}")
        if not allow_eps_change:
            raise LigoError(f"cannot write this model as {descriptor.name}: {reason}; pass --allow-eps-change to "
                            f"write it with norm_eps={changed.norm_eps:g} and record the output difference")
        report = measure_eps_change(model, changed)
        extra_files[CONVERSION_FILE] = json.dumps(report, indent=2) + "\n"
        spec = changed
    same_family = descriptor.name == model.family
    arch = descriptor.architecture_for(spec)
    if same_family and model.mapping is not None:
        prefix = model.mapping.prefix  # keep the source's own key names
    else:
        prefix = arch.prefix if arch else descriptor.prefixes[0]
    layout = descriptor.file_layout(spec.tensor_names(), prefix, arch)
    planned = [_plan(model, key, entries, dtype) for key, entries in layout.items()]
    if same_family and model.mapping is not None and model.reader is not None and unchanged(model):
        # buffers and tied copies the source stored (position_ids, decoder.weight...): carry them byte for byte
        for key in model.mapping.dropped:
            src_dtype = model.reader.dtype(key)
            # float copies (tied decoders) follow the requested dtype; index buffers keep theirs
            key_dtype = dtype if dtype is not None and src_dtype.is_floating_point else src_dtype
            planned.append(PlannedTensor(key, model.reader.shape(key), key_dtype,
                                         lambda key=key, d=key_dtype: model.reader.get(key).to(d)))
    out_dtype = dtype or model.dtype
    # a model made in memory has no source config ({}): start from the family template then
    config = descriptor.write_config(spec, (model.config or None) if same_family else None, out_dtype)
    return planned, config, extra_files


# A grown tensor whose rows can be made apart (a vocabulary table, W_src[i:j] B^T) is written in blocks of rows of
# about this many fp32 bytes: writing never holds the whole (vocab x width) table (1.5 GB fp32 for a 128k x 3072
# target).  Blocks of thousands of rows give the same bytes as the whole product on the CPU.
WRITE_BLOCK_BYTES = 32 * 2**20

CONVERSION_FILE = "conversion.json"  # what a conversion changed beyond the layout (a norm epsilon) and its effect


def with_family_eps(descriptor, spec: Spec) -> Spec | None:
    """``spec`` with the norm epsilon ``descriptor`` fixes, when that epsilon is all that keeps the family from
    holding the model; else None (also used by ``grow --allow-eps-change``)."""
    wanted = descriptor.spec_constants.get("norm_eps")
    if wanted is None or spec.norm_eps == wanted:
        return None
    changed = spec.replace(norm_eps=wanted)
    return changed if descriptor.supports(changed) is None else None


@torch.no_grad()
def measure_eps_change(model: CanonicalModel, changed: Spec, batch: int = 4, seq: int = 16) -> dict:
    """How much the canonical forward's output moves when ``model`` runs with ``changed``'s norm epsilon: the
    largest absolute difference of its logits (else last hidden states) on random inputs (seed 0)."""
    from .export import example_inputs
    from .model import forward

    spec = model.spec
    if spec.input == "tokens" and spec.max_positions:
        seq = max(1, min(seq, spec.max_positions - spec.position_offset))
    inputs = example_inputs(spec, batch, None if spec.input == "patches" else seq)
    weights = model.materialize(torch.float32)
    before, after = forward(spec, weights, **inputs), forward(changed, weights, **inputs)
    key = "logits" if "logits" in before else "hidden"
    return {"norm_eps": {"from": spec.norm_eps, "to": changed.norm_eps}, "measured_on": key,
            "max_abs_diff": float((before[key] - after[key]).abs().max()),
            "max_abs_output": float(before[key].abs().max()),
            "inputs": f"{batch} random {'images' if spec.input == 'patches' else f'sequences of {seq} tokens'}, "
                      f"seed 0"}


def unchanged(model: CanonicalModel) -> bool:
    """True when the model is still exactly what was read (no growth), so the source's extra keys still fit."""
    return isinstance(model.tensors, LazyTensors)


def _plan(model: CanonicalModel, key: str, entries, dtype) -> PlannedTensor:
    metas = [model.meta(name) for name, _ in entries]
    out_dtype = dtype or metas[0][1]
    first = entries[0][1].resolved(model.spec.to_dict())
    disk_shapes = [shape_to_disk(shape, loc.transform) for (shape, _), (_, loc) in zip(metas, entries)]
    shape = list(disk_shapes[0])
    if first.fused:
        shape[first.axis] = sum(s[first.axis] for s in disk_shapes)
        entries = sorted(entries, key=lambda e: e[1].index)

    # tensors read lazily were checked as they were read; tensors made in memory (growth) are checked here
    checked = isinstance(model.tensors, LazyTensors) and model.tensors.check_finite

    def ready(t: torch.Tensor) -> torch.Tensor:
        if not checked and not all_finite(t):
            raise LigoError(f"tensor {key} ({', '.join(n for n, _ in entries)}) has NaN or infinite values; "
                            f"nothing was written")
        if t.dtype != out_dtype:
            t = t.to(out_dtype)
            if not all_finite(t):  # finite before the cast: the values overflow the smaller dtype
                raise LigoError(f"tensor {key} has values too large for {str(out_dtype).removeprefix('torch.')}; "
                                f"nothing was written — choose bfloat16 or float32")
        return t

    def make():
        from .descriptors import to_disk

        parts = [to_disk(model.tensors[name], loc.transform) for name, loc in entries]
        return ready(first.fuse(parts) if first.fused else parts[0])

    if hasattr(model.tensors, "row_blocks") and len(entries) == 1 and entries[0][1].transform is None and shape:
        # a grown tensor whose rows can be made a block at a time (a vocabulary table): never formed whole
        rows = max(1, WRITE_BLOCK_BYTES // max(1, math.prod(shape[1:]) * 4))
        return PlannedTensor(key, tuple(shape), out_dtype, pieces=lambda: (
            ready(block) for block in model.tensors.row_blocks(entries[0][0], rows)))
    return PlannedTensor(key, tuple(shape), out_dtype, make)


def describe(model: CanonicalModel) -> dict:
    """What `inspect` prints: family, spec, parameter count, mapping report."""
    return {
        "source": str(model.source) if model.source else None,
        "family": model.family,
        "spec": model.spec.to_dict(),
        "parameters": model.parameter_count(),
        "dtype": str(model.dtype).removeprefix("torch.") if model.dtype is not None else None,
        "mapping": model.report(),
        "version": __version__,
    }
