"""Architecture descriptors: the data files in ``architectures/`` that hold all family knowledge.

A descriptor says, for one family, which on-disk tensor name holds each canonical tensor (with the base-model prefix
``{p}`` and layer index ``{i}``), which tensors are stored transposed or fused, which keys are buffers to drop, how
config keys map to :class:`~ligo_convert.spec.Spec` fields, and which model class to name when writing.  This module
is the only code that reads those files; it holds no knowledge of any particular family.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .errors import LigoError, UnknownFamily
from .files import check_config_value, check_id2label
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
    if transform == "flat":  # e.g. CLIP's class embedding stored as (D,), canonical (1, D)
        return t.unsqueeze(0)
    raise ValueError(f"unknown transform {transform!r}")


def to_disk(t: torch.Tensor, transform: str | None) -> torch.Tensor:
    if transform is None:
        return t
    if transform == "transpose":
        return t.t().contiguous()
    if transform == "lead1":
        return t.unsqueeze(0)
    if transform == "flat":
        return t.reshape(t.shape[1:]).contiguous()
    raise ValueError(f"unknown transform {transform!r}")


def shape_to_canonical(shape: tuple, transform: str | None) -> tuple:
    if transform == "transpose":
        return tuple(reversed(shape))
    if transform == "lead1":
        return tuple(shape[1:])
    if transform == "flat":
        return (1, *shape)
    return tuple(shape)


def shape_to_disk(shape: tuple, transform: str | None) -> tuple:
    if transform == "transpose":
        return tuple(reversed(shape))
    if transform == "lead1":
        return (1, *shape)
    if transform == "flat":
        return tuple(shape[1:])
    return tuple(shape)


# --- where each canonical tensor lives on disk -----------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where one canonical tensor is stored: a whole file tensor, or part ``index`` of ``parts`` along ``axis`` —
    equal parts, parts of the ``sizes`` given (Phi-3's q | k | v with fewer k/v heads), or, with ``groups``, the
    axis read as (groups, parts, rest) (GPT-NeoX's q/k/v interleaved head by head).  ``split`` / ``interleave`` are
    the descriptor's expressions for sizes / groups until ``resolved`` evaluates them."""

    key: str
    transform: str | None = None
    index: int = 0
    parts: int = 1
    axis: int = 0
    split: tuple[str, ...] | None = None
    interleave: str | None = None
    sizes: tuple[int, ...] | None = None
    groups: int = 0

    @property
    def fused(self) -> bool:
        return self.parts > 1

    def resolved(self, values: dict) -> "Location":
        """This location with its split sizes / interleave groups evaluated from ``values`` (spec fields)."""
        if not self.fused or (self.split is None and self.interleave is None):
            return self
        try:
            sizes = tuple(int(evaluate(e, values)) for e in self.split) if self.split else None
            groups = int(evaluate(self.interleave, values)) if self.interleave else 0
        except Unresolved as e:
            raise LigoError(f"fused tensor {self.key}: the config does not give {e}, which its layout needs") from None
        return dataclasses.replace(self, sizes=sizes, groups=groups)

    def extract(self, disk: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return to_canonical(disk, self.transform)
        if self.groups:
            t = disk.movedim(self.axis, 0)
            t = t.reshape(self.groups, self.parts, -1, *t.shape[1:])[:, self.index]
            t = t.reshape(-1, *t.shape[2:]).movedim(0, self.axis)
        elif self.sizes:
            t = disk.split(list(self.sizes), dim=self.axis)[self.index]
        else:
            t = disk.chunk(self.parts, dim=self.axis)[self.index]
        return to_canonical(t, self.transform)

    def canonical_shape(self, disk_shape: tuple) -> tuple:
        shape = list(disk_shape)
        if self.fused:
            if self.sizes:
                if shape[self.axis] != sum(self.sizes):
                    raise LigoError(f"fused tensor {self.key} has {shape[self.axis]} rows along axis {self.axis}, "
                                    f"but the config makes its parts {' + '.join(map(str, self.sizes))}")
                shape[self.axis] = self.sizes[self.index]
            else:
                unit = self.parts * (self.groups or 1)
                if shape[self.axis] % unit:
                    raise LigoError(f"fused tensor {self.key} has {shape[self.axis]} rows along axis {self.axis}, "
                                    f"not divisible into {unit} equal parts")
                shape[self.axis] //= self.parts
        return shape_to_canonical(tuple(shape), self.transform)

    def fuse(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The on-disk tensor from its canonical parts (already in disk orientation), in part order."""
        if self.groups:
            moved = [t.movedim(self.axis, 0) for t in parts]
            stacked = torch.stack([t.reshape(self.groups, -1, *t.shape[1:]) for t in moved], dim=1)
            return stacked.reshape(-1, *stacked.shape[3:]).movedim(0, self.axis).contiguous()
        return torch.cat(parts, dim=self.axis)


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


def _fused_location(key: str, entry: dict, index: int) -> Location:
    split = entry.get("sizes")
    return Location(key, entry.get("transform"), index, len(entry["parts"]), entry.get("axis", 0),
                    tuple(split) if split else None, entry.get("interleave"))


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
    format: str | None = None  # "id2label" (dict of str(int) -> name), "list" or "layer_types"
    # a config switch that must be on for the value to count (Qwen2's sliding_window needs use_sliding_window);
    # off, the field reads as ``off`` and writing 0/None leaves the key null; the switch is written with the value
    when: str | None = None
    # the spec value the config spells null (with or without ``when``): a key present as null reads as ``off``
    # (a missing key still takes the family's default) and writing ``off`` writes null (Gemma's softcaps: 0 <-> null)
    off: object = None
    spec_field: str = ""  # the spec field it feeds: its declared type is what the config value must be

    @classmethod
    def parse(cls, raw) -> "ConfigField":
        if isinstance(raw, str):
            return cls([raw])
        if isinstance(raw, list):
            return cls(list(raw))
        keys = raw["key"]
        return cls(keys if isinstance(keys, list) else [keys], raw.get("values"), raw.get("format"),
                   raw.get("when"), raw.get("off"))

    def read(self, config: dict):
        if self.when is not None and not _get_path(config, self.when):
            return self.off
        null = False
        for key in self.keys:
            value = _get_path(config, key)
            if value is None:
                null = null or (self.off is not None and _is_null(config, key))
                continue
            if self.format == "id2label":
                return check_id2label(key, value)
            if self.values is not None:
                lookup = _toml_key(value)
                if not isinstance(lookup, (str, int, float)) or lookup not in self.values:
                    raise LigoError(f"config key {key}={value!r} is not supported "
                                    f"(supported: {', '.join(map(str, self.values))})")
                return self.values[lookup]
            if self.spec_field in _FIELD_TYPES and not self.format:
                check_config_value(key, _FIELD_TYPES[self.spec_field], self.spec_field, value)
            return value
        return self.off if null else None

    def write(self, config: dict, value) -> None:
        if self.when is not None:  # the switch follows the value, so a config written from scratch turns it on
            _set_path(config, self.when, value != self.off)
        if (self.when is not None or self.off is not None) and value == self.off:
            for key in self.keys:
                _set_path(config, key, None)
            return
        if self.values is not None:
            current = [_get_path(config, key) for key in self.keys]
            if all(isinstance(c, (str, int, float, bool)) and self.values.get(_toml_key(c)) == value
                   for c in current):
                return  # the config already says it, in its own words (gelu_new and gelu_pytorch_tanh are one)
            inverse = {}
            for raw, canonical in self.values.items():
                inverse.setdefault(canonical, raw)
            if value not in inverse:
                raise LigoError(f"config key {self.keys[0]} cannot express {value!r}")
            value = {"true": True, "false": False}.get(inverse[value], inverse[value])
        for key in self.keys:
            if self.format == "id2label":
                _set_path(config, key, {str(i): label for i, label in enumerate(value)})
                _set_path(config, "label2id", {label: i for i, label in enumerate(value)})
            else:
                _set_path(config, key, value)


def _is_null(config: dict, path: str) -> bool:
    """Whether ``path`` is present in ``config`` with the value null (not merely missing)."""
    *parents, last = path.split(".")
    node = _get_path(config, ".".join(parents)) if parents else config
    return isinstance(node, dict) and last in node and node[last] is None


def _toml_key(value):
    """A config value as a key of a descriptor's value map (TOML keys are strings: true -> "true")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


# Which spec field a width space measures.  q/k/v are measured as flat widths (heads x head_dim).
_MEASURES = {
    "residual": "width",
    "embedding": "embedding_size",  # the width where the family has no embedding size of its own (stored as 0)
    "mlp": "mlp",
    "vocab": "vocab_size",
    "types": "type_vocab_size",
    "classes": "num_classes",
    "channels": "num_channels",
    "patch": "patch_size",
    "positions": "num_positions",
    "projection": "projection_dim",
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
        # [canonical name, config switch]: a decoder the family stores as a tied copy (dropped above) unless the
        # config's switch is false: then the stored tensor is the model's own, read under its [tensors] name
        self.untie: list[tuple[str, str]] = [tuple(u) for u in names.get("untie", [])]
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
        # config key -> the values we support (or { equals = "other_key" }); a config with another value is refused
        self.config_require: dict[str, list | dict] = config.pop("require", {})
        # model_type -> config keys that model type's class implies where its config lacks them (the class's own
        # defaults, e.g. Mistral windows every layer without a use_sliding_window switch); filled in before reading
        self.config_implied: dict[str, dict] = config.pop("implied", {})
        # where the config names the model class: None -> the Hugging Face "architectures" list; else a single-name
        # key, written only where the config has no name yet, so a source's own (more specific) name survives
        self.class_key: str | None = config.pop("class_key", None)
        self.config_fields = {k: dataclasses.replace(ConfigField.parse(v), spec_field=k) for k, v in config.items()}
        self.derive: dict[str, str] = data.get("derive", {})
        self.architectures = [Architecture(a["name"], a.get("prefix", ""), a.get("match", {}), a.get("config", {}),
                                           a.get("tensors", {}))
                              for a in data.get("architectures", [])]
        self.carry_files: list[str] = data.get("carry_files", [])
        # onnxruntime-genai's model "type" for this family's causal LMs: one name, or config model_type -> name
        # (a descriptor serving several model types); absent: the ONNX hub layout writes no genai_config.json
        genai = data.get("genai_type")
        self.genai_types: dict[str, str] = genai if isinstance(genai, dict) else {"*": genai} if genai else {}
        self._check()

    def genai_type(self, config: dict) -> str | None:
        """onnxruntime-genai's model type for a model of this family with ``config`` (None: not known to it)."""
        return self.genai_types.get(config.get("model_type"), self.genai_types.get("*"))

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
                            locations[_layer_name(part, layer)] = _fused_location(key, f, index)
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
                loc = _fused_location(key, f, f["parts"].index(pattern))
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
        said = set(self.spec_constants) | set(self.config_fields) | set(self.config_defaults) | set(self.derive)
        if any(cf.format == "layer_types" for cf in self.config_fields.values()):
            said |= {"window_start", "window_period"}
        for key in _UNTENSORED:  # e.g. a Gemma model (norm gain 1 + weight) written as LLaMA would lose its offset
            default = _SPEC_DEFAULTS[key]
            if key not in said and getattr(spec, key) != default:
                return (f"family {self.name} has no config key for {key} (only the default {default!r}), the model "
                        f"has {getattr(spec, key)!r}")
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

    def resolve_locations(self, mapping: Mapping, config: dict) -> None:
        """Evaluate the split sizes / interleave groups of fused tensors from what the config says, and read untied
        decoders the config switches on (in place)."""
        self._untie_decoders(mapping, config)
        if not any(loc.split or loc.interleave for loc in mapping.locations.values()):
            return
        values = {**self.spec_constants, **self._read_config_fields(config)}
        self._resolve_defaults(values)
        mapping.locations = {name: loc.resolved(values) for name, loc in mapping.locations.items()}

    def _untie_decoders(self, mapping: Mapping, config: dict) -> None:
        for canonical, switch in self.untie:
            if config.get(switch, True) is not False or canonical in mapping.locations:
                continue
            regex = _regex(self.tensors[canonical], mapping.prefix)
            key = next((k for k in mapping.dropped if regex.match(self._normalise(k))), None)
            if key is not None:
                mapping.dropped.remove(key)
                mapping.locations[canonical] = Location(key, self.transforms.get(canonical))

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
        _windows_from_layer_types(values)
        _resolve_heads(values, from_config, where_q=where.get("layers.0.q.weight", "the q weights"),
                       where_k=where.get("layers.0.k.weight", "the k weights"),
                       kv_key=self.config_fields["kv_heads"].keys[0] if "kv_heads" in self.config_fields else "")
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
            if isinstance(allowed, dict):  # { equals = "other_key" }: where both are set, they must be the same
                other = _get_path(config, allowed["equals"])
                if value is not None and other is not None and value != other:
                    raise LigoError(f"config key {key}={value!r} is not supported for {self.name}: it must equal "
                                    f"{allowed['equals']} ({other!r}); use a checkpoint without it")
                continue
            if value is not None and value not in allowed:
                raise LigoError(f"config key {key}={value!r} is not supported for {self.name} "
                                f"(supported: {', '.join(map(repr, allowed))}); use a checkpoint without it")

    def _read_config_fields(self, config: dict) -> dict:
        """The spec fields the config states (missing keys are left out, for defaults to fill later)."""
        config = self._implied(config)
        from_config = {}
        for name, cf in self.config_fields.items():
            value = cf.read(config)
            if value is not None:
                from_config[name] = value
        return from_config

    def _implied(self, config: dict) -> dict:
        """``config`` with the keys its model_type implies (``[config.implied.<model_type>]``) added where it has
        no such key at all; a key the config sets, to null too, is kept."""
        implied = self.config_implied.get(config.get("model_type"))
        if not implied:
            return config
        out = copy.deepcopy(config)
        for path, value in implied.items():
            node, parts = out, path.split(".")
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or parts[-1] not in node:
                _set_path(out, path, value, only_if_missing=True)
        return out

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
            "mask_token": "embed.mask" in present,
            "pool_norm": "pool_norm.weight" in present,
            "head_mean": "head_mean.weight" in present,
            "projection": "proj.weight" in present,
        }
        if "layers.0.q_norm.weight" in present:
            values["qk_norm"] = "head"
        elif "layers.0.q_proj_norm.weight" in present:
            values["qk_norm"] = "proj"
        values["layer_scale"] = "layers.0.attn_scale" in present
        if values["input"] == "patches":  # token models keep the default: they have no patch embedding
            values["patch_bias"] = "embed.patch.bias" in present
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
        elif "token_head.weight" in present:
            head = "token_binary"
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
            if cf.format == "layer_types":
                # written where the family's configs carry the list (transformers checks its length)
                if any(_get_path(config, key) is not None for key in cf.keys):
                    cf.write(config, ["sliding_attention" if spec.windowed(i) else "full_attention"
                                      for i in range(spec.layers)])
                continue
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
            # { expr = "...", only_if_missing = true }: a value for a config that lacks the key (a model made from
            # scratch), where the class's own default would not fit (GPT-2's eos 50256 beyond a 258-token vocab)
            missing_only = isinstance(expr, dict) and expr.get("only_if_missing", False)
            expr = expr["expr"] if isinstance(expr, dict) else expr
            try:
                value = [evaluate(e, names) for e in expr] if isinstance(expr, list) else evaluate(expr, names)
            except Unresolved:
                continue  # the spec lacks a value it needs (e.g. no classes): leave the key as it is
            _set_path(config, key, value, only_if_missing=missing_only)
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


# Spec fields that change what a model computes without leaving a tensor behind: a family whose descriptor neither
# fixes them ([spec]) nor stores them ([config], [config.defaults], [derive]) can only hold their default value.
_UNTENSORED = ("norm_offset", "embed_scale", "parallel_residual", "positions_from_mask", "rope_local_theta",
               "rotary_fraction", "score_scale_dim", "attn_softcap", "final_softcap", "sliding_window",
               "window_start", "window_period", "mlm_activation")
_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Spec)}
_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(Spec)}  # "int", "float", "int | None"...

