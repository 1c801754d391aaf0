"""Growth baselines: the methods LiGO is measured against, as family-neutral functions on canonical weights.

Each method takes ``(source_spec, source_weights, target_spec, seed)`` and returns the target's canonical weights
(fp32).  What a tensor's axes mean comes from ``spec.spaces`` alone — which axis is the residual stream, which is a
head or MLP space — plus the canonical graph's roles: an axis is *written* (a row of a matrix, a bias, a norm, an
embedding row looked up by index) or *read* (a matrix's input columns).  No family is ever asked for.

Width growth copies channels.  Space ``s`` grows from D1 to D2 by a selection ``index`` (target channel i copies
source channel index[i], the first D1 channels stay in place) and a fan-in ``split`` (a read axis reads channel i
with weight split[i]; the copies of one source channel have splits summing to 1), so a copied channel carries the
same value and its readers see the same sum: ``W_new = S W P^T`` with ``S`` the 0/1 selection and ``P`` the split
selection.  Heads are copied whole (every channel of a new head comes from one old head), so per-head layouts such
as rotary half-split pairs survive; with grouped-query attention a new query head copies an old query head of the
key/value group its own group copies.

Where the copy is exact, the grown model computes the source's function: norms over the residual stream see each
channel the same number of times only when D2 is a multiple of D1 (balanced copies keep a LayerNorm's mean and
variance and an RMSNorm's mean square), so unequal counts make it approximate.  A tied LM/MLM decoder both writes
the stream (the embedding) and reads it (the decoder): the norm in front of the decoder takes the split instead.
``preservation(method, source, target)`` says, per case, whether the method is exact and why; tests prove each
"exact" against the source's outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from ..errors import LigoError
from ..model import init_weights
from ..spec import CANONICAL, PER_LAYER_SPACES, Spec, module_of, pattern_of, space_kind
from .operator import check_growable

METHODS = ("stack", "interpolate", "net2net", "aki", "lemon", "scratch")

# What each method does and how it grows the axis it does not define (used by the CLI's --help and growth.json).
METHOD_NOTES: dict[str, str] = {
    "stack": "StackBERT (Gong et al. 2019): new layer l is small layer l mod L1. Depth only; width grows by the "
             "net2net copy (as the LiGO paper pairs its depth baselines). Function-preserving only when no layer is "
             "added (a stacked model runs the small network twice).",
    "interpolate": "Interpolation (Chang et al. 2018): new layer l is small layer floor(l * L1 / L2), each layer "
                   "repeated in place. Depth only; width grows by the net2net copy. Function-preserving only when no "
                   "layer is added.",
    "net2net": "bert2BERT's FPI / Net2Net: every new channel, MLP neuron and whole head copies a random old one; "
               "readers divide its weight by the copy count. Width only; depth grows by stacking (as bert2BERT). "
               "Function-preserving for width growth when the residual width grows by an integer factor (balanced "
               "copies keep the norms' statistics); approximate otherwise and whenever layers are added.",
    "aki": "bert2BERT's AKI: as net2net, but the new MLP neurons and heads of layer l are copied from layer l+1 (the "
           "top layer from itself), which breaks the symmetry of copies. Depth grows by stacking. Not "
           "function-preserving by design (it is when no MLP neuron or head is added and net2net is).",
    "lemon": "LEMON (Wang et al. 2024): lossless expansion. Width: copies with unequal fan-out splits (symmetry "
             "breaking); the residual stream is copied evenly when D2 is a multiple of D1, else (pre-LN only) LEMON's "
             "average expansion (LayerNorm) / zero expansion (RMSNorm) with random reads of the new channels, the "
             "stream scaled by sqrt(D2/D1) in place of LEMON's epsilon rescaling. Depth: each small layer is followed "
             "by copies whose attention-output and fc2 weights are zero, so they add nothing (pre-LN only). Exact "
             "wherever it runs; refuses post-LN depth growth and post-LN width growth by a non-integer factor, where "
             "no lossless expansion exists.",
    "scratch": "Random initialisation of the target (normal(0, 0.02) matrices, unit norms, zero biases): the "
               "reference every saving is measured against.",
    "ligo": "LiGO (Wang et al. 2023): a learned linear operator from the small model's weights to the large one's, "
            "fitted for a few steps on data, then materialised.",
}

# Canonical tensors looked up by index: a row is a vector of the residual stream, so that axis is written, not read.
LOOKUPS = frozenset({"embed.tokens", "embed.positions", "embed.types", "embed.cls", "embed.dist"})
# A block whose attention output and fc2 are zero adds nothing to the residual stream (an output norm of zero is
# zero once its bias is: RMSNorm has none, LayerNorm's is zeroed with them).
ZERO_OUTPUT = ("o.weight", "o.bias", "fc2.weight", "fc2.bias", "attn_out_norm.bias", "mlp_out_norm.bias")
# Canonical tensors that add to the residual stream (its writers).
STREAM_WRITERS = LOOKUPS | {"embed.patch.weight", "embed.patch.bias", "layers.{i}.o.weight", "layers.{i}.o.bias",
                            "layers.{i}.fc2.weight", "layers.{i}.fc2.bias", "embed.proj.weight", "embed.proj.bias"}
# Readers whose input is not the output of a norm (the pooled vector): under average expansion their new input
# channels carry the old channels' mean, not zero, so they must read them with zero weight.
READS_UNNORMALISED = frozenset({"pair_head.weight", "token_head.weight"})


@dataclass
class Growth:
    """How one width space grows from ``d1`` channels.  ``mode``: ``copy`` (channel i copies ``index[i]``, read
    with weight ``split[i]``), ``avg`` / ``zero`` (residual only, LEMON: new channels hold the mean of the old ones /
    zero; the first d1 channels stay)."""

    d1: int
    index: Tensor
    split: Tensor
    mode: str = "copy"

    @property
    def d2(self) -> int:
        return len(self.index)


# --- selections --------------------------------------------------------------------------------------------------------


def _pick(n_old: int, n_new: int, g: torch.Generator) -> Tensor:
    """Old units for ``n_new`` new ones, as even as possible (each old unit floor or ceil(n_new / n_old) times), in
    random order."""
    if n_new <= 0:
        return torch.zeros(0, dtype=torch.long)
    full, rest = divmod(n_new, n_old)
    picks = torch.cat([torch.arange(n_old).repeat(full), torch.randperm(n_old, generator=g)[:rest]])
    return picks[torch.randperm(n_new, generator=g)]


def _splits(index: Tensor, unequal: bool, g: torch.Generator) -> Tensor:
    """Fan-in weights of the copies: 1 / count (net2net), or random unequal shares summing to 1 per source unit
    (LEMON's symmetry breaking)."""
    counts = torch.bincount(index, minlength=int(index.max()) + 1).double()
    if not unequal:
        return 1.0 / counts[index]
    share = 0.5 + torch.rand(len(index), generator=g, dtype=torch.float64)  # U(0.5, 1.5): unequal, positive
    total = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, index, share)
    return share / total[index]


