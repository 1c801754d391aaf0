"""Batch growth of whole model ladders from one TOML manifest: resumable, chainable, shardable.

Library entry point behind ``ligo-convert batch MANIFEST``::

    from ligo_convert.batch import load_manifest, select, run_batch
    manifest = load_manifest("zoo/ladders/ladder-offline.toml", root="runs")
    report = run_batch(manifest, select(manifest, shard=(1, 2)))

A manifest holds an optional ``root`` (the output root, relative to the manifest's folder), a ``[defaults]`` table
and ``[[job]]`` tables.  A job grows ``source`` into ``target`` (or explicit sizes) and writes ``out`` (default: its
``name``) under the root; ``source = "@other-job"`` chains jobs, and jobs run in dependency order.  A job with
``kind = "pretrain"`` trains a small model from scratch on the embedded data instead, so a ladder can start offline.

Everything is checked before anything runs (:func:`load_manifest` and :func:`select` raise :class:`LigoError`, write
nothing).  Each job is built in a hidden ``.<out>.batch-*.partial`` folder beside its output and renamed into place
only once complete (checkpoint, ONNX file, record), so a killed run leaves only complete outputs.  The record
(``growth.json``, or ``pretrain.json`` for pretrain jobs) holds a key: the hash of the resolved job, its source's
content hash and the tool version.  A job whose output holds the same key is skipped; any other is redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import LigoError
from .files import check_output

KINDS = ("grow", "pretrain")
DTYPES = ("float32", "float16", "bfloat16")
RECORD = {"grow": "growth.json", "pretrain": "pretrain.json"}  # the file in each output that holds the batch record
ONNX_FILE = "model.onnx"
HUB_ONNX_FILE = "onnx/model.onnx"  # layout = "hub" (ligo_convert.layout)
REPORT_NAME = "batch-report"

# Every option a [defaults] table or a job may set: its type and the job kinds that use it.  Values left unset take
# the library's own defaults (read from grow()/pretrain()/micro_spec() signatures, so the two never drift).
_BOTH, _GROW = ("grow", "pretrain"), ("grow",)
OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "method": ("str", _GROW), "target": ("str", _GROW), "family": ("str", _BOTH),
    "layers": ("int", _BOTH), "width": ("int", _BOTH), "heads": ("int", _BOTH), "kv_heads": ("int", _GROW),
    "mlp": ("int", _BOTH), "data": ("str", _BOTH), "objective": ("str", _GROW), "steps": ("int", _BOTH),
    "lr": ("float", _BOTH), "batch_size": ("int", _BOTH), "seq_len": ("int", _BOTH), "seed": ("int", _BOTH),
    "device": ("str", _BOTH), "depth_init": ("str", _GROW), "width_init": ("str", _GROW), "noise": ("float", _GROW),
    "shared_width": ("bool", _GROW), "learn": ("str", _GROW), "dtype": ("str", _BOTH), "onnx": ("bool", _BOTH),
    "nproc": ("int", _GROW), "materialize": ("str", _GROW), "parallel": ("str", _GROW), "workers": ("int", _GROW),
    "text_column": ("str", _GROW), "layout": ("str", _BOTH),
}
JOB_KEYS = ("name", "kind", "source", "out")
TOP_KEYS = ("root", "defaults", "job")
SIZES = ("layers", "width", "heads", "kv_heads", "mlp")
# Options that say where or how fast a job runs, not what it makes: changing them does not redo a finished job.
NOT_HASHED = ("device", "nproc", "materialize", "parallel", "workers")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# --- the manifest -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    name: str
    index: int  # 1-based position in the manifest
    kind: str  # "grow" or "pretrain"
    source: str | None  # as written: "@job", a folder, a zoo name or a hub id (None for pretrain)
    out: Path  # absolute, inside the output root
    options: dict  # every option of its kind, resolved (defaults, overrides, library defaults)
    paths: dict = field(default_factory=dict)  # option or "source" -> absolute path, for values naming local paths

    @property
    def upstream(self) -> str | None:
        """The job whose output is this job's source."""
        return self.source[1:] if self.source and self.source.startswith("@") else None

    def spec(self) -> dict:
        """What the job makes, as hashed: the source as written, every option that changes the result, the tool
        version (the source's content hash is added at run time)."""
        opts = {k: v for k, v in self.options.items() if k not in NOT_HASHED}
        return {"kind": self.kind, "source": self.source, **opts, "version": __version__}

    def summary(self) -> str:
        o = self.options
        if self.kind == "pretrain":
            return f"pretrain {o['family']} {o['layers']}x{o['width']} ({o['heads']} heads), {o['steps']} steps"
        sizes = " ".join(f"{k}={o[k]}" for k in SIZES if o.get(k) is not None)
        to = " ".join(x for x in (o.get("target"), sizes) if x)
        return f"grow {self.source} -> {to}, {o['steps']} steps"


