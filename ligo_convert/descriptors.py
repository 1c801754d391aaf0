"""Architecture descriptors: the data files in ``architectures/`` that hold all family knowledge.

A descriptor says, for one family, which on-disk tensor name holds each canonical tensor (with the base-model prefix
``{p}`` and layer index ``{i}``), which tensors are stored transposed or fused, which keys are buffers to drop, how
config keys map to :class:`~ligo_convert.spec.Spec` fields, and which model class to name when writing.  This module
is the only code that reads those files; it holds no knowledge of any particular family.
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .errors import LigoError
from .exprs import Unresolved, evaluate
from .spec import CANONICAL, Spec, pattern_of, spaces, space_kind


def data_dir(name: str) -> Path:
    """``architectures`` or ``zoo``: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"ligo-convert's data folder {name!r} is missing; reinstall the package")


# Tensors that quantisation tools add beside weights.  They have no meaning for growth, so we refuse them.
QUANTISATION_SUFFIXES = ("weight_scale_inv", ".SCB", "_scale", ".absmax", ".quant_map", ".quant_state", ".g_idx",
                         ".qweight", ".qzeros", ".scales")

# --- transforms between the on-disk layout and the canonical one ----------------------------------------------------


def to_canonical(t: torch.Tensor, transform: str | None) -> torch.Tensor:
    if transform is None:
        return t
    if transform == "transpose":  # e.g. GPT-2 Conv1D stores (in, out)
        return t.t()
    if transform == "lead1":  # e.g. ViT position table stored as (1, N, D)
        return t.reshape(t.shape[1:])
    raise ValueError(f"unknown transform {transform!r}")


def to_disk(t: torch.Tensor, transform: str | None) -> torch.Tensor:
    if transform is None:
        return t
    if transform == "transpose":
        return t.t().contiguous()
    if transform == "lead1":
        return t.unsqueeze(0)
    raise ValueError(f"unknown transform {transform!r}")


def shape_to_canonical(shape: tuple, transform: str | None) -> tuple:
    if transform == "transpose":
        return tuple(reversed(shape))
    if transform == "lead1":
        return tuple(shape[1:])
    return tuple(shape)


def shape_to_disk(shape: tuple, transform: str | None) -> tuple:
    if transform == "transpose":
        return tuple(reversed(shape))
    if transform == "lead1":
        return (1, *shape)
    return tuple(shape)


# --- where each canonical tensor lives on disk -----------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where one canonical tensor is stored: a whole file tensor, or part ``index`` of ``parts`` along ``axis``."""

    key: str
    transform: str | None = None
    index: int = 0
    parts: int = 1
    axis: int = 0

    @property
    def fused(self) -> bool:
        return self.parts > 1

    def extract(self, disk: torch.Tensor) -> torch.Tensor:
        t = disk.chunk(self.parts, dim=self.axis)[self.index] if self.fused else disk
        return to_canonical(t, self.transform)

    def canonical_shape(self, disk_shape: tuple) -> tuple:
        shape = list(disk_shape)
        if self.fused:
            if shape[self.axis] % self.parts:
                raise LigoError(f"fused tensor {self.key} has {shape[self.axis]} rows along axis {self.axis}, "
                                f"not divisible into {self.parts} equal parts")
            shape[self.axis] //= self.parts
        return shape_to_canonical(tuple(shape), self.transform)


@dataclass
class Mapping:
    """The result of matching a file's keys to canonical names."""

    prefix: str
    locations: dict[str, Location]  # canonical name -> where it is
    dropped: list[str]  # buffers and tied copies the family stores but the model does not need
    unmapped: list[str]  # keys nobody claimed
    renamed: dict[str, str] = field(default_factory=dict)  # file key -> the key it was read as (aliases)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (file key, what feature it belongs to)

    def by_key(self) -> dict[str, list[str]]:
        """file key -> canonical names it feeds."""
        out: dict[str, list[str]] = {}
        for name, loc in self.locations.items():
            out.setdefault(loc.key, []).append(name)
        return out


