"""Composite checkpoints: several towers of known families in one file (CLIPModel: a vision and a text tower).

A composite descriptor (``architectures/*.toml`` with ``[[towers]]``) says which tensors and which config table
belong to which tower; each tower is then an ordinary canonical model of its own family.  ``load(src, tower=...)``
reads one, ``grow`` grows every tower and writes the composite again (``grow_composite``), ``convert`` rewrites it
(``convert_composite``).  Nothing here knows a family: only the descriptor's tables.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from .checkpoint import PlannedTensor, TensorReader, atomic_folder, carry_files, read_config, resolve_source
from .descriptors import _descriptor_data, data_dir
from .errors import LigoError


@dataclass(frozen=True)
class Tower:
    name: str
    family: str  # the descriptor that reads it
    config_key: str  # its table in the composite's config
    patterns: tuple[re.Pattern, ...]  # the tensor names it owns

    def owns(self, key: str) -> bool:
        return any(p.search(key) for p in self.patterns)


@dataclass(frozen=True)
class Composite:
    name: str
    title: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    towers: tuple[Tower, ...]
    shared_config: tuple[str, ...]  # top-level config keys every tower reads (they override the nested tables)
    shared_tensors: tuple[str, ...]  # tensors of the whole model, carried byte for byte
    path: Path

    @classmethod
    def from_data(cls, data: dict, path: Path) -> "Composite":
        towers = tuple(Tower(t["name"], t["family"], t["config"], tuple(re.compile(k) for k in t["keys"]))
                       for t in data["towers"])
        shared = data.get("shared", {})
        detect = data.get("detect", {})
        return cls(data["name"], data.get("title", data["name"]), tuple(detect.get("model_types", ())),
                   tuple(detect.get("architectures", ())), towers, tuple(shared.get("config", ())),
                   tuple(shared.get("tensors", ())), path)

    @property
    def tower_names(self) -> list[str]:
        return [t.name for t in self.towers]

    def matches(self, config: dict) -> bool:
        return config.get("model_type") in self.model_types or bool(
            set(config.get("architectures") or ()) & set(self.architectures))

    def tower(self, name: str) -> Tower:
        for t in self.towers:
            if t.name == name:
                return t
        raise LigoError(f"a {self.name} model has no tower {name!r}; choose {' or '.join(self.tower_names)}")

    def tower_config(self, config: dict, tower: Tower, where: str) -> dict:
        """The tower's own config: its nested table, with the composite's shared keys over it."""
        sub = config.get(tower.config_key)
        if not isinstance(sub, dict):
            raise LigoError(f"{where}: its config has no {tower.config_key!r} table (the {tower.name} tower's "
                            f"config); restore config.json")
        sub = copy.deepcopy(sub)
        for key in self.shared_config:
            if key in config:
                sub[key] = config[key]
        return sub

    def owner(self, key: str) -> Tower | None:
        return next((t for t in self.towers if t.owns(key)), None)


@lru_cache(maxsize=None)
def load_composites() -> dict[str, Composite]:
    out = {}
    for path in sorted(data_dir("architectures").glob("*.toml")):
        data = _descriptor_data(path)
        if "towers" in data:
            c = Composite.from_data(data, path)
            out[c.name] = c
    return out


def composite_of(config: dict, family: str | None = None) -> Composite | None:
    """The composite a config describes (or ``family`` names), or None for a single-tower model."""
    composites = load_composites()
    if family is not None:
        return composites.get(family)
    return next((c for c in composites.values() if c.matches(config)), None)


def composite_source(source) -> tuple[Composite, Path, dict] | None:
    """(composite, folder, config) when ``source`` (a folder, zoo name or hub id) is a composite checkpoint."""
    from .canonical import CanonicalModel

    if isinstance(source, CanonicalModel):
        return None
    folder = resolve_source(source)
    config = read_config(folder)
    comp = composite_of(config)
    return (comp, folder, config) if comp is not None else None


class TowerReader:
    """The tensors of one tower of a composite checkpoint: a view of the folder's :class:`TensorReader`."""

    def __init__(self, reader: TensorReader, tower: Tower):
        self.folder = reader.folder
        self._reader = reader
        self._keys = [k for k in reader.keys() if tower.owns(k)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def __getattr__(self, name):  # file_of, shape, dtype, nbytes, get: the folder's
        return getattr(self._reader, name)


def read_tower(comp: Composite, tower_name: str | None, folder: Path, config: dict, reader: TensorReader,
               strict: bool) -> tuple[str, dict, TowerReader]:
    """(family, config, reader) of one tower, for ``canonical.load``.  Tensors no tower owns are refused."""
    if tower_name is None:
        raise LigoError(f"{folder}: a {comp.title} checkpoint holds {len(comp.towers)} towers "
                        f"({', '.join(comp.tower_names)}); pass --tower {'|'.join(comp.tower_names)} to read one "
                        f"(grow and convert take the whole model)")
    tower = comp.tower(tower_name)
    if strict:
        stray = [k for k in reader.keys() if comp.owner(k) is None and k not in comp.shared_tensors]
        if stray:
            raise LigoError(f"{reader.file_of(stray[0])}: tensor {stray[0]} belongs to no tower of a {comp.name} "
                            f"model ({', '.join(comp.tower_names)}); remove it from the file")
    return tower.family, comp.tower_config(config, tower, str(folder)), TowerReader(reader, tower)


def load_towers(folder: Path, comp: Composite, strict: bool = True) -> dict:
    from .canonical import load

    return {t.name: load(folder, tower=t.name, strict=strict) for t in comp.towers}


# --- writing ----------------------------------------------------------------------------------------------------------


def save_composite(comp: Composite, towers: dict, source: Path, source_config: dict, out, *, dtype=None,
                   overwrite: bool = False, shard_size="5GB", extra_files: dict | None = None) -> Path:
    """Write ``towers`` (name -> canonical model) as one composite checkpoint in ``out``: every tower's tensors in
    its family's layout, the shared tensors of ``source`` carried, the config ``source_config`` with each tower's
    table rewritten; atomic, as ``canonical.save``."""
    from .canonical import planned_files
    from .checkpoint import write_sharded

    reader = TensorReader(source)
    planned, config, extra = [], copy.deepcopy(source_config), dict(extra_files or {})
    out_dtype = dtype
    for tower in comp.towers:
        model = towers[tower.name]
        tensors, written, more = planned_files(model, tower.family, dtype)
        planned += tensors
        out_dtype = out_dtype or model.dtype
        nested = source_config.get(tower.config_key) or {}
        for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):  # the composite's keys
            if key not in nested:
                written.pop(key, None)
        for key in comp.shared_config:  # the top-level value is the one read; the nested one stays as it was
            if key in nested:
                written[key] = nested[key]
            else:
                written.pop(key, None)
        config[tower.config_key] = written
        extra.update({f"{tower.name}.{name}": text for name, text in more.items()})
    for key in comp.shared_tensors:
        if key in reader.keys():
            key_dtype = dtype if dtype is not None and reader.dtype(key).is_floating_point else reader.dtype(key)
            planned.append(PlannedTensor(key, reader.shape(key), key_dtype,
                                         lambda key=key, d=key_dtype: reader.get(key).to(d)))
    for key in ("torch_dtype", "dtype"):
        if key in config and out_dtype is not None:
            config[key] = str(out_dtype).removeprefix("torch.")
    with atomic_folder(Path(out), overwrite=overwrite, protect=[source]) as tmp:
        write_sharded(tmp, planned, shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        carry_files(source, tmp)
        for name, text in extra.items():
            (tmp / name).write_text(text)
    return Path(out)


def convert_composite(source, out, *, dtype=None, overwrite: bool = False, shard_size="5GB") -> Path:
    """Rewrite a composite checkpoint (``convert`` without ``--tower``): every tower through its descriptor."""
    found = composite_source(source)
    if found is None:
        raise LigoError(f"{source}: not a composite checkpoint")
    comp, folder, config = found
    return save_composite(comp, load_towers(folder, comp), folder, config, out, dtype=dtype, overwrite=overwrite,
                          shard_size=shard_size)


# --- growing ----------------------------------------------------------------------------------------------------------


def tower_data(comp: Composite, data) -> dict:
    """Each tower's training data: ``data`` is None (each tower's embedded default), a dict tower -> data, or text
    ``"vision=images/,text=corpus.txt"`` (a tower left out takes its default)."""
    if data is None:
        return {}
    if isinstance(data, str):
        items = [part for part in data.split(",") if part]
        if not items or not all("=" in part for part in items):
            raise LigoError(f"--data {data}: a {comp.name} model has towers {', '.join(comp.tower_names)}; give each "
                            f"tower's data as {','.join(f'{n}=PATH' for n in comp.tower_names)}")
        data = dict(part.split("=", 1) for part in items)
    if not isinstance(data, dict):
        raise LigoError(f"a {comp.name} model takes its data per tower: a dict tower -> data")
    for name in data:
        comp.tower(name)
    return dict(data)


def target_towers(comp: Composite, target: str | None) -> dict[str, dict]:
    """tower -> sizes of the growth target: a zoo name of this composite, or a folder / hub id with its config."""
    from .descriptors import get_descriptor
    from .grow import sizes_from_config
    from .zoo import find_entry

    if target is None:
        raise LigoError(f"a {comp.title} grows into another one: name the target (zoo name, folder or hub id); "
                        f"each tower takes the target's sizes")
    entry = find_entry(str(target)) if not Path(str(target)).expanduser().exists() else None
    if entry is not None:
        if entry["family"] != comp.name:
            raise LigoError(f"{target}: a {entry['family']} model, not a {comp.name} model; name a {comp.name} "
                            f"target")
        return {t.name: dict(entry["towers"][t.name]) for t in comp.towers}
    folder = resolve_source(target)
    config = read_config(folder)
    if composite_of(config) is not comp:
        raise LigoError(f"{folder}: not a {comp.name} model (model_type {config.get('model_type')!r}); name a "
                        f"{comp.name} target")
    return {t.name: sizes_from_config(get_descriptor(t.family), comp.tower_config(config, t, str(folder)),
                                      f"{folder} ({t.config_key})") for t in comp.towers}


@dataclass
class CompositeResult:
    out: Path | None
    towers: dict  # tower -> GrowResult
    report: dict


def grow_composite(source, target, options) -> CompositeResult:
    """Grow every tower of a composite ``source`` into the composite ``target``'s sizes, with the same method and
    options, each on its own data; write one composite checkpoint.  All refusals come before any work."""
    from .canonical import load
    from .grow import _check_outputs, _name_of, fit_growth, initialise, plan_growth, write_growth
    from .growth.fit import distributed, resolve_device, world

    comp, folder, config = composite_source(source)
    o = options
    explicit = [k for k in ("layers", "width", "heads", "kv_heads", "mlp") if getattr(o, k) is not None]
    if explicit:
        raise LigoError(f"--{explicit[0].replace('_', '-')} sizes one model, but {_name_of(source)} is a "
                        f"{comp.title} with towers {', '.join(comp.tower_names)}; name a {comp.name} target "
                        f"instead (each tower takes its sizes)")
    if o.family not in (None, comp.name):
        raise LigoError(f"--to {o.family}: a {comp.name} model is written as {comp.name}")
    if o.operator is not None or o.save_operator is not None:
        raise LigoError(f"--operator/--save-operator hold one tower's operator; {_name_of(source)} has "
                        f"{len(comp.towers)} towers: grow without them")
    sizes = target_towers(comp, target)
    data = tower_data(comp, o.data)
    out = o.out
    if out is None and o.write:
        out = Path(f"{Path(str(target)).name}-from-{_name_of(source)}-{o.method}")
    _check_outputs(out if o.write else None, o, folder)
    plans = {}
    for tower in comp.towers:
        o_t = replace(o, data=data.get(tower.name), out=None, write=False)
        plans[tower.name] = plan_growth(load(folder, tower=tower.name), None, o_t, sizes=sizes[tower.name])
    dev = resolve_device(o.device)
    results = {}
    with distributed(dev):
        for tower in comp.towers:
            o.say(f"{tower.name} tower:")
            plan = plans[tower.name]
            growth = initialise(plan, dev)
            fit_growth(plan, growth, dev)
            results[tower.name] = write_growth(plan, growth, dev)
    report = {"source": str(folder), "source_family": comp.name, "target": str(target), "family": comp.name,
              "method": o.method, "towers": {name: r.report for name, r in results.items()}}
    written = None
    if world()[0] == 0 and o.write:
        from .canonical import from_tensors

        grown = {name: from_tensors(r.spec, r.weights, family=plans[name].src.family,
                                    config=plans[name].src.config, source=folder) for name, r in results.items()}
        written = save_composite(comp, grown, folder, config, out, dtype=o.dtype or _source_dtype(plans),
                                 overwrite=o.overwrite,
                                 extra_files={"growth.json": json.dumps(report, indent=2) + "\n"})
        o.say(f"wrote {written}")
    return CompositeResult(written, results, report)


def _source_dtype(plans: dict) -> torch.dtype:
    return next(iter(plans.values())).src.dtype or torch.float32


def describe_composite(source) -> dict:
    """What `inspect` prints for a composite read whole: each tower's summary and the shared tensors."""
    from .canonical import describe, load

    comp, folder, _ = composite_source(source)
    reader = TensorReader(folder)
    towers = {t.name: describe(load(folder, tower=t.name, strict=False)) for t in comp.towers}
    stray = [k for k in reader.keys() if comp.owner(k) is None and k not in comp.shared_tensors]
    return {"source": str(folder), "family": comp.name, "title": comp.title, "towers": towers,
            "shared": [k for k in comp.shared_tensors if k in reader.keys()], "unmapped": stray}
