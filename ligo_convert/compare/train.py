"""The plain trainer every method gets after growth, with its FLOPs and wall accounting.

AdamW (weight decay 0.01), linear warmup then cosine decay to 0, gradient clipping (1.0), gradient accumulation,
an evaluation every ``eval_every`` steps, bf16 autocast on CUDA (weights and optimizer state in fp32).  FLOPs are
the matrix products of a forward and backward counted once per phase by ``torch.utils.flop_counter`` (a phase: which
weights train, whether a teacher runs), so every step of a phase costs the same; wall time is the steps' own time,
evaluations excluded.

Under ``torchrun`` (data parallelism) every process draws the same global batches and trains on its share of the
rows: each loss is its share's summed terms over the global count, and the gradients are summed over the processes,
so a step is the single process's step on the whole batch (FLOPs are counted for the whole batch, as there).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from .. import data as data_mod
from ..errors import LigoError
from ..growth.fit import _all_sum, autocast, evaluate_loss, local_share, world
from ..model import forward
from ..objectives import distill_loss, distill_terms, evaluate_metrics, task_loss, task_terms
from ..spec import Spec

KI_ALPHA = 0.5  # KI: the distillation loss's initial weight, decaying linearly to 0 over the distillation steps


@dataclass(frozen=True)
class Recipe:
    """How a model trains: peak learning rate, steps, warmup (a fraction of the steps), evaluation interval."""

    lr: float
    steps: int
    warmup: float = 0.05
    eval_every: int = 15
    weight_decay: float = 0.01
    clip: float = 1.0
    accumulate: int = 1  # micro-batches per step (each a batch from the stream)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, steps: int, warmup: float) -> float:
    """Linear warmup, then cosine decay to 0: the factor applied to the peak learning rate.  The warmup is at least
    one step, which runs at the peak rate: ``warmup`` 0 is no warmup."""
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, steps - w))))


def flops_of(fn: Callable[[], object]) -> int:
    """Matrix-product FLOPs of ``fn()`` (e.g. a forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def loss_of(spec: Spec, weights, batch: dict, objective: str = "task", teacher=None, alpha: float = 0.0):
    """The training loss on one batch: the model's own task loss, blended with ``alpha`` of the distillation loss
    to ``teacher`` (a callable batch -> outputs, e.g. growth.fit.Teacher); ``objective="distill"``: the
    distillation loss alone (models without a head)."""
    out = forward(spec, weights, **data_mod.model_inputs(batch))
    if objective == "distill":
        return distill_loss(spec, out, teacher(batch), batch)
    loss = task_loss(spec, out, batch)
    if teacher is not None and alpha > 0:
        with torch.no_grad():
            t = teacher(batch)
        loss = (1 - alpha) * loss + alpha * distill_loss(spec, out, t, batch)
    return loss


def shared_loss_of(spec: Spec, weights, batch: dict, objective: str = "task", teacher=None,
                   alpha: float = 0.0) -> torch.Tensor:
    """:func:`loss_of` on this process's share of the global ``batch``, each mean taken over the global count (see
    the module docstring); the same value as ``loss_of`` in a single process."""
    local = local_share(batch)
    out = forward(spec, weights, **data_mod.model_inputs(local))
    if objective == "distill":
        total, count = distill_terms(spec, out, teacher(local), local)
        return total / _all_sum(count).clamp(min=1)
    total, count = task_terms(spec, out, local)
    loss = total / _all_sum(count).clamp(min=1)
    if teacher is not None and alpha > 0:
        with torch.no_grad():
            t = teacher(local)
        d_total, d_count = distill_terms(spec, out, t, local)
        loss = (1 - alpha) * loss + alpha * (d_total / _all_sum(d_count).clamp(min=1))
    return loss


def _sum_gradients(tensors) -> None:
    """Sum the gradients over the torchrun processes (nothing in a single process)."""
    if world()[1] == 1:
        return
    import torch.distributed as dist

    handles = [dist.all_reduce(t.grad, async_op=True) for t in tensors if t.grad is not None]
    for h in handles:
        h.wait()


@torch.no_grad()
def evaluate(spec: Spec, weights, val: list[dict], objective: str = "task", teacher=None,
             device: torch.device | None = None) -> tuple[float, float | None]:
    """(validation loss, accuracy) over ``val`` (every example counted once); accuracy None for distillation."""
    device = device or torch.device("cpu")
    if objective == "distill":
        return evaluate_loss(spec, weights, val, "distill", teacher, device), None
    totals = None
    with autocast(device):
        for batch in val:
            batch = data_mod.to_device(batch, device)
            totals = evaluate_metrics(spec, forward(spec, weights, **data_mod.model_inputs(batch)), batch, totals)
    return totals["loss"], totals["accuracy"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TrainResult:
    curve: list  # [(step, flops, wall, val loss, val acc)], from step 0; FLOPs and wall cumulative
    step_flops: dict  # phase -> FLOPs of one step ("full", "frozen", "+teacher")
    weights: dict


def train(spec: Spec, init, batches: Iterable[dict], recipe: Recipe, val: list[dict], *, objective: str = "task",
          teacher=None, distill_until: int = 0, frozen: set | None = None, frozen_until: int = 0,
          start_flops: int = 0, start_wall: float = 0.0, device: torch.device | None = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``init`` (canonical weights) for ``recipe.steps`` steps on ``batches`` (``recipe.accumulate`` batches a
    step).  ``teacher`` with ``distill_until``: KI's decaying distillation for the first steps (with ``objective``
    "distill": the whole loss, every step); ``frozen`` names stay fixed for the first ``frozen_until`` steps (MSLT).
    ``start_flops``/``start_wall``: what the start already cost (LiGO's fitting), where the curve begins."""
    device = device or torch.device("cpu")
    weights = {k: v.detach().clone().float().to(device).requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.AdamW(weights.values(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    frozen = frozen or set()
    stream = iter(batches)
    steps, accumulate = recipe.steps, recipe.accumulate
    size = world()[1]
    if accumulate < 1:
        raise LigoError(f"gradient accumulation must be 1 or more micro-batches, not {accumulate}")

    def phase(step: int) -> tuple[bool, float]:
        alpha = KI_ALPHA * max(0.0, 1 - step / distill_until) if step < distill_until else 0.0
        return step < frozen_until, alpha

    def measure(freeze: bool, alpha: float, batch: dict) -> int:
        probe = {k: v.detach().clone().requires_grad_(not (freeze and k in frozen)) for k, v in weights.items()}
        with autocast(device):
            return accumulate * flops_of(lambda: loss_of(spec, probe, batch, objective, teacher, alpha).backward())

    step_flops = {}
    flops, wall = start_flops, start_wall
    curve = [(0, flops, wall, *evaluate(spec, weights, val, objective, teacher, device))]
    for step in range(steps):
        freeze, alpha = phase(step)
        key = (freeze, alpha > 0 or objective == "distill")
        micro = [data_mod.to_device(next(stream), device) for _ in range(accumulate)]
        if key not in step_flops:
            step_flops[key] = measure(freeze, alpha, micro[0])
        for k in frozen:
            weights[k].requires_grad_(not freeze)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_at(step, steps, recipe.warmup)
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for batch in micro:
            with autocast(device):
                loss = (shared_loss_of if size > 1 else loss_of)(spec, weights, batch, objective, teacher, alpha)
            value = float(_all_sum(loss.detach()))
            if not math.isfinite(value):
                raise LigoError(f"the training loss became {value} at step {step + 1}; lower the learning "
                                f"rate (now {recipe.lr:g})")
            (loss / accumulate if accumulate > 1 else loss).backward()
            total += value / accumulate
        _sum_gradients(weights.values())
        torch.nn.utils.clip_grad_norm_([w for w in weights.values() if w.grad is not None], recipe.clip)
        opt.step()
        _sync(device)
        wall += time.perf_counter() - t0
        flops += step_flops[key]
        if on_step:
            on_step(step, total)
        if (step + 1) % recipe.eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, flops, wall, *evaluate(spec, weights, val, objective, teacher, device)))
    names = {(False, False): "full", (True, False): "frozen", (False, True): "full+teacher",
             (True, True): "frozen+teacher"}
    return TrainResult(curve, {names[k]: v for k, v in step_flops.items()},
                       {k: v.detach() for k, v in weights.items()})

