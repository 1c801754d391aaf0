"""The GPU check: LiGO fitting at real sizes on one GPU, in one command (<= 8 minutes on an H100/H200-class GPU).

Sections (each appends its figures to the markdown as soon as it finishes; one failing does not lose the others):

1. ViT-S -> ViT-B sizes (12x384, 6 heads -> 12x768, 12 heads; 224 px, patch 16, 1000 classes), 100 fitting steps at
   batch 64, bf16 autocast: wall time, peak GPU memory, one fitting step / one plain training step of the target.
2. GPT-2 small -> medium sizes (12x768 -> 24x1024, heads 12 -> 16, vocab 50257), 100 steps at batch 16 x 128: same.
3. A LLaMA-style 1B-shaped source (16x2048, 32 heads of 64, 8 kv heads, MLP 8192, vocab 128256) -> a 3B-shaped target
   (28x3072, 48 heads of 64, 8 kv heads): 3 streamed steps at batch 4 x 512, peak memory with the shared-width and
   the per-layer operator.
4. onnxruntime-gpu: a grown micro model exported and validated on the CUDA execution provider.

Run (on the GPU machine, from the repository root):

    pip uninstall -y onnxruntime && pip install -e ".[gpu]"
    python benchmarks/gpu_check.py                     # writes benchmarks/results/gpu_check.md

``--device cpu --quick`` runs every section at tiny sizes on the CPU in about a minute (the test does).
Source weights are random: this measures time and memory, not quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ligo_convert import Spec, forward  # noqa: E402
from ligo_convert import data as data_mod  # noqa: E402
from ligo_convert.growth.fit import GrowingModel, autocast, fit  # noqa: E402
from ligo_convert.growth.operator import LigoOperator  # noqa: E402
from ligo_convert.objectives import task_terms  # noqa: E402

VIT_S = Spec(layers=12, width=384, heads=6, head_dim=64, mlp=1536, input="patches", image_size=224, patch_size=16,
             num_channels=3, cls_token=True, head="classifier", num_classes=1000, norm_eps=1e-12)
GPT2_S = Spec(layers=12, width=768, heads=12, head_dim=64, mlp=3072, vocab_size=50257, max_positions=1024,
              causal=True, head="lm", tie_embeddings=True, norm_eps=1e-5, activation="gelu_tanh")
LLAMA_1B = Spec(layers=16, width=2048, heads=32, head_dim=64, kv_heads=8, mlp=8192, vocab_size=128256,
                positions="rotary", rope_theta=500000.0, norm="rmsnorm", norm_eps=1e-5, gated_mlp=True,
                activation="silu", qkv_bias=False, o_bias=False, mlp_bias=False, causal=True, head="lm",
                tie_embeddings=True)

FULL = {
    "vit": dict(source=VIT_S, target=dict(layers=12, width=768, heads=12, kv_heads=12, mlp=3072), batch=64, seq=0,
                steps=100),
    "gpt2": dict(source=GPT2_S, target=dict(layers=24, width=1024, heads=16, kv_heads=16, mlp=4096), batch=16,
                 seq=128, steps=100),
    "llama": dict(source=LLAMA_1B, target=dict(layers=28, width=3072, heads=48, kv_heads=8, mlp=8192), batch=4,
                  seq=512, steps=3),
}
QUICK = {
    "vit": dict(source=VIT_S.replace(layers=2, width=32, heads=2, kv_heads=2, head_dim=16, mlp=64, image_size=32,
                                     num_classes=10),
                target=dict(layers=3, width=64, heads=4, kv_heads=4, mlp=128), batch=4, seq=0, steps=3),
    "gpt2": dict(source=GPT2_S.replace(layers=2, width=32, heads=2, kv_heads=2, head_dim=16, mlp=64, vocab_size=500,
                                       max_positions=64),
                 target=dict(layers=4, width=64, heads=4, kv_heads=4, mlp=128), batch=2, seq=16, steps=3),
    "llama": dict(source=LLAMA_1B.replace(layers=2, width=64, heads=4, head_dim=16, kv_heads=2, mlp=96,
                                          vocab_size=600),
                  target=dict(layers=3, width=96, heads=6, kv_heads=2, mlp=96), batch=2, seq=16, steps=2),
}


def random_weights(spec: Spec, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name in spec.tensor_names():
        shape = spec.shape_of(name)
        if "norm" in name:
            out[name] = torch.ones(shape, device=device)
        else:
            out[name] = torch.randn(shape, device=device, generator=g) * 0.02
    return out


def synthetic_batch(spec: Spec, batch: int, seq: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    if spec.input == "patches":
        return {"pixel_values": torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g).to(device),
                "labels": torch.randint(spec.num_classes, (batch,), generator=g).to(device)}
    ids = torch.randint(spec.vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def step_ratio(op, target: Spec, batch: dict, device, stream: bool, pairs: int = 3):
    """(LiGO step s, plain step s, median pair ratio, plain step peak GiB or None): one fitting step vs one plain
    training step of the target (forward, backward, AdamW on its weights), same batch, alternated."""
    inputs = data_mod.model_inputs(batch)
    op_opt = torch.optim.AdamW(op.param_groups(1e-2), eps=1e-6)
    before_plain = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    plain = {k: v.requires_grad_(True) for k, v in random_weights(target, device).items()}
    plain_opt = torch.optim.AdamW(plain.values(), lr=1e-4, eps=1e-6)

    def step(run, opt) -> float:
        sync(device)
        start = time.perf_counter()
        with autocast(device):
            total, count = task_terms(target, run(), batch)
        opt.zero_grad(set_to_none=True)
        (total.float() / count).backward()
        opt.step()
        sync(device)
        return time.perf_counter() - start

    ligo = (lambda: GrowingModel(op, stream)(**inputs), op_opt)
    base = (lambda: forward(target, plain, **inputs), plain_opt)
    times = {"ligo": [], "plain": [], "ratio": []}
    for i in range(pairs + 1):  # the first pair warms up
        a, b = step(*ligo), step(*base)
        if i:
            times["ligo"].append(a)
            times["plain"].append(b)
            times["ratio"].append(a / b)
    plain_peak = None
    if device.type == "cuda":  # the plain step's own footprint: its weights, AdamW state, gradients, activations
        op_opt.zero_grad(set_to_none=True)
        op_opt.state.clear()  # what is left allocated besides the plain model is what was there before it
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step(*base)
        plain_peak = (torch.cuda.max_memory_allocated() - before_plain) / 2**30
    del plain, plain_opt, op_opt
    op.zero_grad(set_to_none=True)
    return (statistics.median(times["ligo"]), statistics.median(times["plain"]), statistics.median(times["ratio"]),
            plain_peak)


def fit_section(name: str, cfg: dict, device, stream: bool, shared: bool = False, ratio: bool = True) -> str:
    source = cfg["source"]
    target = source.replace(**cfg["target"])
    op = LigoOperator(source, target, random_weights(source, device), shared_width=shared).to(device)
    if device.type == "cuda":
        op.cast_source(torch.bfloat16)  # as grow does: the frozen source in bf16, the operator in fp32
    batch = synthetic_batch(target, cfg["batch"], cfg["seq"], device)
    batches = iter(lambda: batch, None)
    reset_peak(device)  # the fit's own peak (not the fp32 source weights the operator was built from)
    sync(device)
    start = time.perf_counter()
    result = fit(op, target, batches, "task", steps=cfg["steps"], lr=1e-2, device=device, stream=stream)
    sync(device)
    wall = time.perf_counter() - start
    peak = peak_gib(device)
    params = target.parameter_count()
    line = (f"| {name} | {source.layers}x{source.width} -> {target.layers}x{target.width} "
            f"({params / 1e6:.1f} M; fp32 {params * 4 / 2**30:.2f} GiB) | {'shared' if shared else 'per-layer'} "
            f"({op.operator_parameter_count() / 1e6:.1f} M) | {'layers' if stream else 'full'} | "
            f"{cfg['batch']}{' x ' + str(cfg['seq']) if cfg['seq'] else ''} | {cfg['steps']} | {wall:.3g} | "
            f"{f'{peak:.2f}' if peak is not None else 'n/a (CPU)'} | ")
    if ratio:
        a, b, r, plain_peak = step_ratio(op, target, batch, device, stream)
        line += (f"{r:.2f} ({a * 1e3:.0f} / {b * 1e3:.0f} ms) | "
                 f"{f'{plain_peak:.2f}' if plain_peak is not None else 'n/a (CPU)'} |")
    else:
        line += f"– | – (would hold >= {params * 16 / 2**30:.0f} GiB: fp32 weights, gradients, AdamW) |"
    print(line, f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}", flush=True)
    del op
    return line


def onnx_section(device, quick: bool) -> str:
    import onnxruntime as ort

    from ligo_convert import from_tensors, init_weights, save
    from ligo_convert.export import export_onnx
    from ligo_convert.grow import grow
    from ligo_convert.growth.pretrain import micro_spec

    have_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    with tempfile.TemporaryDirectory() as tmp:
        spec = micro_spec("hf-vit")
        save(from_tensors(spec, init_weights(spec, seed=0), family="hf-vit"), Path(tmp) / "src")
        grow(Path(tmp) / "src", layers=4, width=128, steps=2 if quick else 20, device=device.type,
             out=Path(tmp) / "grown")
        report = export_onnx(Path(tmp) / "grown", Path(tmp) / "grown.onnx")
    checks = report.to_dict()["checks"]
    used = {c["provider"] for c in checks}
    if not have_cuda:
        note = " — onnxruntime-gpu is not installed (no CUDAExecutionProvider): validated on the CPU provider only"
    elif "CUDAExecutionProvider" not in used:
        note = " — CUDAExecutionProvider is listed but was not used (no CUDA device for torch?)"
    else:
        note = " — on the CUDA execution provider"
    shapes = ", ".join(f"{c['provider']} {list(c['shapes'].values())[0]}" for c in checks)
    return (f"onnxruntime {ort.__version__}{note}: {'valid' if report.ok else 'INVALID'}, max abs diff "
            f"{report.to_dict()['max_diff']:.2e} over {len(checks)} runs ({shapes}); export "
            f"{report.to_dict()['export_seconds']:.1f} s")


def header(device, command: str) -> str:
    try:
        import onnxruntime as ort

        ort_version = f"{ort.__version__} (providers: {', '.join(ort.get_available_providers())})"
    except ImportError:
        ort_version = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        gpu = "none: a CPU run"
    return (f"# GPU check\n\n    {command}\n\n{time.strftime('%Y-%m-%d %H:%M')}; device {device} ({gpu}); torch "
            f"{torch.__version__}; onnxruntime {ort_version}; Python {platform.python_version()}. Random source "
            f"weights (time and memory, not quality); bf16 autocast on GPU with the frozen source in bf16 and the "
            f"operator in fp32. Wall s: the whole `fit()` of that many steps (the first step included). Peak GiB: "
            f"`torch.cuda.max_memory_allocated()` over the fit (the bf16 source, the operator, its gradients and "
            f"AdamW state, activations; reset after the operator is built). Step ratio: one LiGO fitting step / one "
            f"plain training step of the target (fp32 weights, AdamW on them), same batch, alternated (median of 3 "
            f"pair ratios after a warm-up pair); plain peak: that "
            f"plain step's own footprint.\n\nTo run it (from the repository root, on the GPU machine): "
            f"`pip uninstall -y onnxruntime && pip install -e \".[gpu]\"`, then `python benchmarks/gpu_check.py` "
            f"(<= 8 minutes on one H100/H200-class GPU; it writes this file).\n\n"
            f"| case | growth (target params) | operator | materialize | batch | steps | wall s | peak GiB | "
            f"step ratio (LiGO / plain ms) | plain step peak GiB |\n|---|---|---|---|---|---|---|---|---|---|\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or pass --device cpu --quick for a smoke test")
    if device.type == "cpu" and args.quick:
        torch.set_num_threads(1)  # tiny ops: 2 OpenMP threads on a shared 2-core machine spin-wait ~10x longer
    sizes = QUICK if args.quick else FULL
    command = "python benchmarks/gpu_check.py" + (f" --device {args.device}" if args.device != "cuda" else "") + \
        (" --quick" if args.quick else "")
    begin = time.perf_counter()
    args.out.write_text(header(device, command))
    sections = [
        ("ViT-S -> ViT-B", lambda: fit_section("vit", sizes["vit"], device, stream=False)),
        ("ViT-S -> ViT-B, streamed", lambda: fit_section("vit", sizes["vit"], device, stream=True)),
        ("GPT-2 small -> medium", lambda: fit_section("gpt2", sizes["gpt2"], device, stream=False)),
        ("GPT-2 small -> medium, streamed", lambda: fit_section("gpt2", sizes["gpt2"], device, stream=True)),
        ("LLaMA 1B -> 3B shapes, shared", lambda: fit_section("llama", sizes["llama"], device, True, True, False)),
        ("LLaMA 1B -> 3B shapes, per-layer", lambda: fit_section("llama", sizes["llama"], device, True, False,
                                                                  False)),
    ]
    failures = []
    for title, run in sections:
        t = time.perf_counter()
        try:
            line = run()
        except Exception as e:  # noqa: BLE001 - record and go on: one section must not lose the others
            failures.append(title)
            line = f"| {title} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} |"
            traceback.print_exc()
        with args.out.open("a") as f:
            f.write(line + "\n")
        print(f"{title}: {time.perf_counter() - t:.0f} s", flush=True)
    try:
        onnx = onnx_section(device, args.quick)
    except Exception as e:  # noqa: BLE001
        failures.append("onnx")
        onnx = f"failed: {type(e).__name__}: {e}"
        traceback.print_exc()
    with args.out.open("a") as f:
        f.write(f"\nONNX export validated with onnxruntime: {onnx}\n\nWhole check: {time.perf_counter() - begin:.0f} s"
                f"{'; failed sections: ' + ', '.join(failures) if failures else ''}.\n")
    print(onnx)
    if failures:
        sys.exit(f"sections failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
