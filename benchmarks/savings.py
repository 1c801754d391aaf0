"""Savings benchmark: the LiGO paper's Tables 1-2 in miniature, on data that is on the machine, offline.

Three proxies — a ViT on two-digit numbers written with scikit-learn's digits, a GPT-2-style causal LM and a
BERT-style (post-LN) masked LM on the Python standard library's source text — each grown from a pretrained small
model (2 layers x 64) into a target (4 x 128, heads grown at a fixed head dim); the small model pretrains as long as
the target on images and a third as long on text (see ``Proxy.pretrain_fraction``).  The plain 8x8 digits remain as
``--proxies vit-digits``: there the target from scratch saturates (~97 % accuracy) within the budget and no method
saves reliably, so the default image proxy is the harder digit pairs (see ``_digit_pairs``).  For every seed:
pretrain the small model; then train the target from each method's initialisation with the same optimiser (AdamW),
schedule (linear warmup, cosine decay) and batches as ``scratch``.  Methods: ``scratch``, ``ligo`` (the operator
fitted for a few steps, then trained), ``stack``, ``interpolate``, ``net2net``, ``aki``, ``lemon``
(ligo_convert.growth.baselines), and the training-procedure baselines ``mslt`` (stacked, then only the new top
layers trained for a while) and ``ki`` (scratch plus distillation from the small model early on).

Measured: FLOPs (matrix products of forward and backward, counted with torch.utils.flop_counter, LiGO's fitting
steps and KI's teacher included) and training wall time until the validation loss first reaches scratch's final
validation loss, and the final validation loss/accuracy.  Reported as in the paper (method, FLOPs saved %, wall saved
%, final quality; mean +- sd over all seeds, a seed that never reaches the goal counted at its bound), once without
and once with the small model's pretraining counted; LiGO against each method seed by seed (a sign test); and each
method's validation loss at fixed fractions of scratch's FLOPs.

Tuning budget, the same for every method with a knob: three values of its one knob (LiGO: fitting learning rate;
MSLT: fraction of steps that train only the new top layers; KI: fraction of steps with distillation), scored on a
separate tuning seed by the FLOPs saved in a full-length run (ties: final loss).  Methods without a knob get none;
the training learning rate is shared, one per proxy: the one scratch itself does best with on the tuning seed
(benchmarks/savings_lr_check.py trains scratch and the small model alone over a grid; the small model pretrains
at the rate it does best with; results/savings_lr_check.md).

    python benchmarks/savings.py                      # default: 28 min on 2 cores
    python benchmarks/savings.py --quick --out /tmp/q  # pipeline smoke test, < 1 min
    python benchmarks/savings.py --seeds 3,4,5,6,7 --out /tmp/more   # more seeds, then merged with the default's:
    python benchmarks/savings.py --render benchmarks/results/savings.json --merge /tmp/more/savings.json \
        --out benchmarks/results/savings-8seeds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("scratch", "ligo", "stack", "interpolate", "net2net", "aki", "lemon", "mslt", "ki")
# method -> (knob, candidate values): the tuning budget
KNOBS = {
    "ligo": ("fit_lr", (1e-2, 3e-2, 1e-1)),  # relative: width steps by lr / D1, depth by lr / L1 (growth.fit)
    "mslt": ("frozen_fraction", (0.1, 0.25, 0.5)),
    "ki": ("distill_fraction", (0.1, 0.25, 0.5)),
}
# LiGO as the paper's official code runs it; fit_steps None: Settings.fit_steps
LIGO_RECIPE = dict(fit_steps=None, objective="task", shared_width=False, depth_init="stack", width_init="random")
KI_ALPHA = 0.5  # initial weight of the distillation loss; decays linearly to 0 over the distillation fraction


@dataclass
class Proxy:
    name: str
    family: str
    small: dict
    target: dict
    micro: dict
    batch_size: int
    seq_len: int
    lr: float  # the target's training learning rate, shared by every method: the one scratch does best with
    # The small model's pretraining steps, as a fraction of the target's.  The paper's small models are worse than
    # the large ones trained in full; on the text proxies a 2x64 model trained as long as the 4x128 target matches
    # its loss at these budgets (measured at 200 steps: GPT-2 2.47 vs 2.46, BERT 3.10 vs 3.20) and leaves nothing to
    # grow into, so it trains a third as long there.
    pretrain_fraction: float = 1.0
    task: str = "embedded"  # "embedded": ligo_convert.data's own data; "digit-pairs": see _digit_pairs
    val_batches: int | None = None  # overrides Settings.val_batches
    steps_scale: float = 1.0  # this proxy trains Settings.steps x steps_scale (fitting steps, evaluations alike)
    small_lr: float | None = None  # the small model's pretraining learning rate (None: lr): the one it does best with


@dataclass
class Settings:
    steps: int = 300  # training steps of the target (every method)
    fit_steps: int = 15  # LiGO fitting steps (counted): 5 % of training (the paper: 100 steps of ~10^5)
    eval_every: int = 15
    val_batches: int = 6
    warmup: float = 0.05  # fraction of steps
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    tune_seed: int = 100
    jobs: int = 2


PROXIES = {
    "vit-digits": Proxy("vit-digits", "hf-vit", dict(layers=2, width=64, heads=4, mlp=256),
                        dict(layers=4, width=128, heads=8, mlp=512),
                        dict(image_size=8, patch_size=2, num_channels=1, num_classes=10), 64, 0, 2e-3),
    "vit-digit-pairs": Proxy("vit-digit-pairs", "hf-vit", dict(layers=2, width=64, heads=4, mlp=256),
                             dict(layers=4, width=128, heads=8, mlp=512),
                             dict(image_size=16, patch_size=4, num_channels=1, num_classes=100), 64, 0, 2e-3,
                             task="digit-pairs", val_batches=8, steps_scale=2.0, small_lr=4e-3),
    "gpt2-stdlib": Proxy("gpt2-stdlib", "hf-gpt2", dict(layers=2, width=64, heads=4, mlp=256),
                         dict(layers=4, width=128, heads=8, mlp=512), dict(max_positions=64), 16, 64, 2e-3, 1 / 3),
    "bert-stdlib": Proxy("bert-stdlib", "hf-bert", dict(layers=2, width=64, heads=4, mlp=256),
                         dict(layers=4, width=128, heads=8, mlp=512), dict(max_positions=64), 16, 64, 5e-4, 1 / 3,
                         small_lr=2e-3),
}  # each learning rate is the one that model does best with on the tuning seed, the target from scratch and the
#  small model in its pretraining (benchmarks/savings_lr_check.py): the 4x128 post-LN BERT stays on the unigram
#  plateau (~3.2) at 2e-3 and on some seeds at 1e-3
DEFAULT_PROXIES = ("vit-digit-pairs", "gpt2-stdlib", "bert-stdlib")  # vit-digits: see the module docstring
QUICK = Settings(steps=8, fit_steps=2, eval_every=4, val_batches=1, seeds=[0, 1], jobs=1)


def proxy_settings(p: Proxy, s: Settings) -> Settings:
    """The settings ``p`` runs with: its training steps, and with them LiGO's fitting steps and the evaluation
    interval, scaled by ``p.steps_scale``."""
    if p.steps_scale == 1:
        return s
    k = p.steps_scale
    return replace(s, steps=round(s.steps * k), fit_steps=max(1, round(s.fit_steps * k)),
                   eval_every=max(1, round(s.eval_every * k)))


def quick_proxy(p: Proxy) -> Proxy:
    return replace(p, small=dict(layers=1, width=16, heads=2, mlp=32), target=dict(layers=2, width=32, heads=4,
                                                                                    mlp=64), batch_size=8, seq_len=16)


# --- one training run (runs in a worker process) -------------------------------------------------------------------------


def _specs(p: Proxy):
    from ligo_convert.growth.pretrain import micro_spec

    small = micro_spec(p.family, **p.small, **p.micro)
    return small, small.replace(**p.target, kv_heads=p.target["heads"])


def _data(p: Proxy, spec, seed: int, n: int, stream: int) -> list[dict]:
    from ligo_convert import data as data_mod

    if p.task == "digit-pairs":
        return _digit_pairs(spec, "train", n, p.batch_size, seed + 10_000 * stream)
    return list(islice(data_mod.batches(spec, None, None, "train", p.batch_size, p.seq_len or 64,
                                        seed + 10_000 * stream), n))


def _val(p: Proxy, spec, s: Settings) -> list[dict]:
    from ligo_convert import data as data_mod

    n = p.val_batches or s.val_batches
    if p.task == "digit-pairs":
        return _digit_pairs(spec, "val", n, p.batch_size, 0)
    return list(islice(data_mod.batches(spec, None, None, "val", p.batch_size, p.seq_len or 64, 0), n))


def _digit_pairs(spec, split: str, n: int, batch_size: int, seed: int) -> list[dict]:
    """Two-digit numbers written with scikit-learn's digits: two 8x8 digits side by side, centred on a 16x16 canvas,
    labelled 10 * left + right (100 classes).  Pairs are drawn at random from one side of ligo_convert.data's fixed
    train/validation split of the digits, so no validation digit image is ever trained on.  On the plain 8x8 digits a
    4x128 ViT trained from scratch reaches ~97 % accuracy in a few hundred steps and the growth methods' head start is
    lost in the noise of a 360-image validation set; the pairs leave room to grow into at the same patch count."""
    from ligo_convert import data as data_mod

    if spec.image_size != 16:
        raise ValueError(f"digit pairs are 16x16 images; the proxy's model takes {spec.image_size}")
    source = data_mod.image_source(None)
    pool = torch.tensor(source.train if split == "train" else source.val)
    labels = torch.tensor(source.labels)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        left, right = (pool[torch.randint(len(pool), (batch_size,), generator=g)] for _ in range(2))
        canvas = torch.zeros(batch_size, 1, 16, 16)
        canvas[:, 0, 4:12, :8], canvas[:, 0, 4:12, 8:] = source.images[left], source.images[right]
        # normalised as ligo_convert.data normalises images that come without a preprocessor config
        out.append({"pixel_values": ((canvas - 0.5) / 0.5).expand(-1, spec.num_channels, -1, -1).contiguous(),
                    "labels": 10 * labels[left] + labels[right]})
    return out


def _loss(spec, weights, batch, teacher=None, alpha=0.0):
    from ligo_convert import data as data_mod
    from ligo_convert.model import forward
    from ligo_convert.objectives import distill_loss, task_loss

    out = forward(spec, weights, **data_mod.model_inputs(batch))
    loss = task_loss(spec, out, batch)
    if teacher is not None and alpha > 0:
        with torch.no_grad():
            t = forward(teacher[0], teacher[1], **data_mod.model_inputs(batch))
        loss = (1 - alpha) * loss + alpha * distill_loss(spec, out, t, batch)
    return loss


@torch.no_grad()
def evaluate(spec, weights, val) -> tuple[float, float]:
    from ligo_convert import data as data_mod
    from ligo_convert.model import forward
    from ligo_convert.objectives import evaluate_metrics

    totals = None
    for batch in val:
        totals = evaluate_metrics(spec, forward(spec, weights, **data_mod.model_inputs(batch)), batch, totals)
    return totals["loss"], totals["accuracy"]


def flops_of(fn) -> int:
    """Matrix-product FLOPs of ``fn()`` (a forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def lr_at(step: int, steps: int, warmup: float) -> float:
    """Linear warmup, then cosine decay to 0: the factor applied to the peak learning rate."""
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, steps - w))))


