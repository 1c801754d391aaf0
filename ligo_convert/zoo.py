"""The model zoo: named checkpoints (family, hub id, sizes) read from the data files in ``zoo/*.toml``.

A zoo name stands for its hub id wherever a source is expected (``checkpoint.resolve_source``), and for its sizes
wherever a growth target is expected (``target_sizes``), so a target can be named without downloading it.
"""

from __future__ import annotations

import copy
import tomllib
from functools import lru_cache

from .descriptors import data_dir
from .errors import LigoError

# The spec fields a zoo entry fixes; everything else (vocabulary, positions, heads...) comes from the source model.
SIZE_FIELDS = ("layers", "width", "heads", "kv_heads", "mlp", "head_dim")
_REQUIRED = ("family", "hub", "layers", "width", "heads", "mlp")
_KNOWN = set(_REQUIRED) | {"kv_heads", "head_dim", "notes"}


@lru_cache(maxsize=None)
def _load() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in sorted(data_dir("zoo").glob("*.toml")):
        with open(path, "rb") as f:
            data = tomllib.load(f)
        for name, raw in data.items():
            if name in out:
                raise ValueError(f"{path}: zoo name {name!r} is defined twice")
            out[name] = _entry(name, raw, path)
    return out


def _entry(name: str, raw: dict, path) -> dict:
    """Check one entry (the zoo is our own data: a bad entry is a bug, hence ValueError) and fill in defaults.
    A composite's entry (CLIP) gives each tower's sizes in a table named after the tower."""
    where = f"{path}: [{name}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not a table")
    from .composite import load_composites

    comp = load_composites().get(raw.get("family"))
    if comp is not None:
        unknown = sorted(set(raw) - {"family", "hub", "notes", *comp.tower_names})
        missing = [k for k in ("hub", *comp.tower_names) if k not in raw]
        if missing or unknown:
            raise ValueError(f"{where}: missing {missing}, unknown {unknown}")
        towers = {t: _sizes(f"{where}.{t}", raw[t]) for t in comp.tower_names}
        if raw["hub"].count("/") != 1:
            raise ValueError(f"{where}: hub must be an 'org/name' id")
        return {"name": name, "family": raw["family"], "hub": raw["hub"], "notes": raw.get("notes", ""),
                "towers": towers}
    return {"name": name, **_sizes(where, raw, single=True)}


def _sizes(where: str, raw: dict, single: bool = False) -> dict:
    """One model's (or tower's) sizes, checked, with kv_heads and head_dim filled in."""
    required = _REQUIRED if single else _REQUIRED[2:]
    known = _KNOWN if single else set(SIZE_FIELDS)
    missing = [k for k in required if k not in raw]
    unknown = sorted(set(raw) - known)
    if missing or unknown:
        raise ValueError(f"{where}: missing {missing}, unknown {unknown}")
    entry = dict(raw)
    entry.setdefault("kv_heads", entry["heads"])
    if single:
        entry.setdefault("notes", "")
    for key in SIZE_FIELDS:
        if key == "head_dim" and key not in entry:
            continue
        if not isinstance(entry[key], int) or entry[key] <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer")
    if "head_dim" not in entry:
        if entry["width"] % entry["heads"]:
            raise ValueError(f"{where}: width {entry['width']} is not a multiple of heads {entry['heads']}; "
                             f"give head_dim")
        entry["head_dim"] = entry["width"] // entry["heads"]
    if entry["heads"] % entry["kv_heads"]:
        raise ValueError(f"{where}: heads must be a multiple of kv_heads")
    if single and entry["hub"].count("/") != 1:
        raise ValueError(f"{where}: hub must be an 'org/name' id")
    return entry


def entries() -> list[dict]:
    """Every zoo entry, in file order: name, family, hub, layers, width, heads, kv_heads, mlp, head_dim, notes (a
    composite's entry: ``towers``, tower -> those sizes)."""
    return [copy.deepcopy(e) for e in _load().values()]


def find_entry(name: str) -> dict | None:
    """The zoo entry called ``name``, or None."""
    entry = _load().get(name)
    return copy.deepcopy(entry) if entry is not None else None


def target_sizes(name: str) -> dict:
    """The spec fields (layers, width, heads, kv_heads, mlp, head_dim) of zoo model ``name``, for growing to it."""
    entry = _load().get(name)
    if entry is None:
        raise LigoError(f"{name}: not a zoo name; `ligo-convert zoo` lists them")
    if "towers" in entry:
        raise LigoError(f"{name}: a {entry['family']} model of {len(entry['towers'])} towers "
                        f"({', '.join(entry['towers'])}); only a {entry['family']} model grows into it")
    return {k: entry[k] for k in SIZE_FIELDS}