@dataclass
class Manifest:
    path: Path
    root: Path
    jobs: dict[str, Job]  # in manifest order
    order: list[str]  # dependency order (manifest order where free)

    def components(self) -> list[list[str]]:
        """The chains/trees of jobs linked by sources (connected components), each in dependency order, in the
        order of their first job in the manifest."""
        parent = {n: n for n in self.jobs}

        def find(n: str) -> str:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for job in self.jobs.values():
            if job.upstream:
                parent[find(job.name)] = find(job.upstream)
        groups: dict[str, list[str]] = {}
        for name in self.order:
            groups.setdefault(find(name), []).append(name)
        return sorted(groups.values(), key=lambda g: min(self.jobs[n].index for n in g))


def _where(path: Path, index: int | None = None, name: str | None = None) -> str:
    if index is None:
        return f"{path}: [defaults]"
    return f"{path}: [[job]] #{index}" + (f" ({name!r})" if name else "")


def _unknown(key: str, known, where: str) -> LigoError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
    return LigoError(f"{where}: unknown key {key!r}{hint}")


def find_manifest(manifest) -> Path:
    """A manifest file, or the name of a bundled one (``zoo/ladders/NAME.toml``: ladder-offline, ladder-vit...)."""
    path = Path(manifest).expanduser()
    if path.is_file() or path.suffix == ".toml" or os.sep in str(manifest):
        return path  # (a folder of the same name is not a manifest: ladder-offline/ holds that ladder's outputs)
    from .descriptors import data_dir

    bundled = data_dir("zoo") / "ladders" / f"{manifest}.toml"
    return bundled if bundled.is_file() else path


def bundled_manifests() -> list[str]:
    from .descriptors import data_dir

    folder = data_dir("zoo") / "ladders"
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        names = ", ".join(bundled_manifests())
        raise LigoError(f"{path}: no such manifest file" + (f" (bundled manifests: {names})" if names else "")) \
            from None
    except IsADirectoryError:
        raise LigoError(f"{path}: is a folder, not a manifest file (.toml)") from None
    except PermissionError:
        raise LigoError(f"{path}: cannot read the manifest (permission denied)") from None
    except UnicodeDecodeError:
        raise LigoError(f"{path}: cannot read the manifest (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as e:
        raise LigoError(f"{path}: not valid TOML: {str(e).splitlines()[0]}") from None


def _check_value(key: str, value, where: str):
    """Type- and range-check one option; returns it normalised (ints accepted for floats)."""
    kind = OPTIONS[key][0]
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool)}[kind]
    if not ok:
        a = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[kind]
        raise LigoError(f"{where}: {key} must be {a}, not {value!r}")
    if kind == "float":
        value = float(value)
    low = 0 if key in ("steps", "seed") else 1
    if kind == "int" and value < low:
        raise LigoError(f"{where}: {key} must be at least {low}, not {value}")
    if kind == "float" and not math.isfinite(value) or key == "lr" and value <= 0 or key == "noise" and value < 0:
        wanted = "positive" if key == "lr" else "0 or more" if key == "noise" else "a finite number"
        raise LigoError(f"{where}: {key} must be {wanted}, not {value}")
    choices = _choices().get(key)
    if choices and value not in choices:
        raise LigoError(f"{where}: {key} {value!r} is not one of {', '.join(choices)}")
    if key == "device" and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise LigoError(f"{where}: device {value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


@functools.lru_cache(maxsize=None)
def _choices() -> dict[str, tuple]:
    from .descriptors import load_descriptors
    from .growth.init import DEPTH_INITS, WIDTH_INITS
    from .growth.fit import PARALLEL, STREAM_CHOICES
    from .growth.operator import LEARN
    from .objectives import OBJECTIVES

    return {"method": methods(), "objective": OBJECTIVES, "depth_init": DEPTH_INITS, "width_init": WIDTH_INITS,
            "learn": LEARN, "dtype": DTYPES, "family": tuple(sorted(load_descriptors())),
            "materialize": STREAM_CHOICES, "parallel": PARALLEL, "layout": ("flat", "hub")}


def methods() -> tuple[str, ...]:
    """LiGO, plus the baselines once ``grow`` takes a ``method`` (then jobs pass it through)."""
    from .grow import grow

    if "method" not in inspect.signature(grow).parameters:
        return ("ligo",)
    from .growth.baselines import METHODS

    return ("ligo", *(m for m in METHODS if m != "ligo"))


def _library_defaults(kind: str) -> dict:
    """The defaults of the functions a job calls, so a manifest without a value behaves like the library."""
    from .grow import grow
    from .growth.pretrain import micro_spec, pretrain

    def of(fn) -> dict:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}

    if kind == "grow":
        values = of(grow)
        values.update(onnx=True, nproc=1, layout="flat")
        values.setdefault("method", "ligo")
    else:
        values = {**of(pretrain), **of(micro_spec)}
        values.update(onnx=True, layout="flat")
    values["dtype"] = None
    return {k: values.get(k) for k, (_, kinds) in OPTIONS.items() if kind in kinds}


