"""Savings benchmark: the LiGO paper's Tables 1-2 in miniature, on data that is on the machine, offline.

Three proxies — a ViT on two-digit numbers written with scikit-learn's digits, a GPT-2-style causal LM and a
BERT-style (post-LN) masked LM on the Python standard library's source text — each grown from a pretrained small
model (2 layers x 64) into a target (4 x 128, heads grown at a fixed head dim); the small model pretrains as long as
the target on images and a third as long on text (see ``Proxy.pretrain_fraction``).  The plain 8x8 digits remain as
``--proxies vit-digits``: there the target from scratch saturates (~97 % accuracy) within the budget and no method
saves reliably, so the default image proxy is the harder digit pairs (see ``_digit_pairs``).  For every seed:
pretrain the small model; then train the target from each method's initialisation with the same optimiser (AdamW),
schedule (linear warmup, cosine decay) and batches as ``scratch``.  Methods: ``scratch``, ``ligo`` (the operator
fitted for a few steps, then trained), ``stack``, ``interpolate``, ``net2net``, ``aki``, ``lemon``
(ligo_convert.growth.baselines), and the training-procedure baselines ``mslt`` (stacked, then only the new top
layers trained for a while) and ``ki`` (scratch plus distillation from the small model early on).

The trainer, each method's start, the accounting, the tables and the plot are the library's
(``ligo_convert.compare``, also behind ``ligo-convert compare``); this script holds the proxies, the tuning budget and
the multi-proxy report.

Measured: FLOPs (matrix products of forward and backward, counted with torch.utils.flop_counter, LiGO's fitting
steps and KI's teacher included) and training wall time until the validation loss first reaches scratch's final
validation loss, and the final validation loss/accuracy.  Reported as in the paper (method, FLOPs saved %, wall saved
%, final quality; mean +- sd over all seeds, a seed that never reaches the goal counted at its bound), once without
and once with the small model's pretraining counted; LiGO against each method seed by seed (a sign test); and each
method's validation loss at fixed fractions of scratch's FLOPs.

Tuning budget, the same for every method with a knob: three values of its one knob (LiGO: fitting learning rate;
MSLT: fraction of steps that train only the new top layers; KI: fraction of steps with distillation), scored on a
separate tuning seed by the FLOPs saved in a full-length run (ties: final loss).  Methods without a knob get none;
the training learning rate is shared, one per proxy: the one scratch itself does best with on the tuning seed
(benchmarks/savings_lr_check.py trains scratch and the small model alone over a grid; the small model pretrains
at the rate it does best with; results/savings_lr_check.md).

    python benchmarks/savings.py                      # default: 28 min on 2 cores
    python benchmarks/savings.py --quick --out /tmp/q  # pipeline smoke test, < 1 min
    # each finished run is kept in OUT/runs/ (--cache): the same command again resumes where it stopped
    python benchmarks/savings.py --seeds 3,4,5,6,7 --out /tmp/more   # more seeds, then merged with the default's:
    python benchmarks/savings.py --render benchmarks/results/savings.json --merge /tmp/more/savings.json \
        --out benchmarks/results/savings-8seeds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's ligo_convert, not an installed copy

import torch  # noqa: E402

from ligo_convert.compare import methods as lib_methods  # noqa: E402
from ligo_convert.compare.accounting import (aggregate, best_candidate, loss_at, mean_sd, paired,  # noqa: E402,F401
                                             reach, saved, savings, steps_to_goal, with_stronger_scratch as stronger)
from ligo_convert.compare.report import (PAIRED_NOTE, matched_rows, mean_curve, paired_cell, plot_panel,  # noqa: E402
                                         save_figure, savings_rows, summary_cell)
from ligo_convert.compare.run import tuning_table  # noqa: E402
from ligo_convert.compare.train import KI_ALPHA, Recipe, train  # noqa: E402,F401
from ligo_convert.compare.tuning import LR_FACTORS, choose_schedules, parse_lr_factors, schedule_grid  # noqa: E402

_mean_sd = mean_sd

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = lib_methods.METHODS  # scratch, ligo, the baselines, mslt, ki
# method -> (knob, candidate values): the tuning budget
KNOBS = {m: (name, candidates) for m, (name, _, candidates) in lib_methods.KNOBS.items()}
LIGO_RECIPE = lib_methods.LIGO_RECIPE  # LiGO as the paper's official code runs it


@dataclass
class Proxy:
    name: str
    family: str
    small: dict
    target: dict
    micro: dict
    batch_size: int
    seq_len: int
    lr: float  # the target's training learning rate, shared by every method: the one scratch does best with
    # The small model's pretraining steps, as a fraction of the target's.  The paper's small models are worse than
    # the large ones trained in full; on the text proxies a 2x64 model trained as long as the 4x128 target matches
    # its loss at these budgets (measured at 200 steps: GPT-2 2.47 vs 2.46, BERT 3.10 vs 3.20) and leaves nothing to
    # grow into, so it trains a third as long there.
    pretrain_fraction: float = 1.0
    task: str = "embedded"  # "embedded": ligo_convert.data's own data; "digit-pairs": see _digit_pairs
    val_batches: int | None = None  # overrides Settings.val_batches
    steps_scale: float = 1.0  # this proxy trains Settings.steps x steps_scale (fitting steps, evaluations alike)
    small_lr: float | None = None  # the small model's pretraining learning rate (None: lr): the one it does best with


@dataclass
class Settings:
    steps: int = 300  # training steps of the target (every method)
    fit_steps: int = 15  # LiGO fitting steps (counted): 5 % of training (the paper: 100 steps of ~10^5)
    eval_every: int = 15
    val_batches: int = 6
    warmup: float = 0.05  # fraction of steps
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    tune_seed: int = 100
    jobs: int = 2
    methods: tuple = METHODS  # --methods: scratch and a subset
    tune_schedule: bool = False  # --tune-schedule: each method's post-growth warmup x peak lr tuned (compare's grid)
    tune_lr_factors: tuple = LR_FACTORS


PROXIES = {
    "vit-digits": Proxy("vit-digits", "hf-vit", dict(layers=2, width=64, heads=4, mlp=256),
                        dict(layers=4, width=128, heads=8, mlp=512),
                        dict(image_size=8, patch_size=2, num_channels=1, num_classes=10), 64, 0, 2e-3),
    "vit-digit-pairs": Proxy("vit-digit-pairs", "hf-vit", dict(layers=2, width=64, heads=4, mlp=256),
                             dict(layers=4, width=128, heads=8, mlp=512),
                             dict(image_size=16, patch_size=4, num_channels=1, num_classes=100), 64, 0, 2e-3,
                             task="digit-pairs", val_batches=8, steps_scale=2.0, small_lr=4e-3),
    "gpt2-stdlib": Proxy("gpt2-stdlib", "hf-gpt2", dict(layers=2, width=64, heads=4, mlp=256),
                         dict(layers=4, width=128, heads=8, mlp=512), dict(max_positions=64), 16, 64, 2e-3, 1 / 3),
    "bert-stdlib": Proxy("bert-stdlib", "hf-bert", dict(layers=2, width=64, heads=4, mlp=256),
                         dict(layers=4, width=128, heads=8, mlp=512), dict(max_positions=64), 16, 64, 5e-4, 1 / 3,
                         small_lr=2e-3),
}  # each learning rate is the one that model does best with on the tuning seed, the target from scratch and the
#  small model in its pretraining (benchmarks/savings_lr_check.py): the 4x128 post-LN BERT stays on the unigram
#  plateau (~3.2) at 2e-3 and on some seeds at 1e-3
DEFAULT_PROXIES = ("vit-digit-pairs", "gpt2-stdlib", "bert-stdlib")  # vit-digits: see the module docstring
QUICK = Settings(steps=8, fit_steps=2, eval_every=4, val_batches=1, seeds=[0, 1], jobs=1)


def proxy_settings(p: Proxy, s: Settings) -> Settings:
    """The settings ``p`` runs with: its training steps, and with them LiGO's fitting steps and the evaluation
    interval, scaled by ``p.steps_scale``."""
    if p.steps_scale == 1:
        return s
    k = p.steps_scale
    return replace(s, steps=round(s.steps * k), fit_steps=max(1, round(s.fit_steps * k)),
                   eval_every=max(1, round(s.eval_every * k)))


def quick_proxy(p: Proxy) -> Proxy:
    return replace(p, small=dict(layers=1, width=16, heads=2, mlp=32), target=dict(layers=2, width=32, heads=4,
                                                                                    mlp=64), batch_size=8, seq_len=16)


# --- one training run (runs in a worker process) -------------------------------------------------------------------------


def _specs(p: Proxy):
    from ligo_convert.growth.pretrain import micro_spec

    small = micro_spec(p.family, **p.small, **p.micro)
    return small, small.replace(**p.target, kv_heads=p.target["heads"])


@dataclass
class ProxyData:
    """The proxy's batches as ``ligo_convert.compare`` runs read them: the embedded data through
    ``data.batches``, or the digit pairs."""

    p: Proxy
    s: Settings

    def train(self, spec, seed: int, stream: int):
        from ligo_convert import data as data_mod

        p = self.p
        if p.task == "digit-pairs":
            return _digit_pairs(spec, "train", None, p.batch_size, seed + 10_000 * stream)
        return data_mod.batches(spec, None, None, "train", p.batch_size, p.seq_len or 64, seed + 10_000 * stream)

    def val(self, spec) -> list[dict]:
        from ligo_convert import data as data_mod

        p = self.p
        n = p.val_batches or self.s.val_batches
        if p.task == "digit-pairs":
            return list(_digit_pairs(spec, "val", n, p.batch_size, 0))
        return list(islice(data_mod.batches(spec, None, None, "val", p.batch_size, p.seq_len or 64, 0), n))


def _digit_pairs(spec, split: str, n: int | None, batch_size: int, seed: int):
    """Two-digit numbers written with scikit-learn's digits: two 8x8 digits side by side, centred on a 16x16 canvas,
    labelled 10 * left + right (100 classes).  Pairs are drawn at random from one side of ligo_convert.data's fixed
    train/validation split of the digits, so no validation digit image is ever trained on.  On the plain 8x8 digits a
    4x128 ViT trained from scratch reaches ~97 % accuracy in a few hundred steps and the growth methods' head start is
    lost in the noise of a 360-image validation set; the pairs leave room to grow into at the same patch count.
    Yields ``n`` batches (None: endless)."""
    from ligo_convert import data as data_mod

    if spec.image_size != 16:
        raise ValueError(f"digit pairs are 16x16 images; the proxy's model takes {spec.image_size}")
    source = data_mod.image_source(None)
    pool = torch.tensor(source.train if split == "train" else source.val)
    labels = torch.tensor(source.labels)
    g = torch.Generator().manual_seed(seed)
    count = 0
    while n is None or count < n:
        count += 1
        left, right = (pool[torch.randint(len(pool), (batch_size,), generator=g)] for _ in range(2))
        canvas = torch.zeros(batch_size, 1, 16, 16)
        canvas[:, 0, 4:12, :8], canvas[:, 0, 4:12, 8:] = source.images[left], source.images[right]
        # normalised as ligo_convert.data normalises images that come without a preprocessor config
        yield {"pixel_values": ((canvas - 0.5) / 0.5).expand(-1, spec.num_channels, -1, -1).contiguous(),
               "labels": 10 * labels[left] + labels[right]}


def recipe(lr: float, s: Settings, steps: int) -> Recipe:
    """The one training recipe of the benchmark: AdamW, warmup + cosine (ligo_convert.compare.train)."""
    return Recipe(lr=lr, steps=steps, warmup=s.warmup, eval_every=s.eval_every)


def pretrain_steps(p: Proxy, s: Settings) -> int:
    return max(1, round(p.pretrain_fraction * s.steps))


def pretrain_job(job: dict) -> dict:
    """Pretrain the small model of a proxy for one seed (the same trainer and schedule as the target)."""
    torch.set_num_threads(1)
    p, s, seed = job["proxy"], job["settings"], job["seed"]
    small, _ = _specs(p)
    from ligo_convert.model import init_weights

    torch.manual_seed(seed)
    steps = pretrain_steps(p, s)
    data = ProxyData(p, s)
    result = train(small, init_weights(small, seed), data.train(small, seed, lib_methods.PRETRAIN),
                   recipe(p.small_lr or p.lr, s, steps), data.val(small))
    last = result.curve[-1]
    return {"proxy": p.name, "seed": seed, "weights": result.weights, "flops": last[1], "wall": last[2],
            "val_loss": last[3], "val_acc": last[4], "step_flops": result.step_flops}


def method_job(job: dict) -> dict:
    """Initialise the target with one method (and knob value), then train it; returns the run record with its
    curve (ligo_convert.compare.methods.run_method)."""
    torch.set_num_threads(1)
    p, s = job["proxy"], job["settings"]
    small, target = _specs(p)
    rec = recipe(p.lr, s, job["steps"])
    if job.get("schedule"):  # --tune-schedule: (peak lr, warmup) of a grid point
        rec = replace(rec, lr=job["schedule"][0], warmup=job["schedule"][1])
    run = lib_methods.run_method(job["method"], small, job["small_weights"], target, job["seed"],
                                 data=ProxyData(p, s), recipe=rec, knob=job.get("knob"),
                                 fit_steps=s.fit_steps, ligo_recipe=job.get("ligo_variant"))
    return {"proxy": p.name, **run}


# --- savings -------------------------------------------------------------------------------------------------------------


def attach_savings(runs: list[dict], pretrained: dict) -> None:
    """Each run's savings against the scratch run of its proxy and seed (``pretrained``: (proxy, seed) -> the small
    model's pretraining record)."""
    for r in runs:
        scratch = next(x for x in runs if x["proxy"] == r["proxy"] and x["seed"] == r["seed"]
                       and x["method"] == "scratch")
        r["savings"] = savings(r, scratch, pretrained[(r["proxy"], r["seed"])])