def _regex(pattern: str, prefix: str) -> re.Pattern:
    """A file-name pattern with ``{p}`` and ``{i}`` as a regex capturing the layer."""
    text = re.escape(pattern.replace("{p}", prefix)).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile("^" + text + "$")


def _layer_name(canonical_pattern: str, layer: str | None) -> str:
    return canonical_pattern.replace("{i}", layer) if layer is not None else canonical_pattern


# --- config <-> spec -------------------------------------------------------------------------------------------------


def _get_path(config: dict, path: str):
    node = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            return None
        node = node[part]
    return node


def _set_path(config: dict, path: str, value, only_if_missing: bool = False):
    parts = path.split(".")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if only_if_missing and node.get(parts[-1]) is not None:
        return
    node[parts[-1]] = value


@dataclass
class ConfigField:
    """How one spec field is stored in the family's config: one or more keys, an optional value map, a format."""

    keys: list[str]
    values: dict | None = None  # config value -> spec value (first entry wins when writing)
    format: str | None = None  # "id2label" (dict of str(int) -> name) or "list"

    @classmethod
    def parse(cls, raw) -> "ConfigField":
        if isinstance(raw, str):
            return cls([raw])
        if isinstance(raw, list):
            return cls(list(raw))
        keys = raw["key"]
        return cls(keys if isinstance(keys, list) else [keys], raw.get("values"), raw.get("format"))

    def read(self, config: dict):
        for key in self.keys:
            value = _get_path(config, key)
            if value is None:
                continue
            if self.format == "id2label":
                return [value[k] for k in sorted(value, key=int)]
            if self.values is not None:
                if value not in self.values:
                    raise LigoError(f"config key {key}={value!r} is not supported "
                                    f"(supported: {', '.join(map(str, self.values))})")
                return self.values[value]
            return value
        return None

    def write(self, config: dict, value) -> None:
        if self.values is not None:
            inverse = {}
            for raw, canonical in self.values.items():
                inverse.setdefault(canonical, raw)
            if value not in inverse:
                raise LigoError(f"config key {self.keys[0]} cannot express {value!r}")
            value = inverse[value]
        for key in self.keys:
            if self.format == "id2label":
                _set_path(config, key, {str(i): label for i, label in enumerate(value)})
                _set_path(config, "label2id", {label: i for i, label in enumerate(value)})
            else:
                _set_path(config, key, value)


# Which spec field a width space measures.  q/k/v are measured as flat widths (heads x head_dim).
_MEASURES = {
    "residual": "width",
    "mlp": "mlp",
    "vocab": "vocab_size",
    "types": "type_vocab_size",
    "classes": "num_classes",
    "channels": "num_channels",
    "patch": "patch_size",
    "positions": "num_positions",
    "q": "q_width",
    "k": "kv_width",
    "v": "kv_width",
    "o": "q_width",  # the attention output has one head_dim slice per query head
}


@dataclass
class Architecture:
    """A model class of the family: its name, its base-model prefix, and the spec fields that identify it."""

    name: str
    prefix: str
    match: dict
    config: dict = field(default_factory=dict)  # extra config keys written with this class
    # canonical pattern -> file pattern where this class names a tensor differently from the family's [tensors]
    # (e.g. a class whose classifier has another name); read from any class, written with this class's names
    tensors: dict = field(default_factory=dict)

    def fits(self, spec: Spec) -> bool:
        return all(getattr(spec, k) == v for k, v in self.match.items())