def _local_path(value: str, base: Path, *, must_exist: bool) -> Path | None:
    """A value naming a local path (relative to ``base``), or None when it is a name (zoo name, hub id)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if value.startswith((".", "/", "~")) or path.exists() or not must_exist:
        return path.resolve()
    return None


def _parse_set(items) -> dict:
    """``--set key=value`` overrides: TOML values, bare words as strings."""
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LigoError(f"--set {item!r}: write KEY=VALUE, e.g. --set steps=10")
        if key not in OPTIONS:
            raise _unknown(key, OPTIONS, f"--set {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip()
    return out


def load_manifest(manifest, root=None, overrides=None) -> Manifest:
    """Read and check a manifest completely; raises :class:`LigoError` (one line) on any problem, writes nothing.

    ``root`` replaces the manifest's output root (default: its ``root`` key, relative to the manifest's folder,
    else the current directory).  ``overrides`` (``{"steps": 3}`` or ``["steps=3"]``) set options on every job.
    """
    path = find_manifest(manifest)
    data = _read_toml(path)
    base = path.parent.resolve()
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(key, TOP_KEYS, str(path))
    if root is not None:
        out_root = Path(root).expanduser().resolve()
    elif "root" in data:
        if not isinstance(data["root"], str) or not data["root"]:
            raise LigoError(f"{path}: root must be a folder path (a string), not {data['root']!r}")
        out_root = _local_path(data["root"], base, must_exist=False)
    else:
        out_root = Path.cwd().resolve()
    if out_root.exists() and not out_root.is_dir():
        raise LigoError(f"{path}: the output root {out_root} is a file, not a folder")
    check_output(out_root, overwrite=True, flag="--root (or the manifest's root)")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise LigoError(f"{path}: defaults must be a table ([defaults])")
    for key, value in defaults.items():
        if key not in OPTIONS:
            hint = " (it belongs in each [[job]])" if key in JOB_KEYS else ""
            if hint:
                raise LigoError(f"{_where(path)}: key {key!r} cannot be a default{hint}")
            raise _unknown(key, OPTIONS, _where(path))
        defaults[key] = _check_value(key, value, _where(path))
    forced = overrides if isinstance(overrides, dict) else _parse_set(overrides)
    forced = {k: _check_value(k, v, f"--set {k}") for k, v in forced.items()}
    raw_jobs = data.get("job")
    if raw_jobs is None:
        raise LigoError(f"{path}: no jobs; add [[job]] tables (name, source, target, out)")
    if not isinstance(raw_jobs, list) or not all(isinstance(j, dict) for j in raw_jobs):
        raise LigoError(f"{path}: job must be an array of tables: write [[job]], not [job]")

    jobs: dict[str, Job] = {}
    for index, raw in enumerate(raw_jobs, 1):
        job = _make_job(path, base, out_root, index, raw, defaults, forced)
        if job.name in jobs:
            raise LigoError(f"{_where(path, index, job.name)}: job name {job.name!r} is already used by [[job]] "
                            f"#{jobs[job.name].index}; give each job its own name")
        jobs[job.name] = job
    if not jobs:
        raise LigoError(f"{path}: no jobs; add [[job]] tables (name, source, target, out)")
    _check_outputs(path, out_root, jobs)
    for job in jobs.values():
        if job.upstream is not None and job.upstream not in jobs:
            close = difflib.get_close_matches(job.upstream, list(jobs), n=1)
            hint = f"did you mean '@{close[0]}'?" if close else f"jobs: {', '.join(jobs)}"
            raise LigoError(f"{_where(path, job.index, job.name)}: source {job.source!r} names no job in this "
                            f"manifest ({hint})")
    return Manifest(path, out_root, jobs, _order(path, jobs))


def _make_job(path: Path, base: Path, out_root: Path, index: int, raw: dict, defaults: dict, forced: dict) -> Job:
    where = _where(path, index, raw.get("name") if isinstance(raw.get("name"), str) else None)
    for key in raw:
        if key not in OPTIONS and key not in JOB_KEYS:
            raise _unknown(key, (*JOB_KEYS, *OPTIONS), where)
    name = raw.get("name")
    if name is None:
        raise LigoError(f"{where}: missing 'name'; every job needs a name (other jobs refer to it as '@name')")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LigoError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-'")
    kind = raw.get("kind", "grow")
    if kind not in KINDS:
        raise LigoError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    for key in raw:
        if key in OPTIONS and kind not in OPTIONS[key][1]:
            raise LigoError(f"{where}: {key!r} does not apply to a {kind} job")
    options = _library_defaults(kind)
    for layer in (defaults, {k: _check_value(k, v, where) for k, v in raw.items() if k in OPTIONS}, forced):
        options.update({k: v for k, v in layer.items() if k in options})
    paths = {}
    source = raw.get("source")
    if kind == "pretrain":
        if source is not None:
            raise LigoError(f"{where}: a pretrain job has no source (it trains from scratch); remove 'source'")
        if options["family"] is None:
            raise LigoError(f"{where}: missing 'family'; a pretrain job needs the family to build, e.g. "
                            f"family = \"hf-vit\"")
    else:
        if source is None:
            raise LigoError(f"{where}: missing 'source'; give a folder, zoo name, hub id or '@job-name'")
        if not isinstance(source, str) or not source:
            raise LigoError(f"{where}: source must be a string, not {source!r}")
        if not source.startswith("@") and (place := _checked_place(source, base, where, "source")) is not None:
            paths["source"] = place
        if options["target"] is None and all(options[k] is None for k in SIZES):
            raise LigoError(f"{where}: missing 'target'; give a zoo name, folder or hub id, or sizes (layers, "
                            f"width, heads, mlp)")
        if options["target"] is not None and (place := _checked_place(options["target"], base, where, "target")):
            paths["target"] = place
    if options.get("data") is not None:
        data = _local_path(options["data"], base, must_exist=False)
        if not data.exists():
            raise LigoError(f"{where}: data {options['data']!r} does not exist ({data}); give an image folder or "
                            f"text file/folder, or leave data out for the embedded data")
        paths["data"] = data
    out = raw.get("out", name)
    if not isinstance(out, str) or not out:
        raise LigoError(f"{where}: out must be a folder path (a string), not {out!r}")
    out_path = Path(out).expanduser()
    out_path = (out_path if out_path.is_absolute() else out_root / out_path).resolve()
    if out_path == out_root or out_root not in out_path.parents:
        raise LigoError(f"{where}: out {out!r} is outside the output root {out_root}; give a path inside it "
                        f"(or move the root with the manifest's root key or --root)")
    if any(part.startswith(".") for part in out_path.relative_to(out_root).parts):
        raise LigoError(f"{where}: out {out!r} has a part starting with '.'; those names are kept for unfinished "
                        f"outputs")
    return Job(name, index, kind, source, out_path, options, paths)


def _checked_place(value: str, base: Path, where: str, what: str) -> Path | None:
    """A source or target: a local folder (relative to the manifest), else a zoo name or an 'org/name' hub id."""
    path = _local_path(value, base, must_exist=True)
    if path is not None:
        if not path.is_dir():
            raise LigoError(f"{where}: {what} {value!r} is not a checkpoint folder ({path} "
                            f"{'is a file' if path.exists() else 'does not exist'})")
        return path
    from .zoo import find_entry

    if find_entry(value) is None and (value.count("/") != 1 or value.endswith("/")):
        raise LigoError(f"{where}: {what} {value!r} is no folder, zoo name (`ligo-convert zoo`) or 'org/name' "
                        f"hub id")
    return None


def _check_outputs(path: Path, root: Path, jobs: dict[str, Job]) -> None:
    by_out: dict[Path, Job] = {}
    for job in jobs.values():
        if job.out in by_out:
            other = by_out[job.out]
            raise LigoError(f"{path}: jobs {other.name!r} and {job.name!r} both write {job.out}; give each job "
                            f"its own out")
        by_out[job.out] = job
    for job in jobs.values():
        for parent in job.out.parents:
            if parent in by_out:
                raise LigoError(f"{path}: job {job.name!r} writes {job.out} inside the output of job "
                                f"{by_out[parent].name!r}; outputs must not nest")
        for what, place in job.paths.items():
            if what in ("source", "target") and (place == job.out or job.out in place.parents):
                raise LigoError(f"{_where(path, job.index, job.name)}: out {job.out} would replace its own "
                                f"{what}; choose another out")
        # no job writes inside (or over) a folder any job reads: its staging folder would land in that source
        for other in jobs.values():
            for what, place in other.paths.items():
                if what in ("source", "target") and place == job.out or place in job.out.parents or job.out in place.parents:
                    mine = "its own" if other is job else f"job {other.name!r}'s"
                    raise LigoError(f"{_where(path, job.index, job.name)}: out {job.out} is inside or over {mine} "
                                    f"{what} {place}; choose an out outside every source")
        check_output(job.out, overwrite=True, flag=f"out of job {job.name!r}")


def _order(path: Path, jobs: dict[str, Job]) -> list[str]:
    """Dependency order, manifest order among jobs that are free to run; a cycle is an error naming it.  A job has
    at most one upstream job, so walking up from each job finds its chain."""
    done: dict[str, None] = {}
    for name in jobs:
        chain: list[str] = []
        n: str | None = name
        while n is not None and n not in done:
            if n in chain:
                cycle = chain[chain.index(n):] + [n]
                raise LigoError(f"{path}: the jobs' sources form a cycle: {' -> '.join(cycle)} (each takes its "
                                f"source from the next); give one of them a source outside the cycle")
            chain.append(n)
            n = jobs[n].upstream
        done.update(dict.fromkeys(reversed(chain)))
    return list(done)


# --- choosing the jobs of this run ------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise LigoError(f"--shard {text!r}: write I/N with 1 <= I <= N, e.g. --shard 2/4 (SLURM: "
                        f"$((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT)")
    return int(m.group(1)), int(m.group(2))


def shards(manifest: Manifest, count: int) -> list[list[str]]:
    """Split the jobs into ``count`` disjoint slices that never separate a job from the jobs it depends on: whole
    components (chains) are dealt out, biggest first, each to the slice with the fewest jobs so far (ties: the
    first).  Every process reading the same manifest computes the same split."""
    slices: list[list[str]] = [[] for _ in range(count)]
    comps = manifest.components()
    for comp in sorted(comps, key=lambda c: -len(c)):  # stable: manifest order among equal sizes
        target = min(range(count), key=lambda i: (len(slices[i]), i))
        slices[target].extend(comp)
    order = {n: i for i, n in enumerate(manifest.order)}
    return [sorted(s, key=order.__getitem__) for s in slices]


def select(manifest: Manifest, only=None, shard: tuple[int, int] | None = None) -> list[Job]:
    """The jobs to run, in dependency order.  ``only``: these names and the jobs they depend on (skipped when up
    to date).  ``shard=(i, n)``: the i-th of n slices (see :func:`shards`)."""
    names = list(manifest.order)
    if only:
        wanted: set[str] = set()
        for item in only:
            for name in (n.strip() for n in item.split(",")):
                if not name:
                    continue
                if name not in manifest.jobs:
                    close = difflib.get_close_matches(name, list(manifest.jobs), n=1)
                    hint = f"did you mean {close[0]!r}?" if close else f"jobs: {', '.join(manifest.jobs)}"
                    raise LigoError(f"--only {name}: no such job in {manifest.path} ({hint})")
                while name is not None and name not in wanted:
                    wanted.add(name)
                    name = manifest.jobs[name].upstream
        names = [n for n in names if n in wanted]
    if shard is not None:
        i, n = shard
        mine = set(shards(manifest, n)[i - 1])
        names = [x for x in names if x in mine]
    jobs = [manifest.jobs[n] for n in names]
    for job in jobs:  # never replace a folder this tool did not make
        if job.out.exists() and _record(job) is None:
            raise LigoError(f"{job.out}: exists but was not written by `ligo-convert batch` (no batch record in "
                            f"{RECORD[job.kind]}); move it away or give job {job.name!r} another out")
    return jobs


# --- resuming ---------------------------------------------------------------------------------------------------------

_HASH_SKIP = set(RECORD.values())  # records hold wall times: not part of what a model is


def content_hash(folder: Path, cache: dict | None = None) -> str:
    """sha256 over the names and contents of a checkpoint folder's files (records and ONNX exports left out).
    Files in the Hugging Face cache are links to blobs named by their content hash: that name is used unread."""
    folder = Path(folder)
    if cache is not None and folder in cache:
        return cache[folder]
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if (path.name.startswith(".") or path.name in _HASH_SKIP or not path.is_file()
                or path.name.endswith((".onnx", ".onnx.data"))):
            continue
        h.update(path.name.encode() + b"\0" + _file_digest(path).encode() + b"\n")
    digest = h.hexdigest()
    if cache is not None:
        cache[folder] = digest
    return digest


def _file_digest(path: Path) -> str:
    if path.is_symlink():
        blob = path.resolve()
        if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", blob.name):
            return blob.name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def job_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _record(job: Job) -> dict | None:
    """The batch record in a job's output, or None (no output, or not one this tool wrote)."""
    path = job.out / RECORD[job.kind]
    try:
        batch = json.loads(path.read_text()).get("batch")
    except (OSError, ValueError, AttributeError):
        return None
    return batch if isinstance(batch, dict) and "key" in batch else None


