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


class Chain(NamedTuple):
    """A grown layer's (out, in) matrix ``left @ core @ right.T`` (B_out W B_in^T) kept as its factors; ``left`` or
    ``right`` is None where that axis does not grow.  :func:`linear` applies it to its input rows in the order with
    the fewest multiply-adds for that many rows: at a fitting batch, running the rows through the factors costs less
    than forming the dense matrix (its rank is at most the source's width), forward and backward alike."""

    left: Tensor | None  # (D2_out, D1_out)
    core: Tensor  # (D1_out, D1_in)
    right: Tensor | None  # (D2_in, D1_in)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left if self.left is not None else self.core).shape[0], \
            (self.right if self.right is not None else self.core.T).shape[0]

    def dense(self) -> Tensor:
        return self._product(self._cheapest(0, dense=True))

    def apply(self, x: Tensor) -> Tensor:
        """``x @ dense().T`` for rows ``x`` (N, D2_in), without a transposed copy of any factor."""
        return self._product(self._cheapest(x.shape[0]), x)

    def cost(self, n: int) -> int:
        """Multiply-adds of :meth:`apply` on ``n`` rows (its cheapest order)."""
        return min(self._costs(n).values())

    def _cheapest(self, n: int, dense: bool = False) -> str:
        """The order of ``x R C^T L^T`` (the 5 ways to bracket it) with the fewest multiply-adds for ``n`` rows."""
        costs = self._costs(n, dense)
        return min(costs, key=costs.get)  # ties: the first listed, so the choice is the same on every run

    def _costs(self, n: int, dense: bool = False) -> dict[str, int]:
        (a, b), (c, d) = self.core.shape, self.shape  # a, b: D1 out / in; c, d: D2 out / in
        lft, rgt = int(self.left is not None), int(self.right is not None)
        costs = {"dense-left": lft * c * a * b + rgt * c * b * d + n * d * c,  # x ((L C) R^T)^T
                 "dense-right": rgt * a * b * d + lft * c * a * d + n * d * c}  # x (L (C R^T))^T
        if not dense:
            costs.update({"rows": rgt * n * d * b + n * b * a + lft * n * a * c,  # ((x R) C^T) L^T
                          "left": lft * c * a * b + rgt * n * d * b + n * b * c,  # (x R) (L C)^T
                          "right": rgt * a * b * d + n * d * a + lft * n * a * c})  # (x (R C^T)) L^T
        return costs

    def _product(self, order: str, x: Tensor | None = None) -> Tensor:
        left, core, right = self.left, self.core, self.right
        if order.startswith("dense"):
            if order == "dense-left":
                w = left @ core if left is not None else core
                w = w @ right.T if right is not None else w
            else:
                w = core @ right.T if right is not None else core
                w = left @ w if left is not None else w
            return w if x is None else x @ w.T
        if order == "right":
            h = x @ (right @ core.T if right is not None else core.T)  # (N, D1_out)
        else:
            h = x @ right if right is not None else x  # (N, D1_in)
            if order == "left":
                return h @ (left @ core if left is not None else core).T
            h = h @ core.T
        return h @ left.T if left is not None else h


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
    if name == "quick_gelu":  # CLIP: x * sigmoid(1.702 x)
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}")


