"""Fitting the operator: every step makes the large weights from the frozen small ones, runs the canonical forward of
the large model, and takes the objective's loss; only the operator learns (AdamW, gradient clipping).

The large model is made a layer at a time, inside the forward (:class:`GrowingModel`): each block asks the operator
for its weights when it runs, as factors (``LigoOperator.layer_factors``: each grown matrix a ``model.Chain`` that the
block's inputs run through in the cheapest order, the dense weight formed only where that costs fewer FLOPs), and the
vocabulary tables stay factored.  With ``stream`` every block also runs under
non-reentrant activation checkpointing, so the backward makes its weights and activations again instead of keeping
them: peak memory is then the source + the operator and its optimizer state + about one target layer + the
activations at layer boundaries.  Recomputation repeats the forward exactly, so checkpointing changes no bit of the
losses, gradients or operators on the CPU; streaming only trades one more forward per step for memory.  Where memory
is not the first concern (every mode but ``layers``), a shared width matrix is applied to each source matrix once
per step where that is cheaper than once per target layer (``LigoOperator.expanded_sources``): the same model, the
products in another order.  ``stream="selective"`` streams too but keeps each block's matrix products
(``model.KEPT_OPS``) for the backward, which then makes only the cheap ops again (selective activation checkpointing).
``--materialize auto`` streams targets of ``STREAM_ABOVE_BYTES`` or more.

Data-parallel: when ``torch.distributed`` is initialised, every rank draws the same global batch, keeps its own
slice, and the operator is wrapped in DistributedDataParallel.  Each rank divides its summed loss by the global
count (an all-reduce), so the averaged gradients equal one process's gradients on the global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from .. import data as data_mod
from ..errors import LigoError
from ..model import forward, forward_many
from ..objectives import loss_terms
from ..spec import Spec

# A relative learning rate (see LigoOperator.param_groups): a width matrix steps by lr / D1, a depth matrix by lr / L1.
# 1e-2 was best or within noise of the best on every case of `benchmarks/fit_overhead.py --lr-sweep` (digits ViT,
# stdlib GPT-2, real MiniLM 6x384 -> 12x768), while no flat learning rate served all three
# (see benchmarks/results/fit_overhead.md).
DEFAULT_LR = 1e-2
DEFAULT_STEPS = 100
ADAM_EPS = 1e-6  # official LiGO code
WEIGHT_DECAY = 0.0
CLIP = 1.0
# Stream (checkpoint every layer) when the target's fp32 weights reach this size.  Below it, keeping every layer for
# the backward costs little memory and saves the second forward (a fixed size, not the free memory: the same command
# makes the same choice on every machine).
STREAM_ABOVE_BYTES = 256 * 2**20
STREAM_CHOICES = ("auto", "layers", "selective", "full")
# how each mode runs the blocks: model.forward's ``checkpoint``
_CHECKPOINT = {"layers": True, "selective": "selective", "full": False}
PARALLEL = ("ddp", "fsdp")


def choose_stream(target: Spec, choice: str = "auto") -> bool | str:
    """True to stream the fitting layer by layer under checkpointing (``layers``), ``"selective"`` to stream but keep
    each block's matrix products for the backward (only norms, activations and softmax are made again: less
    recomputation for the products' outputs in memory, per layer), False to keep every layer for the backward
    (``full``); ``auto`` decides by the target's size (``layers`` or ``full``)."""
    if choice not in STREAM_CHOICES:
        raise LigoError(f"unknown --materialize {choice!r}; choose one of {', '.join(STREAM_CHOICES)}")
    if choice == "auto":
        return target.parameter_count() * 4 >= STREAM_ABOVE_BYTES
    return _CHECKPOINT[choice]


def stream_name(stream: bool | str) -> str:
    """The ``--materialize`` name of a :func:`choose_stream` answer (what growth.json records)."""
    return next(name for name, mode in _CHECKPOINT.items() if mode == stream)


class GrowingModel(torch.nn.Module):
    """The target model as the operator makes it: ``forward(batch inputs)`` runs the canonical forward with each
    block's weights made when it runs (and, with ``stream``, again in the backward).  What DDP and FSDP wrap."""

    def __init__(self, operator: torch.nn.Module, stream: bool | str = False, attention: str = "sdpa"):
        super().__init__()
        self.operator, self.stream, self.attention = operator, stream, attention

    def forward(self, **inputs) -> dict:
        op = self.operator
        # streaming layer by layer is for memory: it makes every product inside its layer; the other modes may
        # expand the source matrices once for all layers (operator.expanded_sources)
        return forward(op.target, op.global_weights(factored=True), **inputs,
                       layer_weights=op.step_factors(expand_first=self.stream is not True), checkpoint=self.stream,
                       attention=self.attention, lazy_logits=True)

    def forward_many(self, batches: list[dict]) -> list[dict]:
        """The outputs for several batches (no gradients), each target layer made once for all of them."""
        op = self.operator
        return forward_many(op.target, op.global_weights(factored=True), batches, op.layer_weights,
                            self.attention, lazy_logits=True)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LigoError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LigoError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the operator and its optimizer stay fp32); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def distributed(device: torch.device):
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA.  Leaves it again at
    the end if it joined; a no-op for a single process or an already initialised group."""
    import os

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def local_share(batch: dict) -> dict:
    """This rank's rows of a global batch (contiguous, equal shares)."""
    rank, size = world()
    if size == 1:
        return batch
    n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    if n % size:
        raise LigoError(f"the batch size {n} does not split evenly over {size} processes; choose a multiple of {size}")
    share = n // size
    return data_mod.slice_batch(batch, rank * share, (rank + 1) * share)