class Descriptor:
    """One family, loaded from ``architectures/<name>.toml``."""

    def __init__(self, data: dict, path: Path | None = None):
        self.path = path
        self.name: str = data["name"]
        self.title: str = data.get("title", self.name)
        detect = data.get("detect", {})
        self.model_types: list[str] = detect.get("model_types", [])
        self.config_architectures: list[str] = detect.get("architectures", [])
        self.config_key_prefixes: dict[str, list[str]] = detect.get("config_key_prefixes", {})
        self.detect_keys: list[str] = detect.get("keys", [])
        names = data.get("names", {})
        self.prefixes: list[str] = names.get("prefixes", [""])
        self.drop: list[re.Pattern] = [re.compile(p) for p in names.get("drop", [])]
        self.renames: list[tuple[str, str]] = [tuple(r) for r in names.get("rename", [])]
        # [regex, feature]: keys of features we know but do not support (e.g. timm LayerScale), refused by name
        self.unsupported: list[tuple[re.Pattern, str]] = [(re.compile(p), what)
                                                          for p, what in names.get("unsupported", [])]
        self.tensors: dict[str, str] = data.get("tensors", {})
        self.transforms: dict[str, str] = data.get("transforms", {})
        self.fused: list[dict] = data.get("fused", [])
        self.spec_constants: dict = data.get("spec", {})
        config = dict(data.get("config", {}))
        self.config_defaults: dict = config.pop("defaults", {})
        self.config_template: dict = config.pop("template", {})
        self.config_write_defaults: dict = config.pop("write_defaults", {})
        self.dtype_keys: list[str] = config.pop("dtype", [])
        # config key -> expression (or list of expressions) over spec fields, written but never read: values the
        # family's loader needs that are no single spec field (e.g. a ratio of two sizes)
        self.config_write_derived: dict = config.pop("write_derived", {})
        # config key -> the values we support; a config with another value is refused on read
        self.config_require: dict[str, list] = config.pop("require", {})
        # where the config names the model class: None -> the Hugging Face "architectures" list; else a single-name
        # key, written only where the config has no name yet, so a source's own (more specific) name survives
        self.class_key: str | None = config.pop("class_key", None)
        self.config_fields = {k: ConfigField.parse(v) for k, v in config.items()}
        self.derive: dict[str, str] = data.get("derive", {})
        self.architectures = [Architecture(a["name"], a.get("prefix", ""), a.get("match", {}), a.get("config", {}),
                                           a.get("tensors", {}))
                              for a in data.get("architectures", [])]
        self.carry_files: list[str] = data.get("carry_files", [])
        self._check()

    def _check(self):
        for pattern in list(self.tensors) + list(self.transforms) + [p for a in self.architectures for p in a.tensors]:
            if pattern not in CANONICAL:
                raise ValueError(f"{self.path}: {pattern!r} is not a canonical tensor name")
        for f in self.fused:
            for part in f["parts"]:
                if part not in CANONICAL:
                    raise ValueError(f"{self.path}: fused part {part!r} is not a canonical tensor name")

    def __repr__(self):
        return f"Descriptor({self.name!r})"

    # -- names ----------------------------------------------------------------------------------------------------
    def _normalise(self, key: str) -> str:
        for old, new in self.renames:
            key = key.replace(old, new)
        return key

    def match(self, keys: list[str]) -> Mapping:
        """Match file keys to canonical names, trying each known base-model prefix and keeping the best."""
        best = None
        for prefix in self.prefixes:
            mapping = self._match_with_prefix(keys, prefix)
            if best is None or len(mapping.unmapped) + len(mapping.unsupported) < \
                    len(best.unmapped) + len(best.unsupported):
                best = mapping
        return best

    def _match_with_prefix(self, keys: list[str], prefix: str) -> Mapping:
        names = list(self.tensors.items()) + [(c, f) for a in self.architectures for c, f in a.tensors.items()]
        plain = [(_regex(f, prefix), c, self.transforms.get(c)) for c, f in names]
        fused = [(_regex(f["file"], prefix), f) for f in self.fused]
        locations, dropped, unmapped, renamed, unsupported = {}, [], [], {}, []
        for key in keys:
            norm = self._normalise(key)
            if norm != key:
                renamed[key] = norm
            feature = next((what for regex, what in self.unsupported if regex.search(norm)), None)
            if feature:
                unsupported.append((key, feature))
                continue
            if any(d.search(norm) for d in self.drop):
                dropped.append(key)
                continue
            for regex, canonical, transform in plain:
                m = regex.match(norm)
                if m:
                    locations[_layer_name(canonical, m.groupdict().get("i"))] = Location(key, transform)
                    break
            else:
                for regex, f in fused:
                    m = regex.match(norm)
                    if m:
                        layer = m.groupdict().get("i")
                        for index, part in enumerate(f["parts"]):
                            locations[_layer_name(part, layer)] = Location(
                                key, f.get("transform"), index, len(f["parts"]), f.get("axis", 0))
                        break
                else:
                    unmapped.append(key)
        return Mapping(prefix, locations, dropped, unmapped, renamed, unsupported)

    def file_layout(self, names: list[str], prefix: str, arch: Architecture | None = None
                    ) -> dict[str, list[tuple[str, Location]]]:
        """For writing: file key -> [(canonical name, location)] for the given canonical names, with the tensor
        names of model class ``arch`` where it has its own."""
        out: dict[str, list[tuple[str, Location]]] = {}
        fused_by_part = {part: f for f in self.fused for part in f["parts"]}
        tensors = {**self.tensors, **(arch.tensors if arch else {})}
        for name in names:
            pattern, layer = pattern_of(name)
            layer_s = str(layer) if layer is not None else None
            if pattern in tensors:
                key = _layer_name(tensors[pattern], layer_s).replace("{p}", prefix)
                out.setdefault(key, []).append((name, Location(key, self.transforms.get(pattern))))
            elif pattern in fused_by_part:
                f = fused_by_part[pattern]
                key = _layer_name(f["file"], layer_s).replace("{p}", prefix)
                loc = Location(key, f.get("transform"), f["parts"].index(pattern), len(f["parts"]), f.get("axis", 0))
                out.setdefault(key, []).append((name, loc))
            else:
                raise LigoError(f"family {self.name} has no place for tensor {name}; "
                                f"convert to a family that supports it")
        for key, entries in out.items():
            if entries[0][1].fused and len(entries) != entries[0][1].parts:
                raise LigoError(f"family {self.name} stores {key} fused, but only "
                                f"{', '.join(n for n, _ in entries)} of its parts exist")
        return out

    def supports(self, spec: Spec) -> str | None:
        """None if this family can hold a model of ``spec``, else the reason it cannot."""
        fused_parts = {part for f in self.fused for part in f["parts"]}
        arch = self.architecture_for(spec)
        class_tensors = arch.tensors if arch else {}
        for name in spec.tensor_names():
            pattern, _ = pattern_of(name)
            if pattern not in self.tensors and pattern not in class_tensors and pattern not in fused_parts:
                return f"family {self.name} has no place for tensor {name}"
        for key, value in self.spec_constants.items():
            if getattr(spec, key) != value:
                return f"family {self.name} needs {key}={value!r}, the model has {getattr(spec, key)!r}"
        for key, expr in self.derive.items():  # e.g. RoBERTa's positions start after the padding id
            try:
                wanted = evaluate(expr, spec.to_dict()) if isinstance(expr, str) and key not in _STRING_FIELDS \
                    else expr
            except Unresolved:
                continue
            if getattr(spec, key) != wanted:
                return f"family {self.name} needs {key}={wanted!r} ({expr}), the model has {getattr(spec, key)!r}"
        if self.architectures and not any(a.fits(spec) for a in self.architectures):
            return f"family {self.name} has no model class for head={spec.head!r}, pooler={spec.pooler}"
        return None

    # -- detection ------------------------------------------------------------------------------------------------
    def detect_score(self, config: dict, keys: list[str]) -> int:
        """How surely this descriptor reads a checkpoint: 3 config model_type/architecture, 2 config key, 1 keys."""
        if config.get("model_type") in self.model_types:
            return 300
        if set(config.get("architectures") or []) & set(self.config_architectures):
            return 200
        for key, prefixes in self.config_key_prefixes.items():
            value = config.get(key)
            if isinstance(value, str) and any(value.startswith(p) for p in prefixes):
                return 150
        if self.detect_keys and "model_type" not in config:
            normalised = {self._normalise(k) for k in keys}
            for prefix in self.prefixes:
                wanted = [k.replace("{p}", prefix).replace("{i}", "0") for k in self.detect_keys]
                if all(w in normalised for w in wanted):
                    return 100 + len(wanted)
        return 0

    # -- spec inference ---------------------------------------------------------------------------------------------
    def infer_spec(self, config: dict, shapes: dict[str, tuple], where: dict[str, str]) -> Spec:
        """Build the spec from the config and the canonical tensors' shapes; the shapes win, and must agree.

        ``where`` maps canonical names to the file key they came from, for error messages.
        """
        self._check_config_require(config)
        from_config = self._read_config_fields(config)
        values: dict = {**self.spec_constants, **from_config}
        values.update(_measured_sizes(shapes, where, from_config))
        values.update(self._structure_from_tensors(set(shapes), config))
        self._resolve_defaults(values)
        _resolve_heads(values, where_q=where.get("layers.0.q.weight", "the q weights"))
        _positions_to_sizes(values, from_config, where)
        values.pop("q_width", None)  # measured only to check heads x head_dim
        values.pop("kv_width", None)
        try:
            spec = Spec.from_dict(values)
            spec.check()
        except (TypeError, ValueError) as e:
            raise LigoError(f"cannot describe this {self.name} checkpoint: {e}") from None
        return spec

    def _check_config_require(self, config: dict) -> None:
        """Refuse config values the family's layout cannot represent (rather than silently dropping them)."""
        for key, allowed in self.config_require.items():
            value = _get_path(config, key)
            if value is not None and value not in allowed:
                raise LigoError(f"config key {key}={value!r} is not supported for {self.name} "
                                f"(supported: {', '.join(map(repr, allowed))}); use a checkpoint without it")

    def _read_config_fields(self, config: dict) -> dict:
        """The spec fields the config states (missing keys are left out, for defaults to fill later)."""
        from_config = {}
        for name, cf in self.config_fields.items():
            value = cf.read(config)
            if value is not None:
                from_config[name] = value
        return from_config

    def _structure_from_tensors(self, present: set[str], config: dict) -> dict:
        """The spec's switches (tokens, norms, biases, head...) from which canonical tensors exist."""
        values = {
            "input": "patches" if "embed.patch.weight" in present else "tokens",
            "cls_token": "embed.cls" in present,
            "dist_token": "embed.dist" in present,
            "embed_norm": "embed.norm.weight" in present,
            "final_norm": "final_norm.weight" in present,
            "pooler": "pooler.weight" in present,
            "pair_head": "pair_head.weight" in present,
            "dist_head": "head_dist.weight" in present,
            "gated_mlp": "layers.0.gate.weight" in present,
            "qkv_bias": "layers.0.q.bias" in present,
            "o_bias": "layers.0.o.bias" in present,
            "mlp_bias": "layers.0.fc1.bias" in present,
            "mlm_transform": "mlm.dense.weight" in present,
        }
        if "embed.positions" in present:
            values["positions"] = "learned"
        if "embed.types" not in present:
            values["type_vocab_size"] = 0
        values["head"] = self._head_kind(present, config)
        values["tie_embeddings"] = values["head"] in ("mlm", "lm") and "lm_head.weight" not in present
        return values

    def _head_kind(self, present: set[str], config: dict) -> str:
        head = None
        if "head.weight" in present:
            head = "classifier"
        elif "mlm.bias" in present:
            head = "mlm"
        elif "lm_head.weight" in present:
            head = "lm"
        # A tied LM head leaves no tensor behind: the config's model class tells.
        for arch in self.architectures:
            if arch.name in (config.get("architectures") or []):
                for k, v in arch.match.items():
                    if k == "head" and head is None:
                        head = v
        return head or "none"

    def _resolve_defaults(self, values: dict) -> None:
        """Fill config defaults and derived values in place; they may refer to each other, so resolve until
        nothing changes."""
        pending = {k: v for k, v in self.config_defaults.items() if values.get(k) is None}
        pending.update({k: v for k, v in self.derive.items()})
        while pending:
            progressed = False
            for key, expr in list(pending.items()):
                try:
                    values[key] = evaluate(expr, values) if isinstance(expr, str) and key not in _STRING_FIELDS \
                        else expr
                except Unresolved:
                    continue
                del pending[key]
                progressed = True
            if not progressed:
                break  # the rest refer to values this model does not have

    # -- config writing -------------------------------------------------------------------------------------------
    def architecture_for(self, spec: Spec) -> Architecture | None:
        for arch in self.architectures:
            if arch.fits(spec):
                return arch
        return None

    def write_config(self, spec: Spec, base: dict | None = None, dtype: torch.dtype | None = None) -> dict:
        """The family's config for ``spec``; ``base`` (a config of the same family) keeps keys we do not map."""
        config = copy.deepcopy(base) if base is not None else copy.deepcopy(self.config_template)
        for key, value in self.config_write_defaults.items():
            _set_path(config, key, value, only_if_missing=True)
        for name, cf in self.config_fields.items():
            value = getattr(spec, name, None)
            if name == "labels":
                if spec.head != "classifier":
                    continue
                if not value or len(value) != spec.num_classes:
                    value = [f"LABEL_{i}" for i in range(spec.num_classes)]
            if value is None:
                continue
            if name == "num_classes" and spec.head != "classifier":
                continue
            cf.write(config, value)
        names = spec.to_dict()
        for key, expr in self.config_write_derived.items():
            try:
                value = [evaluate(e, names) for e in expr] if isinstance(expr, list) else evaluate(expr, names)
            except Unresolved:
                continue  # the spec lacks a value it needs (e.g. no classes): leave the key as it is
            _set_path(config, key, value)
        # Prefer the model class the base config already names when it still fits (e.g. a Mistral model stays
        # MistralForCausalLM in a descriptor that also writes LlamaForCausalLM).
        named = config.get("architectures") or []
        arch = next((a for a in self.architectures if a.name in named and a.fits(spec)), None) \
            or self.architecture_for(spec)
        if arch is not None:
            if self.class_key:
                _set_path(config, self.class_key, arch.name, only_if_missing=True)
            elif "architectures" in config or base is None or self.model_types:
                config["architectures"] = [arch.name]
            for key, value in arch.config.items():
                _set_path(config, key, value)
        if dtype is not None:
            for key in self.dtype_keys:
                _set_path(config, key, str(dtype).removeprefix("torch."))
        return config