def _pick_knobs(tuning: list[dict]) -> dict:
    """Per proxy and knob method: the candidate with the most FLOPs saved on the tuning run (ties/none reached:
    lowest final loss), with every candidate's score."""
    chosen: dict = {}
    by_proxy: dict = {}
    for run in tuning:
        by_proxy.setdefault(run["proxy"], []).append(run)
    for proxy, runs in by_proxy.items():
        scratch = next(r for r in runs if r["method"] == "scratch")
        for method in (m for m in KNOBS if any(r["method"] == m for r in runs)):
            best, scores = best_candidate([r for r in runs if r["method"] == method], scratch)
            chosen.setdefault(proxy, {})[method] = {"value": best["knob"], "candidates": scores}
    return chosen


def _same_inits(jobs: list[dict]) -> dict[int, int]:
    """Index of each job whose method starts from tensors bit-identical to an earlier job's of the same proxy and
    seed -> that job's index (ligo_convert.compare.methods.init_digest): training is deterministic, so such a run
    would repeat the earlier one step for step."""
    seen: dict[tuple, int] = {}
    twins = {}
    for i, job in enumerate(jobs):
        small, target = _specs(job["proxy"])
        digest = lib_methods.init_digest(job["method"], small, job["small_weights"], target, job["seed"])
        if digest is None:
            continue
        key = (job["proxy"].name, job["seed"], job.get("schedule"), digest)
        if key in seen:
            twins[i] = seen[key]
        else:
            seen[key] = i
    return twins


