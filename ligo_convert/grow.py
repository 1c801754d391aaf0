"""``grow``: read a small checkpoint, build the LiGO operator, fit it on data, write the large model.

Library entry point behind ``ligo-convert grow SRC DST``::

    from ligo_convert.grow import grow
    result = grow("vit-small", "vit-base", data="images/", out="vit-base-ligo")

The target is a zoo name, a folder or hub id whose config gives the sizes, or explicit ``layers/width/heads/
kv_heads/mlp`` (which also override a named target).  The output goes in the target's family layout (the source's
family for explicit sizes) with config, carried tokenizer/preprocessor files, and ``growth.json``.
"""

from __future__ import annotations

import collections.abc
import contextlib
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

from . import __version__, options
from . import data as data_mod
from .canonical import CONVERSION_FILE, CanonicalModel, from_tensors, load, save, with_family_eps
from .checkpoint import check_sentence_transformer_width, read_config, resolve_source
from .descriptors import Descriptor, detect_family, get_descriptor
from .errors import LigoError
from .files import check_output
from .exprs import Unresolved, evaluate
from .growth import baselines
from .growth import init as inits
from .growth.fit import (DEFAULT_LR, DEFAULT_STEPS, PARALLEL, GrowingModel, Teacher, choose_stream, distributed,
                          evaluate_loss, fit, resolve_device, stream_name, world)
from .growth.operator import LigoOperator, check_growable
from .memory import release_freed_memory
from .objectives import choose_objective, head_misfit
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


def check_family(spec: Spec, source: Spec, family: str, allow_eps_change: bool = False) -> float | None:
    """The output family must hold the grown model, and its config must express the head layout.  Returns the
    norm epsilon the family will write instead of the model's (``allow_eps_change``), else None."""
    descriptor = get_descriptor(family)
    reason = descriptor.supports(spec)
    changed = with_family_eps(descriptor, spec) if reason else None
    if changed is not None:
        if not allow_eps_change:
            raise LigoError(f"cannot grow into family {family}: {reason}; pass --allow-eps-change to write it with "
                            f"norm_eps={changed.norm_eps:g} and record the output difference")
        reason = None
    if reason:
        raise LigoError(f"the source cannot be mapped to family {family}: {reason}; grow into the source's own "
                        f"family or choose a target of a family that can hold it")
    if "head_dim" not in descriptor.config_fields and spec.heads * spec.head_dim != spec.width:
        raise LigoError(f"family {family} derives head_dim from width / heads, so {spec.heads} heads on a width of "
                        f"{spec.width} would change head_dim from {source.head_dim}; use --heads "
                        f"{spec.width // source.head_dim}")
    return changed.norm_eps if changed is not None else None


# --- growing: resolve and plan -> initialise -> fit -> write ---------------------------------------------------------