def train(spec, init: dict, batches: list, lr: float, val: list, s: Settings, steps: int, teacher=None,
          distill_until: int = 0, frozen: set | None = None, frozen_until: int = 0, start_flops: int = 0,
          start_wall: float = 0.0) -> dict:
    """Train ``init`` for ``steps`` steps; returns the validation curve [(step, flops, wall, loss, acc)] and the
    FLOPs per step of each phase."""
    weights = {k: v.detach().clone().float().requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.AdamW(weights.values(), lr=lr, weight_decay=0.01)
    frozen = frozen or set()

    def phase(step: int) -> tuple[bool, float]:
        alpha = KI_ALPHA * max(0.0, 1 - step / distill_until) if step < distill_until else 0.0
        return step < frozen_until, alpha

    def measure(freeze: bool, alpha: float) -> int:
        probe = {k: v.detach().clone().requires_grad_(not (freeze and k in frozen)) for k, v in weights.items()}
        return flops_of(lambda: _loss(spec, probe, batches[0], teacher, alpha).backward())

    step_flops = {}
    flops, wall = start_flops, start_wall
    loss0, acc0 = evaluate(spec, weights, val)
    curve = [(0, flops, wall, loss0, acc0)]
    for step in range(steps):
        freeze, alpha = phase(step)
        key = (freeze, alpha > 0)
        if key not in step_flops:
            step_flops[key] = measure(freeze, alpha)
        for k in frozen:
            weights[k].requires_grad_(not freeze)
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, steps, s.warmup)
        t0 = time.perf_counter()
        loss = _loss(spec, weights, batches[step], teacher, alpha)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training loss became {float(loss)} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([w for w in weights.values() if w.grad is not None], 1.0)
        opt.step()
        wall += time.perf_counter() - t0
        flops += step_flops[key]
        if (step + 1) % s.eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, flops, wall, *evaluate(spec, weights, val)))
    return {"curve": curve, "step_flops": {f"{'frozen' if a else 'full'}{'+teacher' if b else ''}": v
                                           for (a, b), v in step_flops.items()},
            "weights": {k: v.detach() for k, v in weights.items()}}


