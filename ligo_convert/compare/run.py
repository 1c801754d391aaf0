"""``compare(SRC, DST, data=...)``: does growth pay for this source, target and data?

Every method starts the target its own way (``methods.make_start``) and trains it with the same recipe and batches;
each finished (method, seed) run is saved as ``OUT/runs/METHOD-seedN.json`` and reused when the same compare runs
again, so an interrupted compare resumes where it stopped.  Then ``OUT/compare.md`` (the table), ``compare.json``
(every run, its curve and accounting) and ``compare.png`` (validation loss against FLOPs).  All refusals happen in
``plan_compare``, before anything is trained or written.

Under ``torchrun`` every process plans the same compare and trains every run together (``train``: each on its share
of the batches, gradients summed); only the first process writes and prints.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .. import __version__, options
from .. import data as data_mod
from ..canonical import CanonicalModel
from ..errors import LigoError
from ..grow import GrowOptions, _name_of, plan_growth
from ..growth import baselines
from ..growth.fit import DEFAULT_LR, Teacher, distributed, resolve_device, world
from ..objectives import choose_objective
from ..spec import Spec
from .accounting import aggregate, mean_sd, paired, savings, steps_to_goal, with_stronger_scratch
from .methods import KNOBS, METHODS, TRAIN, DataBatches, init_digest, run_method
from .report import (PAIRED_NOTE, matched_rows, mean_curve, paired_cell, plot_panel, save_figure, savings_rows)
from .train import Recipe, loss_of
from .tuning import LR_FACTORS, TUNE_SEED, WARMUPS, choose_schedules, parse_lr_factors, schedule_grid

DEFAULT_METHODS = ("ligo", "stack", "net2net", "lemon", "scratch")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_STEPS = 300
DEFAULT_TRAIN_LR = 1e-3
# --quick: a smoke test of the whole pipeline in seconds (each unset option takes these)
QUICK = dict(steps=8, seeds=(0,), batch_size=8, val_batches=1, eval_every=4, fit_steps=2)
RUNS = "runs"
SETTINGS = "settings.json"
OUTPUTS = ("compare.md", "compare.json", "compare.png")


@dataclass
class CompareOptions:
    """Every knob of ``compare`` but the source and target; None: the default (``--quick``: QUICK's)."""

    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    mlp: int | None = None
    data: object = None
    text_column: str | None = None
    workers: int | None = None
    methods: object = DEFAULT_METHODS  # names, or a comma-separated string
    seeds: object = None  # ints, or a comma-separated string [0,1,2]
    steps: int | None = None  # training steps of the target [300]
    lr: float = DEFAULT_TRAIN_LR  # the target's peak training rate, the same for every method
    warmup: float = 0.05  # fraction of the steps
    eval_every: int | None = None  # [steps / 20]
    batch_size: int | None = None  # [16]
    seq_len: int = 64
    val_batches: int | None = None  # [8]
    accumulate: int = 1
    fit_steps: int | None = None  # LiGO's fitting steps, counted [steps / 20]
    fit_lr: float = DEFAULT_LR  # LiGO's relative fitting rate (growth.fit)
    # tune each method's post-growth schedule (warmup x peak lr) on tune_seed, the same grid for every method
    tune_schedule: bool = False
    tune_seed: int = TUNE_SEED
    tune_lr_factors: object = LR_FACTORS  # factors of lr, or a comma-separated string
    objective: str = "auto"
    device: str = "auto"
    out: object = None
    overwrite: bool = False
    quick: bool = False
    log: Callable[[str], None] | None = None
    progress: bool = False
    on_run: Callable[[dict], None] | None = None  # called with each run record as soon as it is saved

    def say(self, msg: str) -> None:
        if self.log is not None and world()[0] == 0:
            self.log(msg)


@dataclass
class ComparePlan:
    src: CanonicalModel
    source_name: str
    target: Spec
    target_name: str | None
    family: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    recipe: Recipe
    fit_steps: int
    objective: str
    objective_reason: str
    data: DataBatches
    data_name: str
    device: torch.device
    out: Path
    resume: bool
    refused: dict[str, str]
    settings: dict
    options: CompareOptions
    grid: list = field(default_factory=list)  # the schedules tuned on tune_seed (empty: no tuning)
    tune_seed: int = TUNE_SEED


@dataclass
class CompareResult:
    out: Path
    results: dict  # what compare.json holds
    markdown: str
    trained: list[tuple[str, int]] = field(default_factory=list)  # (method, seed) runs trained by this call
    resumed: list[tuple[str, int]] = field(default_factory=list)  # reused from OUT/runs/
    rank: int = 0  # under torchrun: this process's rank (only rank 0 wrote and prints)


def compare(source, target: str | None = None, **kwargs) -> CompareResult:
    """Train ``target`` (a zoo name, folder or hub id, or ``layers=``/``width=``... as for ``grow``) from each
    method's start on ``data`` and write the comparison to ``out``; see :class:`CompareOptions` for the options.
    Raises :class:`LigoError` before any work on bad input."""
    o = CompareOptions(**kwargs)
    with distributed(resolve_device(o.device)):
        plan = plan_compare(source, target, o)
        _barrier()  # every process has checked ``out`` before the first one writes in it
        return run_compare(plan)


def _barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _writes() -> bool:
    """Whether this process writes (the only one, or the first under torchrun)."""
    return world()[0] == 0


def parse_methods(value) -> tuple[str, ...]:
    names = [m.strip() for m in value.split(",")] if isinstance(value, str) else list(value)
    if not names or any(not m for m in names):
        raise LigoError(f"--methods must be comma-separated method names like ligo,stack,scratch, not {value!r}")
    for m in names:
        if m not in METHODS:
            raise LigoError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if len(set(names)) < len(names):
        raise LigoError(f"--methods names a method twice: {value!r}")
    # scratch is the reference every saving is measured against
    return tuple(["scratch"] + [m for m in names if m != "scratch"])


def parse_seeds(value) -> tuple[int, ...]:
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        seeds = [int(p) if isinstance(p, str) and p.strip().isdigit() else p for p in parts]
        if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise ValueError
    except ValueError:
        seeds = None
    if not seeds:
        raise LigoError(f"--seeds must be comma-separated whole numbers, 0 or more, like 0,1,2; not {value!r}")
    if len(set(seeds)) < len(seeds):
        raise LigoError(f"--seeds repeats a seed: {value!r}; each seed runs once")
    return tuple(seeds)


def _files_fingerprint(folder: Path | None) -> list:
    """Names, sizes and modification times of a source's weight files: a rewritten source is a new compare."""
    if folder is None or not Path(folder).is_dir():
        return []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(Path(folder).iterdir())
            if f.suffix in (".safetensors", ".bin", ".json")]