@dataclass
class GrowOptions:
    """Every knob of ``grow`` but the source and target (see its docstring); defaults are ``grow``'s."""

    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    mlp: int | None = None
    out: object = None
    family: str | None = None
    data: object = None
    objective: str = "auto"
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch_size: int = 16
    seq_len: int = 64
    seed: int = 0
    device: str = "auto"
    depth_init: str = "stack"
    width_init: str = "random"
    noise: float = inits.DEFAULT_NOISE
    shared_width: bool = False
    learn: str = "both"
    operator: object = None
    save_operator: object = None
    eval_batches: int = data_mod.VAL_PIECES
    overwrite: bool = False
    allow_eps_change: bool = False  # a --to family that fixes the norm epsilon may take the grown model with its own
    write: bool = True
    dtype: torch.dtype | None = None
    log: Callable[[str], None] | None = None
    progress: bool = False
    method: str = "ligo"
    init: str | None = None
    materialize: str = "auto"
    parallel: str = "ddp"
    workers: int | None = None
    text_column: str | None = None

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def data_options(self, dev: torch.device) -> dict:
        """The keyword arguments ``data.batches`` takes from these options: under torchrun each rank gets its share
        of the cores for its loader workers."""
        workers = self.workers
        if workers is None and world()[1] > 1:
            workers = max(1, data_mod.default_workers() // world()[1])
        return {"workers": workers, "text_column": self.text_column, "pin_memory": dev.type == "cuda"}


@dataclass
class GrowPlan:
    """What ``grow`` decided before doing any work: the source (read lazily), the target spec, the output."""

    src: CanonicalModel
    source_name: str
    target: str | None
    spec: Spec
    family: str
    method_info: dict
    out: Path | None
    stream: bool | str  # growth.fit.choose_stream's answer
    options: GrowOptions
    written_eps: float | None = None  # --allow-eps-change: the family's norm epsilon the file gets instead
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Growth:
    """A grown model in progress: the LiGO operator (None for baselines) or the grown tensors, and its report."""

    report: dict
    operator: LigoOperator | None = None
    tensors: dict[str, torch.Tensor] | None = None


@dataclass
class GrowResult:
    out: Path | None  # None on ranks other than 0 and when nothing was written
    spec: Spec
    family: str
    weights: collections.abc.Mapping | None  # the grown canonical weights (rank 0), made as they are read for LiGO
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
         save_operator: str | os.PathLike | None = None, eval_batches: int = data_mod.VAL_PIECES, overwrite: bool = False,
         write: bool = True, dtype: torch.dtype | None = None, log: Callable[[str], None] | None = None,
         progress: bool = False, method: str = "ligo", init: str | None = None, materialize: str = "auto",
         parallel: str = "ddp", workers: int | None = None, text_column: str | None = None,
         allow_eps_change: bool = False) -> GrowResult:
    """Grow ``source`` (a checkpoint folder, zoo name, hub id or :class:`CanonicalModel`) with LiGO.

    Fits the operator for ``steps`` steps (0: keep the initial operator; ``operator``: apply a saved one without
    fitting), then writes the grown model to ``out`` (``write=False``: only return it).  ``method`` picks a baseline
    instead of LiGO (``stack``, ``interpolate``, ``net2net``, ``aki``, ``lemon``, ``scratch``: no operator, no
    fitting); ``init`` starts the LiGO operator from one of those methods' expansions.  ``materialize``: ``layers``
    makes the target a layer at a time under activation checkpointing, ``selective`` too but keeps each layer's
    matrix products for the backward, ``full`` keeps every layer for the backward, ``auto`` streams large targets
    (every mode gives the same result).  ``parallel``: ``ddp`` or ``fsdp`` under torchrun.
    ``workers``/``text_column`` go to the data loader.  ``allow_eps_change``: an output family that fixes the norm
    epsilon (timm's ViT) takes the model with its own; fitting and validation use the model's, and the output
    difference the change causes is measured into conversion.json.  A composite source (CLIPModel) grows every
    tower into the composite target's sizes, ``data`` per tower (``{"vision": ..., "text": ...}`` or
    ``"vision=PATH,text=PATH"``), and returns a ``composite.CompositeResult``.  Every user error raises
    :class:`LigoError` before anything is written; the source is never touched.
    """
    options = GrowOptions(**{k: v for k, v in locals().items() if k not in ("source", "target")})
    from .composite import composite_source, grow_composite

    if composite_source(source) is not None:  # several towers (CLIPModel): each grown, one checkpoint written
        return grow_composite(source, target, options)
    plan = plan_growth(source, target, options)
    if plan.stream:
        release_freed_memory()  # layer-sized buffers go back to the system when freed (see ligo_convert.memory)
    dev = resolve_device(options.device)
    with distributed(dev):
        growth = initialise(plan, dev)
        fit_growth(plan, growth, dev)
        return write_growth(plan, growth, dev)


def plan_growth(source, target: str | None, o: GrowOptions, sizes: dict | None = None) -> GrowPlan:
    """Read the source's config and header, work out the target (``sizes`` given: those, for one tower of a
    composite), and check every option: all refusals happen here, before any tensor is read or anything written."""
    src = source if isinstance(source, CanonicalModel) else load(source)
    sizes, target_family, target_name = (sizes, None, None) if sizes is not None else resolve_target(target)
    explicit = dict(layers=o.layers, width=o.width, heads=o.heads, kv_heads=o.kv_heads, mlp=o.mlp)
    if not sizes and all(v is None for v in explicit.values()):
        raise LigoError("no growth target: name one (zoo name, folder or hub id) or pass --layers/--width/--heads/"
                        "--mlp")
    spec_t = target_spec(src.spec, sizes, **explicit)
    check_growable(src.spec, spec_t)
    out_family = o.family or target_family or src.family
    written_eps = check_family(spec_t, src.spec, out_family, o.allow_eps_change)
    if src.source is not None:  # a sentence-transformers folder keeps its modules: each must follow the width
        check_sentence_transformer_width(src.source, src.spec.width, spec_t.width)
    _check_options(o)
    method_info = baselines.describe(o.method, src.spec, spec_t) if o.method != "ligo" else {}  # refusals here
    out = o.out
    if out is None and o.write:
        out = Path(f"{target_name or f'L{spec_t.layers}-D{spec_t.width}'}-from-{_name_of(source)}-{o.method}")
    _check_outputs(out if o.write else None, o, src.source)
    stream = choose_stream(spec_t, o.materialize)
    return GrowPlan(src, _name_of(source), target, spec_t, out_family, method_info,
                    Path(out) if out is not None else None, stream, o, written_eps)