def pretrain_steps(p: Proxy, s: Settings) -> int:
    return max(1, round(p.pretrain_fraction * s.steps))


def pretrain_job(job: dict) -> dict:
    """Pretrain the small model of a proxy for one seed (the same trainer and schedule as the target)."""
    torch.set_num_threads(1)
    p, s, seed = job["proxy"], job["settings"], job["seed"]
    small, _ = _specs(p)
    from ligo_convert.model import init_weights

    torch.manual_seed(seed)
    steps = pretrain_steps(p, s)
    batches = _data(p, small, seed, steps, stream=2)
    result = train(small, init_weights(small, seed), batches, p.small_lr or p.lr, _val(p, small, s), s, steps)
    last = result["curve"][-1]
    return {"proxy": p.name, "seed": seed, "weights": result["weights"], "flops": last[1], "wall": last[2],
            "val_loss": last[3], "val_acc": last[4], "step_flops": result["step_flops"]}


def method_job(job: dict) -> dict:
    """Initialise the target with one method (and knob value), then train it; returns the curve."""
    torch.set_num_threads(1)
    from ligo_convert.errors import LigoError
    from ligo_convert.growth import baselines
    from ligo_convert.growth.fit import Teacher, fit
    from ligo_convert.growth.operator import LigoOperator

    p, s, seed, method, knob = job["proxy"], job["settings"], job["seed"], job["method"], job.get("knob")
    steps = job["steps"]
    small, target = _specs(p)
    small_w = job["small_weights"]
    torch.manual_seed(seed)
    batches = _data(p, target, seed, steps, stream=0)
    val = _val(p, target, s)
    out = {"proxy": p.name, "seed": seed, "method": method, "knob": knob, "steps": steps}
    extra_flops, extra_wall, kwargs = 0, 0.0, {}
    try:
        if method == "ligo":
            # the paper's recipe unless a variant (benchmarks/savings_ligo_variants.py) asks otherwise
            recipe = {**LIGO_RECIPE, **job.get("ligo_variant", {})}
            fit_steps = recipe["fit_steps"] or s.fit_steps
            fit_batches = _data(p, target, seed, fit_steps, stream=1)
            op = LigoOperator(small, target, small_w, shared_width=recipe["shared_width"])
            op.initialize(recipe["depth_init"], recipe["width_init"], seed=seed)
            with torch.no_grad():
                out["loss_init"] = evaluate(target, op(), val)[0]

            distill = recipe["objective"] == "distill"
            teacher = Teacher(small, small_w, torch.device("cpu")) if distill else None

            def fit_step():  # the FLOPs of one fitting step (with distillation: the teacher's forward too)
                _loss(target, op(), fit_batches[0], (small, teacher.weights) if distill else None, 1.0).backward()

            out["fit_step_flops"] = flops_of(fit_step)
            op.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fitted = fit(op, target, iter(fit_batches), recipe["objective"], steps=fit_steps, lr=knob, teacher=teacher)
            with torch.no_grad():
                init = {k: v.detach() for k, v in op().items()}
            extra_wall = time.perf_counter() - t0
            extra_flops = out["fit_step_flops"] * fit_steps
            out["loss_fitted"] = evaluate(target, init, val)[0]
            out["fit_train_loss"] = [fitted.losses[0], fitted.losses[-1]] if fitted.losses else []
        elif method in ("mslt", "stack"):
            init = baselines.expand("stack", small, small_w, target, seed)
            if method == "mslt":  # MSLT: the small model's layers and embeddings wait while the new top layers learn
                from ligo_convert.spec import pattern_of

                frozen = {k for k in init if (pattern_of(k)[1] is not None and pattern_of(k)[1] < small.layers)
                          or k.startswith("embed.")}
                kwargs = dict(frozen=frozen, frozen_until=round(knob * steps))
        elif method == "ki":
            init = baselines.expand("scratch", small, small_w, target, seed)
            kwargs = dict(teacher=(small, {k: v.float() for k, v in small_w.items()}),
                          distill_until=round(knob * steps))
        else:
            init = baselines.expand(method, small, small_w, target, seed)
    except LigoError as e:
        out["refused"] = str(e)
        return out
    out["loss_at_init"] = evaluate(target, init, val)[0]
    result = train(target, init, batches, p.lr, val, s, steps, start_flops=extra_flops, start_wall=extra_wall,
                   **kwargs)
    out.update(curve=result["curve"], step_flops=result["step_flops"], extra_flops=extra_flops,
               extra_wall=extra_wall)
    return out