# --- running ----------------------------------------------------------------------------------------------------------


@dataclass
class JobResult:
    name: str
    kind: str
    status: str  # done | up-to-date | failed | blocked | interrupted; dry run: run | up-to-date | blocked
    out: str
    source: str | None = None
    key: str | None = None
    loss_before: float | None = None  # grow: validation loss of the initial operator; pretrain: first train loss
    loss_after: float | None = None  # grow: after fitting; pretrain: last train loss
    onnx: str | None = None
    onnx_max_diff: float | None = None
    wall_s: float | None = None
    error: str | None = None
    note: str | None = None


@dataclass
class BatchReport:
    manifest: str
    root: str
    jobs: list[JobResult]
    shard: str | None = None
    only: list[str] | None = None
    dry_run: bool = False
    finished: bool = False
    version: str = __version__
    started: str = ""
    wall_s: float = 0.0

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.jobs if r.status in ("failed", "blocked", "interrupted")]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["counts"] = {s: sum(r.status == s for r in self.jobs) for s in dict.fromkeys(r.status for r in self.jobs)}
        return out


def default_report_path(manifest: Manifest, shard: tuple[int, int] | None) -> Path:
    suffix = f"-shard-{shard[0]}-of-{shard[1]}" if shard else ""
    return manifest.root / f"{REPORT_NAME}{suffix}.json"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _checked_report(manifest: Manifest, report_path: Path) -> Path:
    """The report is written after the first job: a path that cannot take it is refused before any job runs (in
    a dry run too), as is one inside a job's output or a source."""
    sources = [p for job in manifest.jobs.values() for what, p in job.paths.items() if what != "data"]
    report_path = check_output(report_path, overwrite=True, kind="file", flag="--report", sources=sources)
    for job in manifest.jobs.values():
        if job.out == report_path.resolve() or job.out in report_path.resolve().parents:
            raise LigoError(f"{report_path}: the report would go inside the output of job {job.name!r}; choose a "
                            f"--report path outside it")
    return report_path