def norm(spec: Spec, w: Mapping[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    weight = w[prefix + ".weight"]
    if spec.norm == "rmsnorm":
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + spec.norm_eps)
        if spec.norm_offset:  # Gemma: the gain (offset + weight) applies in fp32, before the cast
            return (x32 * (spec.norm_offset + weight.float())).to(dtype)
        return weight * x32.to(dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, w.get(prefix + ".bias"), spec.norm_eps)


def linear(w: Mapping[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    # on (B, T, D) PyTorch itself folds to (B*T, D) and calls addmm, so this is the same arithmetic; spelled out, the
    # ONNX exporter emits one Gemm with the bias fused instead of a 3-D MatMul plus a separate Add
    weight, bias = w[prefix + ".weight"], w.get(prefix + ".bias")
    if isinstance(weight, Chain):  # a grown layer's factors (fitting): no dense weight
        y = weight.apply(x.reshape(-1, x.shape[-1]))
        y = y + bias if bias is not None else y
    else:
        y = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(spec: Spec, seq_len: int, device, dtype, theta: float | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (T, rotary_dim) in the rotate-half layout: dims i and i + rotary_dim/2 form a pair."""
    dim, theta = spec.rotary_dim, theta or spec.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def embed(spec: Spec, w: Mapping[str, Tensor], input_ids=None, pixel_values=None, token_type_ids=None,
          attention_mask=None, position_ids=None) -> Tensor:
    if spec.input == "patches":
        patch = w["embed.patch.weight"]
        x = F.conv2d(pixel_values.to(patch.dtype), patch, w.get("embed.patch.bias"), stride=spec.patch_size)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        batch = x.shape[0]
        prefix = []
        if spec.cls_token:
            prefix.append(w["embed.cls"].expand(batch, 1, -1))
        if spec.dist_token:
            prefix.append(w["embed.dist"].expand(batch, 1, -1))
        x = torch.cat(prefix + [x], dim=1)
        if spec.positions == "learned":
            x = x + patch_positions(spec, w["embed.positions"], grid, x.shape[1])
    else:
        x = rows(w["embed.tokens"], input_ids)
        if spec.embed_scale:  # Gemma: sqrt(width) as a number of the model's dtype
            x = x * torch.tensor(spec.width ** 0.5, dtype=x.dtype)
        if spec.positions == "learned":
            seq = input_ids.shape[1]
            if position_ids is not None:  # given by the caller (a decoding step after a cache): counted from 0
                position_ids = position_ids + spec.position_offset
            elif spec.positions_from_mask:
                # positions count the attended tokens before each one (padding gets -1) (OPT's scheme)
                mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
                position_ids = (torch.cumsum(mask, dim=1) * mask - 1).to(torch.int64) + spec.position_offset
            elif spec.position_offset and spec.pad_token_id is not None:
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
    if spec.embed_proj:  # tables of embedding_size, projected into the residual stream (ELECTRA)
        x = linear(w, "embed.proj", x)
    return x


def patch_positions(spec: Spec, table: Tensor, grid: tuple[int, int], seq: int) -> Tensor:
    """The position rows for a patch grid of ``grid`` (rows, columns): with ``interpolate_positions`` the patch rows
    resampled bicubically in float32 to the grid (the prefix tokens' rows kept), as DINOv2's
    interpolate_pos_encoding; without it, the first ``seq`` rows."""
    if not spec.interpolate_positions:
        return table[:seq]
    prefix = spec.prefix_tokens
    side = math.isqrt(table.shape[0] - prefix)
    # always resampled, so an ONNX export takes any image size: at the table's own grid bicubic resampling gives the
    # rows back exactly (the source points fall on the table's, weights 0, 1, 0, 0)
    dim = table.shape[-1]
    rows = table[prefix:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    rows = F.interpolate(rows.float(), size=grid, mode="bicubic", align_corners=False).to(table.dtype)
    return torch.cat([table[:prefix], rows.permute(0, 2, 3, 1).reshape(-1, dim)], dim=0)


class Context(NamedTuple):
    """What every block needs besides its input: the attention bias and rotary cos/sin, for full-attention layers
    and for sliding-window layers (None where the model has none)."""

    bias: Tensor | str | None
    rope: tuple[Tensor, Tensor] | None
    window_bias: Tensor | None = None
    window_rope: tuple[Tensor, Tensor] | None = None

    def of(self, spec: Spec, layer: int) -> tuple[Tensor | str | None, tuple | None]:
        if spec.windowed(layer):
            return self.window_bias, self.window_rope
        return self.bias, self.rope


def attention_bias(spec: Spec, attention_mask, batch: int, seq: int, device, dtype,
                   impl: str = "explicit", window: int = 0) -> Tensor | str | None:
    """Additive bias (B or 1, 1, T, T): padding keys, for causal models future keys and, with a ``window``, keys
    ``window`` or more places back get the dtype's minimum.  For ``impl="sdpa"``, a causal model without padding
    or window gets the string ``"causal"`` instead (the kernel masks)."""
    if impl == "sdpa" and spec.causal and not window and (attention_mask is None or not _has_padding(attention_mask)):
        return "causal"
    blocked = None
    if attention_mask is not None:
        blocked = (attention_mask[:, None, None, :] == 0)
    if spec.causal:
        future = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)[None, None]
        blocked = future if blocked is None else (blocked | future)
    if window:
        far = torch.ones(seq, seq, dtype=torch.bool, device=device).tril(-window)[None, None]
        blocked = far if blocked is None else (blocked | far)
    if blocked is None:
        return None
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)


def _has_padding(attention_mask: Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True  # a data-dependent branch cannot be traced: keep the general mask
    return not bool(attention_mask.all())


def project_heads(spec: Spec, w: Mapping[str, Tensor], p: str, which: str, x: Tensor, heads: int) -> Tensor:
    """q or k (or v) of (B, T, D) as (B, heads, T, head_dim), with the q/k norm the spec has."""
    batch, seq, _ = x.shape
    y = linear(w, p + which, x)
    if spec.qk_norm == "proj" and which in ("q", "k"):  # OLMo 2: over the whole projection, before the split
        y = norm(spec, w, p + which + "_proj_norm", y)
    y = y.view(batch, seq, heads, spec.head_dim)
    if spec.qk_norm == "head" and which in ("q", "k"):  # Qwen3, Gemma 3: every head by the same head_dim norm
        y = norm(spec, w, p + which + "_norm", y)
    return y.transpose(1, 2)


def rotate(spec: Spec, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotary positions on the first rotary_dim dims of every head; the rest pass (partial rotary: GPT-NeoX)."""
    cos, sin = rope
    dim = spec.rotary_dim
    if dim == spec.head_dim:
        return x * cos + rotate_half(x) * sin
    turned, rest = x[..., :dim], x[..., dim:]
    return torch.cat((turned * cos + rotate_half(turned) * sin, rest), dim=-1)


class KV:
    """One layer's key/value cache, (B, kv_heads, length, head_dim) each: the past going in; the attention replaces
    them with past + this step's (the "present")."""

    def __init__(self, key: Tensor, value: Tensor):
        self.key, self.value = key, value


def attention(spec: Spec, w: Mapping[str, Tensor], p: str, x: Tensor, bias, rope, impl: str = "sdpa",
              cache: KV | None = None) -> Tensor:
    batch, seq, _ = x.shape
    q = project_heads(spec, w, p, "q", x, spec.heads)
    k = project_heads(spec, w, p, "k", x, spec.kv_heads)
    v = project_heads(spec, w, p, "v", x, spec.kv_heads)
    if rope is not None:
        q, k = rotate(spec, q, rope), rotate(spec, k, rope)
    if cache is not None:  # keys are cached after their norm and rotation, as transformers caches them
        k = cache.key = torch.cat([cache.key.to(k.dtype), k], dim=2)
        v = cache.value = torch.cat([cache.value.to(v.dtype), v], dim=2)
    if impl == "sdpa" and not spec.attn_softcap:  # soft-capped scores have no fused kernel
        out = sdpa(spec, q, k, v, bias)
    else:
        out = explicit_attention(spec, q, k, v, bias)
    return linear(w, p + "o", out.transpose(1, 2).reshape(batch, seq, spec.heads * spec.head_dim))


def sdpa(spec: Spec, q: Tensor, k: Tensor, v: Tensor, bias) -> Tensor:
    """PyTorch's fused attention.  A purely causal mask goes as ``is_causal`` (flash kernels take it); padding goes
    as the same additive bias the explicit form adds, so fully masked rows come out exactly as there."""
    causal_only = isinstance(bias, str)
    scale = spec.score_scale_dim ** -0.5 if spec.score_scale_dim else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal_only else bias, is_causal=causal_only,
                                          scale=scale, enable_gqa=spec.kv_heads != spec.heads)


def softcap(x: Tensor, cap: float) -> Tensor:
    return torch.tanh(x / cap) * cap


def explicit_attention(spec: Spec, q: Tensor, k: Tensor, v: Tensor, bias) -> Tensor:
    """Attention spelled out (the ONNX export traces this form)."""
    if spec.kv_heads != spec.heads:  # grouped-query attention: each k/v head serves heads // kv_heads q heads
        repeat = spec.heads // spec.kv_heads
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    if spec.score_scale_dim:
        scores = torch.matmul(q, k.transpose(-1, -2)) * spec.score_scale_dim ** -0.5
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(spec.head_dim)
    if spec.attn_softcap:
        scores = softcap(scores, spec.attn_softcap)
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
        gate = activation(spec.gate_activation or spec.activation, linear(w, p + "gate", x))
        hidden = gate * linear(w, p + "fc1", x)
    else:
        hidden = activation(spec.activation, linear(w, p + "fc1", x))
    return linear(w, p + "fc2", hidden)


def block(spec: Spec, w: Mapping[str, Tensor], i: int, x: Tensor, ctx: Context, impl: str = "sdpa",
          cache: KV | None = None) -> Tensor:
    p = f"layers.{i}."
    bias, rope = ctx.of(spec, i)

    def attn(h):
        return attention(spec, w, p, h, bias, rope, impl, cache)

    def ffn(h):
        return mlp(spec, w, p, h)

    placement = spec.norm_placement
    if placement == "post":
        x = norm(spec, w, p + "attn_norm", x + attn(x))
        return norm(spec, w, p + "mlp_norm", x + ffn(x))
    if spec.parallel_residual:  # GPT-NeoX: both sublayers read the block's input
        return ffn(norm(spec, w, p + "mlp_norm", x)) + attn(norm(spec, w, p + "attn_norm", x)) + x
    x = x + sublayer_output(spec, w, p, "attn", attn)(x)
    return x + sublayer_output(spec, w, p, "mlp", ffn)(x)


def sublayer_output(spec: Spec, w: Mapping[str, Tensor], p: str, which: str, sublayer: Callable) -> Callable:
    """What a pre-, sandwich- or output-norm block adds to the residual stream for one sublayer: its input norm
    (pre, sandwich), the sublayer, its output norm (sandwich, output), its LayerScale gain."""
    def run(x):
        if spec.norm_placement != "output":
            x = norm(spec, w, p + which + "_norm", x)
        y = sublayer(x)
        if spec.norm_placement in ("sandwich", "output"):
            y = norm(spec, w, p + which + "_out_norm", y)
        if spec.layer_scale:
            y = y * w[p + which + "_scale"]
        return y

    return run


def forward(spec: Spec, w: Mapping[str, Tensor], input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
            attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None, *,
            layer_weights: Callable[[int], Mapping[str, Tensor]] | None = None, checkpoint: bool | str = False,
            attention: str = "sdpa", lazy_logits: bool = False) -> dict[str, Tensor]:
    """Run the model.  Returns ``hidden`` (last hidden state, after the final norm), and where the spec has them
    ``pooled``, ``logits`` (classifier, MLM or LM; a per-token binary head's (B, T)) and ``pair_logits``.

    ``layer_weights(i)`` gives block i's weights when it runs (default: they are in ``w``); it may instead be an
    object whose ``for_rows(n)`` returns that callable: called once, after the embeddings and outside any checkpoint,
    with the number of rows each block's matrices see, it prepares what every layer shares (a grower's expansions,
    whose best product order depends on the rows).  With ``checkpoint`` each
    block runs under non-reentrant activation checkpointing, so its weights and activations are made again in the
    backward instead of being kept; ``checkpoint="selective"`` keeps the outputs of its matrix products
    (:data:`KEPT_OPS`) and makes only the cheap ops again.  ``attention``: ``"sdpa"`` or ``"explicit"`` (see the
    module docstring).
    ``lazy_logits``: an LM/MLM head returns ``decode`` (hidden rows -> vocabulary logits) instead of ``logits``, so
    a loss can decode only the predicted places, a chunk at a time (``objectives.task_terms``)."""
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r} (known: {', '.join(ATTENTION)})")
    x, ctx = start(spec, w, input_ids, pixel_values, attention_mask, token_type_ids, attention)
    if hasattr(layer_weights, "for_rows"):  # prepared once per forward, outside the checkpoints (see the docstring)
        layer_weights = layer_weights.for_rows(x.numel() // x.shape[-1])
    for i in range(spec.layers):
        def run_block(x, i=i):
            return block(spec, layer_weights(i) if layer_weights else w, i, x, ctx, attention)

        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(run_block, x, use_reentrant=False,
                                                  **({"context_fn": keep_products} if checkpoint == "selective"
                                                     else {}))
        else:
            x = run_block(x)
    return finish(spec, w, x, lazy_logits, input_ids)


# What a selective checkpoint keeps for the backward: the outputs of the matrix products (most of a block's FLOPs,
# weights and attention alike); norms, activations, softmax and elementwise ops are made again from them.
KEPT_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, name))


def _keep_products_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def keep_products():
    """``context_fn`` of a selective activation checkpoint (:data:`KEPT_OPS` kept, the rest recomputed)."""
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(_keep_products_policy)


def forward_many(spec: Spec, w: Mapping[str, Tensor], batches: list[dict],
                 layer_weights: Callable[[int], Mapping[str, Tensor]], attention: str = "sdpa",
                 lazy_logits: bool = False) -> list[dict[str, Tensor]]:
    """``forward`` over several batches, layer-major: each block's weights are asked for once and run on every
    batch, so a grown model evaluated on N batches makes its layers once instead of N times (no gradients)."""
    states = [start(spec, w, **inputs, attention=attention) for inputs in batches]
    for i in range(spec.layers):
        wi = layer_weights(i)
        states = [(block(spec, wi, i, x, ctx, attention), ctx) for x, ctx in states]
    return [finish(spec, w, x, lazy_logits, inputs.get("input_ids")) for (x, _), inputs in zip(states, batches)]


def start(spec: Spec, w: Mapping[str, Tensor], input_ids=None, pixel_values=None, attention_mask=None,
          token_type_ids=None, attention: str = "sdpa") -> tuple[Tensor, Context]:
    """The embedded input and what every block needs with it (attention biases, rotary cos/sin)."""
    x = embed(spec, w, input_ids, pixel_values, token_type_ids, attention_mask)
    batch, seq, _ = x.shape
    if spec.input == "patches":
        attention_mask = None  # every patch is real
    rotary_positions = spec.positions == "rotary"
    ctx = Context(attention_bias(spec, attention_mask, batch, seq, x.device, x.dtype, attention),
                  rotary(spec, seq, x.device, x.dtype) if rotary_positions else None)
    if any(spec.windowed(i) for i in range(spec.layers)):
        ctx = ctx._replace(
            window_bias=attention_bias(spec, attention_mask, batch, seq, x.device, x.dtype, attention,
                                       spec.sliding_window),
            window_rope=rotary(spec, seq, x.device, x.dtype, spec.rope_local_theta) if rotary_positions else None)
    return x, ctx


def forward_cached(spec: Spec, w: Mapping[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
                   position_ids: Tensor, past: list[tuple[Tensor, Tensor]], attention: str = "explicit"
                   ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """One step of a causal LM with a key/value cache: the ``T`` new tokens ``input_ids`` (B, T) at ``position_ids``
    (B, T, counted from 0 over the attended tokens), ``attention_mask`` (B, past + T) over the cached and the new
    tokens, and ``past``: per layer (key, value) of shape (B, kv_heads, past, head_dim), past may be 0 (the prefill).
    Returns the logits (B, T, vocab) and per layer the present (past + new) keys and values.

    The cache index is the key's place in time: causality and sliding windows count in it, as transformers' caches
    do, while positions (rotary angles, learned rows) come from ``position_ids``, so left-padded rows stay exact."""
    x, ctx = start_cached(spec, w, input_ids, attention_mask, position_ids)
    caches = [KV(k, v) for k, v in past]
    for i in range(spec.layers):
        x = block(spec, w, i, x, ctx, attention, caches[i])
    return finish(spec, w, x)["logits"], [(c.key, c.value) for c in caches]


def start_cached(spec: Spec, w: Mapping[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
                 position_ids: Tensor) -> tuple[Tensor, Context]:
    """:func:`start` for a step with a key/value cache: the new tokens embedded at their positions, and the biases
    over past + new keys."""
    x = embed(spec, w, input_ids, attention_mask=attention_mask, position_ids=position_ids)
    seq, dtype = input_ids.shape[1], x.dtype
    rotary_positions = spec.positions == "rotary"
    ctx = Context(cached_bias(attention_mask, seq, dtype),
                  rotary_at(spec, position_ids, dtype) if rotary_positions else None)
    if any(spec.windowed(i) for i in range(spec.layers)):
        ctx = ctx._replace(window_bias=cached_bias(attention_mask, seq, dtype, spec.sliding_window),
                           window_rope=rotary_at(spec, position_ids, dtype, spec.rope_local_theta)
                           if rotary_positions else None)
    return x, ctx


def cached_bias(attention_mask: Tensor, seq: int, dtype, window: int = 0) -> Tensor:
    """(B, 1, T, past + T) additive bias for the T newest tokens: padding keys, future keys and (with a window) keys
    ``window`` or more places back get the dtype's minimum."""
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device)
    queries = keys[total - seq:]
    blocked = keys[None, :] > queries[:, None]
    if window:
        blocked = blocked | (queries[:, None] - keys[None, :] >= window)
    blocked = blocked[None, None] | (attention_mask[:, None, None, :] == 0)
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(blocked, torch.finfo(dtype).min)


def rotary_at(spec: Spec, position_ids: Tensor, dtype, theta: float | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin (B, 1, T, rotary_dim) at given positions (the same angles as :func:`rotary` at 0..T-1)."""
    dim, theta = spec.rotary_dim, theta or spec.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.int64).float() / dim))
    freqs = position_ids[:, None, :, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def empty_cache(spec: Spec, batch: int, dtype=torch.float32, device=None) -> list[tuple[Tensor, Tensor]]:
    """The past of a prefill: every layer's keys and values of length 0."""
    shape = (batch, spec.kv_heads, 0, spec.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.layers)]


def positions_of(attention_mask: Tensor) -> Tensor:
    """Position ids of every place from the attention mask (B, S): attended tokens count from 0, padding gets 1
    (any valid row: its output is never read) — what transformers' ``generate`` feeds a decoder."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def finish(spec: Spec, w: Mapping[str, Tensor], x: Tensor, lazy_logits: bool = False,
           input_ids: Tensor | None = None) -> dict[str, Tensor]:
    """The final norm and the heads on the last block's output (``input_ids``: for pooling at a token)."""
    if spec.final_norm:
        x = norm(spec, w, "final_norm", x)
    out = {"hidden": x}
    if spec.pooler:
        out["pooled"] = torch.tanh(linear(w, "pooler", x[:, 0]))
    if spec.pool != "none":
        pooled = pooled_token(spec, x, input_ids)
        if spec.pool_norm:  # CLIP vision: a norm on the pooled token only
            pooled = norm(spec, w, "pool_norm", pooled)
        out["pooled"] = pooled
        if spec.projection:
            out["embeds"] = F.linear(pooled, w["proj.weight"])
    if spec.head == "classifier":
        if spec.head_mean:  # DINOv2: one linear layer on [class token; mean of the patch tokens]
            features = torch.cat([x[:, 0], x[:, spec.prefix_tokens:].mean(dim=1)], dim=-1)
            logits = F.linear(features, torch.cat([w["head.weight"], w["head_mean.weight"]], dim=1), w["head.bias"])
        else:
            logits = linear(w, "head", x[:, 0])
        if spec.dist_head:  # DeiT with teacher: the prediction is the mean of the cls and distillation heads
            logits = (logits + linear(w, "head_dist", x[:, 1])) / 2
        out["logits"] = logits
    elif spec.head == "token_binary":  # one logit per token (ELECTRA's discriminator): (B, T)
        h = activation(spec.activation, linear(w, "token_head.dense", x))
        out["logits"] = linear(w, "token_head", h).squeeze(-1)
    elif spec.head in ("mlm", "lm"):
        decode = decoder(spec, w)
        if lazy_logits:
            out["decode"] = decode
        else:
            out["logits"] = decode(x)
    if spec.pair_head:
        out["pair_logits"] = linear(w, "pair_head", out["pooled"])
    return out


def pooled_token(spec: Spec, x: Tensor, input_ids: Tensor | None) -> Tensor:
    """(B, D): the first token, or for ``pool="eos"`` the first place of ``pool_token_id`` in each row (with
    pool_token_id -1: the place of the row's highest id, the end-of-text token of CLIP's original vocabulary)."""
    if spec.pool == "first":
        return x[:, 0]
    if input_ids is None:
        raise ValueError("pooling at the end-of-text token needs input_ids")
    ids = input_ids.to(torch.int32)  # ONNX's ArgMax takes no int64
    hits = ids if spec.pool_token_id < 0 else (ids == spec.pool_token_id).to(torch.int32)
    where = hits.argmax(dim=-1)
    return x.gather(1, where[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)


def decoder(spec: Spec, w: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """The LM/MLM head as a function of hidden states (any leading shape) to vocabulary logits."""
    table = w["embed.tokens"] if spec.tie_embeddings else w["lm_head.weight"]

    def decode(h: Tensor) -> Tensor:
        if spec.head == "mlm":
            if spec.mlm_transform:
                act = spec.mlm_activation or spec.activation
                h = norm(spec, w, "mlm.norm", activation(act, linear(w, "mlm.dense", h)))
            return project(h, table, w["mlm.bias"])
        logits = project(h, table)
        return softcap(logits, spec.final_softcap) if spec.final_softcap else logits

    return decode


def init_weights(spec: Spec, seed: int = 0, std: float = 0.02, dtype=torch.float32) -> dict[str, Tensor]:
    """Random weights for ``spec`` (the 'scratch' starting point): normal(0, std) matrices, unit norms, zero biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in spec.tensor_names():
        shape = spec.shape_of(name)
        if name.endswith(".bias") or name == "mlm.bias":
            t = torch.zeros(shape)
        elif "norm" in name:  # unit gain: with an offset (Gemma) the stored weight is gain - offset
            t = torch.full(shape, 1.0 - spec.norm_offset)
        elif name.endswith(("attn_scale", "mlp_scale")):  # LayerScale starts as the identity
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        out[name] = t.to(dtype)
    return out
