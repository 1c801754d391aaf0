"""The LiGO growth operator over width spaces: ``W_new(l) = B_out(l) (sum_j w[l, j] W_j) B_in(l)^T``.

Every axis of every canonical tensor lives in a width space (``spec.spaces``).  The operator holds one expansion
matrix per space kind that grows — ``residual`` (B_emb, shared by every residual axis), and the per-layer ``q``,
``k``, ``v``, ``o``, ``mlp`` spaces (one matrix per target layer, or one shared by all layers) — and one ``L2 x L1``
depth-mixing matrix per module type (``q.weight``, ``q.bias``...: weights and biases apart, as the official code).
The paper's tying table falls out of the tags: O's output and fc2's output are ``residual`` so they use B_emb, fc2's
input is ``mlp`` so it uses fc1's matrix, biases and norms use their axis' space.  O's input (``o``: the attention
output, one head_dim slice per query head) uses V's matrix whenever the two spaces have the same size (no grouped-
query attention in either model), as in the paper; with GQA it has its own, initialised from the query heads.
Spaces that do not grow (vocab, classes, positions, channels, patch...) are the identity; so is depth when the layer
count is unchanged.  M = L_depth R_width is never formed: each target tensor costs a few matrix products, in the cheaper order.

The operator makes the target a layer at a time (``layer_weights(i)``), so the fitting forward can produce each layer
when it runs and, under activation checkpointing, again in the backward; writing reads one tensor at a time through
``grown()``.  The fitting forward takes a layer as factors instead (``layer_factors(i)``: B_out, the depth-mixed
source matrix, B_in), and ``model.linear`` applies them to its input rows in the order with the fewest FLOPs for
the batch: at 4 x 128 tokens that is the rows through the three factors, at 16 x 128 and more the rows through B_in
and then through ``B_out W`` (the grown matrix has rank <= the source width, so this is cheaper than the dense one).  Per-layer parts (that layer's width matrices and depth-mixing rows) live in ``layer_ops[i]``.
"""

from __future__ import annotations

import collections.abc
import functools
import json
import math
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor

from ..errors import LigoError
from ..files import spec_from_metadata
from ..model import Chain, Factored
from ..spec import CANONICAL, PER_LAYER_SPACES, Spec, module_of, pattern_of, space_kind
from . import init as inits

LEARN = ("both", "width", "depth")
# Spaces measured in heads: which head count sizes them (the rest of the spec's spaces are plain channels).
HEAD_SPACES = {"q": "heads", "o": "heads", "k": "kv_heads", "v": "kv_heads"}
# A space that uses another's matrix when both have the same size in both models: O's input uses V's; the embedding
# space (token/position/type tables, embedding norm, MLM decoder) is the residual stream wherever embedding_size is
# the width (every family without an embedding projection), so it grows by B_emb as the stream does.
TIED = {"o": "v", "embedding": "residual"}
# Spec fields a growth target may change; everything else must stay as the source has it.
SIZE_FIELDS = ("layers", "width", "heads", "kv_heads", "mlp")
# Tables the fitting forward keeps factored (rows looked up / decoded through B_emb): the vocabulary is the only
# axis large enough for that to matter (50k-250k rows against a width of 1-8k).
FACTORED_SPACES = ("vocab",)


