"""Typed reading and checked writing: every file the tool reads is checked field by field before it is used, and
every path a command will write is checked before any work starts.  Each problem is one :class:`LigoError` naming
the file, the field and the fix; a malformed file never reaches the code as a ``KeyError`` or ``TypeError``."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from .errors import LigoError

# safetensors dtype name -> bytes per element (the dtypes ligo-convert reads; others are refused by name)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def readable(path: Path, fix: str = "download it again") -> Path:
    """``path`` itself, refused when it is a link to nothing (os.stat would raise later, with a traceback)."""
    if path.is_symlink() and not path.exists():
        raise LigoError(f"{path}: a link to a file that does not exist ({os.readlink(path)}); {fix}")
    return path


def read_json(path: Path, fix: str = "restore the file"):
    """Parse a JSON file; unreadable or invalid JSON is a LigoError naming the file."""
    try:
        return json.loads(readable(path, fix).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LigoError(f"{path}: not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise LigoError(f"{path}: cannot be read ({e.strerror or type(e).__name__}); {fix}") from None


def read_json_object(path: Path, fix: str = "restore the file") -> dict:
    data = read_json(path, fix)
    if not isinstance(data, dict):
        raise LigoError(f"{path}: expected a JSON object ({{...}}), got {type(data).__name__}; {fix}")
    return data


# --- config.json ------------------------------------------------------------------------------------------------------


def check_config(path: Path, config) -> dict:
    """A config.json is an object whose ``model_type`` is a string and whose ``architectures`` lists strings (the
    keys every family's detection reads; size keys are checked by the descriptor that reads them)."""
    if not isinstance(config, dict):
        raise LigoError(f"{path}: expected a JSON object ({{...}}), got {type(config).__name__}; restore the file")
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        raise LigoError(f"{path}: model_type must be a string, not {config['model_type']!r}; fix the config")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise LigoError(f"{path}: architectures must be a list of class names, not {archs!r}; fix the config")
    if config.get("id2label") is not None:  # transformers reads its keys as integers in every family
        check_id2label("id2label", config["id2label"], where=f"{path}: key")
    return config


# Spec field type -> (test, what the config value must be).  Sizes are whole numbers, never strings or bools.
_CONFIG_TYPES = {
    "int": (is_int, "a whole number"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
}
# sizes the forward divides by or loops over: 0 or less cannot describe a model
POSITIVE_SIZES = ("layers", "width", "heads", "head_dim", "mlp")


def check_config_value(key: str, field_type: str, field: str, value) -> None:
    """One config value read as spec field ``field`` (declared ``field_type`` in Spec): of that type, and sizes
    not negative (``layers``/``width``/``heads``/``head_dim``/``mlp`` at least 1)."""
    base = field_type.replace(" | None", "").strip()
    if base not in _CONFIG_TYPES:
        return
    test, wanted = _CONFIG_TYPES[base]
    if not test(value):
        raise LigoError(f"config.json key {key} is {value!r} ({type(value).__name__}), but must be {wanted}; "
                        f"fix the config")
    low = 1 if field in POSITIVE_SIZES else 0
    if base == "int" and field not in ("pad_token_id", "pool_token_id", "position_offset") and value < low:
        raise LigoError(f"config.json key {key} is {value}, but must be at least {low}; fix the config")


def check_id2label(key: str, value, where: str = "config.json key") -> list[str]:
    """``id2label``: an object of integer strings 0..n-1 -> label names, returned as the list of labels."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.lstrip("-").isdigit() for k in value):
        raise LigoError(f"{where} {key} must map integer strings to labels ({{\"0\": \"cat\"}}), not "
                        f"{value!r}; fix the config")
    if sorted(int(k) for k in value) != list(range(len(value))):
        raise LigoError(f"{where} {key} must number its labels 0..{len(value) - 1}, not "
                        f"{sorted(value, key=int)}; fix the config")
    labels = [value[k] for k in sorted(value, key=int)]
    if not all(isinstance(label, str) for label in labels):
        raise LigoError(f"{where} {key} must give each label as a string; fix the config")
    return labels


# --- safetensors ------------------------------------------------------------------------------------------------------


def check_safetensors_header(path: Path, header, data_size: int) -> dict[str, dict]:
    """The tensors of a parsed safetensors header, each checked: an object with a known ``dtype``, a ``shape`` of
    whole numbers >= 0 and two ``data_offsets`` within the ``data_size`` bytes after the header that span exactly
    shape x itemsize; no two tensors share bytes (safetensors itself refuses such a file)."""
    again = "download the file again"
    if not isinstance(header, dict):
        raise LigoError(f"{path}: not a safetensors file (the header is {type(header).__name__}, not an object); "
                        f"{again}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise LigoError(f"{path}: __metadata__ must map names to strings; {again}")
    spans = []
    for key, info in header.items():
        where = f"{path}: tensor {key}"
        if not isinstance(info, dict):
            raise LigoError(f"{where}: its header entry is {info!r}, not an object with dtype/shape/data_offsets; "
                            f"{again}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise LigoError(f"{where}: dtype must be a string, not {dtype!r}; {again}")
        if dtype not in ITEMSIZE:
            raise LigoError(f"{where} has unsupported dtype {dtype!r}; convert it to F32, F16 or BF16 first")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise LigoError(f"{where}: shape must be a list of whole numbers >= 0, not {shape!r}; {again}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)):
            raise LigoError(f"{where}: data_offsets must be two whole numbers [begin, end], not {offsets!r}; {again}")
        begin, end = offsets
        if begin > end:
            raise LigoError(f"{where}: data_offsets {offsets} run backwards (begin > end); {again}")
        if end > data_size:
            raise LigoError(f"{where} runs past the end of the file (truncated); {again}")
        wanted = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != wanted:
            raise LigoError(f"{where}: data_offsets {offsets} span {end - begin} bytes, but shape {shape} of {dtype} "
                            f"needs {wanted}; {again}")
        if end > begin:
            spans.append((begin, end, key))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise LigoError(f"{path}: tensors {a} and {b} share bytes of the file (overlapping data_offsets), which "
                            f"safetensors refuses; save each tensor with its own data")
    return header


def check_shard_index(index: Path, data, folder: Path) -> dict[str, str]:
    """A ``*.index.json``: an object with a ``weight_map`` object of tensor name -> shard file in ``folder``."""
    fix = "restore it or delete it to read every shard in the folder"
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise LigoError(f"{index}: not a valid shard index (needs a 'weight_map' object of tensor -> file); {fix}")
    weight_map = data["weight_map"]
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise LigoError(f"{index}: weight_map[{key!r}] must be a shard file name in this folder, not {name!r}; "
                            f"{fix}")
    for name in dict.fromkeys(weight_map.values()):
        shard = readable(folder / name)
        if not shard.is_file():
            raise LigoError(f"{index} names shard {name}, which is missing; download it again")
    return weight_map


# --- outputs ----------------------------------------------------------------------------------------------------------


def _exists(path: Path) -> bool:
    """Whether anything (a link to nothing too) is at ``path``; a name too long to look up is not there."""
    try:
        os.lstat(path)
        return True
    except OSError:
        return False


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_output(out, *, overwrite: bool = False, sources: Iterable = (), flag: str = "--out",
                 kind: str = "folder") -> Path:
    """Refuse, before any work, a path a command would write (a ``folder`` or a ``file``): one that exists
    without ``overwrite``, one under a regular file, one whose name is too long for its file system, one that is
    a source or inside one (or holds one).  Returns the absolute path."""
    out = Path(out).expanduser().absolute()
    existing = out
    while not _exists(existing):  # the deepest part of the path that is there
        existing = existing.parent
    limit = _name_max(existing if existing.is_dir() else existing.parent)
    for part in out.parts[len(existing.parts) - (existing == out):]:
        # the hidden temporary name beside the output adds about 20 bytes to the output's own name
        if len(os.fsencode(part)) + (20 if part == out.name else 0) > limit:
            raise LigoError(f"{out}: the name {part[:24]}... is too long for the file system ({limit} bytes at "
                            f"most); choose a shorter {flag}")
    if existing == out:
        if not overwrite:
            raise LigoError(f"{out}: already exists; pass --overwrite to replace it or choose another {flag}")
        if kind == "file" and out.is_dir():
            raise LigoError(f"{out}: is a folder; {flag} names a file to write")
    elif not existing.is_dir():
        raise LigoError(f"{out}: {existing} is a file, not a folder; choose another {flag}")
    resolved = out.resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).resolve()
        if resolved == src or src in resolved.parents:
            raise LigoError(f"{out}: the output would overwrite the source {src}; choose another {flag}")
        if resolved in src.parents:
            raise LigoError(f"{out}: the output would replace a folder holding the source {src}; choose another "
                            f"{flag}")
    return out


def remove_leftovers(out: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the hidden ``.NAME.*.partial`` folders (or files) an interrupted write of ``out`` left beside it,
    and say so.  Returns what was removed."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    stale = sorted({*out.parent.glob(f".{out.name}.*.partial"), *out.parent.glob(f".{out.name}.partial")})
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale and log is not None:
        log(f"removed {len(stale)} unfinished output{'s' if len(stale) > 1 else ''} left by an interrupted run "
            f"beside {out} ({', '.join(p.name for p in stale)})")
    return stale


# --- specs recorded in metadata (operator files, ONNX models) ---------------------------------------------------------


def spec_from_metadata(path: Path, field: str, data, fix: str):
    """A :class:`Spec` from the dict a file's metadata records under ``field``: an object whose every spec field
    has its declared type, with the required sizes present and the spec consistent."""
    import dataclasses

    from .spec import Spec

    if not isinstance(data, dict):
        raise LigoError(f"{path}: metadata field {field} must be an object of spec fields, not "
                        f"{type(data).__name__}; {fix}")
    fields = {f.name: f for f in dataclasses.fields(Spec)}
    missing = [name for name, f in fields.items() if f.default is dataclasses.MISSING and name not in data]
    if missing:
        raise LigoError(f"{path}: metadata field {field} lacks {', '.join(missing)}; {fix}")
    for name, value in data.items():
        if name not in fields or value is None and "None" in str(fields[name].type):
            continue
        if name == "labels":
            ok = value is None or isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            base = str(fields[name].type).replace(" | None", "")
            ok = base not in _CONFIG_TYPES or _CONFIG_TYPES[base][0](value)
        if not ok or name in POSITIVE_SIZES and value < 1:
            raise LigoError(f"{path}: metadata field {field}.{name} is {value!r}, not {fields[name].type}; {fix}")
    try:
        spec = Spec.from_dict(data)
        spec.check()
    except (TypeError, ValueError) as e:
        raise LigoError(f"{path}: metadata field {field} is not a valid spec ({e}); {fix}") from None
    return spec


# --- tokenizer and preprocessor configs -------------------------------------------------------------------------------


def _numbers(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) for v in value)


def read_image_normalisation(path: Path, channels: int) -> tuple[list[float], list[float]] | None:
    """(image_mean, image_std) of a preprocessor_config.json, one finite number per channel (a single number counts
    for every channel, as transformers reads it), std > 0; None when the file gives neither field."""
    fix = "fix the field or remove the file (0.5 / 0.5 is used without one)"
    data = read_json_object(path, fix)
    if data.get("image_mean") is None and data.get("image_std") is None:
        return None
    values = []
    for field in ("image_mean", "image_std"):
        value = data.get(field)
        value = [value] * channels if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not _numbers(value) or len(value) != channels:
            raise LigoError(f"{path}: field {field} must be a list of {channels} finite numbers (one per channel), "
                            f"not {value!r}; {fix}")
        values.append([float(v) for v in value])
    if any(v <= 0 for v in values[1]):
        raise LigoError(f"{path}: field image_std must be positive (it divides the pixels), not {values[1]}; {fix}")
    return values[0], values[1]


def read_mask_token(path: Path) -> str | None:
    """The ``mask_token`` a tokenizer_config.json names (a string, or transformers' {"content": ...} form), or None
    when it names none."""
    data = read_json_object(path, "restore the file (the tokenizer's own files)")
    token = data.get("mask_token")
    if isinstance(token, dict):
        token = token.get("content")
    if token is not None and not isinstance(token, str):
        raise LigoError(f"{path}: field mask_token must be a token string (or {{\"content\": \"...\"}}), not "
                        f"{data.get('mask_token')!r}; fix the field or remove it")
    return token
