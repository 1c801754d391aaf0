"""Fitting at scale on this CPU: peak memory of a whole ``grow`` and the cost of a streamed fitting step.

1. Peak RSS of ``python -m ligo_convert grow`` (2 fitting steps at batch 4 x 128, validation before and after, and
   writing the grown model), each run a fresh process with OMP_NUM_THREADS pinned, divided by the target's fp32
   bytes (``target.parameter_count() * 4``): GPT-2 6x512 (random weights, vocab 50257, 1024 positions) ->
   12x1024 and -> 24x1024 (16 heads, MLP 4096), per-layer and shared width, with ``--materialize layers``
   (streamed: every layer checkpointed) and ``--materialize full``.  For each case also the operator's parameter
   count, the "floor" = operator parameters x 16 bytes (fp32 value, gradient, two AdamW moments) + the source's
   fp32 bytes, and peak / floor; and the peak of each phase of the run (initialise, validate, fit, write), read by
   resetting the process's peak-RSS counter (``/proc/self/clear_refs``) at each phase boundary.  A process that
   only imports torch and ligo_convert gives the fixed cost inside every figure.
   Targets (issue 11), on the streamed runs:
     shared width:  peak / target fp32 <= 1.0
     per-layer:     peak <= 1.5 x floor
     12 -> 24 layers: the peak grows <= 25 % beyond what the operator's own size adds:
                    (peak24 - peak12 - (floor24 - floor12)) / peak12 <= 0.25
2. One fitting step (``GrowingModel(op, stream)`` forward, ``task_terms``, backward, AdamW on the per-layer
   operator) / one plain training step of the 12x1024 target (``forward(target, weights)``, the same loss,
   backward, AdamW on its weights), same batch (4 x 128 tokens), streamed and full, in one process: each LiGO step
   timed right after a plain one, the median of the pair ratios after a warm-up round.  Target: <= 1.5 streamed.

    python benchmarks/fit_scale.py --markdown benchmarks/results/fit_scale.md     # 15-35 min on 2 cores
    python benchmarks/fit_scale.py --cases '24-*-layers,step-ratio'               # a subset (fnmatch patterns)
    python benchmarks/fit_scale.py --quick                                        # tiny sizes, ~30 s (the test)
    python benchmarks/fit_scale.py --cases step-ratio --step-batches 4,16 --pairs 3 \
        --markdown benchmarks/results/fit_scale.md --append                      # the step ratio at more batches

Case names: ``{layers}-{per-layer|shared}-{layers|full}`` (``--list`` prints them) and ``step-ratio``.
Peak RSS is the child's own ``VmHWM``: ``ru_maxrss`` from ``wait4`` would also count the pages the child held from
this (large) process between fork and exec, since Linux carries the old address space's high-water mark over exec.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ligo_convert import data as data_mod  # noqa: E402
from ligo_convert import forward, from_tensors, init_weights, save  # noqa: E402
from ligo_convert.growth.fit import GrowingModel  # noqa: E402
from ligo_convert.growth.operator import LigoOperator  # noqa: E402
from ligo_convert.growth.pretrain import micro_spec  # noqa: E402
from ligo_convert.objectives import task_terms  # noqa: E402

SIZES = {  # source (layers, width, heads, mlp), target width/heads/mlp, target layer counts, vocab, batch, seq
    "default": dict(source=(6, 512, 8, 2048), width=1024, heads=16, mlp=4096, layers=(12, 24), vocab=50257,
                    positions=1024, batch=4, seq=128, pairs=5, threads=2),
    # 1 thread: on a shared 2-core machine, tiny ops under 2 OpenMP threads spin-wait for ~10x longer
    "quick": dict(source=(2, 64, 4, 128), width=128, heads=8, mlp=256, layers=(4, 8), vocab=2000, positions=128,
                  batch=2, seq=32, pairs=2, threads=1),
}
VARIANTS = ("per-layer", "shared")
MODES = ("layers", "selective", "full")
FIT_STEPS = 2
TARGET_SHARED, TARGET_FLOOR, TARGET_GROWTH, TARGET_STEP = 1.0, 1.5, 0.25, 1.5
GROWTH_FORMULA = "(peak24 - peak12 - (floor24 - floor12)) / peak12"
IMPORT_ONLY = "import torch, ligo_convert, ligo_convert.grow, ligo_convert.cli"


def source_spec(size: dict):
    layers, width, heads, mlp = size["source"]
    return micro_spec("hf-gpt2", layers=layers, width=width, heads=heads, mlp=mlp, vocab_size=size["vocab"],
                      max_positions=size["positions"])


def target_of(source, size: dict, layers: int):
    return source.replace(layers=layers, width=size["width"], heads=size["heads"], kv_heads=size["heads"],
                          mlp=size["mlp"])


def operator_parameters(source, target, shared: bool) -> int:
    zeros = {n: torch.zeros(source.shape_of(n)) for n in source.tensor_names()}
    return LigoOperator(source, target, zeros, shared_width=shared).operator_parameter_count()


def case_names(size: dict) -> list[str]:
    return [f"{layers}-{variant}-{mode}" for layers in size["layers"] for variant in VARIANTS for mode in MODES] + \
        ["step-ratio"]


def pick(names: list[str], patterns: str) -> list[str]:
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        sys.exit(f"--cases: {', '.join(unknown)} match no case; cases are {', '.join(names)}")
    return chosen


# The child: runs ``-m MODULE ARGS`` (or ``-c CODE``) and writes its peak RSS, overall and per phase, to a JSON file
# at exit.  Each phase's peak is the process's VmHWM when the phase ends; the counter is then reset (clear_refs 5)
# so the next phase's peak is its own.  The phases are marked by wrapping the steps grow() calls from
# ligo_convert.grow (instrumentation of this process only: nothing in the library changes).
_CHILD = r"""
import atexit, json, runpy, sys, time
out = sys.argv.pop(1)
def status(full=False):
    v = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:")):
            v[line.split(":")[0]] = int(line.split()[1])
    return v if full else (v["VmHWM"], v["VmRSS"])