class Teacher:
    """The source model's outputs (for distillation), computed without gradients."""

    def __init__(self, spec: Spec, weights: dict, device: torch.device):
        self.spec = spec
        self.weights = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in weights.items()}

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        return forward(self.spec, self.weights, **data_mod.model_inputs(batch))


@torch.no_grad()
def evaluate_loss(spec: Spec, weights, batches: Iterable[dict], objective: str, teacher: Teacher | None,
                  device: torch.device) -> float:
    """Mean objective loss over ``batches`` (every example counted once).  ``weights``: a mapping of canonical
    weights, or a :class:`GrowingModel` — the target made a layer at a time, each layer once for all the batches."""
    batches = [data_mod.to_device(b, device) for b in batches]
    with autocast(device):
        if isinstance(weights, GrowingModel):
            outs = weights.forward_many([data_mod.model_inputs(b) for b in batches])
        else:
            outs = [forward(spec, weights, **data_mod.model_inputs(b)) for b in batches]
        total, count = 0.0, 0.0
        for batch, out in zip(batches, outs):
            s, c = loss_terms(spec, objective, out, batch, teacher(batch) if teacher else None)
            total += float(s)
            count += float(c)
    return total / max(count, 1.0)


@dataclass
class FitResult:
    steps: int
    lr: float
    losses: list[float] = field(default_factory=list)  # training loss per step (global batch)
    wall_s: float = 0.0
    state: dict | None = None  # FSDP: the fitted operator's trainable tensors, gathered (the operator stays sharded)


def fit(operator: torch.nn.Module, target: Spec, batches: Iterator[dict], objective: str, steps: int = DEFAULT_STEPS,
        lr: float = DEFAULT_LR, teacher: Teacher | None = None, device: torch.device | None = None,
        on_step: Callable[[int, float], None] | None = None, relative_lr: bool = True,
        stream: bool | str = False, parallel: str = "ddp") -> FitResult:
    """Train ``operator`` for ``steps`` steps on ``batches`` (global batches); ``stream``: layer by layer under
    activation checkpointing (see the module docstring).  Raises LigoError, changing nothing on disk, when the loss
    turns NaN or infinite."""
    device = device or torch.device("cpu")
    params = [p for p in operator.parameters() if p.requires_grad]
    result = FitResult(steps, lr)
    if steps <= 0 or not params:
        return result
    if lr <= 0 or not math.isfinite(lr):
        raise LigoError(f"the learning rate must be a positive number, not {lr}")
    rank, size = world()
    model = parallelize(GrowingModel(operator, stream), parallel, device)
    params = [p for p in operator.parameters() if p.requires_grad]  # FSDP replaced them with sharded ones
    groups = operator.param_groups(lr) if relative_lr else [{"params": params, "lr": lr}]
    opt = torch.optim.AdamW(groups, lr=lr, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    start = time.perf_counter()
    for step in range(steps):
        batch = data_mod.to_device(local_share(next(batches)), device)
        with autocast(device):
            out = model(**data_mod.model_inputs(batch))
            total, count = loss_terms(target, objective, out, batch, teacher(batch) if teacher else None)
        count = _all_sum(count.to(device))
        global_loss = float(_all_sum(total.detach().float()) / count.clamp(min=1))
        if not math.isfinite(global_loss):
            raise LigoError(f"the fitting loss became {global_loss} at step {step + 1}; nothing was written — lower "
                            f"--lr (now {lr:g})")
        loss = total.float() / count.clamp(min=1) * size  # DDP and FSDP average gradients over ranks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        result.losses.append(global_loss)
        if on_step:
            on_step(step, global_loss)
    del opt  # its state and the gradients are as large as the operator: free them before validation and writing
    operator.zero_grad(set_to_none=True)
    if is_sharded(operator):
        result.state = gathered_state(operator)
    result.wall_s = time.perf_counter() - start
    return result


def parallelize(model: GrowingModel, parallel: str, device: torch.device) -> torch.nn.Module:
    """Wrap the growing model for data parallelism across the torchrun processes (nothing for one process).

    ``ddp``: every rank holds the whole operator and source; gradients are averaged.  ``fsdp``: FSDP2
    (``fully_shard``) shards each target layer's operator part (``layer_ops[i]``: its width matrices and depth rows)
    and, at the root, the global matrices and the frozen source; a layer's part is gathered only while that layer is
    made (again in the backward, under checkpointing), so a rank holds 1/N of the operator, its gradients and AdamW
    state plus one layer's part at a time.  The operator stays sharded after fitting: ``FitResult.state`` holds its
    gathered trainable tensors (see :func:`gathered_state`)."""
    size = world()[1]
    if size <= 1:
        return model
    if parallel not in PARALLEL:
        raise LigoError(f"unknown --parallel {parallel!r}; choose one of {', '.join(PARALLEL)}")
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (size,))
    for layer_op in model.operator.layer_ops:
        if any(True for _ in layer_op.parameters()):
            fully_shard(layer_op, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(operator: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in operator.parameters())


def gathered_state(operator: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of an FSDP-sharded operator, gathered whole on every rank (a collective: every rank
    calls it), by the names of the unsharded module; load them into a fresh operator."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in operator.named_parameters() if p.requires_grad}
