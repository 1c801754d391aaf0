"""The canonical forward: one functional transformer for every supported family.

``forward(spec, weights, ...)`` takes its weights as a mapping of canonical names, so growth can call it with weights
it materialises each step and export can trace it.  It reads top to bottom like the papers: embed, blocks, final
norm, heads.

Growth at scale adds two things, both family-neutral:

- ``layer_weights(i)``: a block's weights are asked for when the block runs, so a grown model's layers can be produced
  one at a time (and, with ``checkpoint=True``, again in the backward instead of being kept).
- :class:`Factored` vocabulary tables: ``W = core @ right.T`` kept as its factors, so the embedding lookup and the LM
  decoder of a grown model never form the (vocab x width) table: ``rows(W, ids) = core[ids] @ right.T`` and
  ``h @ W.T = (h @ right) @ core.T``.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (``attention="sdpa"``, flash / memory-
efficient kernels on GPU) or spelled out as matmul + softmax (``attention="explicit"``, the form the ONNX export
traces); both compute the same thing.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from .spec import Spec

ATTENTION = ("sdpa", "explicit")


class Factored(NamedTuple):
    """A (rows, width) table ``core @ right.T`` kept as its factors: core (rows, d), right (width, d)."""

    core: Tensor
    right: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.core.shape[0], self.right.shape[0]

    def dense(self) -> Tensor:
        return self.core @ self.right.T


def rows(table: Tensor | Factored, ids: Tensor) -> Tensor:
    """``F.embedding(ids, table)`` for a plain or factored table."""
    if isinstance(table, Factored):
        return F.embedding(ids, table.core) @ table.right.T
    return F.embedding(ids, table)


def project(x: Tensor, table: Tensor | Factored, bias: Tensor | None = None) -> Tensor:
    """``x @ table.T (+ bias)`` for a plain or factored table: the LM/MLM decoder."""
    if isinstance(table, Factored):
        y = (x @ table.right) @ table.core.T
        return y + bias if bias is not None else y
    return F.linear(x, table, bias)


def activation(name: str, x: Tensor) -> Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def norm(spec: Spec, w: Mapping[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    weight = w[prefix + ".weight"]
    if spec.norm == "rmsnorm":
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + spec.norm_eps)
        return weight * x32.to(dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, w.get(prefix + ".bias"), spec.norm_eps)


def linear(w: Mapping[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    # on (B, T, D) PyTorch itself folds to (B*T, D) and calls addmm, so this is the same arithmetic; spelled out, the
    # ONNX exporter emits one Gemm with the bias fused instead of a 3-D MatMul plus a separate Add
    y = F.linear(x.reshape(-1, x.shape[-1]), w[prefix + ".weight"], w.get(prefix + ".bias"))
    return y.view(*x.shape[:-1], y.shape[-1])


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(spec: Spec, seq_len: int, device, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (T, head_dim) in the rotate-half layout: dims i and i + head_dim/2 form a pair."""
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, device=device, dtype=torch.int64)
                                          .float() / spec.head_dim))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def embed(spec: Spec, w: Mapping[str, Tensor], input_ids=None, pixel_values=None, token_type_ids=None) -> Tensor:
    if spec.input == "patches":
        patch = w["embed.patch.weight"]
        x = F.conv2d(pixel_values.to(patch.dtype), patch, w["embed.patch.bias"], stride=spec.patch_size)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        batch = x.shape[0]
        prefix = []
        if spec.cls_token:
            prefix.append(w["embed.cls"].expand(batch, 1, -1))
        if spec.dist_token:
            prefix.append(w["embed.dist"].expand(batch, 1, -1))
        x = torch.cat(prefix + [x], dim=1)
        if spec.positions == "learned":
            x = x + w["embed.positions"][: x.shape[1]]
    else:
        x = rows(w["embed.tokens"], input_ids)
        if spec.positions == "learned":
            seq = input_ids.shape[1]
            if spec.position_offset and spec.pad_token_id is not None:
                # positions count real tokens only and start after the padding id (RoBERTa's scheme)
                real = (input_ids != spec.pad_token_id).to(torch.int64)
                position_ids = torch.cumsum(real, dim=1) * real + spec.pad_token_id
            else:
                position_ids = torch.arange(seq, device=input_ids.device) + spec.position_offset
            x = x + rows(w["embed.positions"], position_ids)
        if spec.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + rows(w["embed.types"], token_type_ids)
    if spec.embed_norm:
        x = norm(spec, w, "embed.norm", x)
    return x