def _channels(d1: int, d2: int, unequal: bool, g: torch.Generator) -> Growth:
    index = torch.cat([torch.arange(d1), _pick(d1, d2 - d1, g)])
    return Growth(d1, index, _splits(index, unequal, g))


def _per_head(head_index: Tensor, head_split: Tensor, head_dim: int, d1: int) -> Growth:
    """A head-level selection spread over the head's channels (channel e of new head h is channel e of its old
    head)."""
    offsets = torch.arange(head_dim)
    index = (head_index[:, None] * head_dim + offsets).reshape(-1)
    return Growth(d1, index, head_split.repeat_interleave(head_dim))


def head_selection(source: Spec, target: Spec, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(key/value head index (kv2,), query head index (h2,)): which old head each new one copies.

    New key/value head k copies old head kv[k] (old heads stay in place).  Query slot m of a new group that is the
    c-th copy of old group j copies old query head ``j * r1 + (c * r2 + m) % r1`` (r = query heads per group), so
    every new query head attends with the keys its old head used, and every old query head appears at least once —
    which needs each old group copied ceil(r1 / r2) times."""
    h1, g1, h2, g2 = source.heads, source.kv_heads, target.heads, target.kv_heads
    r1, r2 = h1 // g1, h2 // g2
    need = -(-r1 // r2)
    if g2 < g1 * need:
        raise LigoError(f"cannot copy heads from {h1} query / {g1} key-value heads into {h2} / {g2}: each old "
                        f"key/value group's {r1} query heads need {need} copies of the group; choose kv_heads >= "
                        f"{g1 * need}")
    extra = torch.arange(g1).repeat_interleave(need - 1)
    extra = torch.cat([extra, _pick(g1, g2 - g1 - len(extra), g)])
    kv = torch.cat([torch.arange(g1), extra[torch.randperm(len(extra), generator=g)]])
    query = torch.empty(h2, dtype=torch.long)
    copies = [0] * g1
    for group in range(g2):
        j = int(kv[group])
        for m in range(r2):
            query[group * r2 + m] = j * r1 + (copies[j] * r2 + m) % r1
        copies[j] += 1
    return kv, query


def layer_growths(source: Spec, target: Spec, unequal: bool, g: torch.Generator) -> dict[str, Growth]:
    """Growths of one layer's own spaces (q, k, v, o, mlp) that change size."""
    out: dict[str, Growth] = {}
    if (target.heads, target.kv_heads) != (source.heads, source.kv_heads):
        kv, query = head_selection(source, target, g)
        d = source.head_dim
        q_split = _splits(query, unequal, g)
        out["q"] = out["o"] = _per_head(query, q_split, d, source.heads * d)
        kv_growth = _per_head(kv, _splits(kv, unequal, g), d, source.kv_heads * d)
        out["k"] = out["v"] = kv_growth
    if target.mlp != source.mlp:
        out["mlp"] = _channels(source.mlp, target.mlp, unequal, g)
    return out


# --- the residual stream ------------------------------------------------------------------------------------------------


def decoder_norm(spec: Spec) -> str | None:
    """The norm whose output a tied LM/MLM decoder reads (None: no tied decoder, or it reads an unnormalised
    stream)."""
    if not spec.tie_embeddings or spec.head not in ("lm", "mlm"):
        return None
    if spec.head == "mlm" and spec.mlm_transform:
        return "mlm.norm"
    return "final_norm" if spec.final_norm else None


def _tied_without_norm(spec: Spec) -> bool:
    return spec.tie_embeddings and spec.head in ("lm", "mlm") and decoder_norm(spec) is None


def residual_mode(method: str, source: Spec, target: Spec) -> str:
    """How the residual stream grows: ``copy`` (a channel selection), or, for LEMON with a width that is no multiple
    of the source's, ``avg`` (LayerNorm) or ``zero`` (RMSNorm) expansion of a pre-LN stream.  Raises LigoError
    where LEMON has no lossless expansion."""
    if method != "lemon" or target.width == source.width or target.width % source.width == 0:
        if method == "lemon" and target.width != source.width and _tied_without_norm(source):
            raise LigoError("lemon cannot widen a model whose tied decoder reads the residual stream without a norm "
                            "in front (the copied embedding columns would be counted twice); use --method net2net "
                            "(approximate)")
        return "copy"
    if source.norm_placement == "post":
        raise LigoError(f"lemon cannot widen a post-LN model losslessly from {source.width} to {target.width}: every "
                        f"norm output is the stream, and only an integer width factor keeps its statistics; choose a "
                        f"width that is a multiple of {source.width} or --method net2net (approximate)")
    plain = _not_plain_pre_ln(source)
    if plain:
        raise LigoError(f"lemon's average/zero expansion (width {source.width} -> {target.width}, not a multiple) "
                        f"scales the residual stream, which {plain} does not pass through unchanged; choose a width "
                        f"that is a multiple of {source.width} or --method net2net (approximate)")
    if source.embed_norm or (source.head == "mlm" and source.mlm_transform) or not source.final_norm:
        raise LigoError(f"lemon's average expansion (width {source.width} -> {target.width}, not a multiple) needs "
                        f"every norm to read the residual stream and the heads to read the final norm; this model "
                        f"has an embedding norm, an MLM transform or no final norm — choose a width that is a "
                        f"multiple of {source.width}")
    return "zero" if source.norm == "rmsnorm" else "avg"


def _not_plain_pre_ln(spec: Spec) -> str | None:
    """What keeps a pre-LN model from LEMON's average/zero expansion (which scales the stream by sqrt(D2/D1) and
    relies on every sublayer reading it through a norm and writing it through a plain matrix), or None."""
    if spec.norm_placement != "pre":
        return f"a {spec.norm_placement}-norm block"
    if spec.layer_scale:
        return "LayerScale"
    if spec.embed_scale:
        return "the sqrt(width) embedding scale"
    return None


def _unbalanced_heads(source: Spec, target: Spec) -> bool:
    """q/k norms over the whole projection (OLMo 2) keep their statistics only when every head is copied equally
    often."""
    return source.qk_norm == "proj" and (target.heads % source.heads or target.kv_heads % source.kv_heads) != 0


def _window_changes(method: str, source: Spec, target: Spec) -> str | None:
    """Where a copied source layer lands on a target layer of another attention kind (full / windowed, with its own
    rotary base), the first such layer, else None."""
    for i, (src, zero) in enumerate(depth_map(method, source.layers, target.layers)):
        if not zero and source.windowed(src) != target.windowed(i):
            kind = "windowed" if target.windowed(i) else "full"
            return f"source layer {src} lands on target layer {i}, which is {kind}"
    return None


def residual_growth(method: str, source: Spec, target: Spec, g: torch.Generator) -> Growth | None:
    if target.width == source.width:
        return None
    mode = residual_mode(method, source, target)
    if mode == "copy":
        return _channels(source.width, target.width, method == "lemon", g)
    index = torch.arange(source.width)
    return Growth(source.width, index, torch.ones(source.width, dtype=torch.float64), mode)


# --- applying growths ---------------------------------------------------------------------------------------------------


def _is_norm(pattern: str) -> bool:
    return pattern.endswith("norm.weight") or pattern.endswith("norm.bias")


def _grow_written(x: Tensor, axis: int, gr: Growth, d2: int, stream: bool) -> Tensor:
    if gr.mode == "copy":
        return x.index_select(axis, gr.index)
    new_shape = list(x.shape)
    new_shape[axis] = d2 - gr.d1
    fill = x.mean(axis, keepdim=True).expand(new_shape) if gr.mode == "avg" else x.new_zeros(new_shape)
    out = torch.cat([x, fill], axis)
    # LEMON rescales the norms' epsilon by D1/D2; scaling the stream by sqrt(D2/D1) is the same and keeps epsilon
    return out * math.sqrt(d2 / gr.d1) if stream else out


def _grow_read(x: Tensor, axis: int, gr: Growth, d2: int, random_new: bool, g: torch.Generator) -> Tensor:
    if gr.mode == "copy":
        shape = [1] * x.dim()
        shape[axis] = d2
        return x.index_select(axis, gr.index) * gr.split.to(x.dtype).view(shape)
    # the new input channels carry zero (LEMON): any weight keeps the function; random weights break the symmetry
    new_shape = list(x.shape)
    new_shape[axis] = d2 - gr.d1
    std = float(x.std()) if x.numel() > 1 else 0.0
    fill = torch.randn(new_shape, generator=g, dtype=x.dtype) * std if random_new else x.new_zeros(new_shape)
    return torch.cat([x, fill], axis)


def _grow_norm(x: Tensor, pattern: str, gr: Growth, d2: int, decoder: bool, g: torch.Generator,
               offset: float = 0.0, decoder_gain: float = 1.0) -> Tensor:
    """A residual-space norm parameter grown.  Gains are scaled as gains: with an ``offset`` (Gemma stores
    gain - 1) the stored value is rescaled around it.  ``decoder_gain``: the extra factor a tied decoder's norm
    takes (the embedding scale's change)."""
    if not pattern.endswith(".bias") and offset:
        return _grow_norm(x + offset, pattern, gr, d2, decoder, g, 0.0, decoder_gain) - offset
    if gr.mode == "copy":
        out = x.index_select(0, gr.index)
        # a tied decoder sums over the copies of each channel
        return out * (gr.split.to(x.dtype) * decoder_gain) if decoder else out
    # average/zero expansion of a stream scaled by c = sqrt(D2/D1): the old channels' normalised values grow by c,
    # so gamma shrinks by 1/c; new channels output 0 (beta 0, random gamma).  A tied decoder (the embedding, scaled
    # by c) reads the output: that norm shrinks by another 1/c.
    eta = math.sqrt(gr.d1 / d2)
    if pattern.endswith(".bias"):
        out = torch.cat([x, x.new_zeros(d2 - gr.d1)])
        return out * eta if decoder else out
    pick = torch.randint(gr.d1, (d2 - gr.d1,), generator=g)
    out = torch.cat([x * eta, x[pick] * eta])
    return out * eta if decoder else out


def widen(name: str, x: Tensor, target: Spec, residual: Growth | None, own: Mapping[str, Growth],
          decoder: str | None, g: torch.Generator) -> Tensor:
    """One canonical tensor grown along every axis whose space grows (``own``: the layer's q/k/v/o/mlp growths)."""
    pattern, _ = pattern_of(name)
    tags = CANONICAL[pattern]
    for axis, tag in enumerate(tags):
        kind = space_kind(tag)
        if kind == "embedding":  # the embedding size is kept; where it is the width, it is the residual stream
            if target.embed_proj:
                continue
            kind = "residual"
        gr = residual if kind == "residual" else own.get(kind) if kind in PER_LAYER_SPACES else None
        if gr is None:
            continue
        d2 = target.space_size(kind)
        if kind == "residual" and _is_norm(pattern):
            x = _grow_norm(x, pattern, gr, d2, decoder is not None and pattern.startswith(decoder + "."), g,
                           target.norm_offset if target.norm == "rmsnorm" else 0.0, 1.0 / _embed_factor(gr, target))
        elif x.dim() >= 2 and axis == 1 and pattern not in LOOKUPS:
            random_new = not (gr.mode == "avg" and pattern in READS_UNNORMALISED)
            x = _grow_read(x, axis, gr, d2, random_new, g)
        else:
            x = _grow_written(x, axis, gr, d2, kind == "residual" and pattern in STREAM_WRITERS)
            if kind == "residual" and pattern == "embed.tokens":
                x = x * _embed_factor(gr, target)
    return x


def _embed_factor(gr: Growth, target: Spec) -> float:
    """With a sqrt(width) embedding scale (Gemma), copied embedding rows are scaled by sqrt(D1/D2) so the stream
    keeps its values (the average/zero expansion wants the stream scaled up: LEMON is refused there)."""
    return math.sqrt(gr.d1 / target.width) if target.embed_scale and gr.mode == "copy" else 1.0


def _new_units_from(wide_self: Tensor, wide_above: Tensor, name: str, own: Mapping[str, Growth]) -> Tensor:
    """AKI: along the layer's own spaces, the new units take their weights from the layer above."""
    pattern, _ = pattern_of(name)
    out = wide_self
    for axis, tag in enumerate(CANONICAL[pattern]):
        gr = own.get(space_kind(tag)) if space_kind(tag) in PER_LAYER_SPACES else None
        if gr is None:
            continue
        shape = [1] * out.dim()
        shape[axis] = gr.d2
        new = (torch.arange(gr.d2) >= gr.d1).view(shape)
        out = torch.where(new, wide_above, out)
    return out


def depth_map(method: str, l1: int, l2: int) -> list[tuple[int, bool]]:
    """For each target layer: (source layer it starts from, whether its block output is zeroed)."""
    if method == "interpolate":
        return [(i * l1 // l2, False) for i in range(l2)]
    if method == "lemon":  # each small layer, then its zero-output copies
        src = [i * l1 // l2 for i in range(l2)]
        return [(s, i > 0 and src[i - 1] == s) for i, s in enumerate(src)]
    return [(i % l1, False) for i in range(l2)]  # stack (also net2net / aki depth, as bert2BERT)


# --- the methods --------------------------------------------------------------------------------------------------------


def expand(method: str, source: Spec, weights: Mapping[str, Tensor], target: Spec, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The target's canonical weights grown from ``weights`` of ``source`` by ``method`` (see METHODS), in ``dtype``.
    Copies and splits are computed in float64, so each grown weight is the correctly rounded value."""
    if method not in METHODS:
        raise LigoError(f"unknown growth method {method!r}; choose one of {', '.join(METHODS)} (or ligo)")
    check_growable(source, target)
    if method == "scratch":
        return init_weights(target, seed, dtype=dtype)
    preservation(method, source, target)  # raises where the method refuses
    g = torch.Generator().manual_seed(seed)
    w = {k: weights[k].detach().to(torch.float64) for k in source.tensor_names()}
    unequal = method == "lemon"
    residual = residual_growth(method, source, target, g)
    decoder = decoder_norm(source)
    out: dict[str, Tensor] = {}
    for name in target.tensor_names():
        if pattern_of(name)[1] is None:
            out[name] = widen(name, w[name], target, residual, {}, decoder, g)

    modules = [module_of(n) for n in source.tensor_names() if pattern_of(n)[1] == 0]
    own = [layer_growths(source, target, unequal, g) for _ in range(source.layers)]
    wide: list[dict[str, Tensor]] = []
    for layer in range(source.layers):
        wide.append({m: widen(f"layers.{layer}.{m}", w[f"layers.{layer}.{m}"], target, residual, own[layer], decoder,
                              g) for m in modules})
    if method == "aki":
        merged = []
        for layer in range(source.layers):
            above = min(layer + 1, source.layers - 1)
            merged.append({m: _new_units_from(wide[layer][m], widen(f"layers.{layer}.{m}", w[f"layers.{above}.{m}"],
                                                                     target, residual, own[layer], decoder, g),
                                              f"layers.{layer}.{m}", own[layer]) for m in modules})
        wide = merged
    for i, (src, zero) in enumerate(depth_map(method, source.layers, target.layers)):
        for m in modules:
            t = wide[src][m].clone()
            out[f"layers.{i}.{m}"] = t.zero_() if zero and m in ZERO_OUTPUT else t
    return {k: v.to(dtype) for k, v in out.items()}


# --- what is preserved -------------------------------------------------------------------------------------------------


def preservation(method: str, source: Spec, target: Spec) -> tuple[bool, str]:
    """(exact, why): whether ``method`` grows ``source`` into ``target`` keeping the source's outputs (on the
    source's channels), and the reason.  Raises LigoError where the method refuses the growth (LEMON)."""
    if method == "scratch":
        return False, "random initialisation"
    if method == "ligo":
        return False, "LiGO's initial operator averages channels and is fitted on data; not function-preserving"
    if method not in METHODS:
        raise LigoError(f"unknown growth method {method!r}; choose one of {', '.join(METHODS)} (or ligo)")
    deeper = target.layers > source.layers
    wider = target.width > source.width
    if method == "lemon":
        if deeper and source.norm_placement == "post":
            raise LigoError("lemon cannot add layers to a post-LN model losslessly: a block with zero output still "
                            "renormalises the stream; use --method stack or interpolate (approximate), or grow only "
                            "the width")
        if _unbalanced_heads(source, target):
            raise LigoError(f"lemon cannot grow the heads {source.heads}/{source.kv_heads} -> {target.heads}/"
                            f"{target.kv_heads} losslessly: the q/k norms over the whole projection need every head "
                            f"copied equally often; choose head counts that are multiples of the source's")
        moved = _window_changes(method, source, target) if deeper else None
        if moved:
            raise LigoError(f"lemon cannot add layers losslessly here: {moved} (the window pattern follows the layer "
                            f"index); choose a layer count that keeps each source layer's kind, or --method stack "
                            f"(approximate)")
        mode = residual_mode(method, source, target) if wider else "copy"
        if mode != "copy":
            return True, (f"lossless: {mode} expansion of the residual stream, scaled by sqrt({target.width}/"
                          f"{source.width}) (LEMON's epsilon rescaling with the source's epsilon kept)")
        return True, "lossless: copies with unequal fan-out splits, zero-output new blocks"
    if deeper:
        return False, f"{target.layers - source.layers} added layers repeat small layers, which changes the function"
    if method == "aki" and ((target.heads, target.kv_heads, target.mlp) != (source.heads, source.kv_heads,
                                                                             source.mlp)):
        return False, "new heads and MLP neurons come from the layer above"
    if wider and target.width % source.width:
        return False, (f"approximate: widening {source.width} -> {target.width} copies residual channels unequal "
                       f"numbers of times, which changes every norm's statistics")
    if _unbalanced_heads(source, target):
        return False, "approximate: heads copied unequal numbers of times change the q/k norms over the projection"
    if wider and _tied_without_norm(source):
        return False, "approximate: the tied decoder reads the copied residual channels without a norm to rescale"
    return True, "exact: every copied channel is read with weights summing to its original weight"


# --- starting LiGO from another method ---------------------------------------------------------------------------------

# Why a method's expansion can or cannot be a LiGO operator's starting point (``ligo --init METHOD``).
LIGO_INIT_NOTES: dict[str, str] = {
    "stack": "exact for depth-only growth (depth rows one-hot on layer l mod L1); a growing width starts from "
             "net2net's copies without its division (see net2net)",
    "interpolate": "exact for depth-only growth (depth rows one-hot on layer floor(l * L1 / L2)); a growing width "
                   "starts from net2net's copies without its division (see net2net)",
    "net2net": "approximate: LiGO applies one matrix per space both to the rows that write a channel and to the "
               "columns that read it, so the readers' division by the copy count cannot be expressed; the operator "
               "starts from the same copies without it (exact when no width grows)",
    "lemon": "approximate: zero-output new blocks are exact (their o/fc2 depth rows are zero), but LEMON's unequal "
             "fan-out splits, like net2net's division, need a reading matrix apart from the writing one; the "
             "operator starts from the copies without splits (exact for depth-only growth)",
    "aki": "not expressible: AKI takes a layer's new neurons from the layer above, a per-row mix of layers, while "
           "LiGO mixes whole layers (one depth weight per module and layer) before any width expansion",
    "scratch": "not expressible: a random target is no linear function of the small model's weights",
}


def _selection(gr: Growth, d2: int) -> Tensor:
    """The (D2, D1) expansion matrix of a growth: one-hot copies, or LEMON's mean / zero rows for new channels."""
    if gr.mode == "copy":
        return torch.nn.functional.one_hot(gr.index, gr.d1).float()
    fill = torch.full((d2 - gr.d1, gr.d1), 1.0 / gr.d1) if gr.mode == "avg" else torch.zeros(d2 - gr.d1, gr.d1)
    return torch.cat([torch.eye(gr.d1), fill])


@torch.no_grad()
def ligo_init(operator, method: str, seed: int = 0) -> str:
    """Set a ``LigoOperator`` to the LiGO form of ``method``'s expansion (see LIGO_INIT_NOTES): depth rows from
    ``depth_map`` (zero rows for LEMON's zero-output blocks), width matrices = the method's channel/head copy
    selections.  Returns the note saying how exact that is; raises LigoError where it cannot be expressed."""
    if method not in LIGO_INIT_NOTES:
        raise LigoError(f"unknown --init method {method!r}; choose one of {', '.join(LIGO_INIT_NOTES)}")
    if method in ("aki", "scratch"):
        raise LigoError(f"ligo --init {method}: {LIGO_INIT_NOTES[method]}")
    source, target = operator.source, operator.target
    preservation(method, source, target)  # LEMON's refusals hold here too
    g = torch.Generator().manual_seed(seed)
    mapping = depth_map(method, source.layers, target.layers)
    if operator.depth_grows:
        for module in operator.module_types:
            mix = torch.zeros(target.layers, source.layers)
            for i, (src, zero) in enumerate(mapping):
                if not (zero and module in ZERO_OUTPUT):
                    mix[i, src] = 1.0
            operator.set_depth(module, mix)
    residual = residual_growth(method, source, target, g)
    if residual is not None:
        operator.set_width("residual", _selection(residual, target.width))
    per_source = [layer_growths(source, target, method == "lemon", g) for _ in range(source.layers)]
    for kind in operator.width_kinds:
        if kind == "residual" or kind in operator.tied:
            continue
        matrix = operator.width(kind).clone()
        if matrix.dim() == 3:  # one per target layer: the copies of the small layer it starts from
            for i, (src, _) in enumerate(mapping):
                matrix[i] = _selection(per_source[src][kind], matrix.shape[-2])
        else:
            matrix = _selection(per_source[0][kind], matrix.shape[-2])
        operator.set_width(kind, matrix)
    return LIGO_INIT_NOTES[method]


def describe(method: str, source: Spec, target: Spec) -> dict:
    """What growth.json records about a baseline growth: the method, how it grows each axis, and whether (and why)
    the grown model computes the source's function.  Raises LigoError where the method refuses."""
    exact, why = preservation(method, source, target)
    return {"method": method, "method_note": METHOD_NOTES[method], "function_preserving": exact,
            "function_preserving_reason": why}
