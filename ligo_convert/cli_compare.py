"""`ligo-convert compare`: parse, call ``ligo_convert.compare``, print the table."""

from __future__ import annotations

import click

from .cli_options import target_sizes
from .compare.methods import METHODS
from .compare.run import DEFAULT_METHODS, DEFAULT_STEPS, DEFAULT_TRAIN_LR, QUICK
from .compare.tuning import LR_FACTORS, TUNE_SEED
from .growth.fit import DEFAULT_LR
from .objectives import OBJECTIVES

_EPILOG = f"""\b
Examples (offline; the last needs vit-small in the Hugging Face cache and a GPU to be quick):
  ligo-convert pretrain micro-gpt2 --family hf-gpt2
  ligo-convert compare micro-gpt2 --layers 4 --width 128 --quick --out cmp-quick
  ligo-convert compare micro-gpt2 --layers 4 --width 128 --steps 300 --lr 2e-3 --out cmp-gpt2
  ligo-convert compare micro-gpt2 --layers 4 --width 128 --steps 300 --lr 2e-3 --out cmp-gpt2   # resumes
  ligo-convert compare micro-gpt2 --layers 4 --width 128 --quick --tune-schedule --out cmp-tuned
  ligo-convert pretrain micro-vit
  ligo-convert compare micro-vit --layers 4 --width 128 --methods ligo,aki,mslt,ki --seeds 0,1 --out cmp-vit
  ligo-convert compare vit-small vit-base --data images/ --steps 2000 --batch-size 64 --out cmp-vit-base
  torchrun --nproc_per_node 2 -m ligo_convert compare micro-gpt2 --layers 4 --width 128 --quick --out cmp-ddp

\b
Methods: {', '.join(METHODS)} (scratch, the reference, always runs).
--tune-schedule: every method, scratch included, trains its start on --tune-seed once per point of the same
grid (post-growth warmup none / short = a quarter of --warmup / --warmup, times peak lr = --lr times each
--tune-lr-factors) and keeps its best (scratch: the lowest final loss; the others: the fewest FLOPs to scratch's
tuned loss); the report then holds a table with scratch's schedule and one with each method's tuned schedule.
Under torchrun every process trains each run on its share of every batch (data parallelism; the same
curves as one process); the first process writes and prints.
--quick sets every option not given to: {', '.join(f'{k}={v}' for k, v in QUICK.items())}.
"""


@click.command("compare", epilog=_EPILOG)
@click.argument("src")
@click.argument("dst", required=False)
@target_sizes
@click.option("--data", type=click.Path(), help="Image folder (class subfolders), text file or folder of .txt, or a "
              "table [default: embedded digits / standard-library source].")
@click.option("--text-column", help="The text column of a .jsonl/.parquet/datasets folder.")
@click.option("--workers", type=int, help="Data loader worker processes for image folders.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
              help="Comma-separated methods to compare.")
@click.option("--steps", type=int, help=f"Training steps of the target, every method [default: {DEFAULT_STEPS}].")
@click.option("--seeds", help="Comma-separated seeds [default: 0,1,2].")
@click.option("--lr", type=float, default=DEFAULT_TRAIN_LR, show_default=True,
              help="Peak training learning rate, the same for every method (the one scratch does best with).")
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Warmup, a fraction of the steps.")
@click.option("--batch-size", type=int, help="Batch size [default: 16].")
@click.option("--accumulate", type=int, default=1, show_default=True, help="Batches accumulated per step.")
@click.option("--seq-len", type=int, default=64, show_default=True, help="Tokens per text sequence.")
@click.option("--eval-every", type=int, help="Steps between evaluations [default: steps / 20].")
@click.option("--val-batches", type=int, help="Held-out batches per evaluation [default: 8].")
@click.option("--fit-steps", type=int, help="LiGO's fitting steps, counted in its FLOPs [default: steps / 20].")
@click.option("--fit-lr", type=float, default=DEFAULT_LR, show_default=True,
              help="LiGO's relative fitting learning rate (as grow --lr).")
@click.option("--tune-schedule", is_flag=True, help="Also tune each method's post-growth warmup and peak lr on "
              "--tune-seed over the same grid, and report both schedules (see below).")
@click.option("--tune-seed", type=int, default=TUNE_SEED, show_default=True,
              help="The tuning seed of --tune-schedule (not one of --seeds).")
@click.option("--tune-lr-factors", default=",".join(f"{f:g}" for f in LR_FACTORS), show_default=True,
              help="Peak learning rates --tune-schedule tries, as factors of --lr.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="auto", show_default=True,
              help="task: the model's own loss; distill: match the source's outputs (models without a head).")
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default="auto", show_default=True,
              help="cuda: bf16 autocast, weights and optimizer state in fp32.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [default: compare-<target>-from-<src>]; "
              "run again with the same options to resume.")
@click.option("--overwrite", is_flag=True, help="Discard the runs and outputs already in --out.")
@click.option("--quick", is_flag=True, help="A smoke test of the whole pipeline (seconds on a micro model).")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json instead of the table.")
def compare_command(src, dst, layers, width, heads, kv_heads, mlp, data, text_column, workers, methods, steps, seeds,
                    lr, warmup, batch_size, accumulate, seq_len, eval_every, val_batches, fit_steps, fit_lr,
                    tune_schedule, tune_seed, tune_lr_factors, objective, device, out, overwrite, quick, as_json):
    """Does growth pay for SRC -> DST on this data?  Train DST from each method's start with the same recipe and
    batches, and measure the FLOPs and wall time each needs to reach scratch's final validation loss.

    SRC and DST are given as for `grow` (a zoo name, folder or hub id; or DST's sizes by --layers/--width/...).
    Writes OUT/compare.md (the table, also printed), compare.json (every run and its curve) and compare.png
    (validation loss against FLOPs).  Each finished (method, seed) run is kept in OUT/runs/: run the same command
    again after an interruption and only the missing runs train.
    """
    import json

    from .compare import compare

    result = compare(src, dst, layers=layers, width=width, heads=heads, kv_heads=kv_heads, mlp=mlp, data=data,
                     text_column=text_column, workers=workers, methods=methods, seeds=seeds, steps=steps, lr=lr,
                     warmup=warmup, batch_size=batch_size, accumulate=accumulate, seq_len=seq_len,
                     eval_every=eval_every, val_batches=val_batches, fit_steps=fit_steps, fit_lr=fit_lr,
                     tune_schedule=tune_schedule, tune_seed=tune_seed, tune_lr_factors=tune_lr_factors,
                     objective=objective, device=device, out=out, overwrite=overwrite, quick=quick,
                     log=lambda msg: click.echo(msg, err=True), progress=True)
    if result.rank != 0:  # under torchrun the first process prints
        return
    if as_json:
        click.echo(json.dumps(result.results, indent=1, default=float))
        return
    from .compare.run import tables

    click.echo("\n".join(tables(result.results)).rstrip())
    if result.resumed:
        click.echo(f"({len(result.resumed)} run(s) reused from {result.out / 'runs'}; {len(result.trained)} trained)",
                   err=True)