RUN_CACHE: list[Path] = []  # main() puts --cache (default OUT/runs) here: finished runs, one JSON file each
# what a run's result depends on besides the job's own fields (seeds, jobs and the method list only pick the runs)
_NOT_IN_KEY = ("jobs", "seeds", "methods", "tune_schedule", "tune_lr_factors", "tune_seed")


def job_key(job: dict, code: dict) -> str:
    """A run's cache name: every field its result depends on (the proxy, the settings that shape a run, seed,
    method, knob, schedule, steps) and the growth/trainer code's fingerprint; the small model's weights follow
    from the proxy and seed (pretraining is deterministic)."""
    import hashlib

    fields = {k: v for k, v in job.items() if k != "small_weights"}
    fields["proxy"] = asdict(job["proxy"])
    fields["settings"] = {k: v for k, v in asdict(job["settings"]).items() if k not in _NOT_IN_KEY}
    fields["code"] = code
    text = json.dumps(fields, sort_keys=True, default=str)
    return f"{job['proxy'].name}-{job['method']}-s{job['seed']}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _as_json(record: dict) -> dict:
    return json.loads(json.dumps(record, default=float))  # cached and fresh runs alike: lists, not tuples


def _cached_runs(jobs: list[dict], workers: int) -> list[dict]:
    """method_job over ``jobs``, reading finished runs from the cache and writing each new one as it finishes, so
    an interrupted benchmark resumes where it stopped."""
    folder = RUN_CACHE[0]
    folder.mkdir(parents=True, exist_ok=True)
    code = versions()["growth_code_sha256"]
    paths = [folder / f"{job_key(j, code)}.json" for j in jobs]
    results = {i: json.loads(path.read_text()) for i, path in enumerate(paths) if path.exists()}
    todo = [i for i in range(len(jobs)) if i not in results]
    if results:
        print(f"  {len(results)} of {len(jobs)} runs read from {folder}", flush=True)
    for i, record in zip(todo, _map(method_job, [jobs[i] for i in todo], workers)):
        results[i] = _as_json(record)
        tmp = paths[i].with_suffix(".partial")
        tmp.write_text(json.dumps(results[i]) + "\n")
        tmp.replace(paths[i])  # atomic: a killed run leaves no half-written record
    return [results[i] for i in range(len(jobs))]