def check_growable(source: Spec, target: Spec) -> None:
    """Refuse a target the operator cannot reach from ``source``, with a one-line reason."""
    if target.head_dim != source.head_dim:
        raise LigoError(f"the target has head_dim {target.head_dim} but the source has {source.head_dim}; LiGO keeps "
                        f"the head dimension and grows the number of heads — choose heads = q width / "
                        f"{source.head_dim}")
    if source.embed_proj and target.width == source.embed_width > source.width:
        raise LigoError(f"the target's width {target.width} is the source's embedding_size: growth keeps the "
                        f"embedding size, and its projection into the stream (embed.proj) cannot vanish; choose "
                        f"another width")
    fixed = {k: v for k, v in source.to_dict().items() if k not in SIZE_FIELDS and k != "labels"}
    for key, value in fixed.items():
        if getattr(target, key) != value:
            raise LigoError(f"the target changes {key} ({value!r} -> {getattr(target, key)!r}); growth changes only "
                            f"{', '.join(SIZE_FIELDS)}")
    for key in SIZE_FIELDS:
        if getattr(target, key) < getattr(source, key):
            raise LigoError(f"the target is smaller than the source on {key} ({getattr(source, key)} -> "
                            f"{getattr(target, key)}); LiGO only grows — choose a target at least as large on every "
                            f"axis")
    if target.heads % target.kv_heads:
        raise LigoError(f"target heads ({target.heads}) must be a multiple of its kv_heads ({target.kv_heads})")


def expand(x: Tensor, mats: list[Tensor | None]) -> Tensor:
    """``x`` with each axis ``a`` multiplied by ``mats[a]`` (D2, D1) where it is not None: ``B_out x B_in^T`` for a
    matrix, in the product order with fewer FLOPs, and without moving axes (no transposed copies)."""
    grows = [a for a, m in enumerate(mats) if m is not None]
    if not grows:
        return x
    if x.dim() == 1:
        return mats[0] @ x
    if grows == [0]:  # only the output axis (biases of 2-D+ tensors: the patch kernel): one matmul
        return (mats[0] @ x.reshape(x.shape[0], -1)).reshape(mats[0].shape[0], *x.shape[1:])
    if x.dim() == 2 and grows == [1]:
        return x @ mats[1].T
    if x.dim() == 2:
        b_out, b_in = mats
        (d2o, d1o), (d2i, d1i) = b_out.shape, b_in.shape
        if d2o * d1o * d1i + d2o * d1i * d2i <= d1o * d1i * d2i + d2o * d1o * d2i:
            return (b_out @ x) @ b_in.T
        return b_out @ (x @ b_in.T)
    for axis in grows:  # not reached by the canonical tensors; kept general
        x = (x.movedim(axis, -1) @ mats[axis].T).movedim(-1, axis)
    return x