# Spec fields whose values are strings, never expressions.
_STRING_FIELDS = {"activation", "norm", "norm_placement", "input", "positions", "head"}


def _measure(shapes: dict[str, tuple], where: dict[str, str]) -> tuple[dict, dict]:
    """Read every size the tensors show, checking that they agree."""
    measured: dict[str, int] = {}
    source_of: dict[str, str] = {}
    layers = set()
    for name, shape in shapes.items():
        tags = spaces(name)
        _, layer = pattern_of(name)
        if layer is not None:
            layers.add(layer)
        if len(shape) != len(tags):
            raise LigoError(f"tensor {where.get(name, name)} has shape {tuple(shape)}, expected {len(tags)} axes")
        for size, tag in zip(shape, tags):
            field_name = _MEASURES.get(space_kind(tag))
            if field_name is None:
                continue
            if field_name in measured and measured[field_name] != size:
                raise LigoError(f"tensor {where.get(name, name)} has shape {tuple(shape)}: its {space_kind(tag)} "
                                f"axis is {size}, but {source_of[field_name]} makes it {measured[field_name]}")
            if field_name not in measured:
                measured[field_name] = size
                source_of[field_name] = f"tensor {where.get(name, name)}"
    if layers:
        if layers != set(range(max(layers) + 1)):
            missing = sorted(set(range(max(layers) + 1)) - layers)
            raise LigoError(f"layers {missing} have no tensors: the checkpoint is incomplete")
        measured["layers"] = max(layers) + 1
        source_of["layers"] = "the layer tensors"
    return measured, source_of


