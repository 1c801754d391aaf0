"""Does growth pay for *my* model and data?  Train the target from each method's start with the same recipe and
batches, and account for what each saved against training it from scratch.

- ``train``: the plain trainer (AdamW, warmup + cosine, clipping, accumulation, evaluation, bf16 on CUDA) with its
  FLOPs and wall accounting;
- ``methods``: each method's start (LiGO fitted for counted steps, the growth baselines, MSLT, KI) and the run;
- ``accounting``: FLOPs/steps to scratch's final loss with censored seeds, the paired sign test;
- ``report``: the markdown table and the PNG;
- ``run``: ``compare(SRC, DST, data=...)``, behind ``ligo-convert compare``: checks, resumable runs, outputs.

``benchmarks/savings.py`` runs the same pieces on its three built-in proxies.
"""

from .run import CompareOptions, CompareResult, compare, plan_compare, run_compare  # noqa: F401