class LayerOperator(torch.nn.Module):
    """What belongs to one target layer: its own q/k/v/o/mlp width matrices (unless the width is shared) and its
    row of every depth-mixing matrix.  A module of its own, so FSDP can shard and gather the operator layer by layer.
    ``layer_op(make)`` calls ``make`` with its tensors by key (``width__q``, ``depth__q__weight``) and returns what
    ``make`` returns: the layer's weights are made inside the call, while FSDP has the tensors gathered."""

    def forward(self, make: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> dict[str, Tensor]:
        return make({**dict(self.named_parameters(recurse=False)), **dict(self.named_buffers(recurse=False))})


def _is_fsdp(module: torch.nn.Module) -> bool:
    """Whether FSDP2 manages ``module`` (``fully_shard`` gives it an FSDPModule class)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def _register(module: torch.nn.Module, key: str, value: Tensor, trainable: bool) -> None:
    if trainable:
        module.register_parameter(key, torch.nn.Parameter(value))
    else:
        module.register_buffer(key, value)


class LigoOperator(torch.nn.Module):
    """The operator for growing ``source`` (spec + weights, frozen) into ``target``.

    ``global_weights()`` and ``layer_weights(i)`` give the target's canonical weights (differentiable with respect to
    the operator's parameters) a part at a time, so a forward can make each layer when it runs; ``tensor(name)`` one
    tensor (for writing); calling the operator gives them all.

    ``shared_width``: one q/k/v/o/mlp matrix for all target layers instead of one per layer.  ``learn``: which part
    trains (``both``, ``width`` or ``depth``); the other keeps its initial value.  The frozen source is held as
    parameters that do not train, so FSDP shards it with the operator.
    """

    def __init__(self, source: Spec, target: Spec, weights: Mapping[str, Tensor], shared_width: bool = False,
                 learn: str = "both", depth_init: str = "stack", width_init: str = "random",
                 noise: float = inits.DEFAULT_NOISE, seed: int = 0):
        super().__init__()
        check_growable(source, target)
        if learn not in LEARN:
            raise LigoError(f"unknown --learn {learn!r}; choose one of {', '.join(LEARN)}")
        self.source, self.target, self.shared_width, self.learn = source, target, shared_width, learn
        names = target.tensor_names()
        self.global_names = [n for n in names if pattern_of(n)[1] is None]
        self.module_types = [module_of(n) for n in names if pattern_of(n)[1] == 0]
        frozen = {name: weights[name] for name in self.global_names}
        frozen.update({module: torch.stack([weights[f"layers.{j}.{module}"] for j in range(source.layers)])
                       for module in self.module_types})
        for name, value in frozen.items():
            self.register_parameter(self._key("src", name), torch.nn.Parameter(value.detach().float(),
                                                                               requires_grad=False))

        kinds = sorted({space_kind(t) for n in names for t in CANONICAL[pattern_of(n)[0]]})
        self.width_kinds: dict[str, tuple[int, int]] = {}  # kind -> (d2, d1), for every space that grows
        for kind in kinds:
            d1, d2 = source.space_size(kind), target.space_size(kind)
            if d2 != d1:
                self.width_kinds[kind] = (d2, d1)
        self.tied = {k: v for k, v in TIED.items() if k in self.width_kinds and v in self.width_kinds
                     and self.width_kinds[k] == self.width_kinds[v]}
        self.depth_grows = target.layers != source.layers
        self.layer_ops = torch.nn.ModuleList(LayerOperator() for _ in range(target.layers))
        learn_width, learn_depth = learn in ("both", "width"), learn in ("both", "depth")
        for kind, shape in self.width_kinds.items():
            if kind in self.tied:
                continue
            for owner in (self.layer_ops if self._per_layer(kind) else [self]):
                _register(owner, self._key("width", kind), torch.zeros(shape), learn_width)
        for module in self.module_types if self.depth_grows else []:
            for layer_op in self.layer_ops:
                _register(layer_op, self._key("depth", module), torch.zeros(source.layers), learn_depth)
        self.initialize(depth_init, width_init, noise, seed)

    # -- structure ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _key(part: str, name: str) -> str:
        return f"{part}__{name.replace('.', '__')}"

    def _per_layer(self, kind: str) -> bool:
        return kind in PER_LAYER_SPACES and not self.shared_width

    def _source(self, name: str) -> Tensor:
        """A frozen source tensor: a global one by name, or a module type's (L1, ...) stack."""
        return getattr(self, self._key("src", name))

    def _matrix(self, kind: str, own: Mapping[str, Tensor] | None) -> Tensor | None:
        """The expansion matrix of ``kind`` for one layer (``own``: that layer's tensors) or for global tensors."""
        kind = self.tied.get(kind, kind)
        if kind not in self.width_kinds:
            return None
        key = self._key("width", kind)
        return own[key] if self._per_layer(kind) else getattr(self, key)

    def width(self, kind: str) -> Tensor | None:
        """The expansion matrix of a space kind: (D2, D1), or (L2, D2, D1) stacked when per layer; None if it does
        not grow."""
        kind = self.tied.get(kind, kind)
        if kind not in self.width_kinds:
            return None
        key = self._key("width", kind)
        if self._per_layer(kind):
            return torch.stack([getattr(layer_op, key) for layer_op in self.layer_ops])
        return getattr(self, key)

    def depth(self, module: str) -> Tensor | None:
        """The (L2, L1) mixing matrix of a module type (``q.weight``); None when the layer count does not change."""
        if not self.depth_grows:
            return None
        return torch.stack([getattr(layer_op, self._key("depth", module)) for layer_op in self.layer_ops])

    @torch.no_grad()
    def set_width(self, kind: str, value: Tensor) -> None:
        key = self._key("width", self.tied.get(kind, kind))
        if self._per_layer(kind):
            for layer_op, row in zip(self.layer_ops, value.expand(self.target.layers, *value.shape[-2:])):
                getattr(layer_op, key).copy_(row)
        else:
            target = getattr(self, key)
            target.copy_(value.reshape(target.shape))

    @torch.no_grad()
    def set_depth(self, module: str, value: Tensor) -> None:
        for layer_op, row in zip(self.layer_ops, value):
            getattr(layer_op, self._key("depth", module)).copy_(row)

    def named_operator_tensors(self) -> dict[str, Tensor]:
        """Every operator tensor (learned or fixed) by a readable name: ``width.q``, ``depth.fc1.weight``; the
        per-layer kinds stacked (L2, D2, D1), so this is a copy the size of the operator (see ``operator_shapes``)."""
        return {name: self.operator_tensor(name) for name in self.operator_shapes()}

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups with learning rates relative to each tensor's natural entry size: a width matrix's new
        rows start as combinations of D1 old neurons (entries ~1/D1), a depth row as a combination of L1 layers
        (~1/L1), so they step by ``lr / D1`` and ``lr / L1``: the same relative change whatever the model size."""
        groups = []
        for kind, (_, d1) in self.width_kinds.items():
            key = self._key("width", kind)
            owners = self.layer_ops if self._per_layer(kind) else [self]
            params = [getattr(o, key) for o in owners if kind not in self.tied and key in o._parameters]
            if params:
                groups.append({"params": params, "lr": lr / d1, "name": f"width.{kind}"})
        for module in self.module_types if self.depth_grows else []:
            key = self._key("depth", module)
            params = [layer_op._parameters[key] for layer_op in self.layer_ops if key in layer_op._parameters]
            if params:
                groups.append({"params": params, "lr": lr / self.source.layers, "name": f"depth.{module}"})
        return groups

    def operator_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of :meth:`named_operator_tensors`, by the same names, without making any (the
        stacked per-layer matrices are the size of the operator)."""
        out = {}
        for kind, shape in self.width_kinds.items():
            if kind not in self.tied:
                out[f"width.{kind}"] = (self.target.layers, *shape) if self._per_layer(kind) else shape
        if self.depth_grows:
            for module in self.module_types:
                out[f"depth.{module}"] = (self.target.layers, self.source.layers)
        return out

    def operator_parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.operator_shapes().values())

    def operator_tensor(self, name: str) -> Tensor:
        """One tensor of :meth:`named_operator_tensors` (``width.q``, ``depth.fc1.weight``), made alone."""
        part, what = name.split(".", 1)
        return self.width(what) if part == "width" else self.depth(what)

    def _layered_key(self, name: str) -> str | None:
        """For an operator tensor stored stacked over the target layers (a per-layer width kind), the key of its
        matrix in each ``LayerOperator``; None for the others (kept whole)."""
        part, what = name.split(".", 1)
        return self._key("width", what) if part == "width" and self._per_layer(what) else None

    # -- initialisation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, depth: str = "stack", width: str = "random", noise: float = inits.DEFAULT_NOISE,
                   seed: int = 0) -> None:
        """Set the operator to an initial value (see ``growth.init``), deterministically from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        s, t = self.source, self.target
        for module in self.module_types if self.depth_grows else []:
            self.set_depth(module, inits.depth_matrix(t.layers, s.layers, depth, noise, g))
        head_kinds = [k for k in self.width_kinds if k in HEAD_SPACES and k not in self.tied]
        for kind in sorted(self.width_kinds):
            if kind in self.tied or kind in HEAD_SPACES:
                continue
            d2, d1 = self.width_kinds[kind]
            for owner in self._owners(kind):  # drawn and set one matrix at a time: no stacked copies
                getattr(owner, self._key("width", kind)).copy_(inits.width_matrix(d2, d1, width, noise, g))
        if head_kinds:
            per_layer = any(self._per_layer(k) for k in head_kinds)
            for owner in self.layer_ops if per_layer else [self]:
                mats = inits.head_matrices((s.heads, t.heads), (s.kv_heads, t.kv_heads), s.head_dim, width, noise, g)
                for kind in head_kinds:
                    getattr(owner, self._key("width", kind)).copy_(mats[kind])

    def _owners(self, kind: str) -> list[torch.nn.Module]:
        """The modules holding ``kind``'s matrix: every layer's part when per layer, else the operator itself."""
        return list(self.layer_ops) if self._per_layer(kind) else [self]

    # -- application -------------------------------------------------------------------------------------------------
    def _global_matrices(self, name: str) -> list[Tensor | None]:
        """The width matrix of each axis of a global tensor (None where that axis does not grow)."""
        return [self._matrix(space_kind(tag), None) for tag in CANONICAL[name]]

    def global_weights(self, factored: bool = False) -> dict[str, Tensor | Factored]:
        """The target's tensors outside the layers (embeddings, final norm, heads).  With ``factored``, a vocabulary
        table that grows only in width comes as :class:`Factored` (source table, B_emb): the forward then looks rows
        up and decodes without ever forming the (vocab x width) table."""
        out = {}
        for name in self.global_names:
            tags, mats = CANONICAL[name], self._global_matrices(name)
            if factored and tags[0] in FACTORED_SPACES and mats[0] is None and len(mats) == 2 and mats[1] is not None:
                out[name] = Factored(self._source(name), mats[1])
            else:
                out[name] = expand(self._source(name), mats)
        return out

    def layer_weights(self, layer: int) -> dict[str, Tensor]:
        """Target layer ``layer``'s tensors: each module's depth mix of the source layers, expanded in width."""
        def make(own):
            return {f"layers.{layer}.{module}": self._layer_tensor(layer, module, own) for module in self.module_types}

        return self.layer_ops[layer](make)  # one call per layer: FSDP gathers this layer's operator for it

    def layer_factors(self, layer: int, expanded: Mapping[str, tuple[int, Tensor]] | None = None
                      ) -> dict[str, Tensor | Chain]:
        """Target layer ``layer``'s tensors for the fitting forward: each matrix that grows as a :class:`Chain`
        (B_out, depth-mixed source matrix, B_in) that ``model.linear`` runs its input through in the cheapest order,
        never forming the dense weight where that costs more; vectors (biases, norms) made as in ``layer_weights``.
        Mixing the L1 source matrices first and expanding once is what both forms share, except for the modules in
        ``expanded`` (:meth:`expanded_sources`), whose source matrices come already expanded on one side."""
        sharded = _is_fsdp(self.layer_ops[layer])
        expanded = expanded or {}

        def make(own):
            out = {}
            for module in self.module_types:
                t = self._layer_tensor(layer, module, own, factored=True, expanded=expanded.get(module))
                if sharded and isinstance(t, Chain):  # FSDP frees the gathered matrices when this call returns
                    t = Chain(*(m.clone() if m is not None else None for m in t))
                out[f"layers.{layer}.{module}"] = t
            return out

        return self.layer_ops[layer](make)

    def _layer_tensor(self, layer: int, module: str, own: Mapping[str, Tensor], factored: bool = False,
                      expanded: tuple[int, Tensor] | None = None) -> Tensor | Chain:
        mats = [self._matrix(space_kind(tag), own) for tag in CANONICAL["layers.{i}." + module]]
        if expanded is not None:  # one side already applied to every source matrix: mix those
            side, stack = expanded
            mats[side] = None
        else:
            stack = self._source(module)  # (L1, ...)
        if self.depth_grows:  # mixed in source space, before any expansion (L1 small matrices, not L2 large ones)
            mixed = torch.tensordot(own[self._key("depth", module)].to(stack.dtype), stack, dims=1)
        else:
            mixed = stack[layer]
        if factored and mixed.dim() == 2 and any(m is not None for m in mats):
            return Chain(mats[0], mixed, mats[1])
        return expand(mixed, mats)

    def step_factors(self, expand_first: bool = True) -> "StepFactors":
        """The fitting forward's ``layer_weights`` (see ``model.forward``): :meth:`layer_factors`, with the shared
        expansions applied once per step where that is cheaper when ``expand_first``."""
        return StepFactors(self, expand_first)

    def expanded_sources(self, rows: int) -> dict[str, tuple[int, Tensor]]:
        """The module types whose matrices cost fewer multiply-adds per step (``rows`` rows a layer) when one side's
        shared expansion is applied to each of the L1 source matrices once and the depth mix is taken of those —
        ``sum_j w_j (B_out W_j)`` in each of the L2 layers instead of ``B_out (sum_j w_j W_j)`` — as module ->
        (side: 0 output / 1 input, the (L1, ...) stack expanded on that side).  With a shared-width operator that is
        fc1's and fc2's MLP side at a fitting batch (B_mlp against 2x the layers).  The stacks and their gradients
        are held for the whole step: memory for speed."""
        out = {}
        for module in self.module_types:
            stack = self._source(module)
            kinds = [space_kind(tag) for tag in CANONICAL["layers.{i}." + module]]
            if stack.dim() != 3 or all(self._shape(k) is None for k in kinds):
                continue
            side = self._cheaper_side(stack.shape[1:], kinds, rows)
            if side is not None:
                mat = self._matrix(kinds[side], None)
                out[module] = (side, mat @ stack if side == 0 else stack @ mat.T)
        return out

    def _shape(self, kind: str) -> tuple[int, int] | None:
        return self.width_kinds.get(self.tied.get(kind, kind))

    def _cheaper_side(self, core: tuple[int, int], kinds: list[str], rows: int) -> int | None:
        """Which shared side of a (out, in) module is cheaper applied to the source matrices first, if any (see
        :meth:`expanded_sources`): multiply-adds of the step's forward, every layer's products and depth mixes."""
        l1, l2 = self.source.layers, self.target.layers
        meta = [torch.empty(s, device="meta") if s is not None else None for s in map(self._shape, kinds)]

        def per_step(core_shape, left, right, expand_cost):
            mix = l1 * math.prod(core_shape) if self.depth_grows else 0
            chain = Chain(left, torch.empty(core_shape, device="meta"), right)
            return expand_cost + l2 * (mix + chain.cost(rows))

        best, side = per_step(core, meta[0], meta[1], 0), None
        for s in (0, 1):
            if meta[s] is None or self._per_layer(kinds[s]):
                continue
            d2 = meta[s].shape[0]
            shape = (d2, core[1]) if s == 0 else (core[0], d2)
            cost = per_step(shape, None if s == 0 else meta[0], meta[1] if s == 0 else None,
                            l1 * math.prod(core) * d2)
            if cost < best:
                best, side = cost, s
        return side

    def tensor(self, name: str) -> Tensor:
        """One canonical tensor of the target."""
        pattern, layer = pattern_of(name)
        if layer is None:
            return expand(self._source(name), self._global_matrices(name))
        return self.layer_ops[layer](lambda own: {name: self._layer_tensor(layer, module_of(name), own)})[name]

    def tensor_blocks(self, name: str, rows: int) -> Iterator[Tensor]:
        """One canonical tensor of the target as consecutive blocks of at most ``rows`` rows, where its first axis
        does not grow (a vocabulary table: ``W_src[i:j] B^T``, the same values as the whole table): writing it then
        never forms the (vocab x width) table.  Any other tensor comes whole.  No gradients."""
        mats = self._global_matrices(name) if pattern_of(name)[1] is None else []
        if len(mats) == 2 and mats[0] is None and mats[1] is not None:
            table = self._source(name)
            for start in range(0, table.shape[0], rows):
                with torch.no_grad():
                    block = expand(table[start:start + rows], mats)
                yield block
        else:
            with torch.no_grad():
                whole = self.tensor(name)
            yield whole

    def forward(self) -> dict[str, Tensor]:
        """Every canonical weight of the target (fp32, on the operator's device)."""
        out = self.global_weights()
        for layer in range(self.target.layers):
            out.update(self.layer_weights(layer))
        return out

    def grown(self, dtype: torch.dtype | None = None) -> "GrownTensors":
        """The target's tensors as a read-only mapping that makes each one when it is read (on the CPU, in
        ``dtype``): what writing and evaluation take, without the whole grown model in memory."""
        return GrownTensors(self, dtype)

    def source_weights(self) -> dict[str, Tensor]:
        """The frozen source's canonical weights (views of what the operator holds, no copies)."""
        out = {name: self._source(name) for name in self.global_names}
        for module in self.module_types:
            for j, t in enumerate(self._source(module).unbind(0)):
                out[f"layers.{j}.{module}"] = t
        return out

    def cast_source(self, dtype: torch.dtype) -> None:
        """Hold the frozen source in ``dtype`` (bf16 on GPU); the operator itself stays fp32."""
        for name, p in self.named_parameters():
            if name.startswith("src__"):
                p.data = p.data.to(dtype)

    # -- files ---------------------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"source_spec": self.source.to_dict(), "target_spec": self.target.to_dict(),
                "shared_width": self.shared_width, "learn": self.learn}

    def save(self, path, extra: dict | None = None) -> Path:
        """Write the operator's tensors to a safetensors file as they are made, a per-layer kind a layer's matrix at
        a time (no copy of the whole operator); the specs and options go in its metadata."""
        from ..checkpoint import PlannedTensor, write_safetensors

        path = Path(path)
        meta = {**self.describe(), **(extra or {})}
        planned = [PlannedTensor(name, shape, torch.float32, pieces=functools.partial(self._saved, name))
                   for name, shape in self.operator_shapes().items()]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        write_safetensors(tmp, planned, metadata={"ligo_convert": json.dumps(meta, sort_keys=True)})
        tmp.replace(path)
        return path

    @torch.no_grad()
    def _saved(self, name: str) -> Iterator[Tensor]:
        """``name``'s data as :meth:`save` writes it: a per-layer width kind one layer's matrix at a time (the
        stacked tensor's rows, in order), anything else whole."""
        key = self._layered_key(name)
        if key is None:
            yield self.operator_tensor(name).detach().float().cpu()
            return
        for layer_op in self.layer_ops:
            yield getattr(layer_op, key).detach().float().cpu().unsqueeze(0)

    @torch.no_grad()
    def load(self, path) -> dict:
        """Set the operator from a file ``save`` wrote, checking it was made for these two specs and that every
        tensor fits before setting any.  Reads one tensor at a time (twice: checked, then set), so a large operator
        is never held twice.  Returns its metadata."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = Path(path)
        if not path.is_file():
            raise LigoError(f"{path}: no such operator file; pass one written by --save-operator")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("ligo_convert", "null"))
                self._check_metadata(path, meta)
                names = self._checked_names(path, f)
                for name in names:
                    for _, value in self._stored_pieces(f, name):
                        self._check_tensor(path, name, value)
                for name in names:
                    for destination, value in self._stored_pieces(f, name):
                        self._set_piece(name, destination, value)
        except (SafetensorError, json.JSONDecodeError, OSError) as e:
            raise LigoError(f"{path}: not an operator file written by ligo-convert ({e})") from None
        return meta

    def _check_metadata(self, path: Path, meta) -> None:
        if not isinstance(meta, dict) or "source_spec" not in meta:
            raise LigoError(f"{path}: not an operator file written by ligo-convert (no ligo_convert metadata)")
        fix = "fit a new one with --save-operator"
        if not isinstance(meta.get("shared_width", False), bool):
            raise LigoError(f"{path}: metadata field shared_width must be true or false; {fix}")
        for which, spec in (("source", self.source), ("target", self.target)):
            saved = spec_from_metadata(path, f"{which}_spec", meta.get(f"{which}_spec"), fix)
            if saved != spec:
                diff = [k for k, v in spec.to_dict().items() if saved.to_dict().get(k) != v and k != "labels"]
                raise LigoError(f"{path}: the operator was made for another {which} model (differs in "
                                f"{', '.join(diff[:4])}); fit a new one")
        if bool(meta.get("shared_width")) != self.shared_width:
            raise LigoError(f"{path}: the operator was made with shared_width={meta.get('shared_width')}; pass the "
                            f"same width variant")

    def _checked_names(self, path: Path, f) -> list[str]:
        """The file's tensor names, checked against this operator's names and shapes (from the header alone)."""
        mine, names = self.operator_shapes(), list(f.keys())
        if set(names) != set(mine):
            raise LigoError(f"{path}: operator tensors {sorted(set(names) ^ set(mine))[:3]} do not match; fit a "
                            f"new one")
        for name in names:
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(mine[name]):
                raise LigoError(f"{path}: operator tensor {name} has shape {shape}, expected {tuple(mine[name])}")
        return names

    def _stored_pieces(self, f, name: str) -> Iterator[tuple[Tensor | None, Tensor]]:
        """A saved tensor as (destination, value) pieces: a per-layer width kind one layer's matrix at a time (read
        as a slice of the file, destined for that layer's parameter), anything else whole (destination None)."""
        key = self._layered_key(name)
        if key is None:
            yield None, f.get_tensor(name)
            return
        stored = f.get_slice(name)
        for i, layer_op in enumerate(self.layer_ops):
            yield getattr(layer_op, key), stored[i:i + 1][0]

    def _set_piece(self, name: str, destination: Tensor | None, value: Tensor) -> None:
        if destination is not None:
            destination.copy_(value)
            return
        part, what = name.split(".", 1)
        (self.set_width if part == "width" else self.set_depth)(what, value)

    @staticmethod
    def _check_tensor(path: Path, name: str, value: Tensor) -> None:
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise LigoError(f"{path}: operator tensor {name} has NaN or infinite values (or is not floating "
                            f"point); fit a new one with --save-operator")