def _measured_sizes(shapes: dict[str, tuple], where: dict[str, str], from_config: dict) -> dict:
    """The sizes the tensors show, which must agree with the config's; the position table's row count is kept as
    ``_positions`` until we know whether it means patches or tokens."""
    measured, source_of = _measure(shapes, where)
    if "num_positions" in measured:
        positions = measured.pop("num_positions")
        measured["_positions"] = positions
    for name, value in measured.items():
        if name in from_config and from_config[name] != value:
            raise LigoError(f"{source_of[name]} says {name}={value}, but the config says {from_config[name]}; "
                            f"the config does not describe these weights")
    return measured


def _positions_to_sizes(values: dict, from_config: dict, where: dict[str, str]) -> None:
    """Turn the measured position rows into image_size (a square patch grid plus class tokens) or max_positions."""
    positions = values.pop("_positions", None)
    if positions is None:
        return
    if values["input"] != "patches":
        values["max_positions"] = positions
        return
    patches = positions - int(values["cls_token"]) - int(values["dist_token"])
    grid = math.isqrt(max(patches, 0))
    if grid * grid != patches:  # e.g. a table without rows for the class token: positions shift
        raise LigoError(f"{where.get('embed.positions')} has {positions} positions, which is not a "
                        f"square grid of patches plus {positions - patches} class/distillation "
                        f"token(s); this position layout is not supported")
    image_size = grid * values["patch_size"]
    if from_config.get("image_size") not in (None, image_size):
        raise LigoError(f"{where.get('embed.positions')} has {positions} positions, which does not fit "
                        f"image_size={from_config['image_size']} with patch_size={values['patch_size']}")
    values["image_size"] = image_size


