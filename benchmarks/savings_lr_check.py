"""Is each savings proxy's training learning rate the one the reference itself wants?

The savings benchmark (benchmarks/savings.py) trains every method with one shared learning rate per proxy.  Savings
against a badly tuned scratch run are savings against a straw man, so that rate should be the one scratch does best
with.  This script trains scratch only, at a grid of learning rates, on the benchmark's tuning seed (the choice) and on
seed 0 (a check), with the benchmark's own data, trainer and schedule, and reports each final validation loss and
which rate the proxy uses.  No growth method is run: the choice cannot favour one.

    python benchmarks/savings_lr_check.py --markdown benchmarks/results/savings_lr_check.md   # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import savings as sv  # noqa: E402

GRID = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)


def scratch_job(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    p, s, seed = job["proxy"], job["settings"], job["seed"]
    # scratch never reads the small model's weights; the job format wants them
    small, _ = sv._specs(p)
    from ligo_convert.model import init_weights

    run = sv.method_job(dict(proxy=p, settings=s, seed=seed, method="scratch", small_weights=init_weights(small, seed),
                             steps=s.steps))
    return {"proxy": p.name, "lr": p.lr, "seed": seed, "final_loss": run["curve"][-1][3],
            "final_acc": run["curve"][-1][4]}


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
    jobs = []
    for name in args.proxies.split(","):
        proxy = sv.quick_proxy(sv.PROXIES[name]) if args.quick else sv.PROXIES[name]
        for lr in GRID:
            p = replace(proxy, lr=lr)
            jobs += [dict(proxy=p, settings=sv.proxy_settings(p, base), seed=seed) for seed in seeds]
    runs = sv._run_all(scratch_job, jobs, 1 if args.quick else args.jobs)

    lines = ["| proxy | " + " | ".join(f"lr {lr:g}" for lr in GRID) + " | best on the tuning seed | the proxy uses |",
             "|---|" + "---|" * (len(GRID) + 2)]
    for name in args.proxies.split(","):
        cells, score = [], {}
        for lr in GRID:
            got = {r["seed"]: r["final_loss"] for r in runs if r["proxy"] == name and r["lr"] == lr}
            score[lr] = got[seeds[0]]
            cells.append(" / ".join(f"{got[s]:.3f}" for s in seeds))
        best = min(score, key=score.get)
        used = sv.PROXIES[name].lr
        lines.append(f"| {name} | " + " | ".join(f"**{c}**" if lr == used else c for lr, c in zip(GRID, cells))
                     + f" | {best:g} | {used:g}" + ("" if best == used else " (differs)") + " |")
    command = "python benchmarks/savings_lr_check.py" + ("" if not (argv or sys.argv[1:]) else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    text = "\n".join([
        f"Scratch's final validation loss at each training learning rate (tuning seed {seeds[0]} / seed {seeds[1]}; "
        f"{base.steps} steps x each proxy's step scale, the benchmark's schedule, batches and validation set); bold: "
        "the rate the proxy uses for every method.", "", *lines, "",
        f"Command: `{command}`; wall {(time.perf_counter() - start) / 60:.1f} min.", ""])
    print(text)
    if args.markdown:
        args.markdown.write_text("# Savings proxies: the training learning rate scratch wants\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
