"""``grow``: read a small checkpoint, build the LiGO operator, fit it on data, write the large model.

Library entry point behind ``ligo-convert grow SRC DST``::

    from ligo_convert.grow import grow
    result = grow("vit-small", "vit-base", data="images/", out="vit-base-ligo")

The target is a zoo name, a folder or hub id whose config gives the sizes, or explicit ``layers/width/heads/
kv_heads/mlp`` (which also override a named target).  The output goes in the target's family layout (the source's
family for explicit sizes) with config, carried tokenizer/preprocessor files, and ``growth.json``.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from . import data as data_mod
from .canonical import CanonicalModel, from_tensors, load, save
from .checkpoint import read_config, resolve_source
from .descriptors import Descriptor, detect_family, get_descriptor
from .errors import LigoError
from .exprs import Unresolved, evaluate
from .growth import baselines
from .growth import init as inits
from .growth.fit import DEFAULT_LR, DEFAULT_STEPS, Teacher, distributed, evaluate_loss, fit, resolve_device, world
from .growth.operator import LigoOperator, check_growable
from .objectives import choose_objective
from .spec import Spec

SIZE_KEYS = ("layers", "width", "heads", "kv_heads", "mlp", "head_dim")


# --- the target -------------------------------------------------------------------------------------------------------


def sizes_from_config(descriptor: Descriptor, config: dict, where: str) -> dict:
    """layers/width/heads/kv_heads/mlp/head_dim a family's config states, with the family's defaults applied."""
    values = {}
    for key in SIZE_KEYS:
        cf = descriptor.config_fields.get(key)
        if cf is not None:
            value = cf.read(config)
            if value is not None:
                values[key] = value
    pending = {k: v for k, v in {**descriptor.config_defaults, **descriptor.derive}.items()
               if k in SIZE_KEYS and k not in values}
    for _ in range(len(pending) + 1):  # defaults may refer to each other
        for key, expr in list(pending.items()):
            try:
                values[key] = evaluate(expr, values) if isinstance(expr, str) else expr
                del pending[key]
            except Unresolved:
                pass
    missing = [k for k in ("layers", "width", "heads", "mlp") if not values.get(k)]
    if missing:
        raise LigoError(f"{where}: its config does not give the target's {', '.join(missing)}; pass --layers "
                        f"--width --heads --mlp")
    values.setdefault("kv_heads", values["heads"])
    values.setdefault("head_dim", values["width"] // values["heads"])
    return {k: int(v) for k, v in values.items()}


def resolve_target(target: str | None) -> tuple[dict, str | None, str | None]:
    """(sizes, family, name) of a target given as a zoo name, a folder or a hub id; ({}, None, None) for None."""
    if target is None:
        return {}, None, None
    path = Path(target).expanduser()
    if not path.exists():
        try:
            from .zoo import find_entry, target_sizes
        except ImportError:  # the zoo module is optional for growth
            find_entry = target_sizes = None
        if find_entry is not None and find_entry(str(target)) is not None:
            entry = find_entry(str(target))
            return target_sizes(str(target)), entry["family"], str(target)
    folder = resolve_source(target)
    config = read_config(folder)
    if not config:
        raise LigoError(f"{folder}: no config.json; a growth target needs a config (or pass --layers --width --heads "
                        f"--mlp)")
    descriptor = detect_family(config, [], str(folder))
    return sizes_from_config(descriptor, config, str(folder)), descriptor.name, folder.name


def target_spec(source: Spec, sizes: dict | None = None, layers: int | None = None, width: int | None = None,
                heads: int | None = None, kv_heads: int | None = None, mlp: int | None = None) -> Spec:
    """The source spec with the sizes replaced.  Unset sizes keep the source's proportions: heads and mlp scale
    with the width, kv_heads keeps heads / kv_heads."""
    sizes = dict(sizes or {})
    for key, value in (("layers", layers), ("width", width), ("heads", heads), ("kv_heads", kv_heads), ("mlp", mlp)):
        if value is not None:
            if value < 1:
                raise LigoError(f"--{key.replace('_', '-')} must be at least 1, not {value}")
            sizes[key] = value
            if key == "heads" and kv_heads is None:
                sizes.pop("kv_heads", None)
    if sizes.get("head_dim", source.head_dim) != source.head_dim:
        raise LigoError(f"the target has head_dim {sizes['head_dim']} but the source has {source.head_dim}; LiGO "
                        f"keeps the head dimension and grows the number of heads")
    new_width = sizes.get("width", source.width)

    def scaled(value: int, what: str) -> int:
        if (value * new_width) % source.width:
            raise LigoError(f"cannot scale {what} ({value}) by the width ratio {new_width}/{source.width}; pass "
                            f"--{what.replace('_', '-')}")
        return value * new_width // source.width

    new_heads = sizes.get("heads") or scaled(source.heads, "heads")
    if "kv_heads" in sizes:
        new_kv = sizes["kv_heads"]
    elif (new_heads * source.kv_heads) % source.heads == 0:
        new_kv = new_heads * source.kv_heads // source.heads
    else:
        raise LigoError(f"cannot keep {source.heads // source.kv_heads} query heads per key/value head with "
                        f"{new_heads} heads; pass --kv-heads")
    if new_heads % new_kv:
        raise LigoError(f"--heads {new_heads} is not a multiple of kv_heads {new_kv}; choose heads that split into "
                        f"{new_kv} groups or pass --kv-heads")
    return source.replace(layers=sizes.get("layers", source.layers), width=new_width, heads=new_heads,
                          kv_heads=new_kv, mlp=sizes.get("mlp") or scaled(source.mlp, "mlp"))


def check_family(spec: Spec, source: Spec, family: str) -> Descriptor:
    """The output family must hold the grown model, and its config must express the head layout."""
    descriptor = get_descriptor(family)
    reason = descriptor.supports(spec)
    if reason:
        raise LigoError(f"the source cannot be mapped to family {family}: {reason}; grow into the source's own "
                        f"family or choose a target of a family that can hold it")
    if "head_dim" not in descriptor.config_fields and spec.heads * spec.head_dim != spec.width:
        raise LigoError(f"family {family} derives head_dim from width / heads, so {spec.heads} heads on a width of "
                        f"{spec.width} would change head_dim from {source.head_dim}; use --heads "
                        f"{spec.width // source.head_dim}")
    return descriptor


# --- growing ----------------------------------------------------------------------------------------------------------


@dataclass
class GrowResult:
    out: Path | None  # None on ranks other than 0 and when nothing was written
    spec: Spec
    family: str
    weights: dict[str, torch.Tensor] | None  # the grown canonical weights (rank 0)
    report: dict = field(default_factory=dict)  # what growth.json holds
    operator: LigoOperator | None = None


def _name_of(source) -> str:
    if isinstance(source, CanonicalModel):
        return source.source.name if source.source is not None else "model"
    return Path(str(source)).name or str(source)


def grow(source, target: str | None = None, *, layers: int | None = None, width: int | None = None,
         heads: int | None = None, kv_heads: int | None = None, mlp: int | None = None, out=None,
         family: str | None = None, data=None, objective: str = "auto", steps: int = DEFAULT_STEPS,
         lr: float = DEFAULT_LR, batch_size: int = 16, seq_len: int = 64, seed: int = 0, device: str = "auto",
         depth_init: str = "stack", width_init: str = "random", noise: float = inits.DEFAULT_NOISE,
         shared_width: bool = False, learn: str = "both", operator: str | os.PathLike | None = None,
         save_operator: str | os.PathLike | None = None, eval_batches: int = 8, overwrite: bool = False,
         write: bool = True, dtype: torch.dtype | None = None, log: Callable[[str], None] | None = None,
         progress: bool = False, method: str = "ligo", init: str | None = None) -> GrowResult:
    """Grow ``source`` (a checkpoint folder, zoo name, hub id or :class:`CanonicalModel`) with LiGO.

    Fits the operator for ``steps`` steps (0: keep the initial operator; ``operator``: apply a saved one without
    fitting), then writes the grown model to ``out`` (``write=False``: only return it).  ``method`` picks a baseline
    instead of LiGO (``stack``, ``interpolate``, ``net2net``, ``aki``, ``lemon``, ``scratch``: no operator, no
    fitting); ``init`` starts the LiGO operator from one of those methods' expansions.  Every user error raises
    :class:`LigoError` before anything is written; the source is never touched.
    """
    say = log or (lambda msg: None)
    wall = time.perf_counter()
    src = source if isinstance(source, CanonicalModel) else load(source)
    sizes, target_family, target_name = resolve_target(target)
    explicit = dict(layers=layers, width=width, heads=heads, kv_heads=kv_heads, mlp=mlp)
    if not sizes and all(v is None for v in explicit.values()):
        raise LigoError("no growth target: name one (zoo name, folder or hub id) or pass --layers/--width/--heads/"
                        "--mlp")
    spec_t = target_spec(src.spec, sizes, **explicit)
    check_growable(src.spec, spec_t)
    out_family = family or target_family or src.family
    check_family(spec_t, src.spec, out_family)
    if depth_init not in inits.DEPTH_INITS:
        raise LigoError(f"unknown depth init {depth_init!r}; choose one of {', '.join(inits.DEPTH_INITS)}")
    if width_init not in inits.WIDTH_INITS:
        raise LigoError(f"unknown width init {width_init!r}; choose one of {', '.join(inits.WIDTH_INITS)}")
    if steps < 0:
        raise LigoError(f"--steps must be 0 or more, not {steps}")
    if method != "ligo" and method not in baselines.METHODS:
        raise LigoError(f"unknown method {method!r}; choose one of ligo, {', '.join(baselines.METHODS)}")
    if method != "ligo" and (init or operator):
        raise LigoError(f"--init and --operator belong to the ligo method, not {method}")
    method_info = baselines.describe(method, src.spec, spec_t) if method != "ligo" else {}  # refusals happen here
    if out is None and write:
        tname = target_name or f"L{spec_t.layers}-D{spec_t.width}"
        out = Path(f"{tname}-from-{_name_of(source)}-{method}")
    if write and out is not None and Path(out).exists() and not overwrite:
        raise LigoError(f"{out}: already exists; pass --overwrite to replace it or choose another --out")
    dev = resolve_device(device)

    def run_baseline() -> tuple[dict, dict]:
        weights = src.materialize(torch.float32)
        grown = baselines.expand(method, src.spec, weights, spec_t, seed)
        report: dict = {
            "source": str(src.source) if src.source is not None else _name_of(source),
            "source_family": src.family, "target": target or None, "family": out_family, **method_info,
            "source_spec": _sizes(src.spec), "target_spec": _sizes(spec_t), "seed": seed, "steps": 0,
        }
        if eval_batches > 0:  # the same held-out loss LiGO reports at init, for comparison
            obj, why = choose_objective(src.spec, objective)
            val = list(itertools.islice(data_mod.batches(spec_t, data, src.source, "val", batch_size, seq_len, seed),
                                        eval_batches))
            teacher = Teacher(src.spec, weights, dev) if obj == "distill" else None
            report.update({"objective": obj, "objective_reason": why, "data": data_mod.describe(spec_t, data),
                           "loss_init": evaluate_loss(spec_t, grown, val, obj, teacher, dev)})
            say(f"{method}: validation {obj} loss of the grown model {report['loss_init']:.4f}")
        return grown, report

    def run() -> GrowResult:
        rank, size = world()
        if method != "ligo":
            grown, report = run_baseline()
            return finish(rank, grown, report, None)
        weights = src.materialize(torch.float32)
        op = LigoOperator(src.spec, spec_t, weights, shared_width=shared_width, learn=learn)
        op.initialize(depth_init, width_init, noise, seed)
        init_note = baselines.ligo_init(op, init, seed) if init else None
        op.to(dev)
        fitting = operator is None and steps > 0
        report: dict = {
            "source": str(src.source) if src.source is not None else _name_of(source),
            "source_family": src.family,
            "target": target or None,
            "family": out_family,
            "method": "ligo",
            "variant": "shared" if shared_width else "per-layer",
            "learn": learn,
            "init": ({"method": init, "note": init_note} if init else
                     {"depth": depth_init, "width": width_init, "noise": noise}),
            "source_spec": _sizes(src.spec),
            "target_spec": _sizes(spec_t),
            "operator_parameters": op.operator_parameter_count(),
            "seed": seed,
        }
        if operator is not None:
            meta = op.load(operator)
            report.update({"operator_file": str(operator), "steps": 0, "fitted_with": {k: meta.get(k) for k in (
                "steps", "lr", "objective", "data") if k in meta}})
            say(f"applied the operator from {operator}")
        if fitting:
            obj, why = choose_objective(src.spec, objective)
            say(f"objective: {why}")
            if not any(p.requires_grad for p in op.parameters()):
                say(f"with --learn {learn} this growth has nothing to fit (that part does not grow); the initial "
                    f"operator is written")
            tok_dir = src.source
            stream = data_mod.batches(spec_t, data, tok_dir, "train", batch_size, seq_len, seed)
            first = next(stream)  # bad or empty data fails here, before any fitting
            stream = itertools.chain([first], stream)
            val = list(itertools.islice(data_mod.batches(spec_t, data, tok_dir, "val", batch_size, seq_len, seed),
                                        eval_batches))
            teacher = Teacher(src.spec, weights, dev) if obj == "distill" else None
            loss_init = _val_loss(op, spec_t, val, obj, teacher, dev)
            bar = None
            if progress and rank == 0:
                from tqdm import tqdm

                bar = tqdm(total=steps, desc="fitting LiGO", unit="step", leave=False, file=sys.stderr, disable=None)

            def on_step(step, loss):
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")

            try:
                result = fit(op, spec_t, stream, obj, steps, lr, teacher, dev, on_step)
            finally:
                if bar is not None:
                    bar.close()
            loss_final = _val_loss(op, spec_t, val, obj, teacher, dev)
            say(f"validation {obj} loss: {loss_init:.4f} at init -> {loss_final:.4f} after {steps} steps "
                f"({result.wall_s:.1f} s)")
            report.update({"objective": obj, "objective_reason": why, "data": data_mod.describe(spec_t, data),
                           "steps": steps, "lr": lr, "batch_size": batch_size,
                           "seq_len": data_mod.usable_seq_len(spec_t, seq_len) if spec_t.input == "tokens" else None,
                           "loss_init": loss_init, "loss_final": loss_final,
                           "train_loss_first": result.losses[0] if result.losses else None,
                           "train_loss_last": result.losses[-1] if result.losses else None,
                           "fit_wall_s": round(result.wall_s, 3), "world_size": size})
        elif operator is None:
            report["steps"] = 0
        with torch.no_grad():
            grown = {k: v.detach().cpu() for k, v in op().items()}
        if rank == 0 and save_operator is not None:
            op.save(save_operator, {k: report.get(k) for k in ("steps", "lr", "objective", "data", "seed")})
        return finish(rank, grown, report, op)

    def finish(rank: int, grown: dict, report: dict, op) -> GrowResult:
        report.update({"device": str(dev), "versions": {"ligo_convert": __version__, "torch": torch.__version__,
                                                         "python": platform.python_version()}})
        out_dtype = dtype or src.dtype or torch.float32
        grown = {k: v.to(out_dtype) for k, v in grown.items()}
        written = None
        if rank == 0:
            report["wall_s"] = round(time.perf_counter() - wall, 3)
            if write:
                model = from_tensors(spec_t, grown, family=out_family, config=src.config, source=src.source)
                written = save(model, out, family=out_family, overwrite=overwrite,
                               extra_files={"growth.json": json.dumps(report, indent=2) + "\n"})
                say(f"wrote {written}")
        return GrowResult(written, spec_t, out_family, grown, report, op)

    with distributed(dev):
        return run()


def _val_loss(op, spec, val, objective, teacher, device) -> float:
    with torch.no_grad():
        weights = op()
    return evaluate_loss(spec, weights, val, objective, teacher, device)


def _sizes(spec: Spec) -> dict:
    return {k: getattr(spec, k) for k in SIZE_KEYS}