def attention_bias(spec: Spec, attention_mask, batch: int, seq: int, device, dtype,
                   impl: str = "explicit") -> Tensor | str | None:
    """Additive bias (B or 1, 1, T, T): padding keys and, for causal models, future keys get the dtype's minimum.
    For ``impl="sdpa"``, a causal model without padding gets the string ``"causal"`` instead (the kernel masks)."""
    if impl == "sdpa" and spec.causal and (attention_mask is None or not _has_padding(attention_mask)):
        return "causal"
    blocked = None
    if attention_mask is not None:
        blocked = (attention_mask[:, None, None, :] == 0)
    if spec.causal:
        future = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)[None, None]
        blocked = future if blocked is None else (blocked | future)
    if blocked is None:
        return None
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)


def _has_padding(attention_mask: Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True  # a data-dependent branch cannot be traced: keep the general mask
    return not bool(attention_mask.all())


def attention(spec: Spec, w: Mapping[str, Tensor], p: str, x: Tensor, bias, rope, impl: str = "sdpa") -> Tensor:
    batch, seq, _ = x.shape
    q = linear(w, p + "q", x).view(batch, seq, spec.heads, spec.head_dim).transpose(1, 2)
    k = linear(w, p + "k", x).view(batch, seq, spec.kv_heads, spec.head_dim).transpose(1, 2)
    v = linear(w, p + "v", x).view(batch, seq, spec.kv_heads, spec.head_dim).transpose(1, 2)
    if rope is not None:
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    if impl == "sdpa":
        out = sdpa(spec, q, k, v, bias)
    else:
        out = explicit_attention(spec, q, k, v, bias)
    return linear(w, p + "o", out.transpose(1, 2).reshape(batch, seq, spec.heads * spec.head_dim))


def sdpa(spec: Spec, q: Tensor, k: Tensor, v: Tensor, bias) -> Tensor:
    """PyTorch's fused attention.  A purely causal mask goes as ``is_causal`` (flash kernels take it); padding goes
    as the same additive bias the explicit form adds, so fully masked rows come out exactly as there."""
    causal_only = isinstance(bias, str)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal_only else bias, is_causal=causal_only,
                                          enable_gqa=spec.kv_heads != spec.heads)


def explicit_attention(spec: Spec, q: Tensor, k: Tensor, v: Tensor, bias) -> Tensor:
    """Attention spelled out (the ONNX export traces this form)."""
    if spec.kv_heads != spec.heads:  # grouped-query attention: each k/v head serves heads // kv_heads q heads
        repeat = spec.heads // spec.kv_heads
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(spec.head_dim)
    if isinstance(bias, str):  # "causal": build the mask the fused path leaves to its kernel
        bias = causal_bias(q.shape[-2], q.device, scores.dtype)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def causal_bias(seq: int, device, dtype) -> Tensor:
    future = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)[None, None]
    return torch.zeros(future.shape, dtype=dtype, device=device).masked_fill(future, torch.finfo(dtype).min)


def mlp(spec: Spec, w: Mapping[str, Tensor], p: str, x: Tensor) -> Tensor:
    if spec.gated_mlp:
        hidden = activation(spec.activation, linear(w, p + "gate", x)) * linear(w, p + "fc1", x)
    else:
        hidden = activation(spec.activation, linear(w, p + "fc1", x))
    return linear(w, p + "fc2", hidden)


def block(spec: Spec, w: Mapping[str, Tensor], i: int, x: Tensor, bias, rope, impl: str = "sdpa") -> Tensor:
    p = f"layers.{i}."
    if spec.norm_placement == "pre":
        x = x + attention(spec, w, p, norm(spec, w, p + "attn_norm", x), bias, rope, impl)
        return x + mlp(spec, w, p, norm(spec, w, p + "mlp_norm", x))
    x = norm(spec, w, p + "attn_norm", x + attention(spec, w, p, x, bias, rope, impl))
    return norm(spec, w, p + "mlp_norm", x + mlp(spec, w, p, x))