def _check_outputs(out, o: GrowOptions, source: Path | None) -> None:
    """Every path grow writes, checked before any work: the output folder and the operator file."""
    if out is not None:
        out = check_output(out, overwrite=o.overwrite, sources=[source])
    if o.save_operator is not None:
        op = check_output(o.save_operator, overwrite=o.overwrite, sources=[source], flag="--save-operator",
                          kind="file")
        if out is not None and (op.resolve() == out.resolve() or out.resolve() in op.resolve().parents):
            raise LigoError(f"{op}: the operator file would go inside --out {out}, which is replaced as a whole; "
                            f"choose a --save-operator path outside it")


def _check_options(o: GrowOptions) -> None:
    if o.depth_init not in inits.DEPTH_INITS:
        raise LigoError(f"unknown depth init {o.depth_init!r}; choose one of {', '.join(inits.DEPTH_INITS)}")
    if o.width_init not in inits.WIDTH_INITS:
        raise LigoError(f"unknown width init {o.width_init!r}; choose one of {', '.join(inits.WIDTH_INITS)}")
    options.check(steps=(o.steps, "count"), lr=(o.lr, "positive"), noise=(o.noise, "nonnegative"),
                  batch_size=(o.batch_size, "size"), seq_len=(o.seq_len, "size"), eval_batches=(o.eval_batches, "count"),
                  layers=(o.layers, "size"), width=(o.width, "size"), heads=(o.heads, "size"),
                  kv_heads=(o.kv_heads, "size"), mlp=(o.mlp, "size"), workers=(o.workers, "count"))
    if o.method != "ligo" and o.method not in baselines.METHODS:
        raise LigoError(f"unknown method {o.method!r}; choose one of ligo, {', '.join(baselines.METHODS)}")
    if o.method != "ligo" and (o.init or o.operator):
        raise LigoError(f"--init and --operator belong to the ligo method, not {o.method}")
    if o.parallel not in PARALLEL:
        raise LigoError(f"unknown --parallel {o.parallel!r}; choose one of {', '.join(PARALLEL)}")


def _base_report(plan: GrowPlan) -> dict:
    src = plan.src
    return {"source": str(src.source) if src.source is not None else plan.source_name, "source_family": src.family,
            "target": plan.target or None, "family": plan.family}


def initialise(plan: GrowPlan, dev: torch.device) -> Growth:
    """The starting point: a baseline's grown tensors, or the LiGO operator at its initial value (or loaded from
    ``operator``), on ``dev``."""
    o, src, spec_t = plan.options, plan.src, plan.spec
    if o.method != "ligo":
        grown = baselines.expand(o.method, src.spec, src.materialize(torch.float32), spec_t, o.seed)
        report = {**_base_report(plan), **plan.method_info, "source_spec": _sizes(src.spec),
                  "target_spec": _sizes(spec_t), "seed": o.seed, "steps": 0}
        return Growth(report, tensors=grown)
    op = _operator(plan)
    init_note = baselines.ligo_init(op, o.init, o.seed) if o.init else None
    report = {**_base_report(plan), "method": "ligo", "variant": "shared" if o.shared_width else "per-layer",
              "learn": o.learn,
              "init": ({"method": o.init, "note": init_note} if o.init else
                       {"depth": o.depth_init, "width": o.width_init, "noise": o.noise}),
              "source_spec": _sizes(src.spec), "target_spec": _sizes(spec_t),
              "operator_parameters": op.operator_parameter_count(), "seed": o.seed,
              "materialize": stream_name(plan.stream), "steps": 0}
    if o.operator is not None:
        meta = op.load(o.operator)
        report.update({"operator_file": str(o.operator), "fitted_with": {k: meta.get(k) for k in (
            "steps", "lr", "objective", "data") if k in meta}})
        o.say(f"applied the operator from {o.operator}")
    op.to(dev)
    if dev.type == "cuda":
        op.cast_source(torch.bfloat16)  # the frozen source in bf16; the operator and its AdamW state stay fp32
    return Growth(report, operator=op)