def _map(fn, jobs: list[dict], workers: int):
    if workers <= 1:
        yield from (fn(j) for j in jobs)
        return
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(fn, jobs)  # in order, each as soon as it and those before it are done


def _run_all(fn, jobs: list[dict], workers: int) -> list[dict]:
    if fn is method_job and RUN_CACHE:
        return _cached_runs(jobs, workers)
    return list(_map(fn, jobs, workers))


def run_benchmark(proxies: list[Proxy], s: Settings, log=print) -> dict:
    start = time.perf_counter()
    seeds = list(s.seeds) + [s.tune_seed]
    log(f"pretraining {len(proxies) * len(seeds)} small models")
    pre = _run_all(pretrain_job, [dict(proxy=p, settings=proxy_settings(p, s), seed=seed) for p in proxies
                                  for seed in seeds], s.jobs)
    pretrained = {(r["proxy"], r["seed"]): r for r in pre}
    for r in pre:
        log(f"  {r['proxy']} seed {r['seed']}: small val loss {r['val_loss']:.3f} acc {r['val_acc']:.3f}")

    tuning_jobs = []  # tuning runs are as long as the measured ones
    for p in proxies:
        w = pretrained[(p.name, s.tune_seed)]["weights"]
        sp = proxy_settings(p, s)
        base = dict(proxy=p, settings=sp, seed=s.tune_seed, small_weights=w, steps=sp.steps)
        tuning_jobs.append({**base, "method": "scratch"})
        for method, (_, values) in ((m, k) for m, k in KNOBS.items() if m in s.methods):
            tuning_jobs += [{**base, "method": method, "knob": v} for v in values]
    log(f"tuning: {len(tuning_jobs)} runs (seed {s.tune_seed})")
    tuning = _run_all(method_job, tuning_jobs, s.jobs)
    knobs = _pick_knobs(tuning)
    for proxy, methods in knobs.items():
        log(f"  {proxy}: " + ", ".join(f"{m} {KNOBS[m][0]}={c['value']:g}" for m, c in methods.items()))

    jobs = []
    for p in proxies:
        for seed in s.seeds:
            w = pretrained[(p.name, seed)]["weights"]
            for method in s.methods:
                knob = knobs[p.name][method]["value"] if method in KNOBS else None
                jobs.append(dict(proxy=p, settings=proxy_settings(p, s), seed=seed, method=method, knob=knob,
                                 small_weights=w, steps=proxy_settings(p, s).steps))
    runs = _measure(jobs, s, "measuring", log)
    attach_savings(runs, pretrained)
    out = {"settings": asdict(s), "proxies": [{**asdict(p), "settings": asdict(proxy_settings(p, s))}
                                              for p in proxies], "knobs": knobs,
           "pretrain": [{k: v for k, v in r.items() if k != "weights"} for r in pre],
           "runs": runs, "tuning": [{k: v for k, v in r.items() if k not in ("small_weights",)} for r in tuning]}
    if s.tune_schedule:
        out["schedules"], out["tuned_runs"] = tune_schedules(proxies, s, pretrained, knobs, tuning + runs, log)
    return {**out, "wall_s": time.perf_counter() - start}


def _measure(jobs: list[dict], s: Settings, what: str, log, done: list[dict] = ()) -> list[dict]:
    """Every job's run record: a run in ``done`` with the same proxy, seed, method, knob and schedule, a
    bit-identical twin's run, or trained now."""
    def key(proxy, seed, method, knob, lr, warmup):
        return proxy, seed, method, knob, lr, warmup

    have = {key(r["proxy"], r["seed"], r["method"], r.get("knob"), r.get("lr"), r.get("warmup")): r for r in done
            if "same_init_as" not in r}
    found = {}
    for i, j in enumerate(jobs):
        lr, warmup = j.get("schedule") or (j["proxy"].lr, j["settings"].warmup)
        k = key(j["proxy"].name, j["seed"], j["method"], j.get("knob"), lr, warmup)
        if k in have:
            found[i] = have[k]
    twins = _same_inits(jobs)
    todo = [j for i, j in enumerate(jobs) if i not in twins and i not in found]
    log(f"{what}: {len(todo)} runs ({len(twins)} more start from a bit-identical initialisation already in the list "
        f"and reuse its run; {len(found)} were already run)")
    fresh = iter(_run_all(method_job, todo, s.jobs))
    runs = []
    for i, job in enumerate(jobs):
        if i in found:
            runs.append(dict(found[i]))
        elif i in twins:
            runs.append({**runs[twins[i]], "method": job["method"], "same_init_as": jobs[twins[i]]["method"]})
        else:
            runs.append(next(fresh))
    return runs


