"""What a run saved against scratch: FLOPs, wall time and steps until the validation loss first reaches scratch's
final validation loss, with seeds that never reach it kept at their bound (censored), and the paired sign test.

A run is a dict with ``method`` and ``curve``: evaluations ``(step, flops, wall, loss, acc)`` from step 0, FLOPs and
wall time cumulative (a grown start's fitting already in its first point), or ``refused`` (the method refused the
growth).
"""

from __future__ import annotations

import math
import statistics

MATCHED = (0.1, 0.25, 0.5, 0.75, 1.0)  # fractions of scratch's FLOPs at which losses are compared


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


def savings(run: dict, scratch: dict, pretrain: dict | None = None) -> dict:
    """Per run: saved FLOPs/wall (%) against scratch, with and without the small model's pretraining (``pretrain``:
    its ``flops`` and ``wall``; None: not known, counted as 0), and the training steps taken to reach scratch's final
    loss."""
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


def mean_sd(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def aggregate(sv: list[dict], key: str, digits: int = 1, sd: bool = True) -> str:
    """Mean (± sd) of ``key`` over every seed, a seed that did not reach the goal counted at its bound; then the
    whole mean is an upper bound and says so (≤)."""
    got = [v for v in (saved(x, key) for x in sv) if v is not None]
    if not got:
        return "–"
    values = [v for v, _ in got]
    text = mean_sd(values, digits) if sd else f"{statistics.mean(values):.{digits}f}"
    return ("≤ " + text) if any(bound for _, bound in got) else text


def steps_to_goal(sv: list[dict]) -> str:
    got = [(x["steps_to_goal"], False) if x["reached"] else (x["steps_to_goal_min"], True)
           for x in sv if x["reached"] or "steps_to_goal_min" in x]
    if not got:
        return "–"
    text = mean_sd([v for v, _ in got], 0)
    return ("≥ " + text) if any(bound for _, bound in got) else text


def paired(ours: list[dict], theirs: list[dict], key: str = "flops_saved") -> dict:
    """One method against another seed by seed (both lists in seed order): on how many seeds each saved more, with a
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


def best_candidate(runs: list[dict], scratch: dict, value=None) -> tuple[dict, list[dict]]:
    """The tuning budget's choice among ``runs`` (one method, one candidate value each, on the tuning seed): the most
    FLOPs saved against ``scratch`` (none reached, or ties: the lowest final loss).  Returns (the chosen run, every
    candidate's score); ``value(run)``: what a candidate is (default: its ``knob``)."""
    scores = []
    for r in runs:
        sv = savings(r, scratch, None)
        scores.append({"value": value(r) if value else r.get("knob"), "flops_saved": sv.get("flops_saved"),
                       "final_loss": sv.get("final_loss"), "loss_fitted": r.get("loss_fitted"),
                       "loss_init": r.get("loss_init"), "refused": sv.get("refused")})
    ok = [i for i, c in enumerate(scores) if c["final_loss"] is not None]
    best = max(ok, key=lambda i: (scores[i]["flops_saved"] if scores[i]["flops_saved"] is not None else -1e9,
                                  -scores[i]["final_loss"])) if ok else 0
    return runs[best], scores


def with_stronger_scratch(base: list[dict], tuned: list[dict]) -> list[dict]:
    """The tuned runs with, on each seed, scratch's stronger run in scratch's place: its own schedule's or its tuned
    one's, whichever ends at the lower validation loss.  A schedule chosen on one tuning seed can be the worse one
    on the others, and measuring against it would flatter every grown start."""
    best: dict = {}
    for r in base + tuned:
        if r["method"] == "scratch" and (r["seed"] not in best or r["curve"][-1][3] < best[r["seed"]]["curve"][-1][3]):
            best[r["seed"]] = r
    return [dict(best[r["seed"]] if r["method"] == "scratch" else r) for r in tuned]
