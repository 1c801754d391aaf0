"""Pretraining a small model from scratch on the embedded data, so the whole grow flow runs on a fresh machine.

``micro_spec(family, ...)`` builds a small spec a family can hold, reading only its descriptor (which tensors it
has, its fixed spec values, its config defaults and model classes): image families get a classifier over the 8x8
digits, text families a causal-LM head where they have one, else a masked-LM head, over byte-level text; bare towers
whose classes have no head (CLIP's, SigLIP's) get none, with their pooled-token outputs (pool norm, projection).
``pretrain(spec, ...)`` trains it with the task objective and returns canonical weights.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import data as data_mod
from ..descriptors import get_descriptor
from ..errors import LigoError
from ..exprs import Unresolved, evaluate
from ..model import forward, init_weights
from ..objectives import task_terms
from ..spec import Spec
from .fit import autocast, resolve_device

BYTE_VOCAB = 258  # 256 byte ids + a mask id and a pad id for the byte-level fallback


def micro_spec(family: str, layers: int = 2, width: int = 64, heads: int = 4, mlp: int = 128, kv_heads: int = 0,
               image_size: int = 8, patch_size: int = 2, num_channels: int = 3, num_classes: int = 10,
               vocab_size: int = BYTE_VOCAB, max_positions: int = 128) -> Spec:
    """A small spec of ``family`` (checked with the family's descriptor)."""
    d = get_descriptor(family)
    has = set(d.tensors) | {p for f in d.fused for p in f["parts"]} | {c for a in d.architectures for c in a.tensors}
    heads_offered = {a.match.get("head") for a in d.architectures} or {None}
    values: dict = {}
    for key, value in d.config_defaults.items():  # e.g. norm_eps, activation; expressions are about sizes we set
        if not isinstance(value, str) or key in ("activation", "norm", "norm_placement", "positions"):
            values[key] = value
    values.update(d.spec_constants)
    values.update(layers=layers, width=width, heads=heads, head_dim=width // heads, mlp=mlp, kv_heads=kv_heads)
    patches = "embed.patch.weight" in has
    values["input"] = "patches" if patches else "tokens"
    values.setdefault("positions", "learned" if "embed.positions" in has else "rotary")
    for flag, name in (("embed_norm", "embed.norm.weight"), ("final_norm", "final_norm.weight"),
                       ("gated_mlp", "layers.{i}.gate.weight")):
        values.setdefault(flag, name in has)
    for flag, name in (("qkv_bias", "layers.{i}.q.bias"), ("o_bias", "layers.{i}.o.bias"),
                       ("mlp_bias", "layers.{i}.fc1.bias"), ("layer_scale", "layers.{i}.attn_scale")):
        values.setdefault(flag, name in has)
    if "layers.{i}.q_norm.weight" in has:
        values.setdefault("qk_norm", "head")
    elif "layers.{i}.q_proj_norm.weight" in has:
        values.setdefault("qk_norm", "proj")
    # the pooled-token outputs a family has (a pool norm, a projection to a fixed-size embedding space)
    for flag, name in (("pool_norm", "pool_norm.weight"), ("projection", "proj.weight")):
        values.setdefault(flag, name in has)
    if patches:
        values.setdefault("cls_token", "embed.cls" in has)
        values.setdefault("patch_bias", "embed.patch.bias" in has)
        values.setdefault("mask_token", "embed.mask" in has)
        # a family whose model classes all lack a classifier (a bare vision tower) gets none
        classifier = "head.weight" in has and ({"classifier", None} & heads_offered)
        values.update(image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                      head="classifier" if classifier else "none", num_classes=num_classes if classifier else 0)
        if classifier:
            values.setdefault("head_mean", "head_mean.weight" in has)
    else:
        # an LM head where a class has one, else a masked-LM head where the family can hold one, else none (a bare
        # text tower)
        mlm = "mlm.bias" in has and ({"mlm", None} & heads_offered)
        values.update(vocab_size=vocab_size, max_positions=max_positions,
                      head="lm" if "lm" in heads_offered else "mlm" if mlm else "none")
        values["tie_embeddings"] = values["head"] in ("lm", "mlm")
        if values["head"] == "mlm":
            values["mlm_transform"] = "mlm.dense.weight" in has
        if "embed.types" in has:
            values["type_vocab_size"] = 2
        values.setdefault("pad_token_id", vocab_size - 2)
        for key, expr in d.derive.items():  # e.g. a position offset that follows the pad id
            try:
                values[key] = evaluate(expr, values) if isinstance(expr, str) else expr
            except Unresolved:
                pass
        if values.get("position_offset"):
            values["max_positions"] = max_positions + values["position_offset"]
    spec = Spec.from_dict(values)
    spec.check()
    # some model classes need an untied LM head, or a pooler
    alternative = spec.replace(tie_embeddings=False) if spec.head in ("lm", "mlm") else spec.replace(pooler=True)
    for candidate in (spec, alternative):
        if d.supports(candidate) is None:
            return candidate
    raise LigoError(f"cannot build a small {family} model to pretrain: {d.supports(spec)}")


def pretrain(spec: Spec, data=None, tokenizer_dir=None, steps: int = 300, lr: float = 2e-3, batch_size: int = 32,
             seq_len: int = 64, seed: int = 0, device: str = "auto",
             on_step: Callable[[int, float], None] | None = None, *, workers: int | None = None,
             text_column: str | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train a model of ``spec`` from random weights with its own task loss (AdamW, warmup then cosine decay).
    Returns (weights on the CPU, training losses).  ``workers`` (image folders' loader processes) and
    ``text_column`` (a table's text column) go to :func:`data.batches`."""
    if spec.head == "none":
        raise LigoError("pretraining needs an output head (classifier, mlm or lm); this model has none")
    dev = resolve_device(device)
    weights = {k: v.to(dev).requires_grad_(True) for k, v in init_weights(spec, seed).items()}
    opt = torch.optim.AdamW(weights.values(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))))
    stream = data_mod.batches(spec, data, tokenizer_dir, "train", batch_size, seq_len, seed, workers=workers,
                              text_column=text_column, pin_memory=dev.type == "cuda")
    losses = []
    for step in range(steps):
        batch = data_mod.to_device(next(stream), dev)
        with autocast(dev):
            total, count = task_terms(spec, forward(spec, weights, **data_mod.model_inputs(batch)), batch)
        loss = total / count.clamp(min=1)
        if not torch.isfinite(loss):
            raise LigoError(f"pretraining loss became {float(loss)} at step {step + 1}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(weights.values()), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    return {k: v.detach().cpu() for k, v in weights.items()}, losses
