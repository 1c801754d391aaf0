"""`ligo-convert grow` and `ligo-convert pretrain`: parse, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_options import target_sizes
from .growth.fit import DEFAULT_LR, DEFAULT_STEPS, PARALLEL, STREAM_ABOVE_BYTES, STREAM_CHOICES
from .growth.init import DEFAULT_NOISE, DEPTH_INITS, WIDTH_INITS
from .growth.baselines import LIGO_INIT_NOTES, METHOD_NOTES, METHODS
from .growth.operator import LEARN
from .objectives import OBJECTIVES

_DTYPES = ("float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")


_GROW_EXAMPLES = """\b
Examples (offline; the last needs vit-small in the Hugging Face cache):
  ligo-convert pretrain micro-vit && ligo-convert grow micro-vit --layers 4 --width 128 --out grown-vit
  ligo-convert grow micro-vit --layers 4 --width 128 --steps 200 --save-operator op.safetensors --out grown-a
  ligo-convert grow micro-vit --layers 4 --width 128 --operator op.safetensors --out grown-b --onnx
  ligo-convert grow micro-vit --layers 4 --width 128 --steps 0 --out grown-hub --onnx --layout hub
  ligo-convert grow micro-vit --layers 4 --width 128 --method lemon --out lemon-vit
  torchrun --nproc_per_node 2 -m ligo_convert grow micro-vit --layers 4 --width 128 --batch-size 32 --out grown-ddp
  torchrun --nproc_per_node 2 -m ligo_convert grow micro-vit --layers 4 --width 128 --parallel fsdp --out grown-fsdp
  ligo-convert grow micro-vit --layers 8 --width 128 --materialize layers --out grown-deep
  ligo-convert grow vit-small vit-base --data images/ --out vit-base-ligo
