"""Each method's start for the target and the run that trains it: LiGO (the operator fitted for a few counted steps),
the growth baselines of ``growth.baselines`` (stack, interpolate, net2net, aki, lemon, scratch), and two training
procedures: MSLT (stacked, then only the new top layers train for a while) and KI (scratch with a decaying
distillation from the small model early on)."""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from .. import data as data_mod
from ..errors import LigoError
from ..growth import baselines
from ..growth.fit import DEFAULT_LR, Teacher, fit
from ..growth.operator import LigoOperator
from ..spec import Spec, pattern_of
from .train import Recipe, evaluate, flops_of, loss_of, train

PROCEDURES = ("mslt", "ki")
METHODS = ("scratch", "ligo") + tuple(m for m in baselines.METHODS if m != "scratch") + PROCEDURES
# method -> (knob, default value, candidates for a tuning budget)
KNOBS = {
    "ligo": ("fit_lr", DEFAULT_LR, (1e-2, 3e-2, 1e-1)),  # relative: width by lr / D1, depth by lr / L1 (growth.fit)
    "mslt": ("frozen_fraction", 0.25, (0.1, 0.25, 0.5)),
    "ki": ("distill_fraction", 0.25, (0.1, 0.25, 0.5)),
}
# LiGO as the paper's official code runs it; fit_steps None: the caller's
LIGO_RECIPE = dict(fit_steps=None, objective="task", shared_width=False, depth_init="stack", width_init="random")
# the batch streams of one seed: the target's training batches, LiGO's fitting batches, the small model's pretraining
TRAIN, FIT, PRETRAIN = 0, 1, 2


class RunData(Protocol):
    """Where runs get their batches: an endless training stream per (seed, stream) and a fixed validation set."""

    def train(self, spec: Spec, seed: int, stream: int) -> Iterator[dict]: ...

    def val(self, spec: Spec) -> list[dict]: ...


@dataclass
class DataBatches:
    """``RunData`` over ``data.batches``: a user's data (or the embedded defaults), seed ``seed + 10000 * stream``
    for training, seed 0 for validation (the same held-out batches for every run)."""

    data: object = None
    tokenizer_dir: object = None
    batch_size: int = 16
    seq_len: int = 64
    val_batches: int = 8
    workers: int | None = None
    text_column: str | None = None
    pin_memory: bool = False

    def _stream(self, spec: Spec, split: str, seed: int):
        return data_mod.batches(spec, self.data, self.tokenizer_dir, split, self.batch_size, self.seq_len, seed,
                                workers=self.workers, text_column=self.text_column, pin_memory=self.pin_memory)

    def train(self, spec: Spec, seed: int, stream: int) -> Iterator[dict]:
        return self._stream(spec, "train", seed + 10_000 * stream)

    def val(self, spec: Spec) -> list[dict]:
        return list(itertools.islice(self._stream(spec, "val", 0), self.val_batches))


@dataclass
class Start:
    """A method's starting weights for the target and what making them cost (counted in its curve)."""

    init: dict
    extra_flops: int = 0
    extra_wall: float = 0.0
    train_kwargs: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def make_start(method: str, small: Spec, small_w: dict, target: Spec, seed: int, *, data: RunData, val: list[dict],
               steps: int, knob: float | None = None, fit_steps: int = 0, ligo_recipe: dict | None = None,
               objective: str = "task", device: torch.device | None = None) -> Start:
    """The start of ``method`` (raises LigoError where it refuses the growth).  ``knob``: the method's one knob
    (see KNOBS; None: its default); ``fit_steps``: LiGO's fitting steps, counted in FLOPs and wall time;
    ``objective``: what the validation loss measures (LiGO's fitting objective is its recipe's)."""
    device = device or torch.device("cpu")
    if method not in METHODS:
        raise LigoError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if knob is None and method in KNOBS:
        knob = KNOBS[method][1]
    if method == "ligo":
        return _ligo_start(small, small_w, target, seed, data, val, knob, fit_steps, ligo_recipe or {}, objective,
                           device)
    if method in ("mslt", "stack"):
        init = baselines.expand("stack", small, small_w, target, seed)
        if method == "mslt":  # the small model's layers and embeddings wait while the new top layers learn
            frozen = {k for k in init if (pattern_of(k)[1] is not None and pattern_of(k)[1] < small.layers)
                      or k.startswith("embed.")}
            return Start(init, train_kwargs=dict(frozen=frozen, frozen_until=round(knob * steps)))
        return Start(init)
    if method == "ki":
        init = baselines.expand("scratch", small, small_w, target, seed)
        return Start(init, train_kwargs=dict(teacher=Teacher(small, small_w, device),
                                             distill_until=round(knob * steps)))
    return Start(baselines.expand(method, small, small_w, target, seed))