# --- savings -------------------------------------------------------------------------------------------------------------


def reach(curve: list, target_loss: float) -> tuple[float, float, float] | None:
    """(FLOPs, wall, steps) at which the validation loss first reaches ``target_loss``, interpolated linearly between
    evaluations; None if it never does."""
    prev = None
    for point in curve:
        loss = point[3]
        if loss <= target_loss:
            if prev is None or prev[3] == loss:
                return float(point[1]), float(point[2]), float(point[0])
            f = (prev[3] - target_loss) / (prev[3] - loss)
            return tuple(prev[i] + f * (point[i] - prev[i]) for i in (1, 2, 0))
        prev = point
    return None


def savings(run: dict, scratch: dict, pretrain: dict | None) -> dict:
    """Per run: saved FLOPs/wall (%) against scratch, with and without the small model's pretraining, and the
    training steps taken to reach scratch's final loss."""
    if "refused" in run:
        return {"refused": run["refused"]}
    final_loss, final_acc = run["curve"][-1][3], run["curve"][-1][4]
    goal = scratch["curve"][-1][3]
    ref = reach(scratch["curve"], goal)
    got = reach(run["curve"], goal)
    # scratch reaching its own final loss at step 0 (no progress at all) leaves nothing to measure against
    got = got if ref is not None and ref[0] > 0 else None
    out = {"final_loss": final_loss, "final_acc": final_acc, "reached": got is not None}
    uses_small = run["method"] != "scratch"
    pre_f = pretrain["flops"] if (pretrain and uses_small) else 0.0
    pre_w = pretrain["wall"] if (pretrain and uses_small) else 0.0
    if got is not None:
        out["steps_to_goal"] = got[2]
        out["flops_saved"] = 100 * (1 - got[0] / ref[0])
        out["wall_saved"] = 100 * (1 - got[1] / ref[1])
        out["flops_saved_pre"] = 100 * (1 - (got[0] + pre_f) / ref[0])
        out["wall_saved_pre"] = 100 * (1 - (got[1] + pre_w) / ref[1])
    elif ref is not None and ref[0] > 0:
        # Not reached within the run: it would have needed more than everything it spent, so its saving is below
        # what spending all of it would give.  Aggregates use this bound (marked ≤) instead of dropping the seed,
        # which would keep only a method's easy seeds.
        last = run["curve"][-1]
        out["steps_to_goal_min"] = float(last[0])
        out["flops_saved_max"] = 100 * (1 - last[1] / ref[0])
        out["wall_saved_max"] = 100 * (1 - last[2] / ref[1])
        out["flops_saved_pre_max"] = 100 * (1 - (last[1] + pre_f) / ref[0])
        out["wall_saved_pre_max"] = 100 * (1 - (last[2] + pre_w) / ref[1])
    return out


def saved(x: dict, key: str) -> tuple[float, bool] | None:
    """A run's ``key`` saving (%) and whether it is only an upper bound (the goal was not reached); None when there
    is nothing to measure."""
    if x.get("reached"):
        return x[key], False
    return (x[key + "_max"], True) if key + "_max" in x else None


def aggregate(sv: list[dict], key: str, digits: int = 1, sd: bool = True) -> str:
    """Mean (± sd) of ``key`` over every seed, a seed that did not reach the goal counted at its bound; then the
    whole mean is an upper bound and says so (≤)."""
    got = [v for v in (saved(x, key) for x in sv) if v is not None]
    if not got:
        return "–"
    values = [v for v, _ in got]
    text = _mean_sd(values, digits) if sd else f"{statistics.mean(values):.{digits}f}"
    return ("≤ " + text) if any(bound for _, bound in got) else text


def steps_to_goal(sv: list[dict]) -> str:
    got = [(x["steps_to_goal"], False) if x["reached"] else (x["steps_to_goal_min"], True)
           for x in sv if x["reached"] or "steps_to_goal_min" in x]
    if not got:
        return "–"
    text = _mean_sd([v for v, _ in got], 0)
    return ("≥ " + text) if any(bound for _, bound in got) else text


def paired(ours: list[dict], theirs: list[dict], key: str = "flops_saved") -> dict:
    """LiGO against one method seed by seed (both lists in seed order): on how many seeds each saved more, with a
    two-sided sign test over the decided seeds.  A seed where neither reached the goal is undecided; where one did
    not, its bound decides only if the other's saving is above it."""
    ahead = behind = undecided = 0
    diffs = []
    for a, b in zip(ours, theirs):
        va, vb = saved(a, key), saved(b, key)
        if va is None or vb is None or (va[1] and vb[1]):
            undecided += 1
            continue
        diffs.append(va[0] - vb[0])
        if va[0] > vb[0] and not va[1]:
            ahead += 1
        elif vb[0] > va[0] and not vb[1]:
            behind += 1
        else:
            undecided += 1
    n = ahead + behind
    tail = sum(math.comb(n, k) for k in range(max(ahead, behind), n + 1)) / 2 ** n if n else 1.0
    return {"ahead": ahead, "behind": behind, "undecided": undecided, "p": min(1.0, 2 * tail),
            "mean_diff": statistics.mean(diffs) if diffs else None}


