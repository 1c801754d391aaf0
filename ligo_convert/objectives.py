"""Losses and metrics, decided by the spec's head alone (never by the family).

- ``task``: the model's own pretraining loss — cross-entropy over classes for a ``classifier`` head, masked-LM
  cross-entropy at the masked places for an ``mlm`` head (``data.batches`` masks the inputs), next-token
  cross-entropy for an ``lm`` head.
- ``distill``: match a teacher (the source model) — KL divergence to its output distribution where the model has
  logits, else the token-to-token cosine-similarity structure of the last hidden states, which needs no equal widths
  (the relation idea of MiniLM) — for encoders without a head such as MiniLM.

Every loss comes as ``(sum, count)`` terms whose count depends only on the batch, so data-parallel ranks can divide
by the global count and reproduce one process's loss exactly; ``*_loss`` functions return ``sum / count``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from .data import IGNORE_INDEX
from .errors import LigoError
from .spec import Spec

OBJECTIVES = ("auto", "task", "distill")
# Heads whose task the data cannot give labels for, and why.
NO_TASK_DATA = {"token_binary": "the per-token binary head (replaced-token detection) needs the tokens a generator "
                                "replaced, which the data does not give"}


def head_misfit(spec: Spec, data=None) -> str | None:
    """Why ``data`` (None: the embedded data) cannot give the task loss of ``spec``'s classifier head, or None:
    known before any batch is read, so ``auto`` can choose distillation instead of failing later."""
    if spec.head != "classifier":
        return None
    if spec.input != "patches":
        return "the text data gives no class labels for the classifier head"
    from .data import image_source

    classes = image_source(data).classes or []
    if len(classes) > spec.num_classes:
        return f"the data has {len(classes)} classes but the head only {spec.num_classes}"
    return None


def choose_objective(spec: Spec, requested: str = "auto", misfit: str | None = None) -> tuple[str, str]:
    """(objective, why): ``auto`` takes the model's own task where it has a head and the data fits it (``misfit``:
    why it does not, from :func:`head_misfit`), else distillation."""
    if requested not in OBJECTIVES:
        raise LigoError(f"unknown objective {requested!r}; choose one of {', '.join(OBJECTIVES)}")
    if requested == "task" and spec.head == "none":
        raise LigoError("this model has no output head, so it has no task loss; use --objective distill")
    if requested == "task" and spec.head in NO_TASK_DATA:
        raise LigoError(f"--objective task: {NO_TASK_DATA[spec.head]}; use --objective distill")
    if requested == "task" and misfit:
        raise LigoError(f"--objective task: {misfit}; use --objective distill (or auto), or --data that fits")
    if requested != "auto":
        return requested, f"{requested} (as asked)"
    if spec.head == "none":
        return "distill", "distill: the model has no output head, so it learns to match the source's hidden states"
    if spec.head in NO_TASK_DATA:
        return "distill", f"distill: {NO_TASK_DATA[spec.head]}, so it learns to match the source's logits"
    if misfit:
        return "distill", f"distill: {misfit}, so it learns to match the source's logits"
    what = {"classifier": "image/sequence classification", "mlm": "masked LM (15 % masking)", "lm": "causal LM"}
    return "task", f"task: {what[spec.head]}, the model's own head"


# --- task ------------------------------------------------------------------------------------------------------------


def _lm_pairs(spec: Spec, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, targets) at the predicted places: masked places (mlm) or every next token (lm)."""
    if spec.head == "lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    return logits[keep], labels[keep]


# Rows of vocabulary logits decoded at once by the chunked loss: 8 MB of fp32 logits per chunk.  The backward of a
# chunk holds about four such buffers (recomputed logits, log-softmax, their gradients): at 32 MB a chunk that was
# 130 MB, most of a shared-width fit's step memory over its floor (benchmarks/results/fit_scale.md).
DECODE_CHUNK_ELEMENTS = 1 << 21


def logits_of(outputs: dict) -> Tensor:
    """The logits of a forward's outputs, decoding them whole where the forward left them lazy (``decode``)."""
    return outputs["logits"] if "logits" in outputs else outputs["decode"](outputs["hidden"])


