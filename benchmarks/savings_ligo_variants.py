"""Where LiGO stands on one savings proxy, and what its recipe's parts are worth: the issue's "investigate in the open".

Runs the savings benchmark's pipeline (benchmarks/savings.py: same small models, batches, trainer and accounting) for
``scratch`` and for LiGO under variants of the paper's recipe, one change at a time:

- ``recipe``: per-layer width matrices, noisy-stack depth, random-convex width, task objective, 5 % fitting steps;
- ``fit x2`` / ``fit x4``: two / four times the fitting steps (all counted in the FLOPs);
- ``distill``: fitting on the small model's outputs instead of the task labels (the teacher's forwards counted);
- ``shared width``: one q/k/v/o/mlp matrix for every target layer;
- ``interleave depth``: depth initialised as interpolation instead of stacking;
- ``select width``: width initialised by Net2Net-style selection instead of random convex combinations.

Every variant uses the fitting learning rate the savings benchmark chose for the proxy (read from
results/savings.json unless ``--fit-lr`` is given), so this is a look at the recipe, not a second tuning budget: the
savings table stays the paper's recipe.

    python benchmarks/savings_ligo_variants.py --proxy vit-digit-pairs --markdown benchmarks/results/savings_ligo_variants.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import savings as sv  # noqa: E402

VARIANTS = {
    "recipe": {},
    "fit x2": {"fit_scale": 2},
    "fit x4": {"fit_scale": 4},
    "distill": {"objective": "distill"},
    "shared width": {"shared_width": True},
    "interleave depth": {"depth_init": "interleave"},
    "select width": {"width_init": "select"},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", default="vit-digit-pairs", choices=sorted(sv.PROXIES))
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2])
    parser.add_argument("--fit-lr", type=float, help="LiGO's fitting learning rate (relative; default: the one "
                        "benchmarks/results/savings.json chose for the proxy)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--markdown", type=Path, help="also write the table here, and every run's curve and savings "
                        "beside it (same name, .json)")
    args = parser.parse_args(argv)

    p = sv.PROXIES[args.proxy]
    if args.fit_lr is None:
        chosen = json.loads((sv.RESULTS / "savings.json").read_text())["knobs"]
        if p.name not in chosen:
            parser.error(f"benchmarks/results/savings.json has no {p.name} run; pass --fit-lr")
        args.fit_lr = chosen[p.name]["ligo"]["value"]
    s = sv.proxy_settings(p, sv.Settings(seeds=args.seeds, jobs=args.jobs))
    start = time.perf_counter()
    pre = sv._run_all(sv.pretrain_job, [dict(proxy=p, settings=s, seed=seed) for seed in args.seeds], s.jobs)
    jobs = []
    for r in pre:
        base = dict(proxy=p, settings=s, seed=r["seed"], small_weights=r["weights"], steps=s.steps)
        jobs.append({**base, "method": "scratch"})
        for name, change in VARIANTS.items():
            variant = {k: v for k, v in change.items() if k != "fit_scale"}
            if "fit_scale" in change:
                variant["fit_steps"] = s.fit_steps * change["fit_scale"]
            jobs.append({**base, "method": "ligo", "knob": args.fit_lr, "ligo_variant": variant, "variant": name})
    runs = sv._run_all(sv.method_job, jobs, s.jobs)
    for job, run in zip(jobs, runs):
        run["variant"] = job.get("variant", "scratch")
    sv.attach_savings(runs, {(r["proxy"], r["seed"]): r for r in pre})

    lines = [f"LiGO recipe variants on {p.name} ({s.steps} training steps, {s.fit_steps} fitting steps in the recipe, "
             f"fitting lr {args.fit_lr:g}, seeds {args.seeds}); FLOPs saved against scratch on the same seed, pretraining "
             "not counted, mean ± sd over all seeds, a seed that did not reach scratch's final validation loss counted at "
             "its bound (the saving of the whole run; the mean is then marked ≤).", "",
             "| variant | FLOPs saved % | reached | val loss after fitting | final val loss | final val acc |",
             "|---|---|---|---|---|---|"]
    for name in ["scratch", *VARIANTS]:
        mine = [r for r in runs if r["variant"] == name]
        sav = [r["savings"] for r in mine]
        ok = sum(x["reached"] for x in sav)
        fitted = [r["loss_fitted"] for r in mine if "loss_fitted" in r]
        lines.append(f"| {name} | {sv.aggregate(sav, 'flops_saved')} | {ok}/{len(sav)} | {sv._mean_sd(fitted, 3)} | "
                     f"{sv._mean_sd([x['final_loss'] for x in sav], 3)} | {sv._mean_sd([x['final_acc'] for x in sav], 3)} |")
    command = "python benchmarks/savings_ligo_variants.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines += ["", f"Command: `{command}`; wall {(time.perf_counter() - start) / 60:.1f} min.", ""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text("# LiGO recipe variants\n\n" + text)
        keep = ("variant", "seed", "method", "knob", "loss_init", "loss_fitted", "extra_flops", "curve", "savings")
        args.markdown.with_suffix(".json").write_text(json.dumps(
            {"command": command, "runs": [{k: r[k] for k in keep if k in r} for r in runs]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
