"""Are the savings proxies' learning rates the ones each model itself wants?

The savings benchmark (benchmarks/savings.py) trains every method with one shared learning rate per proxy.  Savings
against a badly tuned scratch run are savings against a straw man, so that rate should be the one scratch does best
with; and the small model that every growth method starts from should be pretrained at the rate it does best with.
This script trains only those two — the target from scratch and the small model's pretraining — over a grid of
learning rates, on the benchmark's tuning seed (the choice) and on seed 0 (a check), with the benchmark's own data,
trainer, schedule and step counts, and reports each final validation loss and the rate the proxy uses.  No growth
method is run: the choice cannot favour one.

    python benchmarks/savings_lr_check.py --markdown benchmarks/results/savings_lr_check.md   # ~12 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import savings as sv  # noqa: E402

GRID = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
MODELS = {"target": "target from scratch", "small": "small model's pretraining"}


def lr_job(job: dict) -> dict:
    """One model at one learning rate: the target from scratch, or the small model's pretraining."""
    import torch

    torch.set_num_threads(1)
    p, s, seed, model = job["proxy"], job["settings"], job["seed"], job["model"]
    if model == "small":
        run = sv.pretrain_job(dict(proxy=replace(p, small_lr=job["lr"]), settings=s, seed=seed))
        loss = run["val_loss"]
    else:
        from ligo_convert.model import init_weights

        small, _ = sv._specs(p)  # scratch never reads the small model's weights; the job format wants some
        run = sv.method_job(dict(proxy=replace(p, lr=job["lr"]), settings=s, seed=seed, method="scratch",
                                 small_weights=init_weights(small, seed), steps=s.steps))
        loss = run["curve"][-1][3]
    return {"proxy": p.name, "model": model, "lr": job["lr"], "seed": seed, "final_loss": loss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxies", default=",".join(sv.DEFAULT_PROXIES))
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny models and runs: a pipeline smoke test")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    base = replace(sv.QUICK, jobs=1) if args.quick else sv.Settings()
    seeds = (base.tune_seed, 0)
    names = args.proxies.split(",")
    jobs = []
    for name in names:
        proxy = sv.quick_proxy(sv.PROXIES[name]) if args.quick else sv.PROXIES[name]
        s = sv.proxy_settings(proxy, base)
        jobs += [dict(proxy=proxy, settings=s, seed=seed, model=model, lr=lr)
                 for model in MODELS for lr in GRID for seed in seeds]
    runs = sv._run_all(lr_job, jobs, 1 if args.quick else args.jobs)

    lines = ["| proxy | model | " + " | ".join(f"lr {lr:g}" for lr in GRID) + " | best on the tuning seed | "
             "the proxy uses |", "|---|---|" + "---|" * (len(GRID) + 2)]
    for name in names:
        for model, what in MODELS.items():
            got = {(r["lr"], r["seed"]): r["final_loss"] for r in runs if r["proxy"] == name and r["model"] == model}
            best = min(GRID, key=lambda lr: got[(lr, seeds[0])])
            p = sv.PROXIES[name]
            used = (p.small_lr or p.lr) if model == "small" else p.lr
            cells = [" / ".join(f"{got[(lr, s)]:.3f}" for s in seeds) for lr in GRID]
            lines.append(f"| {name} | {what} | " + " | ".join(f"**{c}**" if lr == used else c
                                                             for lr, c in zip(GRID, cells))
                         + f" | {best:g} | {used:g}" + ("" if best == used else " (differs)") + " |")
    command = " ".join(["python benchmarks/savings_lr_check.py", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join([
        f"Final validation loss at each learning rate (tuning seed {seeds[0]} / seed {seeds[1]}) of the target trained "
        "from scratch and of the small model's pretraining, each with the benchmark's steps, schedule, batches and "
        "validation set; bold: the rate the proxy uses (the target's for every method).", "", *lines, "",
        f"Command: `{command}`; wall {(time.perf_counter() - start) / 60:.1f} min.", ""])
    print(text)
    if args.markdown:
        args.markdown.write_text("# Savings proxies: the learning rates the models want\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