def fit_growth(plan: GrowPlan, growth: Growth, dev: torch.device) -> None:
    """Fit the LiGO operator on the data (LiGO with steps and no saved operator), recording the validation loss
    before and after; for a baseline, the same validation loss of its grown model."""
    o, spec_t, op = plan.options, plan.spec, growth.operator
    fitting = op is not None and o.operator is None and o.steps > 0
    if not fitting and not (op is None and o.eval_batches > 0):
        return _save_operator(plan, growth)
    if op is None:
        return _baseline_validation(plan, growth, dev)
    obj, why = choose_objective(plan.src.spec, o.objective, head_misfit(plan.src.spec, o.data))
    tok_dir = plan.src.source
    val = _validation_batches(plan, dev)
    # distillation's teacher: the source's outputs, from the operator's frozen copy
    teacher = Teacher(plan.src.spec, op.source_weights(), dev) if obj == "distill" else None
    info = {"objective": obj, "objective_reason": why, "data": data_mod.describe(spec_t, o.data, o.text_column)}
    o.say(f"objective: {why}")
    if not any(p.requires_grad for p in op.parameters()):
        o.say(f"with --learn {o.learn} this growth has nothing to fit (that part does not grow); the initial "
              f"operator is written")
    stream = data_mod.batches(spec_t, o.data, tok_dir, "train", o.batch_size, o.seq_len, o.seed,
                              **o.data_options(dev))
    first = next(stream)  # bad or empty data fails here, before any fitting
    stream = itertools.chain([first], stream)
    loss_init = evaluate_loss(spec_t, GrowingModel(op), val, obj, teacher, dev)
    with _progress(o.steps, o.progress and world()[0] == 0) as on_step:
        result = fit(op, spec_t, stream, obj, o.steps, o.lr, teacher, dev, on_step, stream=plan.stream,
                     parallel=o.parallel)
    if result.state is not None:  # FSDP left the operator sharded: continue with a whole one holding its values
        op = growth.operator = _rebuilt(plan, result.state, dev)
        teacher = Teacher(plan.src.spec, op.source_weights(), dev) if obj == "distill" else None
    loss_final = evaluate_loss(spec_t, GrowingModel(op), val, obj, teacher, dev)
    o.say(f"validation {obj} loss: {loss_init:.4f} at init -> {loss_final:.4f} after {o.steps} steps "
          f"({result.wall_s:.1f} s)")
    growth.report.update({**info, "steps": o.steps, "lr": o.lr, "batch_size": o.batch_size,
                          "seq_len": data_mod.usable_seq_len(spec_t, o.seq_len) if spec_t.input == "tokens" else None,
                          "loss_init": loss_init, "loss_final": loss_final,
                          "train_loss_first": result.losses[0] if result.losses else None,
                          "train_loss_last": result.losses[-1] if result.losses else None,
                          "fit_wall_s": round(result.wall_s, 3), "world_size": world()[1],
                          "parallel": o.parallel if world()[1] > 1 else None})
    return _save_operator(plan, growth)


def _validation_batches(plan: GrowPlan, dev: torch.device) -> list[dict]:
    """The held-out examples `eval` reads by default (eval_batches x data.VAL_CHUNK), whatever --batch-size and
    --seed, so the reported validation loss is eval's of the written model."""
    o = plan.options
    if not o.eval_batches:
        return []
    return list(data_mod.val_batches(plan.spec, o.data, plan.src.source, o.batch_size, o.seq_len, o.eval_batches,
                                     **o.data_options(dev)))


