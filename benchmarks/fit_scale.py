"""Fitting at scale on this CPU: peak memory of a whole ``grow`` and the cost of a streamed fitting step.

1. Peak RSS of ``ligo-convert grow`` (2 fitting steps at batch 4 x 128 + validation + writing), each run a fresh
   process, divided by the target's fp32 bytes; GPT-2 6x512 -> 12x1024 and -> 24x1024 (random source weights, vocab
   50257), per-layer and shared width, streamed (``--materialize layers``) and full.  Also the "floor" of a run: the
   operator with its gradient and two AdamW moments (16 bytes a parameter) plus the source's fp32 bytes, and the RSS
   of a process that only imports torch and ligo_convert (the fixed cost every run pays).
   Targets (issue 11): shared width peak / target <= 1.0; per-layer peak <= 1.5 x floor; from 12 to 24 target layers
   the peak grows <= 25 % beyond what the floor adds: (peak24 - peak12 - (floor24 - floor12)) / peak12 <= 0.25.
2. One fitting step / one plain training step of the target (forward, backward, AdamW on its weights) at the same
   batch, streamed and full, timed alternately in one process (median of the pairs after a warm-up pair).
   Target: <= 1.5 streamed.

    python benchmarks/fit_scale.py --markdown benchmarks/results/fit_scale.md
    python benchmarks/fit_scale.py --quick        # tiny sizes, seconds (the test runs this)
"""

from __future__ import annotations

import argparse
import json
import os
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

THREADS = 2
SIZES = {  # source (layers, width, heads, mlp), target widths, target layer counts, vocab, batch, seq
    "default": dict(source=(6, 512, 8, 2048), width=1024, heads=16, mlp=4096, layers=(12, 24), vocab=50257,
                    positions=1024, batch=4, seq=128, pairs=3),
    "quick": dict(source=(2, 64, 4, 128), width=128, heads=8, mlp=256, layers=(4, 8), vocab=2000, positions=128,
                  batch=2, seq=32, pairs=1),
}


def source_spec(size: dict):
    layers, width, heads, mlp = size["source"]
    return micro_spec("hf-gpt2", layers=layers, width=width, heads=heads, mlp=mlp, vocab_size=size["vocab"],
                      max_positions=size["positions"])


def target_of(source, size: dict, layers: int):
    return source.replace(layers=layers, width=size["width"], heads=size["heads"], kv_heads=size["heads"],
                          mlp=size["mlp"])


def operator_parameters(source, target, shared: bool) -> int:
    return LigoOperator(source, target, _zeros(source), shared_width=shared).operator_parameter_count()


def _zeros(spec) -> dict:
    return {n: torch.zeros(spec.shape_of(n)) for n in spec.tensor_names()}


# Runs a module as __main__ and, at exit, writes its peak RSS (VmHWM) to a file.  VmHWM belongs to the process's
# own address space, which exec starts afresh; the ru_maxrss that wait4 reports would also count the pages the child
# shared with this (large) benchmark process between fork and exec.
_PEAK_WRAPPER = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(out, "w").write(line.split()[1])
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def child_peak_mb(module_args: list[str], folder: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of ``python -m MODULE ARGS`` in a fresh process; raises with its stderr if it
    fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(ROOT)}
    peak_file = folder / "peak.kb"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, str(peak_file), *module_args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(module_args)} failed:\n{done.stderr[-2000:]}")
    return int(peak_file.read_text()) / 1024, time.perf_counter() - start


def memory_rows(size: dict, folder: Path, modes: list[str]) -> tuple[list[dict], float]:
    source = source_spec(size)
    src = folder / "source"
    save(from_tensors(source, init_weights(source, seed=0), family="hf-gpt2"), src, overwrite=True)
    baseline, _ = child_peak_mb(["ligo_convert", "--version"], folder)  # imports torch and the package
    rows = []
    for layers in size["layers"]:
        target = target_of(source, size, layers)
        for shared in (False, True):
            ops = operator_parameters(source, target, shared)
            floor = (ops * 16 + source.parameter_count() * 4) / 2**20
            for mode in modes:
                out = folder / f"out-{layers}-{shared}-{mode}"
                cmd = ["ligo_convert", "grow", str(src), "--layers", str(layers), "--width",
                       str(size["width"]), "--heads", str(size["heads"]), "--mlp", str(size["mlp"]), "--steps", "2",
                       "--batch-size", str(size["batch"]), "--seq-len", str(size["seq"]), "--device", "cpu",
                       "--materialize", mode, "--out", str(out)] + (["--shared-width"] if shared else [])
                peak, wall = child_peak_mb(cmd, folder)
                rows.append({"layers": layers, "variant": "shared" if shared else "per-layer", "mode": mode,
                             "target_mb": target.parameter_count() * 4 / 2**20, "operator": ops, "floor_mb": floor,
                             "peak_mb": peak, "wall_s": wall})
                print(f"  {layers} layers, {rows[-1]['variant']}, {mode}: peak {peak:.0f} MB "
                      f"({peak / rows[-1]['target_mb']:.2f} x target, {peak / floor:.2f} x floor), {wall:.0f} s",
                      flush=True)
    return rows, baseline