def tune_schedules(proxies: list[Proxy], s: Settings, pretrained: dict, knobs: dict, done: list[dict],
                   log) -> tuple[dict, list[dict]]:
    """--tune-schedule (ligo_convert.compare.tuning): every method, its knob at the value it chose, trains on the
    tuning seed once per grid point (warmup x peak lr); each keeps its best (scratch: the lowest final loss); then
    every seed trains with the chosen schedule.  Returns (per proxy: the grid, the choice, every candidate's score;
    the tuned runs, with savings against tuned scratch)."""
    jobs, grids = [], {}
    for p in proxies:
        sp = proxy_settings(p, s)
        grids[p.name] = schedule_grid(recipe(p.lr, sp, sp.steps), s.tune_lr_factors)
        w = pretrained[(p.name, s.tune_seed)]["weights"]
        for method in s.methods:
            knob = knobs[p.name][method]["value"] if method in KNOBS else None
            jobs += [dict(proxy=p, settings=sp, seed=s.tune_seed, method=method, knob=knob, small_weights=w,
                          steps=sp.steps, schedule=(pt.lr, pt.warmup)) for pt in grids[p.name]]
    tuning = _measure(jobs, s, "schedule tuning", log, done)
    info = {}
    for p in proxies:
        mine = [r for r in tuning if r["proxy"] == p.name]
        chosen = choose_schedules({m: [r for r in mine if r["method"] == m] for m in s.methods})
        for c in chosen.values():
            if "refused" not in c:
                c["name"] = next(pt.name for pt in grids[p.name] if (pt.lr, pt.warmup) == (c["lr"], c["warmup"]))
        log(f"  {p.name}: " + ", ".join(f"{m} {c.get('name', 'refused')}" for m, c in chosen.items()))
        info[p.name] = {"seed": s.tune_seed, "grid": [pt.to_dict() for pt in grids[p.name]], "chosen": chosen,
                        "knobs": {m: _schedule_knobs(m, knobs[p.name], proxy_settings(p, s)) for m in s.methods},
                        "runs": [{k: v for k, v in r.items() if k != "small_weights"} for r in mine]}
    tuned_jobs = []
    for p in proxies:
        for seed in s.seeds:
            for method in s.methods:
                c = info[p.name]["chosen"][method]
                knob = knobs[p.name][method]["value"] if method in KNOBS else None
                tuned_jobs.append(dict(proxy=p, settings=proxy_settings(p, s), seed=seed, method=method, knob=knob,
                                       small_weights=pretrained[(p.name, seed)]["weights"],
                                       steps=proxy_settings(p, s).steps,
                                       schedule=None if "refused" in c else (c["lr"], c["warmup"])))
    tuned = _measure(tuned_jobs, s, "measuring with the tuned schedules", log, done + tuning)
    attach_savings(tuned, pretrained)
    return info, tuned


def _schedule_knobs(method: str, knobs: dict, sp: Settings) -> dict:
    """What --tune-schedule varied for ``method`` and what it kept at the value tuned before (3 runs, scratch's
    schedule)."""
    fixed = {"fit_steps": sp.fit_steps} if method == "ligo" else {}
    if method in KNOBS:
        fixed = {KNOBS[method][0]: f"{knobs[method]['value']:g} (tuned first)", **fixed}
    return {"tuned": ["warmup", "lr"], "fixed": fixed}


# --- report --------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    import transformers

    import ligo_convert

    import hashlib

    package = Path(ligo_convert.__file__).parent
    # the growth code and the trainer are what the numbers depend on: fingerprint them, committed or not
    code = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:12] for f in sorted((package / "growth").glob("*.py"))}
    code.update({f"compare/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()[:12]
                 for f in sorted((package / "compare").glob("*.py"))})
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "ligo_convert": ligo_convert.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "growth_code_sha256": code}


def _methods(results: dict) -> tuple:
    return tuple(results["settings"].get("methods", METHODS))


def table(results: dict, proxy: str, pre: bool, key: str = "runs") -> list[str]:
    """The savings table of ``proxy`` over ``results[key]`` ("tuned_runs": each method's tuned schedule)."""
    runs = [r for r in results[key] if r["proxy"] == proxy]
    chosen = results["schedules"][proxy]["chosen"] if key != "runs" else {}
    groups = []
    for method in _methods(results):
        mine = [r for r in runs if r["method"] == method]
        knobs = [f"{KNOBS[method][0]} {mine[0]['knob']:g}"] if method in KNOBS and "refused" not in mine[0] else []
        if key == "stronger_runs" and method == "scratch":
            knobs.append("the stronger of its two schedules on each seed")
        elif "name" in chosen.get(method, {}):
            knobs.append(chosen[method]["name"])
        groups.append((method, method + (f" ({', '.join(knobs)})" if knobs else ""), mine))
    return savings_rows(groups, pre)


def _runs(results: dict, proxy: str, method: str, key: str = "runs") -> list[dict]:
    return sorted((r for r in results[key] if r["proxy"] == proxy and r["method"] == method),
                  key=lambda r: r["seed"])


def matched_table(results: dict, proxy: str, key: str = "runs") -> list[str]:
    """Mean validation loss of each method when it has spent a fraction of scratch's FLOPs (its own seed's)."""
    runs = [r for r in results[key] if r["proxy"] == proxy]
    return matched_rows([(m, [r for r in runs if r["method"] == m]) for m in _methods(results)])


