"""What is resident at the peak of a streamed fitting step: torch.profiler's memory categories, and the runtime.

``fit_scale.py`` measures the peak RSS of a whole ``grow``; this script says what it is made of.  It builds the
12x1024 GPT-2 target of ``fit_scale.py`` from the 6x512 source (random weights, vocab 50257), runs one fitting
step with ``--materialize layers`` streaming (``GrowingModel(op, stream=True)``, AdamW on the operator), then
profiles the second step (``torch.profiler`` with ``profile_memory``) and reports, at the moment the live tensors
peak: their total by category (the source is the profiler's INPUT, the operator PARAMETER, the AdamW moments
OPTIMIZER_STATE, gradients and autograd's buffers GRADIENT / AUTOGRAD_DETAIL, the recomputed layer ACTIVATION) and
the largest live tensors.  Beside it, the process's fixed cost: RSS after ``import torch`` and after
``torch._dynamo`` (which the first ``torch.utils.checkpoint`` call or ``AdamW`` construction imports).

    python benchmarks/fit_memory.py                      # shared width, ~2 min on one thread
    python benchmarks/fit_memory.py --width per-layer
    python benchmarks/fit_memory.py --quick --json F     # tiny sizes (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import fit_scale  # noqa: E402
from ligo_convert import data as data_mod  # noqa: E402
from ligo_convert import init_weights  # noqa: E402
from ligo_convert.growth.fit import GrowingModel  # noqa: E402
from ligo_convert.growth.operator import LigoOperator  # noqa: E402
from ligo_convert.objectives import task_terms  # noqa: E402

MB = 2**20


def rss_after(code: str) -> float:
    """Peak RSS (MB) of a fresh one-thread process that runs ``code``."""
    probe = code + "\nimport re; print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def profiled_step(size: dict, layers: int, shared: bool):
    """The profiler of the second streamed fitting step (the first creates the AdamW state and the gradients)."""
    source = fit_scale.source_spec(size)
    target = fit_scale.target_of(source, size, layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, source.vocab_size, (size["batch"], size["seq"]), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    op = LigoOperator(source, target, init_weights(source, seed=0), shared_width=shared)
    opt = torch.optim.AdamW(op.param_groups(1e-2), eps=1e-6)
    model = GrowingModel(op, stream=True)

    def step():
        total, count = task_terms(target, model(**data_mod.model_inputs(batch)), batch)
        opt.zero_grad(set_to_none=True)
        (total / count).backward()
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:  # the memory profile needs shapes and stacks
        step()
    return prof, target, op


def tensors_at_peak(prof) -> tuple[float, list[tuple[int, str]]]:
    """(peak MB of live tensors, [(bytes, category)] of the tensors live then), from the profiler's memory
    timeline (the bookkeeping behind ``export_memory_timeline``, which gives only the totals)."""
    from torch.profiler._memory_profiler import Action

    memory = prof._memory_profile()
    live, total, peak, at_peak = {}, 0, 0, {}
    for _, action, (key, _version), size in memory.timeline:
        if action in (Action.CREATE, Action.PREEXISTING):
            total += size - live.get(key, 0)  # a key seen again replaces its earlier size
            live[key] = size
        elif action == Action.DESTROY:
            total -= live.pop(key, 0)
        if total > peak:
            peak, at_peak = total, dict(live)
    cats = memory._categories
    rows = [(size, getattr(cats.get(key, 0), "name", None) or "UNKNOWN") for key, size in at_peak.items()]
    return peak / MB, sorted(rows, reverse=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", choices=("shared", "per-layer"), default="shared")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--top", type=int, default=12, help="how many of the largest live tensors to list")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    size = fit_scale.SIZES["quick" if args.quick else "default"]
    layers = size["layers"][0] if args.quick else args.layers
    runtime = {"import torch": rss_after("import torch"),
               "+ torch._dynamo": rss_after("import torch, torch._dynamo")}
    prof, target, op = profiled_step(size, layers, args.width == "shared")
    peak, rows = tensors_at_peak(prof)
    by_cat: dict[str, float] = {}
    for nbytes, cat in rows:
        by_cat[cat] = by_cat.get(cat, 0.0) + nbytes / MB
    src = size["source"]
    print(f"{src[0]}x{src[1]} -> {layers}x{size['width']} (vocab {size['vocab']}), {args.width} width, batch "
          f"{size['batch']} x {size['seq']}, streamed (`layers`); target fp32 {target.parameter_count() * 4 / MB:.0f} "
          f"MB, operator {op.operator_parameter_count():,} parameters")
    print("\n| runtime (fresh process, peak RSS) | MB |\n|---|---:|")
    for name, mb in runtime.items():
        print(f"| {name} | {mb:.0f} |")
    print(f"\nLive tensors at their peak in the second fitting step: **{peak:.0f} MB**\n")
    print("| category | MB |\n|---|---:|")
    for cat, mb in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {mb:.1f} |")
    print(f"\nThe {args.top} largest: " + ", ".join(f"{n / MB:.1f} MB {c}" for n, c in rows[:args.top]))
    if args.json:
        args.json.write_text(json.dumps({"runtime_mb": runtime, "peak_tensors_mb": peak, "by_category_mb": by_cat,
                                         "operator_parameters": op.operator_parameter_count(),
                                         "source_parameters": op.source.parameter_count(),
                                         "target_parameters": target.parameter_count()}, indent=1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024
    print(f"\nPeak RSS of this process, the profiler's own records included: {hwm:.0f} MB")


if __name__ == "__main__":
    main()