"""
# Methods: what each does and how it grows the axis it does not define (also written to growth.json).
_METHODS_HELP = "\n\n".join(f"{name}: {note}" for name, note in METHOD_NOTES.items())
LIGO_INITS = tuple(LIGO_INIT_NOTES)


@click.command("grow", epilog=_GROW_EXAMPLES + "\n\nMethods (--method):\n\n" + _METHODS_HELP)
@click.argument("src")
@click.argument("dst", required=False)
@target_sizes
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [default: <target>-from-<src>-ligo].")
@click.option("--to", "to", metavar="FAMILY", help="Write in this family's layout [default: DST's, else SRC's].")
@click.option("--allow-eps-change", is_flag=True, help="Let a --to family that fixes the norm epsilon (timm-vit: "
              "1e-6) write the grown model with its own; the output difference is measured into conversion.json.")
@click.option("--data", type=click.Path(), help="Image folder (class subfolders), text file or folder of .txt "
              "[default: embedded digits / standard-library source]; a composite (CLIP) takes it per tower: "
              "vision=images/,text=corpus.txt.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="auto", show_default=True,
              help="task: the model's own loss; distill: match the source's outputs.")
@click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True, help="Fitting steps (0: no fitting).")
@click.option("--lr", type=float, default=DEFAULT_LR, show_default=True,
              help="Relative operator learning rate (AdamW): width matrices step by lr/D1, depth by lr/L1.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Global batch size.")
@click.option("--seq-len", type=int, default=64, show_default=True, help="Tokens per text sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files (on CPU).")
@click.option("--device", type=click.Choice(_DEVICES), default="auto", show_default=True)
@click.option("--depth-init", type=click.Choice(DEPTH_INITS), default="stack", show_default=True)
@click.option("--width-init", type=click.Choice(WIDTH_INITS), default="random", show_default=True)
@click.option("--noise", type=float, default=DEFAULT_NOISE, show_default=True, help="Init noise (0: exact copies).")
@click.option("--shared-width", is_flag=True, help="One q/k/v/mlp matrix for all layers instead of one per layer.")
@click.option("--learn", type=click.Choice(LEARN), default="both", show_default=True,
              help="Which part of the operator is fitted.")
@click.option("--operator", "operator", type=click.Path(), help="Apply this saved operator; no fitting.")
@click.option("--save-operator", type=click.Path(dir_okay=False), help="Write the fitted operator (safetensors).")
@click.option("--dtype", type=click.Choice(_DTYPES), help="Output dtype [default: the source's].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--method", type=click.Choice(("ligo",) + METHODS), default="ligo", show_default=True,
              help="ligo, or a baseline (no fitting): see the method notes below.")
@click.option("--init", "init_method", type=click.Choice(LIGO_INITS), default=None,
              help="Start the LiGO operator from this method's expansion (instead of --depth-init/--width-init).")
@click.option("--onnx", "onnx_export", is_flag=True,
              help="Also export OUT/model.onnx and validate it with onnxruntime (exit 1 if it drifts).")
@click.option("--layout", default="flat", show_default=True, type=click.Choice(["flat", "hub"]),
              help="With --onnx: flat writes OUT/model.onnx; hub writes OUT/onnx/model.onnx (+ genai_config.json "
                   "for LLaMA-style decoders), the layout transformers.js and optimum load.")
@click.option("--materialize", type=click.Choice(STREAM_CHOICES), default="auto", show_default=True,
              help="layers: make the target a layer at a time under activation checkpointing (memory flat in depth); "
                   "selective: the same, but keep each layer's matrix products for the backward (less recomputation, "
                   "more memory per layer); full: keep every layer for the backward (faster for small models); auto: "
                   "layers for targets of "
                   f"{STREAM_ABOVE_BYTES // 2**20} MB or more.  Same result either way.")
@click.option("--parallel", type=click.Choice(PARALLEL), default="ddp", show_default=True,
              help="Under torchrun: ddp replicates the operator; fsdp shards the operator and the frozen source.")
@click.option("--workers", type=int, help="Data loader worker processes for image folders [default: the cores "
              "this process may use, at most 8; 0: decode in this process].")
@click.option("--text-column", help="The text column of a .jsonl/.parquet/datasets folder [default: 'text' or the "
              "only string column].")
@click.option("--json", "as_json", is_flag=True, help="Print growth.json (with the ONNX report under 'onnx').")
def grow_command(src, dst, layers, width, heads, kv_heads, mlp, out, to, allow_eps_change, data, objective, steps,
                 lr, batch_size, seq_len, seed, device, depth_init, width_init, noise, shared_width, learn, operator, save_operator,
                 dtype, overwrite, method, init_method, materialize, parallel, workers, text_column, onnx_export,
                 layout, as_json):
    """Grow SRC into a larger model DST with LiGO and write it in DST's family layout.

    DST is a zoo name, a folder or hub id whose config gives the sizes, or left out with --layers, --width, --heads
    and --mlp.  The operator is fitted for --steps steps on --data (GPU when present), then the large model is
    materialised and written with its config, SRC's tokenizer files and growth.json.
    """
    import torch

    from .composite import composite_source
    from .errors import LigoError
    from .growth.fit import world
    from .grow import grow

    composite = composite_source(src)
    if composite is not None and onnx_export and layout == "hub":
        raise LigoError(f"--layout hub writes one model's folder; {src} is a {composite[0].title}: use --onnx with "
                        f"--layout flat (one ONNX file per tower)")
    result = grow(src, dst, layers=layers, width=width, heads=heads, kv_heads=kv_heads, mlp=mlp, out=out, family=to,
                  data=data, objective=objective, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                  seed=seed, device=device, depth_init=depth_init, width_init=width_init, noise=noise,
                  shared_width=shared_width, learn=learn, operator=operator, save_operator=save_operator,
                  dtype=getattr(torch, dtype) if dtype else None, overwrite=overwrite,
                  log=lambda msg: click.echo(msg, err=as_json) if world()[0] == 0 else None, progress=True,
                  method=method, init=init_method, materialize=materialize, parallel=parallel, workers=workers,
                  text_column=text_column, allow_eps_change=allow_eps_change)
    if result.out is None:  # ranks other than 0 write nothing
        return
    onnx_report = None
    if onnx_export:
        from .export import export_onnx

        say = lambda msg: click.echo(msg, err=as_json)  # noqa: E731
        if composite is not None:  # one file per tower, named as transformers.js names CLIP's
            from . import load

            onnx_reports = [export_onnx(load(result.out, tower=name), Path(result.out) / f"{name}_model.onnx",
                                        log=say) for name in composite[0].tower_names]
            onnx_report = next((r for r in onnx_reports if not r.ok), onnx_reports[-1])
        elif layout == "hub":
            from .layout import export_hub

            onnx_report = export_hub(result.out, result.out, log=say)
        else:
            onnx_report = export_onnx(result.out, Path(result.out) / "model.onnx", log=say)
    if as_json:
        click.echo(json.dumps({**result.report, "onnx": onnx_report.to_dict() if onnx_report else None}, indent=2))
    else:
        towers = result.report.get("towers") or {None: result.report}
        for name, r in towers.items():
            s, t = r["source_spec"], r["target_spec"]
            how = (f"{r['variant']} width, {r['operator_parameters']:,} operator parameters" if method == "ligo" else
                   f"{method}, {'function-preserving' if r['function_preserving'] else 'not function-preserving'}")
            family = result.family if name is None else f"{result.report['family']} {name} tower"
            click.echo(f"grew {s['layers']}x{s['width']} ({s['heads']} heads) -> {t['layers']}x{t['width']} "
                       f"({t['heads']} heads) as {family}: {how}")
    if onnx_report is not None and not onnx_report.ok:
        click.echo(f"error: {onnx_report.failure()}", err=True)
        sys.exit(1)


@click.command("pretrain", epilog="""\b
Examples:
  ligo-convert pretrain micro-vit
  ligo-convert pretrain micro-gpt2 --family hf-gpt2 --steps 400
  ligo-convert pretrain my-vit --data images/ --width 96 --heads 6 --mlp 192