def reset():
    try:
        open("/proc/self/clear_refs", "w").write("5")
        return True
    except OSError:
        return False
phases, now, overall = [], {"name": "start-up", "t": time.perf_counter(), "rss": status()[1]}, [0]
def mark(name):
    v = status(True)
    overall[0] = max(overall[0], v["VmHWM"])
    phases.append({"phase": now["name"], "peak_kb": v["VmHWM"], "start_kb": now["rss"], "end_kb": v["VmRSS"],
                   "end_anon_kb": v.get("RssAnon"), "end_file_kb": v.get("RssFile"),
                   "s": round(time.perf_counter() - now["t"], 2)})
    if reset():
        now.update(name=name, t=time.perf_counter(), rss=status()[1])
    else:  # no reset: one phase to the end
        now.update(name=now["name"])
def done():
    mark("")
    json.dump({"peak_kb": overall[0], "phases": phases}, open(out, "w"))
atexit.register(done)
if sys.argv[1] == "-c":
    exec(sys.argv[2])
else:
    import importlib
    g = importlib.import_module("ligo_convert.grow")  # the module (the package re-exports a function of its name)
    seen = {}
    def wrap(attr, label):
        orig = getattr(g, attr)
        def run(*a, **k):
            seen[label] = seen.get(label, 0) + 1
            mark(label if label != "validate" else f"validate #{seen[label]}")
            try:
                return orig(*a, **k)
            finally:
                mark("after " + label)
        setattr(g, attr, run)
    for attr, label in (("initialise", "initialise"), ("evaluate_loss", "validate"), ("fit", "fit"),
                        ("write_growth", "write")):
        wrap(attr, label)
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def child_peak(args: list[str], folder: Path, threads: int) -> tuple[dict, float]:
    """({peak_kb, phases}, seconds) of ``python -m MODULE ARGS`` (or ``-c CODE``) in a fresh process; raises with
    its stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    peak_file = folder / "peak.json"
    peak_file.unlink(missing_ok=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(peak_file), *args], env=env, cwd=folder,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode or not peak_file.exists():
        raise RuntimeError(f"{' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(peak_file.read_text()), wall


def phase_summary(phases: list[dict]) -> dict[str, float]:
    """Peak MB of each named phase (the between-phase gaps folded into 'other')."""
    out: dict[str, float] = {}
    for p in phases:
        name = "other" if p["phase"].startswith("after ") else p["phase"]
        out[name] = max(out.get(name, 0.0), p["peak_kb"] / 1024)
    return out


def write_source(size: dict, folder: Path) -> Path:
    source = source_spec(size)
    src = folder / f"source-{'x'.join(map(str, size['source']))}"
    save(from_tensors(source, init_weights(source, seed=0), family="hf-gpt2"), src, overwrite=True)
    return src


def grow_cmd(size: dict, src: Path, layers: int, shared: bool, mode: str, out: Path) -> list[str]:
    return ["ligo_convert", "grow", str(src), "--layers", str(layers), "--width", str(size["width"]),
            "--heads", str(size["heads"]), "--mlp", str(size["mlp"]), "--steps", str(FIT_STEPS),
            "--batch-size", str(size["batch"]), "--seq-len", str(size["seq"]), "--device", "cpu",
            "--materialize", mode, "--out", str(out)] + (["--shared-width"] if shared else [])


def baselines(size: dict, folder: Path, threads: int) -> dict:
    """Peak MB of a process that only imports, and (at full sizes) of the tiny quick-size grow: the fixed cost of
    the code a fitting process runs (torch's kernels are file-backed pages that count in RSS once touched)."""
    base, _ = child_peak(["-c", IMPORT_ONLY], folder, threads)
    out = {"import": base["peak_kb"] / 1024}
    print(f"import-only process ({IMPORT_ONLY}): {out['import']:.0f} MB", flush=True)
    if size["source"] != SIZES["quick"]["source"]:
        tiny = SIZES["quick"]
        run, _ = child_peak(grow_cmd(tiny, write_source(tiny, folder), tiny["layers"][0], False, "layers",
                                     folder / "out-tiny"), folder, threads)
        out["tiny"] = run["peak_kb"] / 1024
        src = tiny["source"]
        out["tiny_label"] = (f"{src[0]}x{src[1]} -> {tiny['layers'][0]}x{tiny['width']} (vocab {tiny['vocab']}, "
                             f"batch {tiny['batch']} x {tiny['seq']})")
        print(f"tiny grow {out['tiny_label']}: {out['tiny']:.0f} MB", flush=True)
    return out


def memory_rows(size: dict, folder: Path, cases: list[str], threads: int) -> tuple[list[dict], dict]:
    source = source_spec(size)
    src = write_source(size, folder)
    baseline = baselines(size, folder, threads)
    rows = []
    for layers in size["layers"]:
        target = target_of(source, size, layers)
        for variant in VARIANTS:
            shared = variant == "shared"
            if not any(c.startswith(f"{layers}-{variant}-") for c in cases):
                continue
            ops = operator_parameters(source, target, shared)
            floor = (ops * 16 + source.parameter_count() * 4) / 2**20
            for mode in MODES:
                if f"{layers}-{variant}-{mode}" not in cases:
                    continue
                out = folder / f"out-{layers}-{variant}-{mode}"
                measured, wall = child_peak(grow_cmd(size, src, layers, shared, mode, out), folder, threads)
                written = sum(f.stat().st_size for f in out.iterdir()) / 2**20
                subprocess.run(["rm", "-rf", str(out)], check=True)
                peak = measured["peak_kb"] / 1024
                row = {"case": f"{layers}-{variant}-{mode}", "layers": layers, "width": size["width"],
                       "variant": variant, "mode": mode, "target_params": target.parameter_count(),
                       "target_mb": target.parameter_count() * 4 / 2**20, "source_mb": source.parameter_count() * 4
                       / 2**20, "operator": ops, "floor_mb": floor, "peak_mb": peak, "wall_s": wall,
                       "written_mb": written, "phases": phase_summary(measured["phases"]),
                       "raw_phases": measured["phases"]}
                rows.append(row)
                print(f"  {row['case']}: peak {peak:.0f} MB = {peak / row['target_mb']:.2f} x target fp32 "
                      f"({row['target_mb']:.0f} MB), {peak / floor:.2f} x floor ({floor:.0f} MB; operator "
                      f"{ops:,} params), {wall:.0f} s; phases "
                      + ", ".join(f"{k} {v:.0f}" for k, v in row["phases"].items()), flush=True)
    return rows, baseline


def step_ratios(size: dict, threads: int, batch_size: int, dense_too: bool = False, cpu_clock: bool = False,
                shared: bool = False) -> dict:
    """One fitting step / one plain training step of the first target size at ``batch_size`` x seq tokens, streamed
    and full (per-layer width, or ``shared`` width); ``dense_too``: also the earlier path with dense layer weights;
    ``cpu_clock``: this process's CPU time instead of wall time (robust on a loaded machine with 1 thread)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    source = source_spec(size)
    target = target_of(source, size, size["layers"][0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, source.vocab_size, (batch_size, size["seq"]), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    inputs = data_mod.model_inputs(batch)
    op = LigoOperator(source, target, init_weights(source, seed=0), shared_width=shared)
    op_opt = torch.optim.AdamW(op.param_groups(1e-2), eps=1e-6)
    plain = {k: v.requires_grad_(True) for k, v in init_weights(target, seed=1).items()}
    plain_opt = torch.optim.AdamW(plain.values(), lr=1e-4, eps=1e-6)
    models = {"streamed": GrowingModel(op, stream=True), "selective": GrowingModel(op, stream="selective"),
              "full": GrowingModel(op, stream=False)}
    if dense_too:  # the path before layer factors: every grown matrix formed densely (``layer_weights``)
        for name, stream in (("streamed-dense", True), ("full-dense", False)):
            models[name] = (lambda stream: lambda **x: forward(
                target, op.global_weights(factored=True), **x, layer_weights=op.layer_weights, checkpoint=stream,
                lazy_logits=True))(stream)
    clock = time.process_time if cpu_clock else time.perf_counter

    def step(run, opt) -> float:
        start = clock()
        total, count = task_terms(target, run(), batch)
        opt.zero_grad(set_to_none=True)
        (total / count).backward()
        opt.step()
        return clock() - start

    def plain_step():
        return step(lambda: forward(target, plain, **inputs), plain_opt)

    def ligo_step(name):
        return step(lambda: models[name](**inputs), op_opt)

    times = {"plain": [], **{name: [] for name in models}}
    ratios = {name: [] for name in models}
    for i in range(size["pairs"] + 1):  # round 0 warms up
        order = tuple(models) if i % 2 else tuple(reversed(models))
        for name in order:
            p, t = plain_step(), ligo_step(name)  # each LiGO step right after a plain one
            if i:
                times["plain"].append(p)
                times[name].append(t)
                ratios[name].append(t / p)
        print(f"  round {i}{' (warm-up)' if not i else ''}: " + ", ".join(
            f"{k} {v[-1]:.2f} s" for k, v in times.items() if v and i), flush=True)
    return {"plain_s": statistics.median(times["plain"]),
            **{f"{k}_s": statistics.median(times[k]) for k in ratios},
            **{f"{k}_ratio": statistics.median(v) for k, v in ratios.items()},
            **{f"{k}_range": (min(v), max(v)) for k, v in ratios.items()},
            "pairs": size["pairs"], "target": f"{target.layers}x{target.width}",
            "target_params": target.parameter_count(), "operator": op.operator_parameter_count(),
            "batch": batch_size, "seq": size["seq"], "width": VARIANTS[shared],
            "clock": "cpu" if cpu_clock else "wall", "threads": threads}


def verdicts(rows: list[dict]) -> list[str]:
    """One line per target, on the streamed runs (``layers``); the full runs' figures in brackets for contrast."""
    out = []
    by = {(r["layers"], r["variant"], r["mode"]): r for r in rows}

    def note(key, fn):
        r = by.get(key)
        return f" [full: {fn(r):.2f}]" if r else ""

    for r in rows:
        if r["mode"] not in ("layers", "selective"):
            continue
        key = (r["layers"], r["variant"], "full")
        label = r["variant"] + (" (selective)" if r["mode"] == "selective" else "")
        if r["variant"] == "shared":
            ratio = r["peak_mb"] / r["target_mb"]
            out.append(f"{label}, {r['layers']} layers: peak / target fp32 = {ratio:.2f} (target <= {TARGET_SHARED}: "
                       f"{'pass' if ratio <= TARGET_SHARED else 'FAIL'})"
                       + note(key, lambda x: x["peak_mb"] / x["target_mb"]))
        else:
            ratio = r["peak_mb"] / r["floor_mb"]
            out.append(f"{label}, {r['layers']} layers: peak / floor = {ratio:.2f} (target <= {TARGET_FLOOR}: "
                       f"{'pass' if ratio <= TARGET_FLOOR else 'FAIL'})"
                       + note(key, lambda x: x["peak_mb"] / x["floor_mb"]))
    counts = sorted({r["layers"] for r in rows})
    if len(counts) == 2:
        lo, hi = counts
        for variant in VARIANTS:
            growth = {}
            for mode in MODES:
                a, b = by.get((lo, variant, mode)), by.get((hi, variant, mode))
                if a and b:
                    growth[mode] = (b["peak_mb"] - a["peak_mb"] - (b["floor_mb"] - a["floor_mb"])) / a["peak_mb"]
            for mode in ("layers", "selective"):
                if mode not in growth:
                    continue
                g = growth[mode]
                formula = GROWTH_FORMULA.replace("24", str(hi)).replace("12", str(lo))
                out.append(f"{variant}{' (selective)' if mode == 'selective' else ''}, {lo} -> {hi} layers: "
                           f"{formula} = {g:+.3f} (target <= {TARGET_GROWTH}: {'pass' if g <= TARGET_GROWTH else 'FAIL'})"
                           + (f" [full: {growth['full']:+.3f}]" if "full" in growth else ""))
    return out


def step_line(s: dict) -> str:
    return (f"fitting step / plain step ({s['target']}, batch {s['batch']} x {s['seq']}, "
            f"{s.get('width', 'per-layer')} operator, median of {s['pairs']} pairs): streamed {s['streamed_ratio']:.2f} ({s['streamed_s']:.2f} s vs "
            f"{s['plain_s']:.2f} s; pairs {s['streamed_range'][0]:.2f}-{s['streamed_range'][1]:.2f}), full "
            f"{s['full_ratio']:.2f} ({s['full_s']:.2f} s; pairs {s['full_range'][0]:.2f}-{s['full_range'][1]:.2f}); "
            f"target <= {TARGET_STEP} with checkpointing (the better of streamed and selective): "
            f"{'pass' if min(s['streamed_ratio'], s.get('selective_ratio', math.inf)) <= TARGET_STEP else 'FAIL'}"
            + "".join(f"; {k} {s[k + '_ratio']:.2f} ({s[k + '_s']:.2f} s)" for k in ("selective", "streamed-dense",
                                                                                      "full-dense")
                      if k + "_ratio" in s) + f" [{s['threads']} thread(s), {s['clock']} time]")


def markdown(size, rows, baseline, steps, lines, command, threads, wall) -> str:
    src = size["source"]
    md = ["# Fitting at scale (CPU)", "", "    " + command, "",
          f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, Python {platform.python_version()}, "
          f"{threads} threads (OMP_NUM_THREADS={threads} in every child); the project's 2-core CPU VM (24 GB), "
          f"shared with other jobs while measuring (times vary, memory does not). Whole run {wall / 60:.0f} min.", "",
          f"GPT-2 source {src[0]}x{src[1]} ({src[2]} heads, MLP {src[3]}, vocab {size['vocab']}, "
          f"{size['positions']} positions, random weights) grown to {size['width']} wide ({size['heads']} heads, "
          f"MLP {size['mlp']}). Each row is one fresh `python -m ligo_convert grow SRC --layers L --width "
          f"{size['width']} --heads {size['heads']} --mlp {size['mlp']} --steps {FIT_STEPS} --batch-size "
          f"{size['batch']} --seq-len {size['seq']} --device cpu --materialize MODE [--shared-width]` process "
          f"(fitting, validation before and after on 8 batches, writing the safetensors); its peak RSS is its own "
          f"`VmHWM`.", ""]
    if baseline:
        md += [f"Fixed costs inside every peak below (not in the floor): a process that only runs `{IMPORT_ONLY}` "
               f"peaks at **{baseline['import']:.0f} MB**"
               + (f"; a whole grow of a tiny model ({baseline['tiny_label']}, same command) at "
                  f"**{baseline['tiny']:.0f} MB** (the kernels a fitting step runs are file-backed pages of "
                  f"libtorch that count in RSS once touched)" if "tiny" in baseline else "") + ".", ""]
    if rows:
        md += ["| target (fp32 MB) | width | materialize | operator params | floor MB | peak RSS MB | "
               "peak / target fp32 | peak / floor | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['layers']}x{r['width']} ({r['target_mb']:.0f}) | {r['variant']} | {r['mode']} | "
                      f"{r['operator']:,} | {r['floor_mb']:.0f} | {r['peak_mb']:.0f} | "
                      f"{r['peak_mb'] / r['target_mb']:.2f} | {r['peak_mb'] / r['floor_mb']:.2f} | "
                      f"{r['wall_s']:.0f} |")
        md += ["", "Floor: operator parameters x 16 bytes (fp32 value, gradient, two AdamW moments) + the source's "
               f"fp32 bytes ({rows[0]['source_mb']:.0f} MB).", "",
               "Where the peak is reached: each phase's own peak RSS in MB (the process's high-water mark reset at "
               "each phase boundary, so a phase's figure includes what earlier phases still hold) and, in brackets, "
               "how far it rose above the RSS the phase started with. `other`: planning, reading the data and the "
               "gaps between the steps.", ""]
        names = [n for n in ("start-up", "initialise", "validate #1", "fit", "validate #2", "write", "other")
                 if any(n in r["phases"] for r in rows)]
        md += ["| case | " + " | ".join(names) + " | file-backed RSS after fit |", "|---" * (len(names) + 2) + "|"]
        for r in rows:
            rise = {}
            for p in r["raw_phases"]:
                name = "other" if p["phase"].startswith("after ") else p["phase"]
                rise[name] = max(rise.get(name, 0.0), (p["peak_kb"] - p["start_kb"]) / 1024)
            after_fit = next((p for p in r["raw_phases"] if p["phase"] == "fit"), {})
            file_mb = f"{after_fit['end_file_kb'] / 1024:.0f}" if after_fit.get("end_file_kb") else "–"
            md.append(f"| {r['case']} | " + " | ".join(
                f"{r['phases'][n]:.0f} (+{rise[n]:.0f})" if n in r["phases"] else "–" for n in names)
                + f" | {file_mb} |")
        md += ["", "Against the targets (streamed runs, `--materialize layers`; the full runs in brackets):", "",
               f"Growth with depth: `{GROWTH_FORMULA}` — the peak's increase from 12 to 24 target layers, less the "
               f"increase of the floor (the operator's own size with its gradient and AdamW state), relative to the "
               f"12-layer peak.", ""] + [f"- {line}" for line in lines] + [""]
    md += step_markdown(steps)
    return "\n".join(md)


# selective and full apply shared expansions to the source matrices once per step where cheaper
# (LigoOperator.expanded_sources); streamed makes every product inside its layer
STEP_LABELS = (("streamed", "streamed (`stream=True`, checkpointed)"),
               ("selective", "streamed, products kept (`stream=\"selective\"`)"), ("full", "full (`stream=False`)"),
               ("streamed-dense", "streamed, dense layer weights (before)"),
               ("full-dense", "full, dense layer weights (before)"))


def step_markdown(steps: list[dict], title: str = "## One fitting step / one plain training step") -> list[str]:
    if not steps:
        return []
    s0 = steps[0]
    md = [title, "",
          f"The {s0['target']} target ({s0['target_params']:,} parameters), causal LM loss on random tokens; LiGO: "
          f"`GrowingModel(op, stream)` with the {s0.get('width', 'per-layer')} operator ({s0['operator']:,} "
          f"parameters), `task_terms`, "
          f"backward, AdamW on the operator; plain: `forward(target, weights)`, the same loss, backward, AdamW on the "
          f"weights. One process, each LiGO step right after a plain step, median of {s0['pairs']} pair ratios after "
          f"a warm-up round; {s0.get('threads', 2)} thread(s), {s0.get('clock', 'wall')} time.", "",
          "| batch (tokens) | LiGO step | LiGO s | plain s | ratio (median) | pairs min - max | target <= "
          f"{TARGET_STEP} |", "|---|---|---|---|---|---|---|"]
    for st in steps:
        for k, label in STEP_LABELS:
            if k + "_ratio" not in st:
                continue
            verdict = ("pass" if st[k + "_ratio"] <= TARGET_STEP else "FAIL") if k in ("streamed", "selective") \
                else "–"
            md.append(f"| {st['batch']} x {st['seq']} ({st['batch'] * st['seq']}) | {label} | {st[k + '_s']:.2f} | "
                      f"{st['plain_s']:.2f} | **{st[k + '_ratio']:.2f}** | {st[k + '_range'][0]:.2f} - "
                      f"{st[k + '_range'][1]:.2f} | {verdict} |")
    return md + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (~30 s; what the test runs)")
    parser.add_argument("--cases", default="*", help="comma-separated fnmatch patterns over the case names "
                        "(default: all); e.g. '12-*,step-ratio' or '*-layers'")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--threads", type=int, help="torch / OpenMP threads [default: 2; 1 with --quick]")
    parser.add_argument("--pairs", type=int, help="step-ratio pairs to time after the warm-up [default: 5; 2 quick]")
    parser.add_argument("--step-batches", help="batch sizes (comma-separated) of the step-ratio case "
                        "[default: 4; 2 quick]; the sequence length stays 128 (32 quick)")
    parser.add_argument("--dense-too", action="store_true", help="step-ratio: also time the path with dense layer "
                        "weights (before layer factors), side by side")
    parser.add_argument("--step-width", choices=VARIANTS, default="per-layer", help="step-ratio: the operator's "
                        "width variant [default: per-layer]")
    parser.add_argument("--cpu-clock", action="store_true", help="step-ratio: time by this process's CPU time "
                        "(use with --threads 1 on a loaded machine)")
    parser.add_argument("--markdown", type=Path, help="write the results (with this command at the top) here")
    parser.add_argument("--append", action="store_true", help="append to --markdown as a section of its own "
                        "(with this command) instead of replacing it")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    size = dict(SIZES["quick" if args.quick else "default"])
    if args.pairs:
        size["pairs"] = args.pairs
    threads = args.threads or size["threads"]
    names = case_names(size)
    if args.list:
        print("\n".join(names))
        return
    cases = pick(names, args.cases)
    command = "python benchmarks/fit_scale.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    start = time.perf_counter()
    rows, baseline, steps = [], {}, []
    grow_cases = [c for c in cases if c != "step-ratio"]
    if grow_cases:
        with tempfile.TemporaryDirectory(prefix="fit-scale-") as tmp:
            print(f"peak RSS of grow ({len(grow_cases)} runs, OMP_NUM_THREADS={threads}):", flush=True)
            rows, baseline = memory_rows(size, Path(tmp), grow_cases, threads)
    lines = verdicts(rows)
    for line in lines:
        print(line)
    if "step-ratio" in cases:
        print("one fitting step vs one plain training step:", flush=True)
        batches = [int(b) for b in (args.step_batches or str(size["batch"])).split(",") if b]
        for b in batches:
            steps.append(step_ratios(size, threads, b, args.dense_too, args.cpu_clock, args.step_width == "shared"))
            print(step_line(steps[-1]), flush=True)
    wall = time.perf_counter() - start
    print(f"total {wall:.0f} s")
    if args.markdown and args.append:
        added = [f"## Added {time.strftime('%Y-%m-%d %H:%M')}", "", "    " + command.strip(), "",
                 f"{threads} threads; whole run {wall / 60:.0f} min.", ""]
        if rows:
            added += [markdown(size, rows, baseline, [], lines, command.strip(), threads, wall).split("\n", 4)[4]]
        added += step_markdown(steps, "### One fitting step / one plain training step")
        with args.markdown.open("a") as f:
            f.write("\n" + "\n".join(added))
    elif args.markdown:
        args.markdown.write_text(markdown(size, rows, baseline, steps, lines, command.strip(), threads, wall))
    if args.json:
        args.json.write_text(json.dumps({"size": size, "rows": rows, "baseline_mb": baseline, "steps": steps},
                                        indent=2))


if __name__ == "__main__":
    main()