def _ligo_start(small, small_w, target, seed, data, val, lr, fit_steps, variant, objective, device) -> Start:
    recipe = {**LIGO_RECIPE, **variant}  # the paper's recipe unless a variant asks otherwise
    fit_steps = recipe["fit_steps"] or fit_steps
    op = LigoOperator(small, target, small_w, shared_width=recipe["shared_width"])
    op.initialize(recipe["depth_init"], recipe["width_init"], seed=seed)
    op.to(device)
    info = {}
    distill = recipe["objective"] == "distill" or objective == "distill"
    teacher = Teacher(small, small_w, device) if distill else None
    with torch.no_grad():
        info["loss_init"] = evaluate(target, op(), val, objective, teacher, device)[0]
    init, extra_flops, extra_wall = {k: v.detach() for k, v in op().items()}, 0, 0.0
    if fit_steps > 0:
        stream = data.train(target, seed, FIT)
        first = data_mod.to_device(next(stream), device)

        def fit_step():  # one fitting step's FLOPs (with distillation: the teacher's forward too)
            loss_of(target, op(), first, recipe["objective"], teacher, 1.0).backward()

        info["fit_step_flops"] = flops_of(fit_step)
        op.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fitted = fit(op, target, itertools.chain([first], stream), recipe["objective"], steps=fit_steps, lr=lr,
                     teacher=teacher, device=device)
        with torch.no_grad():
            init = {k: v.detach() for k, v in op().items()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        extra_wall = time.perf_counter() - t0
        extra_flops = info["fit_step_flops"] * fit_steps
        info["fit_train_loss"] = [fitted.losses[0], fitted.losses[-1]] if fitted.losses else []
    info["loss_fitted"] = evaluate(target, init, val, objective, teacher, device)[0]
    return Start(init, extra_flops, extra_wall, info=info)


def init_digest(method: str, small: Spec, small_w: dict, target: Spec, seed: int) -> str | None:
    """A fingerprint of a pure initialisation method's start (None for ligo, the procedures, scratch and refusals):
    two methods with the same digest start from bit-identical tensors, and training is deterministic, so one run
    stands for both (e.g. net2net and stack: the depth baselines grow width as net2net does, and net2net grows
    depth by stacking)."""
    if method not in baselines.METHODS or method == "scratch":
        return None
    try:
        init = baselines.expand(method, small, small_w, target, seed)
    except LigoError:
        return None
    digest = hashlib.sha256()
    for name in sorted(init):
        digest.update(name.encode() + init[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_method(method: str, small: Spec, small_w: dict, target: Spec, seed: int, *, data: RunData, recipe: Recipe,
               val: list[dict] | None = None, knob: float | None = None, fit_steps: int = 0,
               ligo_recipe: dict | None = None, objective: str = "task", device: torch.device | None = None,
               on_step: Callable[[int, float], None] | None = None) -> dict:
    """Start the target with ``method`` and train it with ``recipe`` on ``data``'s training stream of ``seed``:
    the run record the accounting reads (``curve``, ``step_flops``, ``extra_flops``...; ``refused`` with the reason
    where the method refuses this growth)."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    val = data.val(target) if val is None else val
    out = {"seed": seed, "method": method, "knob": knob, "steps": recipe.steps, "lr": recipe.lr,
           "warmup": recipe.warmup}
    try:
        start = make_start(method, small, small_w, target, seed, data=data, val=val, steps=recipe.steps, knob=knob,
                           fit_steps=fit_steps, ligo_recipe=ligo_recipe, objective=objective, device=device)
    except LigoError as e:
        if method not in METHODS:
            raise
        out["refused"] = str(e)
        return out
    out.update(start.info)
    kwargs = dict(start.train_kwargs)
    if objective == "distill":  # no head: every method learns the small model's outputs
        kwargs.setdefault("teacher", Teacher(small, small_w, device))
    out["loss_at_init"] = evaluate(target, start.init, val, objective, kwargs.get("teacher"), device)[0]
    result = train(target, start.init, data.train(target, seed, TRAIN), recipe, val, objective=objective,
                   start_flops=start.extra_flops, start_wall=start.extra_wall, device=device, on_step=on_step,
                   **kwargs)
    out.update(curve=result.curve, step_flops=result.step_flops, extra_flops=start.extra_flops,
               extra_wall=start.extra_wall)
    return out
