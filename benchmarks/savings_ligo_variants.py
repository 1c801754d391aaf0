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

``--schedules JSON`` (a ``savings.py --tune-schedule`` result) asks the same question of the tuned table: scratch and
LiGO train with the schedules that run chose on its tuning seed (LiGO with its chosen fitting rate), and the variants
add the post-growth and fitting levers a tuning budget could still hold — a third of the fitting steps, and a shorter
cosine (the schedule ends at 0.85 / 0.7 / 0.5 of scratch's steps: LEMON's "decay faster").  Each lever runs on the
tuning seed too, so the table shows what the tuning budget would have chosen next to what the lever does on the
measured seeds, seed by seed against the recipe.

    python benchmarks/savings_ligo_variants.py --proxy vit-digit-pairs --markdown benchmarks/results/savings_ligo_variants.md
    python benchmarks/savings_ligo_variants.py --proxy gpt2-stdlib,bert-stdlib --seeds 0,1,2,3 \
        --schedules benchmarks/results/savings-tuned/savings.json --markdown benchmarks/results/savings_levers.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
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
LEVERS = {  # --schedules: on top of each proxy's tuned LiGO (its chosen schedule and fitting rate)
    "recipe": {},
    "fit x1/3": {"fit_scale": 1 / 3},
    "horizon 0.85": {"horizon": 0.85},
    "horizon 0.7": {"horizon": 0.7},
    "horizon 0.5": {"horizon": 0.5},
    "shared width": {"shared_width": True},
    "interleave depth": {"depth_init": "interleave"},
    "select width": {"width_init": "select"},
}