""")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--family", default="hf-vit", show_default=True, help="Family layout to write (image or text).")
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--width", type=int, default=64, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--mlp", type=int, default=128, show_default=True)
@click.option("--data", type=click.Path(), help="Image folder or text [default: embedded digits / stdlib source].")
@click.option("--steps", type=int, default=300, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seq-len", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(_DEVICES), default="auto", show_default=True)
@click.option("--workers", type=int, help="Data loader worker processes for image folders [default: the cores "
              "this process may use, at most 8; 0: decode in this process].")
@click.option("--text-column", help="The text column of a .jsonl/.parquet/datasets folder [default: 'text' or the "
              "only string column].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def pretrain_command(out, family, layers, width, heads, mlp, data, steps, lr, batch_size, seq_len, seed, device,
                     workers, text_column, overwrite):
    """Train a small model from scratch on the embedded data and write it to OUT, so `grow` has a source offline.

    Image families get a classifier over scikit-learn's 8x8 digits; text families a language model over the Python
    standard library's source, with byte-level ids.
    """
    from tqdm import tqdm

    from . import from_tensors, options, save
    from .files import check_output
    from .growth.pretrain import micro_spec, pretrain

    options.check(layers=(layers, "size"), width=(width, "size"), heads=(heads, "size"), mlp=(mlp, "size"),
                  steps=(steps, "count"), lr=(lr, "positive"), batch_size=(batch_size, "size"),
                  seq_len=(seq_len, "size"), workers=(workers, "count"))
    check_output(out, overwrite=overwrite, flag="OUT")  # refuse before training, not after
    spec = micro_spec(family, layers=layers, width=width, heads=heads, mlp=mlp)
    with tqdm(total=steps, desc="pretraining", unit="step", file=sys.stderr, disable=None, leave=False) as bar:
        def on_step(step, loss):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

        weights, losses = pretrain(spec, data, None, steps, lr, batch_size, seq_len, seed, device, on_step,
                                   workers=workers, text_column=text_column)
    info = {"family": family, "spec": spec.to_dict(), "steps": steps, "lr": lr, "batch_size": batch_size,
            "seed": seed, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    path = save(from_tensors(spec, weights, family=family), out, overwrite=overwrite,
                extra_files={"pretrain.json": json.dumps(info, indent=2) + "\n"})
    if losses:
        click.echo(f"{spec.head} loss {losses[0]:.4f} -> {losses[-1]:.4f} after {steps} steps")
    click.echo(f"wrote {path} ({family}, {spec.layers}x{spec.width}, {spec.parameter_count():,} parameters)")
