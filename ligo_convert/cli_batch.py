"""`ligo-convert batch`: a thin wrapper over :mod:`ligo_convert.batch`."""

from __future__ import annotations

import json
import math
import os
import signal
import sys

import click


@click.command("batch", epilog="""\b
Examples:
  ligo-convert batch ladder-offline --dry-run
  ligo-convert batch ladder-offline --root runs
  ligo-convert batch ladder-offline --root runs --only mini --json
  ligo-convert batch ladder-offline --root runs --set steps=5 --set onnx=false
  ligo-convert batch ladder-offline --root runs-hub --set steps=5 --set layout=hub
  ligo-convert batch my-zoo.toml --shard $((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT
""")
@click.argument("manifest")
@click.option("--dry-run", is_flag=True, help="Check the manifest and print what would run; write nothing.")
@click.option("--only", multiple=True, metavar="NAME",
              help="Run only these jobs (repeat or comma-separate), with the jobs they depend on (skipped when up "
                   "to date).")
@click.option("--shard", metavar="I/N", help="Run the I-th of N disjoint slices; a job and the jobs it depends on "
                                              "are always in the same slice.")
@click.option("--root", type=click.Path(file_okay=False), help="Output root [default: the manifest's root key, "
                                                               "else the current directory].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Set an option on every job, over the manifest (e.g. --set steps=10 --set device=cpu).")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Where to write the JSON report [default: ROOT/batch-report[-shard-I-of-N].json].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def batch_command(manifest, dry_run, only, shard, root, overrides, report, as_json):
    """Grow every model of MANIFEST (a TOML file, or a bundled one: ladder-offline, ladder-vit, ladder-bert).

    Jobs run one at a time in dependency order (`source = "@job"` takes another job's output).  A job whose
    output already records the same job (its options, its source's content hash, the tool version) is skipped;
    outputs appear only when complete, so an interrupted run resumes where it stopped.  A failed job does not stop
    the jobs that do not depend on it.  The end prints a table and writes it as JSON; the exit status is 1 when
    a job failed, 2 when the manifest is wrong (then nothing runs).
    """
    from .batch import default_report_path, load_manifest, parse_shard, run_batch, select

    part = parse_shard(shard) if shard else None
    plan = load_manifest(manifest, root=root, overrides=overrides)
    jobs = select(plan, only=only, shard=part)
    say = lambda line: click.echo(line, err=True)  # noqa: E731  (stdout stays for the table or the JSON)
    where = f" (shard {part[0]}/{part[1]})" if part else ""
    say(f"{plan.path}: {len(jobs)} of {len(plan.jobs)} jobs{where}, output root {plan.root}")
    if not jobs:
        say("nothing to do: no job falls in this selection")
    # schedulers stop jobs with SIGTERM: end like Ctrl-C, removing the unfinished output and writing the report
    if not dry_run and hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _interrupt)
    result = run_batch(plan, jobs, dry_run=dry_run, report_path=report, shard=part, only=only, log=say,
                       progress=sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    elif jobs:
        _table(result)
    if not dry_run and jobs:
        path = report or default_report_path(plan, part)
        say(f"report: {_short(str(path))}")
    if result.failed:
        say(f"{len(result.failed)} of {len(result.jobs)} jobs did not finish: "
            + ", ".join(f"{r.name} ({r.status})" for r in result.failed))
        raise click.exceptions.Exit(1)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _num(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _table(result) -> None:
    rows = [("job", "status", "loss before", "loss after", "onnx max diff", "wall s", "output")]
    for r in result.jobs:
        status = r.status + (f" ({r.note})" if r.note and r.status == "run" else "")
        rows.append((r.name, status, _num(r.loss_before, ".4f"), _num(r.loss_after, ".4f"),
                     _num(r.onnx_max_diff, ".2e"), _num(r.wall_s, ".1f"), _short(r.out)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in result.jobs:
        if r.error:
            click.echo(f"{r.name}: {r.error}")


def _short(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path