def variant_job(base: dict, s, name: str, change: dict, fit_lr: float, schedule: tuple | None) -> dict:
    """A LiGO job with one change of ``change``: ``fit_scale`` (times the fitting steps), ``horizon`` (the cosine
    ends at that fraction of the steps, where the run stops; the warmup keeps its steps), or a LiGO recipe field."""
    variant = {k: v for k, v in change.items() if k not in ("fit_scale", "horizon")}
    if "fit_scale" in change:
        variant["fit_steps"] = max(1, round(s.fit_steps * change["fit_scale"]))
    job = {**base, "method": "ligo", "knob": fit_lr, "ligo_variant": variant, "variant": name}
    if schedule:
        job["schedule"] = schedule
    if "horizon" in change:
        lr, warmup = schedule or (base["proxy"].lr, s.warmup)
        job["steps"] = max(1, round(change["horizon"] * s.steps))
        job["schedule"] = (lr, warmup * s.steps / job["steps"])
    return job


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", default="vit-digit-pairs", help="one of " + ", ".join(sorted(sv.PROXIES)) +
                        "; with --schedules, a comma-separated list")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2])
    parser.add_argument("--fit-lr", type=float, help="LiGO's fitting learning rate (relative; default: the one "
                        "benchmarks/results/savings.json chose for the proxy)")
    parser.add_argument("--schedules", type=Path, metavar="JSON", help="a savings.py --tune-schedule result: train "
                        "scratch and LiGO with the schedules and fitting rate it chose, and compare LEVERS")
    parser.add_argument("--quick", action="store_true", help="with --schedules: tiny models and runs (a smoke test)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="folder of finished runs, read back by a rerun (savings.py's)")
    parser.add_argument("--markdown", type=Path, help="also write the table here, and every run's curve and savings "
                        "beside it (same name, .json)")
    args = parser.parse_args(argv)
    names = args.proxy.split(",")
    if any(n not in sv.PROXIES for n in names):
        parser.error(f"--proxy: choose from {', '.join(sorted(sv.PROXIES))}")
    if len(names) > 1 and not args.schedules:
        parser.error("several proxies need --schedules")
    if args.cache:
        sv.RUN_CACHE[:] = [args.cache]
    start = time.perf_counter()
    if args.schedules:
        tuned = json.loads(args.schedules.read_text())
        missing = [n for n in names if n not in tuned.get("schedules", {})]
        if missing:
            parser.error(f"{args.schedules} has no tuned schedules for {', '.join(missing)} (run savings.py "
                         "--tune-schedule on them first)")
        title, parts = "LiGO's levers under the tuned schedules", [lever_section(sv.PROXIES[n], tuned, args)
                                                                    for n in names]
    else:
        title, parts = "LiGO recipe variants", [variant_section(sv.PROXIES[names[0]], args, parser)]
    lines = [line for text, _ in parts for line in text]
    runs = [run for _, rs in parts for run in rs]
    command = "python benchmarks/savings_ligo_variants.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cached = " (finished runs read back from --cache)" if args.cache else ""
    lines += [f"Command: `{command}`; wall {(time.perf_counter() - start) / 60:.1f} min{cached}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(f"# {title}\n\n" + text)
        keep = ("proxy", "variant", "seed", "method", "knob", "steps", "lr", "warmup", "loss_init", "loss_fitted",
                "extra_flops", "curve", "savings")
        args.markdown.with_suffix(".json").write_text(json.dumps(
            {"command": command, "runs": [{k: r[k] for k in keep if k in r} for r in runs]}, indent=1) + "\n")
    return 0


def variant_section(p, args, parser) -> tuple[list[str], list[dict]]:
    """The recipe's parts on one proxy, every run with scratch's schedule."""
    if args.fit_lr is None:
        chosen = json.loads((sv.RESULTS / "savings.json").read_text())["knobs"]
        if p.name not in chosen:
            parser.error(f"benchmarks/results/savings.json has no {p.name} run; pass --fit-lr")
        args.fit_lr = chosen[p.name]["ligo"]["value"]
    s = sv.proxy_settings(p, sv.Settings(seeds=args.seeds, jobs=args.jobs))
    pre = sv._run_all(sv.pretrain_job, [dict(proxy=p, settings=s, seed=seed) for seed in args.seeds], s.jobs)
    jobs = []
    for r in pre:
        base = dict(proxy=p, settings=s, seed=r["seed"], small_weights=r["weights"], steps=s.steps)
        jobs.append({**base, "method": "scratch", "variant": "scratch"})
        jobs += [variant_job(base, s, name, change, args.fit_lr, None) for name, change in VARIANTS.items()]
    runs = _trained(jobs, pre, s)
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
    return lines + [""], runs


def _trained(jobs: list[dict], pre: list[dict], s) -> list[dict]:
    runs = sv._run_all(sv.method_job, jobs, s.jobs)
    for job, run in zip(jobs, runs):
        run["variant"] = job["variant"]
    sv.attach_savings(runs, {(r["proxy"], r["seed"]): r for r in pre})
    return runs


def lever_section(p, tuned: dict, args) -> tuple[list[str], list[dict]]:
    """LEVERS on one proxy under the tuned table's schedules: on its tuning seed (what that budget would choose) and
    on ``args.seeds``, each seed against tuned scratch on the same seed."""
    chosen = tuned["schedules"][p.name]["chosen"]
    fit_lr = tuned["knobs"][p.name]["ligo"]["value"]
    tune_seed = tuned["settings"]["tune_seed"]
    schedule = {m: (chosen[m]["lr"], chosen[m]["warmup"]) for m in ("scratch", "ligo")}
    q = sv.quick_proxy(p) if args.quick else p
    s = sv.proxy_settings(q, replace(sv.QUICK if args.quick else sv.Settings(), seeds=args.seeds, jobs=args.jobs))
    pre = sv._run_all(sv.pretrain_job, [dict(proxy=q, settings=s, seed=x) for x in [tune_seed, *args.seeds]], s.jobs)
    jobs = []
    for r in pre:
        base = dict(proxy=q, settings=s, seed=r["seed"], small_weights=r["weights"], steps=s.steps)
        jobs.append({**base, "method": "scratch", "schedule": schedule["scratch"], "variant": "scratch"})
        jobs += [variant_job(base, s, name, change, fit_lr, schedule["ligo"]) for name, change in LEVERS.items()]
    runs = _trained(jobs, pre, s)

    def of(name, seeds):
        return [next(r for r in runs if r["variant"] == name and r["seed"] == x) for x in seeds]

    # what the tuning budget would choose: its own rule (most FLOPs saved on the tuning seed; ties: lowest loss)
    pick = sv.best_candidate([of(n, [tune_seed])[0] for n in LEVERS], of("scratch", [tune_seed])[0])[0]["variant"]
    lines = [f"## {p.name}", "",
             f"{s.steps} training steps; scratch with its tuned schedule ({chosen['scratch']['name']}), LiGO with its "
             f"own ({chosen['ligo']['name']}, fitting lr {fit_lr:g}, {s.fit_steps} fitting steps), as "
             f"{args.schedules} chose them on seed {tune_seed}; each lever changes one thing.  FLOPs saved against "
             "tuned scratch on the same seed (pretraining not counted; a seed that did not reach scratch's final loss "
             "at its bound, the mean then ≤; n.r.: not reached).  Bold: the lever the tuning seed would choose (the "
             "most FLOPs saved there).  A shorter horizon's run stops where its cosine ends, so its final loss is "
             "that step's.", "",
             f"| lever | seed {tune_seed} (tuning): FLOPs saved % | seeds {','.join(map(str, args.seeds))}: FLOPs "
             "saved % | against the recipe, seed by seed | reached | val loss after fitting | final val loss |",
             "|---|---|---|---|---|---|---|"]
    recipe = of("recipe", args.seeds)
    for name in ["scratch", *LEVERS]:
        mine = of(name, args.seeds)
        sav = [r["savings"] for r in mine]
        tune = of(name, [tune_seed])[0]["savings"]
        cell = f"{tune['flops_saved']:.1f}" if tune["reached"] else "n.r."
        if name == pick:
            cell = f"**{cell}**"
        against = "–" if name in ("scratch", "recipe") else sv.paired_cell(mine, recipe)
        fitted = [r["loss_fitted"] for r in mine if "loss_fitted" in r]
        lines.append(f"| {name} | {cell} | {sv.aggregate(sav, 'flops_saved')} | {against} | "
                     f"{sum(x['reached'] for x in sav)}/{len(sav)} | {sv._mean_sd(fitted, 3)} | "
                     f"{sv._mean_sd([x['final_loss'] for x in sav], 3)} |")
    return lines + [""], runs


if __name__ == "__main__":
    sys.exit(main())