def _baseline_validation(plan: GrowPlan, growth: Growth, dev: torch.device) -> None:
    """A baseline fits nothing: its held-out loss (the one LiGO reports at init) is only for comparison, so data
    that cannot give it skips the evaluation, saying why, instead of refusing the growth."""
    o = plan.options
    try:
        obj, why = choose_objective(plan.src.spec, o.objective, head_misfit(plan.src.spec, o.data))
        val = _validation_batches(plan, dev)
        teacher = Teacher(plan.src.spec, plan.src.materialize(torch.float32), dev) if obj == "distill" else None
        loss = evaluate_loss(plan.spec, growth.tensors, val, obj, teacher, dev)
        described = data_mod.describe(plan.spec, o.data, o.text_column)
    except LigoError as e:
        growth.report.update({"loss_init": None, "evaluation_skipped": str(e)})
        o.say(f"{o.method}: grown (it fits nothing, so needs no data); validation skipped: {e}")
        return None
    growth.report.update({"objective": obj, "objective_reason": why, "data": described, "loss_init": loss})
    o.say(f"{o.method}: validation {obj} loss of the grown model {loss:.4f} ({why})")
    return None


def _operator(plan: GrowPlan) -> LigoOperator:
    """The LiGO operator over the source (read lazily), at its initial value."""
    o = plan.options
    return LigoOperator(plan.src.spec, plan.spec, plan.src.tensors, shared_width=o.shared_width, learn=o.learn,
                        depth_init=o.depth_init, width_init=o.width_init, noise=o.noise, seed=o.seed)


def _rebuilt(plan: GrowPlan, state: dict, dev: torch.device) -> LigoOperator:
    """A whole operator (source re-read) holding the fitted values gathered from a sharded one."""
    o = plan.options
    op = _operator(plan)  # its initial value stands for the parts that do not learn
    if o.init:
        baselines.ligo_init(op, o.init, o.seed)
    missing = set(n for n, p in op.named_parameters() if p.requires_grad) - set(state)
    if missing:
        raise AssertionError(f"the gathered operator lacks {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name in state:
                p.copy_(state[name])
    op.to(dev)
    if dev.type == "cuda":
        op.cast_source(torch.bfloat16)
    return op


def _save_operator(plan: GrowPlan, growth: Growth) -> None:
    if growth.operator is not None and plan.options.save_operator is not None and world()[0] == 0:
        report = growth.report
        growth.operator.save(plan.options.save_operator,
                             {k: report.get(k) for k in ("steps", "lr", "objective", "data", "seed")})


@contextlib.contextmanager
def _progress(steps: int, enabled: bool):
    """A tqdm bar over the fitting steps (stderr); yields the per-step callback."""
    bar = None
    if enabled:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="fitting LiGO", unit="step", leave=False, file=sys.stderr, disable=None)

    def on_step(step, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

    try:
        yield on_step
    finally:
        if bar is not None:
            bar.close()


def write_growth(plan: GrowPlan, growth: Growth, dev: torch.device) -> GrowResult:
    """Write the grown model in the output family's layout (rank 0): LiGO's tensors are made one at a time from
    the operator as the sharded writer asks for them, so the whole grown model is never in memory."""
    o, report = plan.options, growth.report
    report.update({"device": str(dev), "versions": {"ligo_convert": __version__, "torch": torch.__version__,
                                                     "python": platform.python_version()}})
    out_dtype = o.dtype or plan.src.dtype or torch.float32
    if growth.operator is not None:
        grown = growth.operator.grown(out_dtype)
    else:
        grown = {k: v.to(out_dtype) for k, v in growth.tensors.items()}
    written = None
    if world()[0] == 0:
        report["wall_s"] = round(time.perf_counter() - plan.started, 3)
        if o.write:
            # the family it came from: save() starts from the source's config only when it writes that family
            model = from_tensors(plan.spec, grown, family=plan.src.family, config=plan.src.config,
                                 source=plan.src.source)
            if plan.written_eps is not None:  # fitted and validated with the model's epsilon, written with the family's
                report["norm_eps_written"] = {"from": plan.spec.norm_eps, "to": plan.written_eps,
                                              "effect": CONVERSION_FILE}
            written = save(model, plan.out, family=plan.family, overwrite=o.overwrite,
                           extra_files={"growth.json": json.dumps(report, indent=2) + "\n"},
                           allow_eps_change=o.allow_eps_change)
            o.say(f"wrote {written}")
    return GrowResult(written, plan.spec, plan.family, grown, report, growth.operator)


def _sizes(spec: Spec) -> dict:
    return {k: getattr(spec, k) for k in SIZE_KEYS}