def _resolve_heads(values: dict, where_q: str) -> None:
    """heads x head_dim must equal the q width; kv_heads x head_dim the k/v width."""
    q_width = values.get("q_width")
    kv_width = values.get("kv_width")
    if q_width is None:
        return
    heads, head_dim = values.get("heads"), values.get("head_dim")
    if heads and not head_dim:
        head_dim = q_width // heads
    elif head_dim and not heads:
        heads = q_width // head_dim
    if not heads or heads * head_dim != q_width:
        raise LigoError(f"{where_q}: a q width of {q_width} is not heads ({heads}) x head_dim ({head_dim}); "
                        f"fix num_attention_heads/head_dim in the config")
    values["heads"], values["head_dim"] = heads, head_dim
    if kv_width is not None:
        if kv_width % head_dim:
            raise LigoError(f"k/v width {kv_width} is not a multiple of head_dim {head_dim}")
        values["kv_heads"] = kv_width // head_dim


# --- the registry ----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def load_descriptors() -> dict[str, Descriptor]:
    out = {}
    for path in sorted(data_dir("architectures").glob("*.toml")):
        with open(path, "rb") as f:
            d = Descriptor(tomllib.load(f), path)
        out[d.name] = d
    return out


def get_descriptor(name: str) -> Descriptor:
    descriptors = load_descriptors()
    if name not in descriptors:
        raise LigoError(f"unknown family {name!r}; known families: {', '.join(sorted(descriptors))}")
    return descriptors[name]


def detect_family(config: dict, keys: list[str], where: str) -> Descriptor:
    scored = sorted(((d.detect_score(config, keys), d.name) for d in load_descriptors().values()), reverse=True)
    if not scored or scored[0][0] == 0:
        what = config.get("model_type") or config.get("architecture") or (config.get("architectures") or [None])[0]
        hint = f"model_type {what!r}" if what else "its config and tensor names"
        raise LigoError(f"{where}: unknown family ({hint} match no descriptor); known families: "
                        f"{', '.join(sorted(load_descriptors()))} — pass --family to choose one")
    return load_descriptors()[scored[0][1]]
