"""The savings table (markdown) and the validation-loss-against-FLOPs plot (PNG) of a set of runs.

Runs are grouped by method; each run carries ``savings`` (``accounting.savings`` against scratch on its seed).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .accounting import MATCHED, aggregate, loss_at, mean_sd, paired, steps_to_goal

SAVINGS_HEADER = ["| method | FLOPs saved % | wall saved % | train steps to goal | reached | final val loss | "
                  "final val acc |", "|---|---|---|---|---|---|---|"]


def _acc(values: list) -> str:
    return "–" if any(v is None for v in values) else mean_sd(values, 3)


def savings_rows(groups: list[tuple[str, str, list[dict]]], pre: bool = False) -> list[str]:
    """The savings table: one row per ``(method, label, runs)`` (label: the method as shown, e.g. with its knob),
    mean ± sd over the runs' seeds; ``pre``: with the small model's pretraining counted."""
    suffix = "_pre" if pre else ""
    lines = list(SAVINGS_HEADER)
    for method, label, runs in groups:
        if any("refused" in r for r in runs):
            lines.append(f"| {method} | refused | refused | – | – | – | – |")
            continue
        sv = [r["savings"] for r in runs]
        reached = [x for x in sv if x["reached"]]
        lines.append(f"| {label} | {aggregate(sv, 'flops_saved' + suffix)} | "
                     f"{aggregate(sv, 'wall_saved' + suffix)} | "
                     f"{steps_to_goal(sv)} | {len(reached)}/{len(sv)} | "
                     f"{mean_sd([x['final_loss'] for x in sv], 3)} | {_acc([x['final_acc'] for x in sv])} |")
    return lines


def matched_rows(groups: list[tuple[str, list[dict]]]) -> list[str]:
    """Mean validation loss of each method when it has spent a fraction of scratch's FLOPs (its own seed's): where
    the head start goes, seen without the goal's per-seed noise.  ``groups``: (method, runs), scratch among them."""
    runs = [r for _, rs in groups for r in rs if "curve" in r]
    budget = {r["seed"]: r["curve"][-1][1] for r in runs if r["method"] == "scratch"}
    lines = ["| method | " + " | ".join(f"{f:.0%}" for f in MATCHED) + " |", "|---|" + "---|" * len(MATCHED)]
    for method, rs in groups:
        mine = [r for r in rs if "curve" in r]
        if mine:
            cells = [f"{statistics.mean(loss_at(r['curve'], f * budget[r['seed']]) for r in mine):.3f}"
                     for f in MATCHED]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def summary_cell(runs: list[dict]) -> str:
    """FLOPs / wall saved (%), means only, with how many seeds reached the goal when not all did."""
    if any("refused" in r for r in runs):
        return "refused"
    sv = [r["savings"] for r in runs]
    ok = sum(x["reached"] for x in sv)
    return (f"{aggregate(sv, 'flops_saved', sd=False)} / {aggregate(sv, 'wall_saved', sd=False)}"
            + ("" if ok == len(sv) else f" ({ok}/{len(sv)} reached)"))


def by_seed(runs: list[dict]) -> list[dict]:
    return sorted(runs, key=lambda r: r["seed"])


def paired_cell(ours: list[dict], theirs: list[dict]) -> str:
    """One method against another seed by seed: "ahead–behind (undecided), p, mean difference"."""
    if any("refused" in r for r in theirs + ours):
        return "refused"
    c = paired([r["savings"] for r in by_seed(ours)], [r["savings"] for r in by_seed(theirs)])
    return (f"{c['ahead']}–{c['behind']}" + (f" ({c['undecided']} undecided)" if c["undecided"] else "")
            + f", p {c['p']:.2f}" + (f", {c['mean_diff']:+.1f} pts" if c["mean_diff"] is not None else ""))


PAIRED_NOTE = ("seeds where LiGO saved more – seeds where it saved less, the two-sided sign test's p over those, and "
               "the mean difference in points (a seed that did not reach the goal at its bound; a seed where neither "
               "reached it, or the bound does not decide, is undecided)")


# --- the plot --------------------------------------------------------------------------------------------------------

_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")


def mean_curve(runs: list[dict], shift: list[float] | None = None) -> tuple[list[float], list[float]]:
    """(FLOPs, validation loss) of the runs' curves averaged point by point over seeds (each shifted by its
    ``shift`` FLOPs, e.g. the small model's pretraining)."""
    n = min(len(r["curve"]) for r in runs)
    shift = shift or [0.0] * len(runs)
    x = [statistics.mean(r["curve"][k][1] + sh for r, sh in zip(runs, shift)) for k in range(n)]
    y = [statistics.mean(r["curve"][k][3] for r in runs) for k in range(n)]
    return x, y


def plot_panel(ax, lines: list[tuple[str, list[float], list[float]]], order: tuple[str, ...], goal: float | None,
               title: str, legend: bool = True, labels: dict | None = None) -> None:
    """Validation loss against FLOPs, one line per method: a colour, dash and marker of its own (fixed by its place in
    ``order``, so a method looks the same in every panel), scratch's final loss as a dashed grey line, and axes that
    hold every point of every curve.  ``labels``: a method's legend text, where not its name."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    xs, ys = [], []
    for method, x, y in lines:
        i = order.index(method) if method in order else len(order)
        bold = method in ("ligo", "scratch")
        ax.plot(x, y, label=(labels or {}).get(method, method), color=colors(i % 10), ls=_STYLES[i % len(_STYLES)],
                marker=_MARKERS[i % len(_MARKERS)], markersize=4 if bold else 3, lw=2.2 if bold else 1.3,
                zorder=3 if bold else 2)
        xs += x
        ys += y
    if goal is not None:
        ax.axhline(goal, color="grey", ls="--", lw=0.8, label="scratch's final loss")
        ys.append(goal)
    if xs:
        pad_x, pad_y = 0.02 * (max(xs) - min(xs) or 1.0), 0.04 * (max(ys) - min(ys) or 1.0)
        ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    if legend and lines:
        ax.legend(fontsize=8)


def save_figure(fig, path: Path, dpi: int = 90) -> None:
    """Write ``fig`` as a PNG atomically (temp name + rename) and close it."""
    import os

    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, path)