# Spec fields whose values are strings, never expressions.
_STRING_FIELDS = {"activation", "norm", "norm_placement", "input", "positions", "head", "qk_norm", "pool",
                  "gate_activation", "mlm_activation"}


def _windows_from_layer_types(values: dict) -> None:
    """Read a ``layer_types`` list (``sliding_attention`` / ``full_attention`` per layer) as the spec's window rule:
    the family's own rule first (its window_start / window_period defaults), else the simplest that gives the
    list; a list no rule gives is refused."""
    types = values.pop("layer_types", None)
    if types is None:
        return
    kinds = ("sliding_attention", "full_attention")
    layers = values.get("layers")
    if not isinstance(types, list) or any(t not in kinds for t in types):
        raise LigoError(f"config key layer_types must list {' or '.join(kinds)} for every layer")
    if layers is not None and len(types) != layers:
        raise LigoError(f"config key layer_types has {len(types)} entries for {layers} layers; fix the config")
    windowed = [t == "sliding_attention" for t in types]
    if not any(windowed):  # no window; the family's own rule (Qwen2's max_window_layers) is kept as the config says
        values["sliding_window"] = 0
        return
    if not values.get("sliding_window"):
        raise LigoError("config key layer_types names sliding_attention layers but sliding_window is not set")
    n = len(types)
    own = (values.get("window_start") or 0, values.get("window_period") or 0)
    for start, period in [own] + [(s, p) for p in (0, *range(2, n + 2)) for s in range(n)]:
        trial = Spec(layers=n, width=1, heads=1, head_dim=2, mlp=1, sliding_window=1, window_start=start,
                     window_period=period)
        if [trial.windowed(i) for i in range(n)] == windowed:
            values.update(window_start=start, window_period=period)
            return
    raise LigoError(f"config key layer_types={types} is not a window pattern ligo-convert can grow (windowed "
                    f"from one layer on, or all layers but every N-th); use a regular pattern")


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
        if from_config.get("max_positions") not in (None, positions):
            raise LigoError(f"{where.get('embed.positions')} has {positions} positions, but the config says "
                            f"max_positions={from_config['max_positions']}; the config does not describe these "
                            f"weights")
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