def plan_compare(source, target: str | None, o: CompareOptions) -> ComparePlan:
    """Check everything and decide what runs; nothing is trained or written.  Refused with LigoError: an unknown
    method, malformed seeds, a bad number, a target smaller than the source (or otherwise not growable), data that
    does not fit the model, an existing ``out`` that is not this compare (without ``overwrite``)."""
    quick = QUICK if o.quick else {}
    methods = parse_methods(o.methods)
    seeds = parse_seeds(o.seeds if o.seeds is not None else quick.get("seeds", DEFAULT_SEEDS))
    steps = o.steps if o.steps is not None else quick.get("steps", DEFAULT_STEPS)
    options.check(steps=(steps, "size"), lr=(o.lr, "positive"), warmup=(o.warmup, "nonnegative"),
                  eval_every=(o.eval_every, "size"), batch_size=(o.batch_size, "size"), seq_len=(o.seq_len, "size"),
                  val_batches=(o.val_batches, "size"), accumulate=(o.accumulate, "size"),
                  fit_steps=(o.fit_steps, "count"), fit_lr=(o.fit_lr, "positive"), workers=(o.workers, "count"))
    if o.warmup >= 1:
        raise LigoError(f"--warmup is a fraction of the steps, below 1, not {o.warmup}")
    factors = parse_lr_factors(o.tune_lr_factors) if o.tune_schedule else ()
    if o.tune_schedule and (not isinstance(o.tune_seed, int) or o.tune_seed < 0 or o.tune_seed in seeds):
        raise LigoError(f"--tune-seed {o.tune_seed} must be a whole number, 0 or more, that is not one of the "
                        f"measured --seeds {','.join(map(str, seeds))} (its runs choose the schedules)")
    batch_size = o.batch_size or quick.get("batch_size", 16)
    if batch_size % world()[1]:
        raise LigoError(f"--batch-size {batch_size} does not split evenly over {world()[1]} torchrun processes; "
                        f"choose a multiple of {world()[1]}")
    val_batches = o.val_batches or quick.get("val_batches", 8)
    eval_every = o.eval_every or quick.get("eval_every", max(1, steps // 20))
    fit_steps = o.fit_steps if o.fit_steps is not None else quick.get("fit_steps", max(1, steps // 20))
    grow_plan = plan_growth(source, target, GrowOptions(
        layers=o.layers, width=o.width, heads=o.heads, kv_heads=o.kv_heads, mlp=o.mlp, data=o.data, write=False,
        batch_size=batch_size, seq_len=o.seq_len, workers=o.workers, text_column=o.text_column, device=o.device))
    src, spec_t = grow_plan.src, grow_plan.spec
    objective, why = choose_objective(src.spec, o.objective)
    refused = {}
    for m in methods:  # a method that refuses this growth (LEMON on post-LN depth growth) gets a row saying why
        base = {"mslt": "stack"}.get(m, m)
        if base in baselines.METHODS and base != "scratch":
            try:
                baselines.describe(base, src.spec, spec_t)
            except LigoError as e:
                refused[m] = str(e)
    device = resolve_device(o.device)
    data = DataBatches(o.data, src.source, batch_size, o.seq_len, val_batches, o.workers, o.text_column,
                       pin_memory=device.type == "cuda")
    data_name = data_mod.describe(spec_t, o.data, o.text_column)
    _check_data(src, spec_t, data, objective, seeds[0], data_name)
    recipe = Recipe(lr=o.lr, steps=steps, warmup=o.warmup, eval_every=eval_every, accumulate=o.accumulate)
    target_name = Path(str(target)).name if target is not None else None
    out = Path(o.out) if o.out is not None else Path(
        f"compare-{target_name or f'L{spec_t.layers}-D{spec_t.width}'}-from-{_name_of(source)}")
    settings = {"source": str(src.source) if src.source is not None else grow_plan.source_name,
                "source_files": _files_fingerprint(src.source), "target": spec_t.to_dict(),
                "family": grow_plan.family, "data": data_name, "text_column": o.text_column,
                "objective": objective, "recipe": recipe.to_dict(), "batch_size": batch_size,
                "seq_len": data_mod.usable_seq_len(spec_t, o.seq_len) if spec_t.input == "tokens" else None,
                "val_batches": val_batches, "fit_steps": fit_steps, "fit_lr": o.fit_lr,
                "knobs": {m: v[1] for m, v in KNOBS.items() if m != "ligo"}, "device": device.type,
                "ligo_convert": __version__}
    # the tuning grid stays out of the settings: each run's file names its schedule, so turning --tune-schedule on
    # for a finished compare trains only the tuning runs and the tuned ones
    resume = _check_out(out, settings, o.overwrite)
    return ComparePlan(src, grow_plan.source_name, spec_t, target_name, grow_plan.family, methods, seeds, recipe,
                       fit_steps, objective, why, data, data_name, device, out, resume, refused, settings, o,
                       schedule_grid(recipe, factors) if factors else [], o.tune_seed)


def _check_data(src: CanonicalModel, spec_t: Spec, data: DataBatches, objective: str, seed: int, name: str) -> None:
    """The data must give batches the model takes: run the source on a training and a validation batch."""
    val = data.val(spec_t)
    if not val:
        raise LigoError(f"{name}: no validation batches; pass --data with more examples")
    stream = data.train(spec_t, seed, TRAIN)
    first = next(stream)
    close = getattr(stream, "close", None)
    if close:
        close()
    weights = src.materialize(torch.float32)
    teacher = Teacher(src.spec, weights, torch.device("cpu")) if objective == "distill" else None
    with torch.no_grad():
        for batch in (first, val[0]):
            try:
                loss = loss_of(src.spec, weights, batch, objective, teacher)
            except (IndexError, RuntimeError) as e:  # e.g. token ids past the vocabulary
                raise LigoError(f"{name}: the data does not fit the model ({str(e).splitlines()[0]}); pass --data "
                                f"the model was trained on") from None
            if not torch.isfinite(loss):
                raise LigoError(f"{name}: the source model's loss on this data is {float(loss)}; check the data")


def _check_out(out: Path, settings: dict, overwrite: bool) -> bool:
    """True to resume the compare already in ``out`` (same settings); refuses any other existing ``out``."""
    if not out.exists() or overwrite:
        return False
    saved = out / RUNS / SETTINGS
    if saved.is_file():
        try:
            same = json.loads(saved.read_text()) == json.loads(json.dumps(settings))
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return True
        raise LigoError(f"{out}: holds a compare with other settings; pass --overwrite to start it afresh or choose "
                        f"another --out")
    raise LigoError(f"{out}: already exists; pass --overwrite to replace it or choose another --out")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _dump(data) -> str:
    return json.dumps(data, indent=1, default=float) + "\n"


def run_compare(plan: ComparePlan) -> CompareResult:
    """Train every (method, seed) run not already in ``OUT/runs/`` and write the table, JSON and PNG; with a tuning
    grid, also each method's tuning runs on the tuning seed and its runs with the schedule they chose."""
    o, out = plan.options, plan.out
    runs_dir = out / RUNS
    if _writes():
        if out.exists() and not plan.resume:  # --overwrite: the old runs and outputs go, anything else stays
            shutil.rmtree(runs_dir, ignore_errors=True)
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)
        runs_dir.mkdir(parents=True, exist_ok=True)
        if not plan.resume:
            _write(runs_dir / SETTINGS, _dump(plan.settings))
    s, t = plan.src.spec, plan.target
    o.say(f"compare {plan.source_name} {s.layers}x{s.width} -> {t.layers}x{t.width} ({plan.family}) on "
          f"{plan.data_name}: {', '.join(plan.methods)}; seeds {', '.join(map(str, plan.seeds))}; "
          f"{plan.recipe.steps} steps at lr {plan.recipe.lr:g}; {plan.objective_reason}"
          + (f"; tuning each method's schedule over {len(plan.grid)} runs on seed {plan.tune_seed}" if plan.grid
             else "")
          + ("; resuming the runs already in " + str(out) if plan.resume else ""))
    for m, why in plan.refused.items():
        o.say(f"{m}: refused ({why})")
    started = time.perf_counter()
    runner = _Runner(plan, plan.src.materialize(torch.float32), runs_dir)
    tuned_count = len(plan.methods) * len(plan.seeds) if plan.grid else 0
    runner.bar = _bar(o.progress and _writes(), len(plan.methods) * (len(plan.seeds) + len(plan.grid)) + tuned_count, "runs", True)
    try:
        base = [runner.run(m, seed, plan.recipe) for seed in plan.seeds for m in plan.methods]
        tuning = _tune(plan, runner) if plan.grid else None
        tuned = [runner.run(m, seed, _chosen_recipe(plan, tuning, m)) for seed in plan.seeds
                 for m in plan.methods] if tuning else None
    finally:
        runner.bar.close()
    results = _results(plan, base, time.perf_counter() - started)
    if tuning:
        results["tuning"] = tuning
        results["tuned"] = _summarise(plan.methods, [dict(r) for r in tuned])
        results["stronger"] = _summarise(plan.methods, with_stronger_scratch(base, tuned))
    md = markdown(results)
    if _writes():
        _write(out / "compare.json", _dump(results))
        _write(out / "compare.md", md)
        plot(results, out / "compare.png")
    o.say(f"wrote {out / 'compare.md'}, compare.json, compare.png")
    return CompareResult(out, results, md, runner.trained, runner.resumed, world()[0])


class _Runner:
    """Runs (method, seed, recipe) once each: from ``OUT/runs/`` when saved there, as a bit-identical twin's run, or
    trained and saved.  A run with the compare's own recipe is ``METHOD-seedN.json``; any other schedule adds its
    peak rate and warmup to the name."""

    def __init__(self, plan: ComparePlan, small_w: dict, runs_dir: Path):
        self.plan, self.small_w, self.runs_dir = plan, small_w, runs_dir
        self.records: dict[tuple, dict] = {}
        self.digests: dict[tuple, str] = {}
        self.trained: list[tuple[str, int]] = []
        self.resumed: list[tuple[str, int]] = []
        self.bar = None

    def path(self, method: str, seed: int, recipe: Recipe) -> Path:
        base = self.plan.recipe
        own = (recipe.lr, recipe.warmup) == (base.lr, base.warmup)
        tail = "" if own else f"-lr{recipe.lr:g}-warmup{recipe.warmup:g}"
        return self.runs_dir / f"{method}-seed{seed}{tail}.json"

    def run(self, method: str, seed: int, recipe: Recipe) -> dict:
        plan, o = self.plan, self.plan.options
        key = (method, seed, recipe.lr, recipe.warmup)
        if key in self.records:  # e.g. a tuned schedule that is the compare's own
            self.bar.update(1)
            return self.records[key]
        path = self.path(method, seed, recipe)
        self.bar.set_description(f"{method} seed {seed}")
        twin = None
        if method not in plan.refused:
            digest = init_digest(method, plan.src.spec, self.small_w, plan.target, seed)
            twin = self.digests.get((seed, recipe.lr, recipe.warmup, digest)) if digest else None
            if digest and twin is None:
                self.digests[seed, recipe.lr, recipe.warmup, digest] = method
        if path.is_file():  # every process sees the same files: each run ends at a barrier (below)
            record = json.loads(path.read_text())
            self.resumed.append((method, seed))
        else:
            if twin is not None and (twin, seed, recipe.lr, recipe.warmup) in self.records:
                # a bit-identical start: training would repeat that run step for step
                record = {**self.records[twin, seed, recipe.lr, recipe.warmup], "method": method,
                          "same_init_as": twin}
            else:
                record = _train_one(plan, method, seed, self.small_w, recipe)
                self.trained.append((method, seed))
            if _writes():
                _write(path, _dump(record))
            _barrier()
            if o.on_run is not None:
                o.on_run(record)
        record.setdefault("lr", recipe.lr)  # runs saved before records named their schedule
        record.setdefault("warmup", recipe.warmup)
        self.records[key] = record
        self.bar.update(1)
        return record


def _tune(plan: ComparePlan, runner: _Runner) -> dict:
    """Every method's runs over the grid on the tuning seed, and the schedule each chose (tuning.choose_schedules)."""
    runs = {m: [runner.run(m, plan.tune_seed, point.recipe(plan.recipe)) for point in plan.grid]
            for m in plan.methods}
    chosen = choose_schedules(runs)
    for m, c in chosen.items():
        if "refused" not in c:
            point = next(p for p in plan.grid if (p.lr, p.warmup) == (c["lr"], c["warmup"]))
            c["name"] = point.name
            plan.options.say(f"{m}: tuned schedule {point.name} (lr {c['lr']:g}, warmup {c['warmup']:g})")
    return {"seed": plan.tune_seed, "lr_factors": sorted({p.lr_factor for p in plan.grid}),
            "warmups": {name: w for name, w in WARMUPS}, "grid": [p.to_dict() for p in plan.grid],
            "knobs": {m: _knobs_of(m, plan) for m in plan.methods}, "chosen": chosen,
            "runs": [r for m in plan.methods for r in runs[m]]}


def _knobs_of(method: str, plan: ComparePlan) -> dict:
    """What the tuning budget varied for ``method`` and what it kept fixed."""
    fixed = {}
    if method == "ligo":
        fixed = {"fit_lr": plan.options.fit_lr, "fit_steps": plan.fit_steps}
    elif method in KNOBS:
        fixed = {KNOBS[method][0]: KNOBS[method][1]}
    return {"tuned": ["warmup", "lr"], "fixed": fixed}


def _chosen_recipe(plan: ComparePlan, tuning: dict, method: str) -> Recipe:
    c = tuning["chosen"][method]
    return plan.recipe if "refused" in c else replace(plan.recipe, lr=c["lr"], warmup=c["warmup"])


def _bar(enabled: bool, total: int, desc: str, leave: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run" if leave else "step", leave=leave, file=sys.stderr,
                disable=None if enabled else True)


def _train_one(plan: ComparePlan, method: str, seed: int, small_w: dict, recipe: Recipe) -> dict:
    o = plan.options
    bar = _bar(o.progress and _writes(), recipe.steps, f"{method} seed {seed}", leave=False)

    def on_step(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        knob = o.fit_lr if method == "ligo" else None
        return run_method(method, plan.src.spec, small_w, plan.target, seed, data=plan.data, recipe=recipe,
                          knob=knob, fit_steps=plan.fit_steps, ligo_recipe={"objective": plan.objective},
                          objective=plan.objective, device=plan.device, on_step=on_step)
    finally:
        bar.close()


def _summarise(methods, runs: list[dict]) -> dict:
    """Savings of ``runs`` against scratch's run on the same seed (set on each run), per method and LiGO against
    each method seed by seed."""
    for r in runs:
        scratch = next(x for x in runs if x["seed"] == r["seed"] and x["method"] == "scratch")
        r["savings"] = savings(r, scratch)
    summary, against = {}, {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        if any("refused" in r for r in mine):
            summary[m] = {"refused": mine[0]["refused"]}
            continue
        sv = [r["savings"] for r in mine]
        summary[m] = {"flops_saved": aggregate(sv, "flops_saved"), "wall_saved": aggregate(sv, "wall_saved"),
                      "steps_to_goal": steps_to_goal(sv), "reached": sum(x["reached"] for x in sv),
                      "seeds": len(sv), "final_loss": mean_sd([x["final_loss"] for x in sv], 4)}
    ligo = [r for r in runs if r["method"] == "ligo"]
    if ligo and "refused" not in ligo[0]:
        for m in methods:
            theirs = [r for r in runs if r["method"] == m]
            if m != "ligo" and not any("refused" in r for r in theirs):
                against[m] = paired([r["savings"] for r in ligo], [r["savings"] for r in theirs])
    return {"summary": summary, "ligo_against": against, "runs": runs}


def _results(plan: ComparePlan, runs: list[dict], wall: float) -> dict:
    base = _summarise(plan.methods, runs)
    s, t = plan.src.spec, plan.target
    return {"source": plan.settings["source"], "source_spec": _sizes(s), "target": plan.target_name,
            "target_spec": _sizes(t), "family": plan.family, "data": plan.data_name,
            "objective": plan.objective, "methods": list(plan.methods), "seeds": list(plan.seeds),
            "settings": plan.settings, "summary": base["summary"], "ligo_against": base["ligo_against"],
            "runs": runs, "wall_s": wall, "processes": world()[1], "versions": {"ligo_convert": __version__, "torch": torch.__version__,
                                                       "python": platform.python_version(),
                                                       "machine": platform.machine()}}


def _sizes(spec: Spec) -> dict:
    return {k: getattr(spec, k) for k in ("layers", "width", "heads", "kv_heads", "mlp")}


def _label(method: str, settings: dict) -> str:
    if method == "ligo":
        return f"ligo (fit_lr {settings['fit_lr']:g}, {settings['fit_steps']} fitting steps)"
    if method in KNOBS:
        return f"{method} ({KNOBS[method][0]} {settings['knobs'][method]:g})"
    return method


def markdown(results: dict) -> str:
    """compare.md: the savings table, LiGO against each method seed by seed, losses at matched FLOPs."""
    st = results["settings"]
    r, s, t = st["recipe"], results["source_spec"], results["target_spec"]
    out = [f"# Does growth pay? {results['source']} {s['layers']}x{s['width']} -> {t['layers']}x{t['width']}", "",
           f"Family {results['family']}; data: {results['data']}; objective {results['objective']}; seeds "
           f"{results['seeds']}; device {st['device']}. Every method trains the target {r['steps']} steps with the "
           f"same AdamW (lr {r['lr']:g}, weight decay {r['weight_decay']:g}), warmup ({r['warmup']:.0%}) + cosine "
           f"schedule, clipping {r['clip']:g}, batches of {st['batch_size']}"
           + (f" x {r['accumulate']} accumulated" if r["accumulate"] > 1 else "")
           + f", evaluated every {r['eval_every']} steps on {st['val_batches']} held-out batches"
           + ("; then again with each method's own peak lr and warmup, tuned over the same grid (below)."
              if "tuned" in results else "."), "",
           "Saved against `scratch` on the same seed: FLOPs (forward + backward matrix products, LiGO's fitting "
           "steps and any teacher's forwards counted) and training wall time until the validation loss first "
           "reaches scratch's final validation loss (interpolated between evaluations). A seed that never reaches "
           "it counts at the saving of its whole run, an upper bound, and the mean is marked ≤ (its steps to goal "
           "≥). The small model's own training is not counted.", ""]
    return "\n".join(out + tables(results))


def tables(results: dict) -> list[str]:
    """The tables of compare.md (what the command prints): savings, LiGO against each method, matched FLOPs; with
    tuning, once with scratch's schedule and once with each method's tuned schedule, then the tuning itself."""
    st, methods = results["settings"], results["methods"]
    base = _tables(methods, results["runs"], lambda m: _label(m, st))
    if "tuned" not in results:
        return base + [""]
    tuning, r = results["tuning"], st["recipe"]
    chosen = tuning["chosen"]
    lr_factors = ", ".join(f"{f:g}" for f in tuning["lr_factors"])
    warmups = " / ".join(f"{name} ({w * r['warmup']:.2%})" for name, w in tuning["warmups"].items())
    return (["## Scratch's schedule", "",
             f"Every method trains with scratch's schedule: peak lr {r['lr']:g}, warmup {r['warmup']:.0%}.", ""]
            + base
            + ["", "## Each method's tuned schedule", "",
               f"Each method trains with the schedule it chose on tuning seed {tuning['seed']} (never measured) out of "
               f"the same {len(tuning['grid'])} runs: peak lr x {{{lr_factors}}} of {r['lr']:g}, times warmup "
               f"{warmups} of the steps. Scratch keeps the schedule with the lowest final validation loss — its "
               "final loss on each seed is the goal below; every other method the one that reaches scratch's "
               "tuned final loss with the fewest FLOPs (none does: the lowest final loss).", ""]
            + _tables(methods, results["tuned"]["runs"], lambda m: _tuned_label(m, chosen))
            + ["", "## Tuned schedules against the stronger scratch", "",
               "The tuned runs again, each measured against whichever of scratch's two runs on its seed ends lower "
               "(scratch's schedule or its tuned one): a schedule chosen on one tuning seed can be the worse one on "
               "the others, and this goal is never easier than either table's.", ""]
            + _tables(methods, results["stronger"]["runs"],
                      lambda m: "scratch (the stronger of its two schedules on each seed)" if m == "scratch"
                      else _tuned_label(m, chosen))
            + [""] + tuning_table(results) + [""])


def _tables(methods, runs: list[dict], label) -> list[str]:
    groups = [(m, label(m), [x for x in runs if x["method"] == m]) for m in methods]
    out = savings_rows(groups)
    ligo = [x for x in runs if x["method"] == "ligo"]
    if "ligo" in methods and not any("refused" in x for x in ligo) and len(methods) > 1:
        out += ["", "LiGO against each method, seed by seed (FLOPs saved): " + PAIRED_NOTE + ":", "",
                "| LiGO against | seeds ahead–behind, sign test, mean difference |", "|---|---|"]
        for m in methods:
            if m != "ligo":
                out.append(f"| {m} | {paired_cell(ligo, [x for x in runs if x['method'] == m])} |")
    out += ["", "Validation loss when a fraction of scratch's FLOPs is spent (mean over seeds):", ""]
    out += matched_rows([(m, [x for x in runs if x["method"] == m]) for m in methods])
    for m in methods:
        refused = next((x["refused"] for x in runs if x["method"] == m and "refused" in x), None)
        if refused:
            out.append(f"\n{m} refused this growth: {refused}")
    for m, like in sorted({(x["method"], x["same_init_as"]) for x in runs if "same_init_as" in x}):
        out.append(f"\n{m} starts from tensors bit-identical to {like}'s, so its rows are {like}'s runs (training is "
                   "deterministic; not run twice).")
    return out


def _tuned_label(method: str, chosen: dict) -> str:
    c = chosen[method]
    return method if "refused" in c else f"{method} ({c['name']})"


def tuning_table(results: dict) -> list[str]:
    """The tuning runs: per method, the knobs it got and kept, and each grid point's FLOPs saved against scratch's
    tuned run / final loss (the chosen one in bold)."""
    tuning = results["tuning"]
    grid = tuning["grid"]
    out = [f"Tuning on seed {tuning['seed']}: each method's knobs and every grid point's FLOPs saved against "
           "scratch's tuned run / final validation loss (n.r.: scratch's tuned final loss not reached; chosen in "
           "bold):", "",
           "| method | tuned | kept fixed | " + " | ".join(p["name"] for p in grid) + " |",
           "|---|---|---|" + "---|" * len(grid)]
    for m in results["methods"]:
        c, knobs = tuning["chosen"][m], tuning["knobs"][m]
        fixed = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}"
                          for k, v in knobs["fixed"].items()) or "–"
        if "refused" in c:
            out.append(f"| {m} | refused | {fixed} | " + " | ".join("–" for _ in grid) + " |")
            continue
        cells = []
        for x in c["candidates"]:
            cell = ((f"{x['flops_saved']:.1f} %" if x["flops_saved"] is not None else "n.r.")
                    + (f" / {x['final_loss']:.3f}" if x["final_loss"] is not None else ""))
            cells.append(f"**{cell}**" if (x["value"]["lr"], x["value"]["warmup"]) == (c["lr"], c["warmup"])
                         else cell)
        out.append(f"| {m} | {', '.join(knobs['tuned'])} | {fixed} | " + " | ".join(cells) + " |")
    return out


def plot(results: dict, path: Path) -> None:
    """compare.png: mean validation loss against FLOPs per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = tuple(results["methods"])
    panels = [("", results["runs"])]
    if "tuned" in results:
        panels = [(", scratch's schedule", results["runs"]), (", each method's tuned schedule",
                                                              results["tuned"]["runs"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5.5), squeeze=False)
    s, t = results["source_spec"], results["target_spec"]
    for ax, (what, runs) in zip(axes[0], panels):
        lines, goal = [], None
        for m in methods:
            mine = [r for r in runs if r["method"] == m and "curve" in r]
            if mine:
                lines.append((m, *mean_curve(mine)))
                if m == "scratch":
                    goal = statistics.mean(r["curve"][-1][3] for r in mine)
        twins = {r["method"]: f"{r['method']} (= {r['same_init_as']})" for r in runs if "same_init_as" in r}
        plot_panel(ax, lines, METHODS, goal, f"{results['source']}: {s['layers']}x{s['width']} -> "
                   f"{t['layers']}x{t['width']}, mean of {len(results['seeds'])} seed(s){what}", labels=twins)
    save_figure(fig, path, dpi=100)