def forward(spec: Spec, w: Mapping[str, Tensor], input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
            attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None, *,
            layer_weights: Callable[[int], Mapping[str, Tensor]] | None = None, checkpoint: bool = False,
            attention: str = "sdpa", lazy_logits: bool = False) -> dict[str, Tensor]:
    """Run the model.  Returns ``hidden`` (last hidden state, after the final norm), and where the spec has them
    ``pooled``, ``logits`` (classifier, MLM or LM) and ``pair_logits``.

    ``layer_weights(i)`` gives block i's weights when it runs (default: they are in ``w``); with ``checkpoint`` each
    block runs under non-reentrant activation checkpointing, so its weights and activations are made again in the
    backward instead of being kept.  ``attention``: ``"sdpa"`` or ``"explicit"`` (see the module docstring).
    ``lazy_logits``: an LM/MLM head returns ``decode`` (hidden rows -> vocabulary logits) instead of ``logits``, so
    a loss can decode only the predicted places, a chunk at a time (``objectives.task_terms``)."""
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r} (known: {', '.join(ATTENTION)})")
    x, bias, rope = start(spec, w, input_ids, pixel_values, attention_mask, token_type_ids, attention)
    for i in range(spec.layers):
        def run_block(x, i=i):
            return block(spec, layer_weights(i) if layer_weights else w, i, x, bias, rope, attention)

        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(run_block, x, use_reentrant=False)
        else:
            x = run_block(x)
    return finish(spec, w, x, lazy_logits)


def forward_many(spec: Spec, w: Mapping[str, Tensor], batches: list[dict],
                 layer_weights: Callable[[int], Mapping[str, Tensor]], attention: str = "sdpa",
                 lazy_logits: bool = False) -> list[dict[str, Tensor]]:
    """``forward`` over several batches, layer-major: each block's weights are asked for once and run on every
    batch, so a grown model evaluated on N batches makes its layers once instead of N times (no gradients)."""
    states = [start(spec, w, **inputs, attention=attention) for inputs in batches]
    for i in range(spec.layers):
        wi = layer_weights(i)
        states = [(block(spec, wi, i, x, bias, rope, attention), bias, rope) for x, bias, rope in states]
    return [finish(spec, w, x, lazy_logits) for x, _, _ in states]


def start(spec: Spec, w: Mapping[str, Tensor], input_ids=None, pixel_values=None, attention_mask=None,
          token_type_ids=None, attention: str = "sdpa") -> tuple[Tensor, Tensor | str | None, tuple | None]:
    """The embedded input and what every block needs with it: (x, attention bias, rotary cos/sin)."""
    x = embed(spec, w, input_ids, pixel_values, token_type_ids)
    batch, seq, _ = x.shape
    if spec.input == "patches":
        attention_mask = None  # every patch is real
    bias = attention_bias(spec, attention_mask, batch, seq, x.device, x.dtype, attention)
    rope = rotary(spec, seq, x.device, x.dtype) if spec.positions == "rotary" else None
    return x, bias, rope


def finish(spec: Spec, w: Mapping[str, Tensor], x: Tensor, lazy_logits: bool = False) -> dict[str, Tensor]:
    """The final norm and the heads on the last block's output."""
    if spec.final_norm:
        x = norm(spec, w, "final_norm", x)
    out = {"hidden": x}
    if spec.pooler:
        out["pooled"] = torch.tanh(linear(w, "pooler", x[:, 0]))
    if spec.head == "classifier":
        logits = linear(w, "head", x[:, 0])
        if spec.dist_head:  # DeiT with teacher: the prediction is the mean of the cls and distillation heads
            logits = (logits + linear(w, "head_dist", x[:, 1])) / 2
        out["logits"] = logits
    elif spec.head in ("mlm", "lm"):
        decode = decoder(spec, w)
        if lazy_logits:
            out["decode"] = decode
        else:
            out["logits"] = decode(x)
    if spec.pair_head:
        out["pair_logits"] = linear(w, "pair_head", out["pooled"])
    return out


def decoder(spec: Spec, w: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """The LM/MLM head as a function of hidden states (any leading shape) to vocabulary logits."""
    table = w["embed.tokens"] if spec.tie_embeddings else w["lm_head.weight"]

    def decode(h: Tensor) -> Tensor:
        if spec.head == "mlm":
            if spec.mlm_transform:
                h = norm(spec, w, "mlm.norm", activation(spec.activation, linear(w, "mlm.dense", h)))
            return project(h, table, w["mlm.bias"])
        return project(h, table)

    return decode


def init_weights(spec: Spec, seed: int = 0, std: float = 0.02, dtype=torch.float32) -> dict[str, Tensor]:
    """Random weights for ``spec`` (the 'scratch' starting point): normal(0, std) matrices, unit norms, zero biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in spec.tensor_names():
        shape = spec.shape_of(name)
        if name.endswith(".bias") or name == "mlm.bias":
            t = torch.zeros(shape)
        elif "norm" in name:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        out[name] = t.to(dtype)
    return out