class StepFactors:
    """An operator's layers for one fitting forward (``model.forward``'s ``layer_weights``): ``for_rows(n)`` prepares
    the expansions that every layer shares (:meth:`LigoOperator.expanded_sources`, when ``expand_first``) and
    returns ``layer -> factors``."""

    def __init__(self, operator: LigoOperator, expand_first: bool = True):
        self.operator, self.expand_first = operator, expand_first

    def for_rows(self, rows: int) -> Callable[[int], dict[str, Tensor | Chain]]:
        expanded = self.operator.expanded_sources(rows) if self.expand_first else {}
        return functools.partial(self.operator.layer_factors, expanded=expanded)


class GrownTensors(collections.abc.Mapping):
    """The grown model's canonical tensors, each made from the operator when it is read (no gradients, on the CPU,
    cast to ``dtype``); ``meta`` answers shapes without making anything."""

    def __init__(self, operator: LigoOperator, dtype: torch.dtype | None = None):
        self.operator, self.dtype = operator, dtype
        self.names = operator.target.tensor_names()

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        with torch.no_grad():
            t = self.operator.tensor(name).detach().float().cpu()
        return t.to(self.dtype) if self.dtype is not None else t

    def row_blocks(self, name: str, rows: int) -> Iterator[Tensor]:
        """``self[name]`` as consecutive blocks of at most ``rows`` rows (``LigoOperator.tensor_blocks``)."""
        if name not in self.names:
            raise KeyError(name)
        for block in self.operator.tensor_blocks(name, rows):
            block = block.detach().float().cpu()
            yield block.to(self.dtype) if self.dtype is not None else block

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self.names

    def meta(self, name: str) -> tuple[tuple, torch.dtype]:
        return self.operator.target.shape_of(name), self.dtype or torch.float32