def _chunked_lm_terms(spec: Spec, outputs: dict, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy at the predicted places only, decoding their hidden states a chunk of rows at a time under
    activation checkpointing: the (tokens x vocab) logits never exist at once, in the forward or the backward."""
    hidden, decode = outputs["hidden"], outputs["decode"]
    rows, targets = _lm_pairs(spec, hidden, labels)
    chunk = max(1, DECODE_CHUNK_ELEMENTS // max(spec.vocab_size, 1))

    def piece(h: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(decode(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(rows.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False)
        else:
            total = total + piece(h, t)
    return total, torch.tensor(float(len(targets)))


def task_terms(spec: Spec, outputs: dict, batch: dict) -> tuple[Tensor, Tensor]:
    """(summed cross-entropy, number of predictions) for the spec's head."""
    if spec.head == "none":
        raise LigoError("this model has no output head, so it has no task loss; use the distill objective")
    if spec.head in NO_TASK_DATA:
        raise LigoError(f"this model has no task loss here: {NO_TASK_DATA[spec.head]}; use the distill objective")
    if "labels" not in batch:
        raise LigoError(f"the data gives no labels for this model's {spec.head} head")
    if "decode" in outputs and spec.head in ("mlm", "lm"):
        return _chunked_lm_terms(spec, outputs, batch["labels"])
    logits, labels = logits_of(outputs).float(), batch["labels"]
    if spec.head == "classifier":
        if int(labels.max()) >= spec.num_classes:
            raise LigoError(f"the data has class {int(labels.max())} but the model's head has only "
                            f"{spec.num_classes} classes; use data with at most {spec.num_classes} classes or "
                            f"--objective distill")
        return F.cross_entropy(logits, labels, reduction="sum"), torch.tensor(float(len(labels)))
    logits, targets = _lm_pairs(spec, logits, labels)
    return F.cross_entropy(logits, targets, reduction="sum"), torch.tensor(float(len(targets)))


def task_loss(spec: Spec, outputs: dict, batch: dict) -> Tensor:
    """The model's own pretraining loss on ``batch`` (mean over predictions).  MLM masking already happened in
    ``data.batches``, deterministically from its seed."""
    total, count = task_terms(spec, outputs, batch)
    return total / count.clamp(min=1)


# --- distillation ----------------------------------------------------------------------------------------------------


def distill_terms(spec: Spec, outputs: dict, teacher: dict, batch: dict) -> tuple[Tensor, Tensor]:
    """(summed distillation loss, count): KL(teacher || student) per example (classifier) or per real token (LM
    heads; for a per-token binary head, of each token's two-class distribution); for models without logits, the
    squared difference of token-to-token cosine similarities per sequence."""
    mask = batch.get("attention_mask")
    if "logits" in outputs or "decode" in outputs:
        s, t = logits_of(outputs).float(), logits_of(teacher).float()
        if spec.head == "token_binary":  # one logit per token: the two-class distribution (sigmoid(z), 1 - ...)
            s, t = (torch.stack([z, torch.zeros_like(z)], dim=-1) for z in (s, t))
        s, t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        kl = (t.exp() * (t - s)).sum(-1)  # (B,) or (B, T)
        if kl.dim() == 2 and mask is not None:
            kl = kl * mask
            return kl.sum(), mask.sum().float()
        return kl.sum(), torch.tensor(float(kl.numel()))
    hs = F.normalize(outputs["hidden"].float(), dim=-1)
    ht = F.normalize(teacher["hidden"].float(), dim=-1)
    diff = (hs @ hs.transpose(1, 2) - ht @ ht.transpose(1, 2)).pow(2)  # (B, T, T)
    if mask is not None:
        pair = (mask[:, :, None] * mask[:, None, :]).float()
        per_seq = (diff * pair).sum((1, 2)) / pair.sum((1, 2)).clamp(min=1)
    else:
        per_seq = diff.mean((1, 2))
    return per_seq.sum(), torch.tensor(float(len(per_seq)))


def distill_loss(spec: Spec, outputs: dict, teacher: dict, batch: dict) -> Tensor:
    total, count = distill_terms(spec, outputs, teacher, batch)
    return total / count.clamp(min=1)


def loss_terms(spec: Spec, objective: str, outputs: dict, batch: dict, teacher: dict | None = None):
    if objective == "task":
        return task_terms(spec, outputs, batch)
    if objective == "distill":
        return distill_terms(spec, outputs, teacher, batch)
    raise ValueError(f"unknown objective {objective!r}")


# --- metrics ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_metrics(spec: Spec, outputs: dict, batch: dict, totals: dict | None = None) -> dict:
    """Task metrics of one batch, added to ``totals`` (the dict a previous call returned) for a run over several.

    Returns ``loss`` (mean cross-entropy), ``accuracy`` (classes, masked tokens or next tokens), ``perplexity``
    (mlm/lm heads), and the running sums ``loss_sum``, ``correct``, ``count`` that make the next call exact::

        totals = None
        for batch in data.batches(spec, split="val"):
            totals = evaluate_metrics(spec, forward(spec, w, **data.model_inputs(batch)), batch, totals)
    """
    total, count = task_terms(spec, outputs, batch)
    logits, labels = logits_of(outputs).float(), batch["labels"]
    if spec.head == "classifier":
        correct = (logits.argmax(-1) == labels).sum()
    else:
        logits, targets = _lm_pairs(spec, logits, labels)
        correct = (logits.argmax(-1) == targets).sum()
    sums = dict(totals or {"loss_sum": 0.0, "correct": 0, "count": 0})
    sums["loss_sum"] += float(total)
    sums["correct"] += int(correct)
    sums["count"] += int(count)
    n = max(sums["count"], 1)
    out = {**sums, "loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}
    if spec.head in ("mlm", "lm"):
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
    return out