def _stale_partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.batch-*.partial")) if out.parent.is_dir() else []


def run_batch(manifest: Manifest, jobs: list[Job], *, dry_run: bool = False, report_path=None,
              shard: tuple[int, int] | None = None, only=None, log: Callable[[str], None] | None = None,
              progress: bool = False) -> BatchReport:
    """Run ``jobs`` (from :func:`select`) one after another, one model in memory at a time.

    A job that fails is reported and the run goes on with the jobs that do not depend on it (those are
    ``blocked``).  Outside a dry run the report is written as JSON to ``report_path`` (default
    ``ROOT/batch-report[-shard-I-of-N].json``) after every job.
    """
    say = log or (lambda msg: None)
    start = time.perf_counter()
    report = BatchReport(str(manifest.path), str(manifest.root), [], f"{shard[0]}/{shard[1]}" if shard else None,
                         list(only) if only else None, dry_run,
                         started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    report_path = Path(report_path) if report_path is not None else default_report_path(manifest, shard)
    report_path = _checked_report(manifest, report_path)
    results: dict[str, JobResult] = {}
    hashes: dict = {}

    def save_report(finished: bool = False) -> None:
        report.finished, report.wall_s = finished, round(time.perf_counter() - start, 3)
        if not dry_run:
            _write_json(report_path, report.to_dict())

    for i, job in enumerate(jobs, 1):
        result = JobResult(job.name, job.kind, "run", str(job.out), job.source)
        results[job.name] = result
        report.jobs.append(result)
        tag = f"[{i}/{len(jobs)}] {job.name}"
        up = results.get(job.upstream) if job.upstream else None
        if up is not None and up.status in ("failed", "blocked", "interrupted"):
            result.status, result.error = "blocked", f"its source job {job.upstream!r} {up.status}"
            say(f"{tag}: blocked ({result.error})")
        else:
            _attempt_job(job, up, manifest, result, hashes, dry_run=dry_run, say=say, tag=tag, progress=progress,
                         save_report=save_report)
        save_report()  # after every job, so a killed run still leaves a report
    save_report(finished=True)
    return report


def _attempt_job(job: Job, up: JobResult | None, manifest: Manifest, result: JobResult, hashes: dict, *,
                 dry_run: bool, say: Callable[[str], None], tag: str, progress: bool,
                 save_report: Callable[[], None]) -> None:
    """Run (or in a dry run, plan) one job, recording a failure in ``result``; only an interrupt escapes."""
    t0 = time.perf_counter()
    try:
        _run_or_plan(job, up, manifest, result, hashes, dry_run=dry_run, say=say, tag=tag, progress=progress, t0=t0)
    except LigoError as e:
        result.status, result.error = "failed", str(e)
        result.wall_s = round(time.perf_counter() - t0, 3)
        say(f"{tag}: FAILED: {e}")
    except KeyboardInterrupt:
        result.status, result.error = "interrupted", "interrupted"
        result.wall_s = round(time.perf_counter() - t0, 3)
        save_report()
        raise
    except Exception as e:  # a bug: keep its traceback, go on with the other jobs
        result.status, result.error = "failed", f"{type(e).__name__}: {e}".splitlines()[0]
        result.wall_s = round(time.perf_counter() - t0, 3)
        say(f"{tag}: FAILED with an internal error:\n{traceback.format_exc().rstrip()}")
    finally:
        _release_memory()


def _run_or_plan(job: Job, up: JobResult | None, manifest: Manifest, result: JobResult, hashes: dict, *,
                 dry_run: bool, say: Callable[[str], None], tag: str, progress: bool, t0: float) -> None:
    """Skip the job if its output is up to date, else run it (a dry run only says why it would run)."""
    if not dry_run:
        for stale in _stale_partials(job.out):  # left by a killed run; this job is ours alone
            shutil.rmtree(stale, ignore_errors=True)
    if dry_run and up is not None and up.status == "run":
        result.note = f"after {job.upstream}"
        say(f"{tag}: would run after {job.upstream}: {job.summary()}")
        return
    source = _source_for(job, manifest)
    record = _record(job)
    spec, key = _spec_and_key(job, source, record, hashes, dry_run)
    result.key = key
    if key is not None and record is not None and record.get("key") == key:
        result.status, result.note = "up-to-date", "output holds the same job key"
        _fill_from_record(result, record)
        result.wall_s = round(time.perf_counter() - t0, 3)
        say(f"{tag}: up to date ({job.out})")
        return
    why = "no output yet" if record is None else "changed" if key else "source not downloaded yet"
    if dry_run:
        result.note = why
        say(f"{tag}: would run ({why}): {job.summary()}")
        return
    say(f"{tag}: {job.summary()} ({why})")
    _run_job(job, source, spec, key, manifest, result, say, progress)
    result.status = "done"
    result.wall_s = round(time.perf_counter() - t0, 3)
    say(f"{tag}: done in {result.wall_s:.1f} s -> {job.out}")


def _spec_and_key(job: Job, source: str | None, record: dict | None, hashes: dict,
                  dry_run: bool) -> tuple[dict | None, str | None]:
    """The resolved job (with its source's content hash) and its key.  A dry run with no output to compare reads
    nothing, and one whose source is not downloaded yet gets no key (it would run) instead of failing."""
    spec = key = None
    if record is not None or not dry_run:
        try:
            spec = {**job.spec(), "source_sha256": _source_hash(source, hashes, offline=dry_run)}
            key = job_key(spec)
        except LigoError:
            if not dry_run:
                raise
    return spec, key


def _source_for(job: Job, manifest: Manifest) -> str | None:
    if job.kind == "pretrain":
        return None
    if job.upstream:
        out = manifest.jobs[job.upstream].out
        if _record(manifest.jobs[job.upstream]) is None:
            raise LigoError(f"its source job {job.upstream!r} has no output at {out}; run it first (it is not in "
                            f"this selection)")
        return str(out)
    return str(job.paths["source"]) if job.paths.get("source") else job.source


def _source_hash(source: str | None, cache: dict, offline: bool = False) -> str | None:
    """The content hash of a job's source; ``offline``: from the local Hugging Face cache only (dry runs download
    nothing)."""
    if source is None:
        return None
    from .checkpoint import resolve_source

    saved = os.environ.get("HF_HUB_OFFLINE")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # checkpoint.download reads it at each call
    try:
        return content_hash(resolve_source(source), cache)
    finally:
        if offline:
            if saved is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = saved


def _fill_from_record(result: JobResult, record: dict) -> None:
    for key in ("loss_before", "loss_after", "onnx_max_diff"):
        setattr(result, key, record.get(key))
    result.onnx = record.get("onnx")


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@contextlib.contextmanager
def _staging(out: Path):
    """A hidden folder beside ``out`` to build the output in; removed (with any parent folders it made) unless the
    output was moved out of it."""
    created = [d for d in [out.parent, *out.parent.parents] if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    box = Path(tempfile.mkdtemp(prefix=f".{out.name}.batch-", suffix=".partial", dir=out.parent))
    try:
        yield box / out.name
    except BaseException:
        shutil.rmtree(box, ignore_errors=True)
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    shutil.rmtree(box, ignore_errors=True)


def _publish(staged: Path, out: Path) -> None:
    """Move a finished output into place; an older version is moved aside first and then deleted."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o777 & ~umask)  # temporary folders are private (0700); outputs get the usual folder mode
    if out.exists():
        old = out.with_name(f".{out.name}.batch-old-{os.getpid()}.partial")
        os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, out)


def _run_job(job: Job, source: str | None, spec: dict, key: str, manifest: Manifest, result: JobResult,
             say: Callable[[str], None], progress: bool) -> None:
    o = job.options
    with _staging(job.out) as staged:
        t0 = time.perf_counter()
        if job.kind == "pretrain":
            _pretrain(job, staged, progress)
        elif o["nproc"] > 1 and o["method"] == "ligo":  # the baselines fit nothing: nothing to spread
            _grow_torchrun(job, source, staged, say)
        else:
            _grow(job, source, staged, say, progress)
        record_path = staged / RECORD[job.kind]
        record = json.loads(record_path.read_text())
        if job.kind == "grow":
            result.loss_before, result.loss_after = record.get("loss_init"), record.get("loss_final")
        else:
            result.loss_before, result.loss_after = record.get("loss_first"), record.get("loss_last")
        if o["onnx"]:
            # hub: onnx/model.onnx (+ genai_config.json for LLaMA-style decoders) inside the job's own folder
            name = HUB_ONNX_FILE if o["layout"] == "hub" else ONNX_FILE
            say(f"  exporting {name} and validating it with onnxruntime")
            if o["layout"] == "hub":
                from .layout import export_hub

                hub = export_hub(staged, staged)
                rep, failure = hub.reports[-1], hub.failure()
            else:
                from .export import export_onnx

                rep = export_onnx(staged, staged / ONNX_FILE, source=str(job.out))
                failure = rep.failure()
            result.onnx_max_diff = rep.max_diff
            if not rep.ok:
                raise LigoError(f"ONNX validation failed: {failure}")
            result.onnx = str(job.out / name)
            say(f"  ONNX matches PyTorch: max abs diff {rep.max_diff:.2e} <= {rep.atol:g}")
        record["batch"] = {
            "key": key, "job": job.name, "manifest": str(manifest.path), "spec": spec,
            "loss_before": result.loss_before, "loss_after": result.loss_after,
            "onnx": result.onnx, "onnx_max_diff": result.onnx_max_diff,
            "wall_s": round(time.perf_counter() - t0, 3),
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        _publish(staged, job.out)


def _torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _grow(job: Job, source: str, staged: Path, say, progress: bool) -> None:
    from .grow import grow

    o = job.options
    method = {"method": o["method"]} if o["method"] != "ligo" else {}  # only offered when grow takes it
    result = grow(source, str(job.paths.get("target") or o["target"]) if o["target"] else None,
                  layers=o["layers"], width=o["width"], heads=o["heads"], kv_heads=o["kv_heads"], mlp=o["mlp"],
                  out=staged, family=o["family"], data=str(job.paths["data"]) if o["data"] else None,
                  objective=o["objective"], steps=o["steps"], lr=o["lr"], batch_size=o["batch_size"],
                  seq_len=o["seq_len"], seed=o["seed"], device=o["device"], depth_init=o["depth_init"],
                  width_init=o["width_init"], noise=o["noise"], shared_width=o["shared_width"], learn=o["learn"],
                  dtype=_torch_dtype(o["dtype"]), log=lambda msg: _relay(msg, say), progress=progress,
                  materialize=o["materialize"], parallel=o["parallel"], workers=o["workers"],
                  text_column=o["text_column"], **method)
    del result  # the grown weights and the operator: the next model must not share memory with them


def _relay(msg: str, say) -> None:
    if not msg.startswith("wrote "):  # grow names the hidden staging folder; the batch says where the output went
        say(f"  {msg}")


def _grow_torchrun(job: Job, source: str, staged: Path, say) -> None:
    """Data-parallel fitting: ``torchrun --standalone --nproc_per_node N -m ligo_convert grow ...`` in a child
    process, which writes the output (rank 0); this process only waits."""
    o = job.options
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={o['nproc']}",
           "-m", "ligo_convert", "grow", source]
    if o["target"]:
        cmd.append(str(job.paths.get("target") or o["target"]))
    flags = {"layers": o["layers"], "width": o["width"], "heads": o["heads"], "kv-heads": o["kv_heads"],
             "mlp": o["mlp"], "to": o["family"], "data": str(job.paths["data"]) if o["data"] else None,
             "objective": o["objective"], "steps": o["steps"], "lr": o["lr"], "batch-size": o["batch_size"],
             "seq-len": o["seq_len"], "seed": o["seed"], "device": o["device"], "depth-init": o["depth_init"],
             "width-init": o["width_init"], "noise": o["noise"], "learn": o["learn"], "dtype": o["dtype"],
             "materialize": o["materialize"], "parallel": o["parallel"], "workers": o["workers"],
             "text-column": o["text_column"], "out": str(staged)}
    for flag, value in flags.items():
        if value is not None:
            cmd += [f"--{flag}", repr(value) if isinstance(value, float) else str(value)]
    if o["shared_width"]:
        cmd.append("--shared-width")
    say(f"  torchrun with {o['nproc']} processes")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = b""
    try:
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):  # relay the child's messages and bars as they come
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-4000:]
        proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if proc.returncode != 0:
        lines = [ln.strip() for ln in tail.decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
        raise LigoError(f"torchrun grow exited with status {proc.returncode}: {why.removeprefix('error: ')}")


def _pretrain(job: Job, staged: Path, progress: bool) -> None:
    from .canonical import from_tensors, save
    from .growth.pretrain import micro_spec, pretrain

    o = job.options
    spec = micro_spec(o["family"], layers=o["layers"], width=o["width"], heads=o["heads"], mlp=o["mlp"])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=o["steps"], desc="pretraining", unit="step", leave=False, file=sys.stderr, disable=None)

    def on_step(step, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

    try:
        weights, losses = pretrain(spec, str(job.paths["data"]) if o["data"] else None, None, o["steps"], o["lr"],
                                   o["batch_size"], o["seq_len"], o["seed"], o["device"], on_step)
    finally:
        if bar is not None:
            bar.close()
    info = {"family": o["family"], "spec": spec.to_dict(), "steps": o["steps"], "lr": o["lr"],
            "batch_size": o["batch_size"], "seed": o["seed"], "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "versions": {"ligo_convert": __version__}}
    save(from_tensors(spec, weights, family=o["family"]), staged, dtype=_torch_dtype(o["dtype"]),
         extra_files={RECORD["pretrain"]: json.dumps(info, indent=2) + "\n"})
