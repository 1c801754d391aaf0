"""How ``eval`` scores a model whose head has no task data of its own, the same way on both engines.

- Image towers without a head (CLIP vision, DINOv2, a bare ViT): a k-NN probe.  The features of up to
  :data:`MEMORY` training images are the memory; each held-out image takes the label most of its :data:`K` nearest
  memory images (cosine similarity, votes weighted by it) carry.  Accuracy; chance is 1 / classes.
- Text towers without a head (CLIP text, a bare BERT such as MiniLM, a bare decoder): span retrieval.  Each held-out
  sequence is cut into two halves, each wrapped in the tokenizer's specials; accuracy is the fraction of first halves
  whose nearest second half (cosine) among all held-out ones is their own.  Chance is 1 / sequences.
- A per-token binary head (ELECTRA's discriminator): replaced-token detection with uniform random replacements
  (:data:`REPLACED` of the text tokens, drawn from the seed; no generator), binary cross-entropy and accuracy per
  attended text token.

Features are what a user of the tower takes: the projected embeddings where it has a projection, else its pooled
token where it pools one (CLIP, DINOv2), else the mean of the last hidden states over attended tokens (as
sentence-transformers pools BERT).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import data as data_mod
from .spec import Spec

K = 5
MEMORY = 1024  # training images in the k-NN probe's memory
REPLACED = 0.15
PROBES = {"knn": f"{K}-NN probe (cosine) on training-image features",
          "span": "span retrieval: first halves of held-out sequences find their own second halves (cosine)",
          "rtd": f"replaced-token detection, {REPLACED:.0%} of the text tokens replaced at random"}


def probe_of(spec: Spec) -> str | None:
    """Which probe scores ``spec`` (None: its own task metrics)."""
    if spec.head == "token_binary":
        return "rtd"
    if spec.head == "none":
        return "knn" if spec.input == "patches" else "span"
    return None


def features(spec: Spec, outputs: dict, batch: dict) -> torch.Tensor:
    """(B, D) unit-length features of a batch (see the module docstring for which)."""
    if "embeds" in outputs:
        f = outputs["embeds"]
    elif spec.pool != "none":
        f = outputs["pooled"]
    else:
        h = outputs["hidden"].float()
        mask = batch.get("attention_mask")
        mask = torch.ones(h.shape[:2]) if mask is None else mask.float()
        f = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return F.normalize(f.float(), dim=-1)


def knn_probe(spec: Spec, run: Callable[[dict], dict], memory: Iterable[dict], queries: Iterable[dict]) -> dict:
    """Accuracy of the k-NN probe: ``memory`` and ``queries`` are labelled image batches."""
    bank, bank_labels = _features_and_labels(spec, run, memory)
    if not len(bank):
        return {"correct": 0, "count": 0, "memory": 0}
    classes = int(max(bank_labels.max(), 0)) + 1
    correct = count = 0
    for batch in queries:
        f = features(spec, run(batch), batch)
        sim, idx = (f @ bank.T).topk(min(K, len(bank)), dim=-1)
        votes = torch.zeros(len(f), max(classes, int(batch["labels"].max()) + 1))
        votes.scatter_add_(1, bank_labels[idx], sim.clamp(min=0) + 1e-6)  # ties and negative similarities still vote
        correct += int((votes.argmax(-1) == batch["labels"]).sum())
        count += len(f)
    return {"correct": correct, "count": count, "memory": len(bank)}


def _features_and_labels(spec, run, batches) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for batch in batches:
        feats.append(features(spec, run(batch), batch))
        labels.append(batch["labels"])
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def memory_batches(spec: Spec, data, tokenizer_dir, batch_size: int, seed: int, **options) -> Iterable[dict]:
    """The k-NN probe's memory: the first :data:`MEMORY` images of the training split, in the seed's order."""
    stream = data_mod.batches(spec, data, tokenizer_dir, "train", batch_size, seed=seed, repeat=False, **options)
    taken = 0
    for batch in stream:
        if taken >= MEMORY:
            break
        batch = data_mod.slice_batch(batch, 0, min(data_mod.batch_rows(batch), MEMORY - taken))
        taken += data_mod.batch_rows(batch)
        yield batch
    close = getattr(stream, "close", None)
    if close:
        close()


def halves(batch: dict, prefix: int, suffix: int) -> tuple[dict, dict]:
    """A token batch's rows cut in two halves of their text (between ``prefix`` and ``suffix`` specials), each half
    wrapped in the same specials."""
    ids = batch["input_ids"]
    head, tail = ids[:, :prefix], ids[:, ids.shape[1] - suffix:]
    body = ids[:, prefix:ids.shape[1] - suffix]
    half = body.shape[1] // 2

    def wrap(part: torch.Tensor) -> dict:
        x = torch.cat([head, part, tail], dim=1)
        out = {"input_ids": x, "attention_mask": torch.ones_like(x)}
        if "token_type_ids" in batch:
            out["token_type_ids"] = torch.zeros_like(x)
        return out

    return wrap(body[:, :half]), wrap(body[:, half:2 * half])


def span_retrieval(spec: Spec, run: Callable[[dict], dict], batches: Iterable[dict], prefix: int,
                   suffix: int) -> dict:
    """Accuracy of span retrieval over every held-out sequence in ``batches``."""
    firsts, seconds = [], []
    for batch in batches:
        a, b = halves(batch, prefix, suffix)
        firsts.append(features(spec, run(a), a))
        seconds.append(features(spec, run(b), b))
    if not firsts:
        return {"correct": 0, "count": 0}
    first, second = torch.cat(firsts), torch.cat(seconds)
    found = (first @ second.T).argmax(-1)
    return {"correct": int((found == torch.arange(len(first))).sum()), "count": len(first)}


def replace_tokens(batch: dict, prefix: int, suffix: int, vocab_size: int, g: torch.Generator) -> dict:
    """``batch`` with :data:`REPLACED` of its attended text tokens replaced by other random ids; ``labels`` 1 where
    replaced, 0 elsewhere, -1 on specials and padding (not scored)."""
    ids = batch["input_ids"].clone()
    text = batch.get("attention_mask", torch.ones_like(ids)).bool().clone()
    text[:, :prefix] = False
    if suffix:
        text[:, ids.shape[1] - suffix:] = False
    chosen = (torch.rand(ids.shape, generator=g) < REPLACED) & text
    shift = torch.randint(1, vocab_size, ids.shape, generator=g)  # never the original id
    ids = torch.where(chosen, (ids + shift) % vocab_size, ids)
    labels = torch.where(text, chosen.long(), torch.full_like(ids, -1))
    return {**{k: v for k, v in batch.items() if k != "labels"}, "input_ids": ids, "labels": labels}


def rtd_metrics(outputs: dict, batch: dict, totals: dict | None = None) -> dict:
    """Running sums of replaced-token detection (``totals`` as :func:`objectives.evaluate_metrics` keeps them)."""
    logits, labels = outputs["logits"].float(), batch["labels"]
    scored = labels >= 0
    y = labels[scored].float()
    z = logits[scored]
    sums = dict(totals or {"loss_sum": 0.0, "correct": 0, "count": 0})
    sums["loss_sum"] += float(F.binary_cross_entropy_with_logits(z, y, reduction="sum"))
    sums["correct"] += int(((z > 0).float() == y).sum())
    sums["count"] += int(scored.sum())
    n = max(sums["count"], 1)
    return {**sums, "loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}
