"""The whole flow offline, in a few minutes on a laptop CPU: ``python -m ligo_convert.demo [--text]``.

1. pretrain a micro model from scratch on embedded data (a ViT on scikit-learn's digits, or with ``--text`` a GPT-2
   on the Python standard library's source) and write it as a Hugging Face checkpoint;
2. grow it with LiGO (twice the layers, twice the width) and write the grown checkpoint;
3. print validation loss and accuracy of the small model, the grown model at its initial operator, after fitting the
   operator, and of a randomly initialised model of the grown size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import from_tensors, init_weights, save
from . import data as data_mod
from .grow import grow
from .growth.fit import DEFAULT_LR, DEFAULT_STEPS
from .growth.pretrain import micro_spec, pretrain
from .model import forward
from .objectives import evaluate_metrics


@torch.no_grad()
def metrics(spec, weights, data=None, batches: int = 50) -> dict:
    totals = None
    for batch in data_mod.batches(spec, data, None, "val", batch_size=32, seq_len=64, seed=0):
        totals = evaluate_metrics(spec, forward(spec, weights, **data_mod.model_inputs(batch)), batch, totals)
        batches -= 1
        if not batches:
            break
    return totals


def run(text: bool = False, pretrain_steps: int = 300, fit_steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
        out: Path | None = None, echo=print) -> dict:
    """Run the demo; returns the metrics table as {row name: metrics}."""
    family = "hf-gpt2" if text else "hf-vit"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp)
        spec = micro_spec(family, layers=2, width=64, heads=4, mlp=128)
        echo(f"1. pretraining a {spec.layers}-layer, width-{spec.width} {family} model on "
             f"{data_mod.describe(spec)} for {pretrain_steps} steps ...")
        weights, losses = pretrain(spec, steps=pretrain_steps, batch_size=32, seq_len=64, seed=0)
        small = save(from_tensors(spec, weights, family=family), folder / "small", overwrite=True)
        echo(f"   training loss {losses[0]:.3f} -> {losses[-1]:.3f}; wrote {small}")

        echo(f"2. growing it with LiGO to 4 layers x width 128 ({fit_steps} fitting steps, lr {lr:g}) ...")
        grown = grow(small, layers=4, width=128, steps=fit_steps, lr=lr, out=folder / "grown", overwrite=True)
        at_init = grow(small, layers=4, width=128, steps=0, write=False)
        report = grown.report
        echo(f"   operator: {report['variant']} width, {report['operator_parameters']:,} parameters; "
             f"wrote {grown.out}")

        big = grown.spec
        rows = {
            f"small model ({spec.layers}x{spec.width})": metrics(spec, weights),
            f"grown, at init ({big.layers}x{big.width})": metrics(big, at_init.weights),
            f"grown, after {fit_steps} fitting steps": metrics(big, grown.weights),
            f"random init ({big.layers}x{big.width})": metrics(big, init_weights(big, seed=0)),
        }
    what = "next-byte accuracy" if text else "accuracy"
    echo(f"3. validation ({'held-out stdlib lines' if text else 'held-out digits'}):")
    echo(f"   {'model':<36} {'loss':>8} {what:>20}")
    for name, m in rows.items():
        echo(f"   {name:<36} {m['loss']:8.4f} {m['accuracy']:20.3f}")
    echo(f"done in {time.perf_counter() - started:.0f} s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ligo_convert.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", action="store_true", help="a micro GPT-2 on standard-library source instead of digits")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="LiGO fitting steps")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--out", type=Path, help="keep the small and grown checkpoints here (default: a temp folder)")
    args = p.parse_args(argv)
    from .threads import configure

    configure()  # a command, like the CLI's: the cores other processes leave free, unless OMP_NUM_THREADS says
    run(args.text, args.pretrain_steps, args.steps, args.lr, args.out)


if __name__ == "__main__":
    sys.exit(main())