def attach_savings(runs: list[dict], pretrained: dict) -> None:
    """Each run's savings against the scratch run of its proxy and seed (``pretrained``: (proxy, seed) -> the small
    model's pretraining record)."""
    for r in runs:
        scratch = next(x for x in runs if x["proxy"] == r["proxy"] and x["seed"] == r["seed"]
                       and x["method"] == "scratch")
        r["savings"] = savings(r, scratch, pretrained[(r["proxy"], r["seed"])])


def _mean_sd(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _pick_knobs(tuning: list[dict]) -> dict:
    """Per proxy and knob method: the candidate with the most FLOPs saved on the tuning run (ties/none reached:
    lowest final loss), with every candidate's score."""
    chosen: dict = {}
    by_proxy: dict = {}
    for run in tuning:
        by_proxy.setdefault(run["proxy"], []).append(run)
    for proxy, runs in by_proxy.items():
        scratch = next(r for r in runs if r["method"] == "scratch")
        for method in KNOBS:
            scores = []
            for r in runs:
                if r["method"] != method:
                    continue
                sv = savings(r, scratch, None)
                scores.append({"value": r["knob"], "flops_saved": sv.get("flops_saved"),
                               "final_loss": sv.get("final_loss"), "loss_fitted": r.get("loss_fitted"),
                               "loss_init": r.get("loss_init"), "refused": sv.get("refused")})
            ok = [c for c in scores if c["final_loss"] is not None]
            best = max(ok, key=lambda c: (c["flops_saved"] if c["flops_saved"] is not None else -1e9,
                                          -c["final_loss"])) if ok else scores[0]
            chosen.setdefault(proxy, {})[method] = {"value": best["value"], "candidates": scores}
    return chosen


def _same_inits(jobs: list[dict]) -> dict[int, int]:
    """Index of each job whose method starts from tensors bit-identical to an earlier job's of the same proxy and
    seed -> that job's index.  Training is deterministic, so such a run would repeat the earlier one step for step
    (e.g. net2net and stack here: the depth baselines grow width as net2net does, and net2net grows depth by
    stacking).  Only the pure initialisation methods qualify; ligo, mslt and ki differ by procedure."""
    from ligo_convert.errors import LigoError
    from ligo_convert.growth import baselines

    seen: dict[tuple, int] = {}
    twins = {}
    for i, job in enumerate(jobs):
        if job["method"] not in baselines.METHODS or job["method"] == "scratch":
            continue
        small, target = _specs(job["proxy"])
        try:
            init = baselines.expand(job["method"], small, job["small_weights"], target, job["seed"])
        except LigoError:
            continue
        digest = hashlib.sha256()
        for name in sorted(init):
            digest.update(name.encode() + init[name].contiguous().numpy().tobytes())
        key = (job["proxy"].name, job["seed"], digest.hexdigest())
        if key in seen:
            twins[i] = seen[key]
        else:
            seen[key] = i
    return twins


def _run_all(fn, jobs: list[dict], workers: int) -> list[dict]:
    if workers <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, jobs))


def run_benchmark(proxies: list[Proxy], s: Settings, log=print) -> dict:
    start = time.perf_counter()
    seeds = list(s.seeds) + [s.tune_seed]
    log(f"pretraining {len(proxies) * len(seeds)} small models")
    pre = _run_all(pretrain_job, [dict(proxy=p, settings=proxy_settings(p, s), seed=seed) for p in proxies
                                  for seed in seeds], s.jobs)
    pretrained = {(r["proxy"], r["seed"]): r for r in pre}
    for r in pre:
        log(f"  {r['proxy']} seed {r['seed']}: small val loss {r['val_loss']:.3f} acc {r['val_acc']:.3f}")

    tuning_jobs = []  # tuning runs are as long as the measured ones
    for p in proxies:
        w = pretrained[(p.name, s.tune_seed)]["weights"]
        sp = proxy_settings(p, s)
        base = dict(proxy=p, settings=sp, seed=s.tune_seed, small_weights=w, steps=sp.steps)
        tuning_jobs.append({**base, "method": "scratch"})
        for method, (_, values) in KNOBS.items():
            tuning_jobs += [{**base, "method": method, "knob": v} for v in values]
    log(f"tuning: {len(tuning_jobs)} runs (seed {s.tune_seed})")
    tuning = _run_all(method_job, tuning_jobs, s.jobs)
    knobs = _pick_knobs(tuning)
    for proxy, methods in knobs.items():
        log(f"  {proxy}: " + ", ".join(f"{m} {KNOBS[m][0]}={c['value']:g}" for m, c in methods.items()))

    jobs = []
    for p in proxies:
        for seed in s.seeds:
            w = pretrained[(p.name, seed)]["weights"]
            for method in METHODS:
                knob = knobs[p.name][method]["value"] if method in KNOBS else None
                jobs.append(dict(proxy=p, settings=proxy_settings(p, s), seed=seed, method=method, knob=knob,
                                 small_weights=w, steps=proxy_settings(p, s).steps))
    twins = _same_inits(jobs)
    log(f"measuring: {len(jobs) - len(twins)} runs ({len(twins)} more start from a bit-identical initialisation "
        "already in the list and reuse its run)")
    unique = _run_all(method_job, [j for i, j in enumerate(jobs) if i not in twins], s.jobs)
    done = iter(unique)
    runs = []
    for i, job in enumerate(jobs):
        if i in twins:
            runs.append({**runs[twins[i]], "method": job["method"], "same_init_as": jobs[twins[i]]["method"]})
        else:
            runs.append(next(done))
    attach_savings(runs, pretrained)
    return {"settings": asdict(s), "proxies": [{**asdict(p), "settings": asdict(proxy_settings(p, s))}
                                               for p in proxies], "knobs": knobs,
            "pretrain": [{k: v for k, v in r.items() if k != "weights"} for r in pre],
            "runs": runs, "tuning": [{k: v for k, v in r.items() if k not in ("small_weights",)} for r in tuning],
            "wall_s": time.perf_counter() - start}