def step_ratios(size: dict) -> dict:
    """Median (LiGO step / plain step) for streamed and full fitting at the first target size."""
    torch.set_num_threads(THREADS)
    source = source_spec(size)
    target = target_of(source, size, size["layers"][0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(source.vocab_size - 2, (size["batch"], size["seq"]), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    inputs = data_mod.model_inputs(batch)
    op = LigoOperator(source, target, init_weights(source, seed=0))
    op_opt = torch.optim.AdamW(op.param_groups(1e-2), eps=1e-6)
    plain = {k: v.requires_grad_(True) for k, v in init_weights(target, seed=1).items()}
    plain_opt = torch.optim.AdamW(plain.values(), lr=1e-4, eps=1e-6)

    def step(run, opt):
        start = time.perf_counter()
        total, count = task_terms(target, run(), batch)
        opt.zero_grad(set_to_none=True)
        (total / count).backward()
        opt.step()
        return time.perf_counter() - start

    runs = {"plain": (lambda: forward(target, plain, **inputs), plain_opt),
            "streamed": (lambda: GrowingModel(op, stream=True)(**inputs), op_opt),
            "full": (lambda: GrowingModel(op, stream=False)(**inputs), op_opt)}
    times = {k: [] for k in runs}
    for i in range(size["pairs"] + 1):  # the first round warms up
        for name in ("plain", "streamed", "plain", "full"):  # each LiGO step right after a plain one
            t = step(*runs[name])
            if i:
                times[name].append(t)
    plain_t = statistics.median(times["plain"])
    return {"plain_s": plain_t, **{f"{k}_s": statistics.median(times[k]) for k in ("streamed", "full")},
            **{f"{k}_ratio": statistics.median(times[k]) / plain_t for k in ("streamed", "full")},
            "target_params": target.parameter_count(), "batch": size["batch"], "seq": size["seq"]}


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    by = {(r["layers"], r["variant"], r["mode"]): r for r in rows}
    l12, l24 = sorted({r["layers"] for r in rows})
    for r in rows:
        if r["mode"] != "layers":
            continue
        if r["variant"] == "shared":
            ratio = r["peak_mb"] / r["target_mb"]
            out.append(f"shared, {r['layers']} layers: peak / target {ratio:.2f} (target <= 1.0: "
                       f"{'pass' if ratio <= 1.0 else 'FAIL'})")
        else:
            ratio = r["peak_mb"] / r["floor_mb"]
            out.append(f"per-layer, {r['layers']} layers: peak / floor {ratio:.2f} (target <= 1.5: "
                       f"{'pass' if ratio <= 1.5 else 'FAIL'})")
    for variant in ("per-layer", "shared"):
        a, b = by.get((l12, variant, "layers")), by.get((l24, variant, "layers"))
        if a and b:
            growth = (b["peak_mb"] - a["peak_mb"] - (b["floor_mb"] - a["floor_mb"])) / a["peak_mb"]
            out.append(f"{variant}, {l12} -> {l24} layers: (peak24 - peak12 - (floor24 - floor12)) / peak12 = "
                       f"{growth:+.3f} (target <= 0.25: {'pass' if growth <= 0.25 else 'FAIL'})")
    return out


def markdown(rows, baseline, ratios, lines, command) -> str:
    md = [f"# Fitting at scale (CPU)\n", f"    {command}\n",
          f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {THREADS} threads, the project's 2-core CPU VM "
          f"(shared). GPT-2 with random source weights, vocab 50257; `grow` with 2 fitting steps at batch 4 x 128, "
          f"validation (8 batches) and writing; each run a fresh process, its peak RSS read from its own `VmHWM` at exit.\n",
          f"A process that only imports torch and ligo_convert peaks at **{baseline:.0f} MB**: a fixed cost inside "
          f"every figure below.\n",
          "| target | width | materialize | operator params | floor MB | peak RSS MB | peak / target fp32 | "
          "peak / floor | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['layers']}x1024 ({r['target_mb']:.0f} MB) | {r['variant']} | {r['mode']} | "
                  f"{r['operator']:,} | {r['floor_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] / r['target_mb']:.2f} | {r['peak_mb'] / r['floor_mb']:.2f} | {r['wall_s']:.0f} |")
    md += ["", "Floor: operator parameters x 16 bytes (fp32 value, gradient, two AdamW moments) + the source's fp32 "
           "bytes.", "", "Against the targets (streamed runs):", ""] + [f"- {line}" for line in lines]
    md += ["", f"One fitting step / one plain training step of the {ratios['target_params']:,}-parameter target at "
           f"batch {ratios['batch']} x {ratios['seq']} (median of alternated pairs): streamed (checkpointed) "
           f"**{ratios['streamed_ratio']:.2f}** ({ratios['streamed_s']:.2f} s / {ratios['plain_s']:.2f} s), full "
           f"{ratios['full_ratio']:.2f} (target <= 1.5 streamed: "
           f"{'pass' if ratios['streamed_ratio'] <= 1.5 else 'FAIL'}).", ""]
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--modes", default="layers,full", help="--materialize modes to measure")
    parser.add_argument("--markdown", type=Path, help="write the results table here")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "default"]
    with tempfile.TemporaryDirectory(prefix="fit-scale-") as tmp:
        print("peak RSS of grow:", flush=True)
        rows, baseline = memory_rows(size, Path(tmp), args.modes.split(","))
    print(f"import-only process: {baseline:.0f} MB")
    lines = verdicts(rows)
    for line in lines:
        print(line)
    ratios = step_ratios(size)
    print(f"fitting step / plain step: streamed {ratios['streamed_ratio']:.2f}, full {ratios['full_ratio']:.2f} "
          f"(target <= 1.5 streamed)")
    command = "python benchmarks/fit_scale.py" + (" --quick" if args.quick else "") + \
        (f" --modes {args.modes}" if args.modes != "layers,full" else "") + \
        (f" --markdown {args.markdown}" if args.markdown else "")
    if args.markdown:
        args.markdown.write_text(markdown(rows, baseline, ratios, lines, command))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "baseline_mb": baseline, "steps": ratios}, indent=2))


if __name__ == "__main__":
    main()