def _resolve_heads(values: dict, from_config: dict, where_q: str, where_k: str, kv_key: str) -> None:
    """heads x head_dim must equal the q width; kv_heads x head_dim the k/v width, and a kv_heads the config
    states must be that number (refused, not rewritten to match the tensors)."""
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
        stated = from_config.get("kv_heads")
        if stated and stated != kv_width // head_dim:
            raise LigoError(f"tensor {where_k} holds {kv_width // head_dim} key/value heads of {head_dim}, but the "
                            f"config says {kv_key}={stated}; the config does not describe these weights")
        values["kv_heads"] = kv_width // head_dim


# --- the registry ----------------------------------------------------------------------------------------------------


# Keys a child descriptor never inherits from the one it extends: they say which family it is.
_NOT_INHERITED = ("name", "title", "detect", "architectures")


def _merged(child: dict, parent: dict) -> dict:
    """``parent`` deep-merged with ``child``: tables merge key by key, anything else (lists too) the child replaces."""
    out = copy.deepcopy(parent)
    for key, value in child.items():
        out[key] = _merged(value, out[key]) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def _descriptor_data(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A descriptor file's data; with ``extends = "other"`` it starts from ``other.toml`` beside it (deep-merged,
    without the parent's name, title, [detect] and [[architectures]])."""
    if path in seen:
        raise ValueError(f"{path}: descriptors extend each other in a cycle")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    parent_path = path.with_name(f"{parent_name}.toml")
    if not parent_path.is_file():
        raise ValueError(f"{path}: extends {parent_name!r}, but {parent_path.name} does not exist")
    parent = _descriptor_data(parent_path, seen + (path,))
    return _merged(data, {k: v for k, v in parent.items() if k not in _NOT_INHERITED})


@lru_cache(maxsize=None)
def load_descriptors() -> dict[str, Descriptor]:
    out = {}
    for path in sorted(data_dir("architectures").glob("*.toml")):
        data = _descriptor_data(path)
        if "towers" in data:  # a composite of other families' towers (ligo_convert.composite), not a layer graph
            continue
        d = Descriptor(data, path)
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
        what = f"model_type {what!r}" if what else "its config and tensor names"
        closest = ""
        if keys:
            from .unknown import closest_family, hint

            closest = "; " + hint(closest_family(config, keys))
        raise UnknownFamily(f"{where}: unknown family ({what} match no descriptor){closest}; known families: "
                            f"{', '.join(sorted(load_descriptors()))} — pass --family to choose one", config, keys)
    return load_descriptors()[scored[0][1]]