# --- report --------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    import transformers

    import ligo_convert

    import hashlib

    growth = Path(ligo_convert.__file__).parent / "growth"
    # the growth code is what the numbers depend on: fingerprint it, committed or not
    code = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:12] for f in sorted(growth.glob("*.py"))}
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "ligo_convert": ligo_convert.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "growth_code_sha256": code}


def table(results: dict, proxy: str, pre: bool) -> list[str]:
    suffix = "_pre" if pre else ""
    runs = [r for r in results["runs"] if r["proxy"] == proxy]
    lines = ["| method | FLOPs saved % | wall saved % | train steps to goal | reached | final val loss | final val acc |",
             "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        refused = [r for r in mine if "refused" in r]
        if refused:
            lines.append(f"| {method} | refused | refused | – | – | – | – |")
            continue
        sv = [r["savings"] for r in mine]
        reached = [x for x in sv if x["reached"]]
        knob = f" ({KNOBS[method][0]} {mine[0]['knob']:g})" if method in KNOBS else ""
        lines.append(f"| {method}{knob} | {aggregate(sv, 'flops_saved' + suffix)} | "
                     f"{aggregate(sv, 'wall_saved' + suffix)} | "
                     f"{steps_to_goal(sv)} | {len(reached)}/{len(sv)} | "
                     f"{_mean_sd([x['final_loss'] for x in sv], 3)} | {_mean_sd([x['final_acc'] for x in sv], 3)} |")
    return lines


def _runs(results: dict, proxy: str, method: str) -> list[dict]:
    return sorted((r for r in results["runs"] if r["proxy"] == proxy and r["method"] == method),
                  key=lambda r: r["seed"])


def loss_at(curve: list, flops: float) -> float:
    """Validation loss at ``flops`` spent, interpolated linearly between evaluations (the last one past the end)."""
    prev = curve[0]
    for point in curve:
        if point[1] >= flops:
            if point[1] == prev[1]:
                return point[3]
            f = (flops - prev[1]) / (point[1] - prev[1])
            return prev[3] + f * (point[3] - prev[3])
        prev = point
    return curve[-1][3]


MATCHED = (0.1, 0.25, 0.5, 0.75, 1.0)


def matched_table(results: dict, proxy: str) -> list[str]:
    """Mean validation loss of each method when it has spent a fraction of scratch's FLOPs (its own seed's): where
    the head start goes, seen without the goal's per-seed noise."""
    runs = [r for r in results["runs"] if r["proxy"] == proxy and "curve" in r]
    budget = {r["seed"]: r["curve"][-1][1] for r in runs if r["method"] == "scratch"}
    lines = ["| method | " + " | ".join(f"{f:.0%}" for f in MATCHED) + " |", "|---|" + "---|" * len(MATCHED)]
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if mine:
            cells = [f"{statistics.mean(loss_at(r['curve'], f * budget[r['seed']]) for r in mine):.3f}"
                     for f in MATCHED]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def summary(results: dict) -> list[str]:
    """One row per method: FLOPs / wall saved (%) on every proxy, pretraining not counted (the paper's Table 1);
    then LiGO against each method seed by seed."""
    names = [p["name"] for p in results["proxies"]]
    lines = ["| method | " + " | ".join(f"{n} FLOPs / wall saved %" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for method in METHODS:
        cells = []
        for n in names:
            runs = _runs(results, n, method)
            if any("refused" in r for r in runs):
                cells.append("refused")
                continue
            sv = [r["savings"] for r in runs]
            ok = sum(x["reached"] for x in sv)
            cells.append(f"{aggregate(sv, 'flops_saved', sd=False)} / {aggregate(sv, 'wall_saved', sd=False)}"
                         + ("" if ok == len(sv) else f" ({ok}/{len(sv)} reached)"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lead = ["| LiGO against | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method in METHODS:
        if method == "ligo":
            continue
        cells = []
        for n in names:
            theirs = _runs(results, n, method)
            ours = _runs(results, n, "ligo")
            if any("refused" in r for r in theirs + ours):
                cells.append("refused")
                continue
            c = paired([r["savings"] for r in ours], [r["savings"] for r in theirs])
            cells.append(f"{c['ahead']}–{c['behind']}" + (f" ({c['undecided']} undecided)" if c["undecided"] else "")
                         + f", p {c['p']:.2f}" + (f", {c['mean_diff']:+.1f} pts" if c["mean_diff"] is not None
                                                  else ""))
        lead.append(f"| {method} | " + " | ".join(cells) + " |")
    return (["Summary (mean over all seeds, pretraining not counted; ≤: some seed did not reach the goal and counts at "
             "its bound, so the mean is an upper bound; details, sd and the pretraining-counted figures below):", ""]
            + lines + ["", "LiGO against each method, seed by seed (FLOPs saved, pretraining not counted): seeds where "
                       "LiGO saved more – seeds where it saved less, the two-sided sign test's p over those, and the "
                       "mean difference in points (a seed that did not reach the goal at its bound; a seed where "
                       "neither reached it, or the bound does not decide, is undecided):", ""] + lead)


def _scales(results: dict) -> str:
    steps = {p["name"]: p.get("settings", results["settings"])["steps"] for p in results["proxies"]}
    return ", ".join(f"{n}: {v}" for n, v in steps.items())


def markdown(results: dict, command: str) -> str:
    s = results["settings"]
    out = ["# Growth savings benchmark", "",
           f"Command: `{command}`  ", f"Seeds: {s['seeds']} (tuning seed {s['tune_seed']}); total wall "
           f"{results['wall_s'] / 60:.1f} min; versions: {json.dumps(results['versions'])}", "",
           "Savings are against `scratch` on the same seed: FLOPs (forward+backward matrix products, LiGO's "
           "fitting steps and KI's teacher forwards counted) and training wall time until the "
           "validation loss first reaches scratch's final validation loss (linear interpolation between "
           f"evaluations every {s['eval_every'] / s['steps']:.0%} of the steps). Every method trains the proxy's "
           f"steps ({_scales(results)}) with the same AdamW, "
           f"warmup ({s['warmup']:.0%}) + cosine schedule and batches. Mean ± sd over all seeds; a seed that did not "
           "reach the goal (see `reached`) would have needed more than the whole run, so it counts at the saving "
           "the whole run gives, an upper bound, and the mean is marked ≤ (dropping such seeds would keep only a "
           "method's easy ones); likewise its steps to goal at the run's length (≥). Final quality: validation "
           "loss/accuracy after the last step, over all seeds. Fixed before measuring, for every method alike: the "
           "training learning rate (per proxy, the one scratch does best with: results/savings_lr_check.md), steps "
           "and batch size; LiGO as the paper's official recipe (per-layer width "
           "matrices, noisy-stack depth and random-convex width initialisation, task objective), its fitting steps "
           f"set to 5 % of the training steps ({s['fit_steps']} at {s['steps']} steps; the paper fits 100 steps of "
           "~10^5) and its one knob "
           "the fitting learning rate (relative: width matrices step by lr / D1, depth by lr / L1). The small model "
           "pretrains with the same recipe at the learning rate it does best with (results/savings_lr_check.md), as "
           "long as the target on images and a third as long on text: there a "
           "2x64 model trained as long as the 4x128 target matches its loss at these budgets (at 200 steps: GPT-2 "
           "2.47 vs 2.46, BERT 3.10 vs 3.20) and leaves nothing to grow into, while the paper's small models are "
           "worse than the large ones trained in full.", ""]
    pairs = next((p for p in results["proxies"] if p["name"] == "vit-digit-pairs"), None)
    if pairs:
        out += ["The image proxy is two-digit numbers written with the digits (two 8x8 digits side by side on a "
                f"16x16 canvas, 100 classes, {pairs['val_batches'] * pairs['batch_size']} validation pairs of "
                f"held-out digit images), trained {pairs['steps_scale']:g} times as long as the text proxies (a 4x128 "
                "ViT from scratch needs that to pass ~90 % accuracy). The plain 8x8 digits (`--proxies vit-digits`) "
                "saturate: a 4x128 ViT from scratch reaches ~97 % accuracy within the budget, every method ends "
                "within the noise of the 360-image validation set and no method saves reliably (at most 12.6 % on "
                "average, LiGO ≤ -4.1 %; results/savings-digits8x8/).", ""]
    out += summary(results) + [""]
    for p in results["proxies"]:
        name = p["name"]
        pre = [r for r in results["pretrain"] if r["proxy"] == name and r["seed"] in s["seeds"]]
        scratch = [r for r in results["runs"] if r["proxy"] == name and r["method"] == "scratch"]
        ligo = [r for r in results["runs"] if r["proxy"] == name and r["method"] == "ligo" and "curve" in r]
        ps = p.get("settings", s)
        out += [f"## {name}: {p['family']} {p['small']} -> {p['target']}, lr {p['lr']:g}"
                + (f" (small model's pretraining: {p['small_lr']:g})" if p.get("small_lr") else ""), "",
                f"Scratch: {statistics.mean(r['curve'][-1][1] for r in scratch) / 1e12:.3f} TFLOPs in {ps['steps']} "
                f"steps ({statistics.mean(r['curve'][-1][2] for r in scratch):.1f} s). "
                + (f"One LiGO fitting step costs {ligo[0]['fit_step_flops'] / ligo[0]['step_flops']['full']:.2f} "
                   f"training steps; LiGO's validation loss {_mean_sd([r['loss_init'] for r in ligo], 3)} at init, "
                   f"{_mean_sd([r['loss_fitted'] for r in ligo], 3)} after fitting (small model: "
                   f"{_mean_sd([r['val_loss'] for r in pre], 3)})." if ligo else ""), "",
                "Small model's pretraining not counted (the paper's convention):", ""]
        out += table(results, name, pre=False)
        out += ["", "Validation loss when a fraction of scratch's FLOPs is spent (mean over seeds; pretraining "
                "not counted):", ""] + matched_table(results, name)
        out += ["", f"Small model's pretraining counted ({round(p['pretrain_fraction'] * ps['steps'])} steps, "
                    f"{statistics.mean(r['flops'] for r in pre) / 1e12:.2f} TFLOPs, small val loss "
                    f"{_mean_sd([r['val_loss'] for r in pre], 3)}):", ""]
        out += table(results, name, pre=True)
        refused = {r["refused"] for r in results["runs"] if r["proxy"] == name and "refused" in r}
        for msg in sorted(refused):
            out.append(f"\nRefused: {msg}")
        twins = [r for r in results["runs"] if r["proxy"] == name and "same_init_as" in r]
        for method, like in sorted({(r["method"], r["same_init_as"]) for r in twins}):
            n = sum(r["method"] == method for r in twins)
            out.append(f"\n{method} starts from tensors bit-identical to {like}'s on {n} of {len(s['seeds'])} seeds, "
                       f"so those rows are {like}'s runs (training is deterministic; not run twice).")
        out += ["", "Tuning (one knob, three values, tuning seed; FLOPs saved / final loss):", ""]
        for method, c in results["knobs"][name].items():
            cands = "; ".join(
                f"{x['value']:g}: " + (f"{x['flops_saved']:.1f} %" if x["flops_saved"] is not None else "n.r.")
                + (f" / {x['final_loss']:.3f}" if x["final_loss"] is not None else "")
                + (f" (val loss at init {x['loss_init']:.3f}, after fitting {x['loss_fitted']:.3f})"
                   if x.get("loss_fitted") is not None else "") for x in c["candidates"])
            out.append(f"- {method} {KNOBS[method][0]} = **{c['value']:g}** — {cands}")
        out.append("")
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxies = [p["name"] for p in results["proxies"]]
    pre = {(r["proxy"], r["seed"]): r["flops"] for r in results["pretrain"]}
    fig, axes = plt.subplots(2, len(proxies), figsize=(5 * len(proxies), 8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for col, name in enumerate(proxies):
        for row, counted in enumerate((False, True)):
            ax = axes[row][col]
            goal, tops, lows = [], [], []
            for i, method in enumerate(METHODS):
                runs = [r for r in results["runs"] if r["proxy"] == name and r["method"] == method
                        and "curve" in r]
                if not runs:
                    continue
                n = min(len(r["curve"]) for r in runs)
                shift = [pre[(name, r["seed"])] if (counted and method != "scratch") else 0.0 for r in runs]
                x = [statistics.mean(r["curve"][k][1] + sh for r, sh in zip(runs, shift)) for k in range(n)]
                y = [statistics.mean(r["curve"][k][3] for r in runs) for k in range(n)]
                tops.append(y[min(1, n - 1)])
                lows.append(min(y))
                ax.plot(x, y, label=method, color=colors(i), lw=2.2 if method in (
                    "ligo", "scratch") else 1.2)
                if method == "scratch":
                    goal = [r["curve"][-1][3] for r in runs]
            if goal:
                ax.axhline(statistics.mean(goal), color="grey", ls="--", lw=0.8)
            if tops:  # from each curve's second evaluation down: the first steps of a random init dwarf the rest
                ax.set_ylim(min(lows) - 0.05 * (max(tops) - min(lows)), max(tops))
            ax.set_title(f"{name}: pretraining {'counted' if counted else 'not counted'}", fontsize=10)
            ax.set_xlabel("training FLOPs")
            ax.set_ylabel("validation loss")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and runs: a pipeline smoke test (< 1 min)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for savings.md/.png/.json")
    parser.add_argument("--proxies", default=",".join(DEFAULT_PROXIES),
                        help="comma-separated, from " + ", ".join(PROXIES) + " (default: %(default)s)")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps of the target")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (one thread each)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite savings.md/.png from a savings.json "
                        "this script wrote (no training)")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSON",
                        help="with --render: add the seeds of other runs with the same settings (e.g. --seeds 3,4,5 "
                        "after the default 0,1,2); training is deterministic, so this equals one run over all seeds")
    args = parser.parse_args(argv)
    if args.merge and not args.render:
        parser.error("--merge needs --render")
    if args.render:
        results = json.loads(args.render.read_text())
        for other in args.merge:
            results = merge(results, json.loads(other.read_text()), str(other))
        attach_savings(results["runs"], {(r["proxy"], r["seed"]): r for r in results["pretrain"]})
        write(results, args.out)
        return 0

    s = QUICK if args.quick else Settings()
    if args.seeds:
        s = replace(s, seeds=args.seeds)
    if args.steps:
        s = replace(s, steps=args.steps, eval_every=max(1, args.steps // 20),
                    fit_steps=max(1, args.steps // 20))
    if args.jobs:
        s = replace(s, jobs=args.jobs)
    proxies = [PROXIES[n] for n in args.proxies.split(",")]
    if args.quick:
        proxies = [quick_proxy(p) for p in proxies]
    torch.set_num_threads(1)
    before = versions()
    results = run_benchmark(proxies, s, log=lambda m: print(m, flush=True))
    results["versions"] = versions()
    if results["versions"] != before:  # workers import the growth code afresh at each stage
        results["versions"]["changed_during_run_from"] = before["growth_code_sha256"]
    command = "python benchmarks/savings.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    results["command"] = command
    write(results, args.out)
    return 0


def merge(a: dict, b: dict, name: str = "the second run") -> dict:
    """Run ``a`` with the seeds of run ``b`` added.  Refused unless everything but the seeds is the same: settings,
    proxies, growth code, versions, and the knob values the tuning seed chose."""
    same = lambda x: {k: v for k, v in x.items() if k != "seeds"}  # noqa: E731
    for what, x, y in (("settings", same(a["settings"]), same(b["settings"])),
                       ("proxies", [{**p, "settings": same(p["settings"])} for p in a["proxies"]],
                        [{**p, "settings": same(p["settings"])} for p in b["proxies"]]),
                       ("versions", a["versions"], b["versions"]),
                       ("tuned knobs", {n: {m: c["value"] for m, c in k.items()} for n, k in a["knobs"].items()},
                        {n: {m: c["value"] for m, c in k.items()} for n, k in b["knobs"].items()})):
        if x != y:
            raise SystemExit(f"cannot merge {name}: its {what} differ from the first run's")
    seeds = sorted(set(a["settings"]["seeds"]) | set(b["settings"]["seeds"]))
    if len(seeds) < len(a["settings"]["seeds"]) + len(b["settings"]["seeds"]):
        raise SystemExit(f"cannot merge {name}: it repeats seeds of the first run")
    have = {(r["proxy"], r["seed"]) for r in a["pretrain"]}
    out = {**a, "settings": {**a["settings"], "seeds": seeds},
           "proxies": [{**p, "settings": {**p["settings"], "seeds": seeds}} for p in a["proxies"]],
           "runs": a["runs"] + b["runs"],
           "pretrain": a["pretrain"] + [r for r in b["pretrain"] if (r["proxy"], r["seed"]) not in have],
           "wall_s": a["wall_s"] + b["wall_s"], "command": f"{a['command']}` and `{b['command']}"}
    return out


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "savings.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out / "savings.md").write_text(markdown(results, results["command"]))
    plot(results, out / "savings.png")
    print((out / "savings.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