def summary(results: dict, key: str = "runs") -> list[str]:
    """One row per method: FLOPs / wall saved (%) on every proxy, pretraining not counted (the paper's Table 1);
    then LiGO against each method seed by seed."""
    names = [p["name"] for p in results["proxies"]]
    lines = ["| method | " + " | ".join(f"{n} FLOPs / wall saved %" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for method in _methods(results):
        lines.append(f"| {method} | " + " | ".join(summary_cell(_runs(results, n, method, key)) for n in names)
                     + " |")
    lead = ["| LiGO against | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method in _methods(results):
        if method == "ligo":
            continue
        cells = [paired_cell(_runs(results, n, "ligo", key), _runs(results, n, method, key)) for n in names]
        lead.append(f"| {method} | " + " | ".join(cells) + " |")
    return (["Summary (mean over all seeds, pretraining not counted; ≤: some seed did not reach the goal and counts at "
             "its bound, so the mean is an upper bound; details, sd and the pretraining-counted figures below):", ""]
            + lines + ["", "LiGO against each method, seed by seed (FLOPs saved, pretraining not counted): "
                       + PAIRED_NOTE + ":", ""] + lead)


def _scales(results: dict) -> str:
    steps = {p["name"]: p.get("settings", results["settings"])["steps"] for p in results["proxies"]}
    return ", ".join(f"{n}: {v}" for n, v in steps.items())


def markdown(results: dict, command: str) -> str:
    s = results["settings"]
    out = ["# Growth savings benchmark", "",
           f"Command: `{command}`  ", f"Seeds: {s['seeds']} (tuning seed {s['tune_seed']}); total wall "
           f"{results['wall_s'] / 60:.1f} min; versions: {json.dumps(results['versions'])}", "",
           "Savings are against `scratch` on the same seed: FLOPs (forward+backward matrix products, LiGO's "
           "fitting steps and KI's teacher forwards counted) and training wall time until the "
           "validation loss first reaches scratch's final validation loss (linear interpolation between "
           f"evaluations every {s['eval_every'] / s['steps']:.0%} of the steps). Every method trains the proxy's "
           f"steps ({_scales(results)}) with the same AdamW, "
           f"warmup ({s['warmup']:.0%}) + cosine schedule and batches. Mean ± sd over all seeds; a seed that did not "
           "reach the goal (see `reached`) would have needed more than the whole run, so it counts at the saving "
           "the whole run gives, an upper bound, and the mean is marked ≤ (dropping such seeds would keep only a "
           "method's easy ones); likewise its steps to goal at the run's length (≥). Final quality: validation "
           "loss/accuracy after the last step, over all seeds. Fixed before measuring, for every method alike: the "
           "training learning rate (per proxy, the one scratch does best with: results/savings_lr_check.md), steps "
           "and batch size; LiGO as the paper's official recipe (per-layer width "
           "matrices, noisy-stack depth and random-convex width initialisation, task objective), its fitting steps "
           f"set to 5 % of the training steps ({s['fit_steps']} at {s['steps']} steps; the paper fits 100 steps of "
           "~10^5) and its one knob "
           "the fitting learning rate (relative: width matrices step by lr / D1, depth by lr / L1). The small model "
           "pretrains with the same recipe at the learning rate it does best with (results/savings_lr_check.md), as "
           "long as the target on images and a third as long on text: there a "
           "2x64 model trained as long as the 4x128 target matches its loss at these budgets (at 200 steps: GPT-2 "
           "2.47 vs 2.46, BERT 3.10 vs 3.20) and leaves nothing to grow into, while the paper's small models are "
           "worse than the large ones trained in full.", ""]
    pairs = next((p for p in results["proxies"] if p["name"] == "vit-digit-pairs"), None)
    if pairs:
        out += ["The image proxy is two-digit numbers written with the digits (two 8x8 digits side by side on a "
                f"16x16 canvas, 100 classes, {pairs['val_batches'] * pairs['batch_size']} validation pairs of "
                f"held-out digit images), trained {pairs['steps_scale']:g} times as long as the text proxies (a 4x128 "
                "ViT from scratch needs that to pass ~90 % accuracy). The plain 8x8 digits (`--proxies vit-digits`) "
                "saturate: a 4x128 ViT from scratch reaches ~97 % accuracy within the budget, every method ends "
                "within the noise of the 360-image validation set and no method saves reliably (at most 12.6 % on "
                "average, LiGO ≤ -4.1 %; results/savings-digits8x8/).", ""]
    if "schedules" in results:
        out += ["## Scratch's schedule (every method)", ""]
    out += summary(results) + [""]
    if "schedules" in results:
        results = with_stronger_scratch(results)
        out += tuned_summary(results) + stronger_summary(results)
    for p in results["proxies"]:
        name = p["name"]
        pre = [r for r in results["pretrain"] if r["proxy"] == name and r["seed"] in s["seeds"]]
        scratch = [r for r in results["runs"] if r["proxy"] == name and r["method"] == "scratch"]
        ligo = [r for r in results["runs"] if r["proxy"] == name and r["method"] == "ligo" and "curve" in r]
        ps = p.get("settings", s)
        out += [f"## {name}: {p['family']} {p['small']} -> {p['target']}, lr {p['lr']:g}"
                + (f" (small model's pretraining: {p['small_lr']:g})" if p.get("small_lr") else ""), "",
                f"Scratch: {statistics.mean(r['curve'][-1][1] for r in scratch) / 1e12:.3f} TFLOPs in {ps['steps']} "
                f"steps ({statistics.mean(r['curve'][-1][2] for r in scratch):.1f} s). "
                + (f"One LiGO fitting step costs {ligo[0]['fit_step_flops'] / ligo[0]['step_flops']['full']:.2f} "
                   f"training steps; LiGO's validation loss {_mean_sd([r['loss_init'] for r in ligo], 3)} at init, "
                   f"{_mean_sd([r['loss_fitted'] for r in ligo], 3)} after fitting (small model: "
                   f"{_mean_sd([r['val_loss'] for r in pre], 3)})." if ligo else ""), "",
                "Small model's pretraining not counted (the paper's convention):", ""]
        out += table(results, name, pre=False)
        out += ["", "Validation loss when a fraction of scratch's FLOPs is spent (mean over seeds; pretraining "
                "not counted):", ""] + matched_table(results, name)
        out += ["", f"Small model's pretraining counted ({round(p['pretrain_fraction'] * ps['steps'])} steps, "
                    f"{statistics.mean(r['flops'] for r in pre) / 1e12:.2f} TFLOPs, small val loss "
                    f"{_mean_sd([r['val_loss'] for r in pre], 3)}):", ""]
        out += table(results, name, pre=True)
        refused = {r["refused"] for r in results["runs"] if r["proxy"] == name and "refused" in r}
        for msg in sorted(refused):
            out.append(f"\nRefused: {msg}")
        twins = [r for r in results["runs"] if r["proxy"] == name and "same_init_as" in r]
        for method, like in sorted({(r["method"], r["same_init_as"]) for r in twins}):
            n = sum(r["method"] == method for r in twins)
            out.append(f"\n{method} starts from tensors bit-identical to {like}'s on {n} of {len(s['seeds'])} seeds, "
                       f"so those rows are {like}'s runs (training is deterministic; not run twice).")
        out += ["", "Tuning (one knob, three values, tuning seed; FLOPs saved / final loss):", ""]
        for method, c in results["knobs"][name].items():
            cands = "; ".join(
                f"{x['value']:g}: " + (f"{x['flops_saved']:.1f} %" if x["flops_saved"] is not None else "n.r.")
                + (f" / {x['final_loss']:.3f}" if x["final_loss"] is not None else "")
                + (f" (val loss at init {x['loss_init']:.3f}, after fitting {x['loss_fitted']:.3f})"
                   if x.get("loss_fitted") is not None else "") for x in c["candidates"])
            out.append(f"- {method} {KNOBS[method][0]} = **{c['value']:g}** — {cands}")
        out.append("")
        if "schedules" in results:
            out += tuned_section(results, name)
    return "\n".join(out) + "\n"


def tuned_summary(results: dict) -> list[str]:
    """--tune-schedule: the summary again with each method's tuned schedule, and how the schedules were chosen."""
    s = results["settings"]
    grid = next(iter(results["schedules"].values()))["grid"]
    return ["## Each method's tuned schedule", "",
            f"Each method — scratch included — trains its start on the tuning seed {s['tune_seed']} once per point of "
            f"the same grid of {len(grid)} schedules (ligo_convert.compare.tuning): peak lr x "
            f"{{{', '.join(f'{f:g}' for f in s['tune_lr_factors'])}}} of the proxy's, times post-growth warmup none "
            "(one step at the peak rate) / short (a quarter of scratch's) / scratch's; LiGO, MSLT and KI keep the "
            "knob value they chose before (3 runs with scratch's schedule). Scratch keeps the schedule with the "
            "lowest final validation loss, which is then the goal on every seed; each other method the one that "
            "reaches scratch's tuned final loss with the fewest FLOPs (none does: the lowest final loss). Every seed "
            "then trains with the chosen schedules; savings are against tuned scratch on the same seed.", ""] + \
        summary(results, "tuned_runs") + [""]


def with_stronger_scratch(results: dict) -> dict:
    """``results`` with ``stronger_runs``: each proxy's tuned runs with the stronger of scratch's two runs on each
    seed in scratch's place (``compare.accounting.with_stronger_scratch``), their savings against that run."""
    runs = []
    for name in dict.fromkeys(r["proxy"] for r in results["tuned_runs"]):
        runs += stronger([r for r in results["runs"] if r["proxy"] == name],
                         [r for r in results["tuned_runs"] if r["proxy"] == name])
    attach_savings(runs, {(r["proxy"], r["seed"]): r for r in results["pretrain"]})
    return {**results, "stronger_runs": runs}


def stronger_summary(results: dict) -> list[str]:
    """--tune-schedule: the tuned runs' summary against the stronger scratch of each seed."""
    return ["## Tuned schedules against the stronger scratch", "",
            "The tuned runs above, each measured against whichever of scratch's two runs on its seed ends lower "
            "(scratch's schedule or scratch's tuned one): the goal a user who tried both would set. Where the "
            "tuning seed's choice for scratch does not carry over to the other seeds, the table above measures "
            "against a weaker goal than this one.", ""] + summary(results, "stronger_runs") + [""]


def tuned_section(results: dict, proxy: str) -> list[str]:
    """--tune-schedule, one proxy: the table with each method's tuned schedule and the tuning grid."""
    info = results["schedules"][proxy]
    return (["Each method's tuned schedule (pretraining not counted; savings against tuned scratch):", ""]
            + table(results, proxy, False, "tuned_runs")
            + ["", "Validation loss when a fraction of tuned scratch's FLOPs is spent:", ""]
            + matched_table(results, proxy, "tuned_runs") + [""]
            + tuning_table({"tuning": info, "methods": list(_methods(results))}) + [""]
            + ["Each method's tuned schedule against the stronger scratch run of each seed (pretraining not "
               "counted; scratch's row: that run):", ""]
            + table(results, proxy, False, "stronger_runs") + [""])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxies = [p["name"] for p in results["proxies"]]
    pre = {(r["proxy"], r["seed"]): r["flops"] for r in results["pretrain"]}
    fig, axes = plt.subplots(2, len(proxies), figsize=(5 * len(proxies), 8), squeeze=False)
    for col, name in enumerate(proxies):
        for row, counted in enumerate((False, True)):
            lines, goal = [], None
            for method in _methods(results):
                runs = [r for r in results["runs"] if r["proxy"] == name and r["method"] == method and "curve" in r]
                if not runs:
                    continue
                shift = [pre[(name, r["seed"])] if (counted and method != "scratch") else 0.0 for r in runs]
                lines.append((method, *mean_curve(runs, shift)))
                if method == "scratch":
                    goal = statistics.mean(r["curve"][-1][3] for r in runs)
            plot_panel(axes[row][col], lines, METHODS, goal,
                       f"{name}: pretraining {'counted' if counted else 'not counted'}", legend=row == col == 0)
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and runs: a pipeline smoke test (< 1 min)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for savings.md/.png/.json")
    parser.add_argument("--proxies", default=",".join(DEFAULT_PROXIES),
                        help="comma-separated, from " + ", ".join(PROXIES) + " (default: %(default)s)")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps of the target")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (one thread each)")
    parser.add_argument("--methods", default=None, help="comma-separated methods to run (scratch always runs; "
                        "default: all of " + ", ".join(METHODS) + ")")
    parser.add_argument("--tune-schedule", action="store_true", help="also tune each method's post-growth warmup "
                        "and peak lr on the tuning seed over the same grid (ligo-convert compare --tune-schedule) and "
                        "report both schedules")
    parser.add_argument("--tune-lr-factors", default=None, help="with --tune-schedule: peak rates tried, as factors "
                        "of the proxy's (default: " + ",".join(f"{f:g}" for f in LR_FACTORS) + ")")
    parser.add_argument("--cache", type=Path, default=None, help="folder of finished runs, one JSON each, read "
                        "back by a rerun with the same settings and code (default: OUT/runs; 'none' to keep none)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite savings.md/.png from a savings.json "
                        "this script wrote (no training)")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSON",
                        help="with --render: add the seeds of other runs with the same settings (e.g. --seeds 3,4,5 "
                        "after the default 0,1,2); training is deterministic, so this equals one run over all seeds")
    args = parser.parse_args(argv)
    if args.merge and not args.render:
        parser.error("--merge needs --render")
    if args.render:
        results = json.loads(args.render.read_text())
        for other in args.merge:
            results = merge(results, json.loads(other.read_text()), str(other))
        attach_savings(results["runs"], {(r["proxy"], r["seed"]): r for r in results["pretrain"]})
        write(results, args.out)
        return 0

    s = QUICK if args.quick else Settings()
    if args.seeds:
        s = replace(s, seeds=args.seeds)
    if args.steps:
        s = replace(s, steps=args.steps, eval_every=max(1, args.steps // 20),
                    fit_steps=max(1, args.steps // 20))
    if args.jobs:
        s = replace(s, jobs=args.jobs)
    if args.methods:
        names = [m.strip() for m in args.methods.split(",")]
        if any(m not in METHODS for m in names):
            parser.error(f"--methods: choose from {', '.join(METHODS)}")
        s = replace(s, methods=tuple(m for m in METHODS if m == "scratch" or m in names))
    if args.tune_schedule:
        s = replace(s, tune_schedule=True, tune_lr_factors=parse_lr_factors(args.tune_lr_factors or LR_FACTORS))
    proxies = [PROXIES[n] for n in args.proxies.split(",")]
    if args.quick:
        proxies = [quick_proxy(p) for p in proxies]
    torch.set_num_threads(1)
    if str(args.cache) != "none":
        RUN_CACHE[:] = [args.cache or args.out / "runs"]
    before = versions()
    results = run_benchmark(proxies, s, log=lambda m: print(m, flush=True))
    results["versions"] = versions()
    if results["versions"] != before:  # workers import the growth code afresh at each stage
        results["versions"]["changed_during_run_from"] = before["growth_code_sha256"]
    command = "python benchmarks/savings.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    results["command"] = command
    write(results, args.out)
    return 0


def merge(a: dict, b: dict, name: str = "the second run") -> dict:
    """Run ``a`` with the seeds of run ``b`` added.  Refused unless everything but the seeds is the same: settings,
    proxies, growth code, versions, and the knob values the tuning seed chose."""
    same = lambda x: {k: v for k, v in x.items() if k != "seeds"}  # noqa: E731
    for what, x, y in (("settings", same(a["settings"]), same(b["settings"])),
                       ("proxies", [{**p, "settings": same(p["settings"])} for p in a["proxies"]],
                        [{**p, "settings": same(p["settings"])} for p in b["proxies"]]),
                       ("versions", a["versions"], b["versions"]),
                       ("tuned knobs", {n: {m: c["value"] for m, c in k.items()} for n, k in a["knobs"].items()},
                        {n: {m: c["value"] for m, c in k.items()} for n, k in b["knobs"].items()})):
        if x != y:
            raise SystemExit(f"cannot merge {name}: its {what} differ from the first run's")
    seeds = sorted(set(a["settings"]["seeds"]) | set(b["settings"]["seeds"]))
    if len(seeds) < len(a["settings"]["seeds"]) + len(b["settings"]["seeds"]):
        raise SystemExit(f"cannot merge {name}: it repeats seeds of the first run")
    have = {(r["proxy"], r["seed"]) for r in a["pretrain"]}
    out = {**a, "settings": {**a["settings"], "seeds": seeds},
           "proxies": [{**p, "settings": {**p["settings"], "seeds": seeds}} for p in a["proxies"]],
           "runs": a["runs"] + b["runs"],
           "pretrain": a["pretrain"] + [r for r in b["pretrain"] if (r["proxy"], r["seed"]) not in have],
           "wall_s": a["wall_s"] + b["wall_s"], "command": f"{a['command']}` and `{b['command']}"}
    return out


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "savings.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out / "savings.md").write_text(markdown(results, results["command"]))
    plot(results, out / "savings.png")
    print((out / "savings.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
