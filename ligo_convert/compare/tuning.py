"""A fair post-growth recipe: the schedule after growth as part of an equal tuning budget.

Training every grown start with scratch's schedule spends part of it re-warming weights that are already trained
(the official LiGO BERT recipe grows with no warmup; G_stack re-warms; LEMON keeps the peak rate and decays faster).
So on a tuning seed that is never measured, every method — scratch included — trains its start once per point of the
same grid: post-growth warmup none / short / scratch's, times the peak learning rate at a few factors of scratch's.
Scratch keeps the schedule with the lowest final validation loss: that loss is the goal.  Each grown method keeps
the schedule that reaches it with the fewest FLOPs (none does: the lowest final loss), ``accounting.best_candidate``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import LigoError
from .accounting import best_candidate
from .train import Recipe

# post-growth warmups, as fractions of scratch's: none (one step at the peak rate), short, scratch's own
WARMUPS = (("none", 0.0), ("short", 0.25), ("scratch's", 1.0))
LR_FACTORS = (0.5, 1.0, 2.0)  # peak learning rates, as factors of scratch's
TUNE_SEED = 100  # the tuning seed: its runs choose the schedules and are never measured


@dataclass(frozen=True)
class Schedule:
    """One grid point: the peak rate and the warmup (a fraction of the steps), with how the grid names them."""

    lr: float
    warmup: float
    lr_factor: float
    warmup_name: str

    @property
    def name(self) -> str:
        return f"lr x{self.lr_factor:g}, warmup {self.warmup_name}"

    def recipe(self, base: Recipe) -> Recipe:
        return replace(base, lr=self.lr, warmup=self.warmup)

    def to_dict(self) -> dict:
        return {"lr": self.lr, "warmup": self.warmup, "lr_factor": self.lr_factor, "warmup_name": self.warmup_name,
                "name": self.name}


def parse_lr_factors(value) -> tuple[float, ...]:
    """``--tune-lr-factors``: comma-separated positive factors of scratch's peak rate, each once."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        factors = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        factors = ()
    if not factors or any(not f > 0 for f in factors) or len(set(factors)) < len(factors):
        raise LigoError(f"--tune-lr-factors must be distinct positive numbers like 0.5,1,2 (factors of --lr), "
                        f"not {value!r}")
    return factors


def schedule_grid(base: Recipe, lr_factors=LR_FACTORS) -> list[Schedule]:
    """The grid every method gets: each lr factor times each warmup of WARMUPS (scratch's schedule among them when
    a factor is 1)."""
    return [Schedule(base.lr * f, base.warmup * w, f, name) for f in lr_factors for name, w in WARMUPS]


def same_schedule(run: dict, schedule: Schedule) -> bool:
    return run.get("lr") == schedule.lr and run.get("warmup") == schedule.warmup


def choose_schedules(tuning: dict[str, list[dict]]) -> dict[str, dict]:
    """Each method's schedule from its tuning runs (``tuning``: method -> one run per grid point, each with ``lr``
    and ``warmup``; scratch among them).  Scratch: the lowest final validation loss; every other method: the most
    FLOPs saved against that scratch run.  Returns method -> {lr, warmup, candidates: each point's score}, or
    {refused} for a method that refuses the growth."""
    scratch_runs = tuning["scratch"]
    best_scratch = min(scratch_runs, key=lambda r: r["curve"][-1][3])
    chosen = {}
    for method, runs in tuning.items():
        if any("refused" in r for r in runs):
            chosen[method] = {"refused": next(r["refused"] for r in runs if "refused" in r)}
            continue
        best, scores = best_candidate(runs, best_scratch, value=_point)
        if method == "scratch":  # the reference: its lowest final loss, not the FLOPs to reach it
            best = best_scratch
        chosen[method] = {"lr": best["lr"], "warmup": best["warmup"], "candidates": scores}
    return chosen


def _point(run: dict) -> dict:
    return {"lr": run["lr"], "warmup": run["warmup"]}
