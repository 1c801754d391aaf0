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
count is unchanged.  M = L_depth R_width is never formed: each target tensor costs a few matrix products.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..errors import LigoError
from ..spec import CANONICAL, PER_LAYER_SPACES, Spec, module_of, pattern_of, space_kind
from . import init as inits

LEARN = ("both", "width", "depth")
# Spaces measured in heads: which head count sizes them (the rest of the spec's spaces are plain channels).
HEAD_SPACES = {"q": "heads", "o": "heads", "k": "kv_heads", "v": "kv_heads"}
# A space that uses another's matrix when both have the same size in both models.
TIED = {"o": "v"}
# Spec fields a growth target may change; everything else must stay as the source has it.
SIZE_FIELDS = ("layers", "width", "heads", "kv_heads", "mlp")


def check_growable(source: Spec, target: Spec) -> None:
    """Refuse a target the operator cannot reach from ``source``, with a one-line reason."""
    if target.head_dim != source.head_dim:
        raise LigoError(f"the target has head_dim {target.head_dim} but the source has {source.head_dim}; LiGO keeps "
                        f"the head dimension and grows the number of heads — choose heads = q width / "
                        f"{source.head_dim}")
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


def _apply(x: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """Expand ``x`` along ``axis`` by ``matrix`` (D2, D1), or per leading layer by a stack (L, D2, D1)."""
    moved = x.movedim(axis, -1)
    if matrix.dim() == 3:
        shape = moved.shape
        out = torch.bmm(moved.reshape(shape[0], -1, shape[-1]), matrix.transpose(1, 2))
        out = out.reshape(*shape[:-1], matrix.shape[1])
    else:
        out = moved @ matrix.T
    return out.movedim(-1, axis)


class LigoOperator(torch.nn.Module):
    """The operator for growing ``source`` (spec + weights, frozen) into ``target``.  Calling it returns the target's
    canonical weights, differentiable with respect to the operator's parameters.

    ``shared_width``: one q/k/v/o/mlp matrix for all target layers instead of one per layer.  ``learn``: which part
    trains (``both``, ``width`` or ``depth``); the other keeps its initial value.
    """

    def __init__(self, source: Spec, target: Spec, weights: Mapping[str, Tensor], shared_width: bool = False,
                 learn: str = "both"):
        super().__init__()
        check_growable(source, target)
        if learn not in LEARN:
            raise LigoError(f"unknown --learn {learn!r}; choose one of {', '.join(LEARN)}")
        self.source, self.target, self.shared_width, self.learn = source, target, shared_width, learn
        names = target.tensor_names()
        self.global_names = [n for n in names if pattern_of(n)[1] is None]
        self.module_types = [module_of(n) for n in names if pattern_of(n)[1] == 0]
        for name in self.global_names:
            self.register_buffer(self._key("src", name), weights[name].detach().float(), persistent=False)
        for module in self.module_types:
            stack = torch.stack([weights[f"layers.{j}.{module}"].detach().float() for j in range(source.layers)])
            self.register_buffer(self._key("src", module), stack, persistent=False)

        kinds = sorted({space_kind(t) for n in names for t in CANONICAL[pattern_of(n)[0]]})
        self.width_kinds: dict[str, tuple[int, int]] = {}  # kind -> (d2, d1), for every space that grows
        for kind in kinds:
            d1, d2 = source.space_size(kind), target.space_size(kind)
            if d2 != d1:
                self.width_kinds[kind] = (d2, d1)
        self.tied = {k: v for k, v in TIED.items() if k in self.width_kinds and v in self.width_kinds
                     and self.width_kinds[k] == self.width_kinds[v]}
        for kind, (d2, d1) in self.width_kinds.items():
            if kind in self.tied:
                continue
            shape = (target.layers, d2, d1) if self._per_layer(kind) else (d2, d1)
            self._register(self._key("width", kind), torch.zeros(shape), learn in ("both", "width"))
        self.depth_grows = target.layers != source.layers
        if self.depth_grows:
            for module in self.module_types:
                self._register(self._key("depth", module), torch.zeros(target.layers, source.layers),
                               learn in ("both", "depth"))
        self.initialize()

    # -- structure ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _key(part: str, name: str) -> str:
        return f"{part}__{name.replace('.', '__')}"

    def _register(self, key: str, value: Tensor, trainable: bool) -> None:
        if trainable:
            self.register_parameter(key, torch.nn.Parameter(value))
        else:
            self.register_buffer(key, value)

    def _per_layer(self, kind: str) -> bool:
        return kind in PER_LAYER_SPACES and not self.shared_width

    def width(self, kind: str) -> Tensor | None:
        """The expansion matrix of a space kind: (D2, D1), or (L2, D2, D1) when per layer; None if it does not grow."""
        kind = self.tied.get(kind, kind)
        return getattr(self, self._key("width", kind)) if kind in self.width_kinds else None

    def depth(self, module: str) -> Tensor | None:
        """The (L2, L1) mixing matrix of a module type (``q.weight``); None when the layer count does not change."""
        return getattr(self, self._key("depth", module)) if self.depth_grows else None

    def named_operator_tensors(self) -> dict[str, Tensor]:
        """Every operator tensor (learned or fixed) by a readable name: ``width.q``, ``depth.fc1.weight``."""
        out = {}
        for kind in self.width_kinds:
            if kind not in self.tied:
                out[f"width.{kind}"] = self.width(kind)
        if self.depth_grows:
            for module in self.module_types:
                out[f"depth.{module}"] = self.depth(module)
        return out

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups with learning rates relative to each tensor's natural entry size: a width matrix's new
        rows start as combinations of D1 old neurons (entries ~1/D1), a depth row as a combination of L1 layers
        (~1/L1), so they step by ``lr / D1`` and ``lr / L1``: the same relative change whatever the model size."""
        groups = []
        for kind in self.width_kinds:
            t = self.width(kind)
            if kind not in self.tied and t.requires_grad:
                groups.append({"params": [t], "lr": lr / self.width_kinds[kind][1], "name": f"width.{kind}"})
        for module in self.module_types if self.depth_grows else []:
            t = self.depth(module)
            if t.requires_grad:
                groups.append({"params": [t], "lr": lr / self.source.layers, "name": f"depth.{module}"})
        return groups

    def operator_parameter_count(self) -> int:
        return sum(t.numel() for t in self.named_operator_tensors().values())

    # -- initialisation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, depth: str = "stack", width: str = "random", noise: float = inits.DEFAULT_NOISE,
                   seed: int = 0) -> None:
        """Set the operator to an initial value (see ``growth.init``), deterministically from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        s, t = self.source, self.target
        for module in self.module_types if self.depth_grows else []:
            self.depth(module).copy_(inits.depth_matrix(t.layers, s.layers, depth, noise, g))
        head_kinds = [k for k in self.width_kinds if k in HEAD_SPACES and k not in self.tied]
        for kind in sorted(self.width_kinds):
            if kind in self.tied or kind in HEAD_SPACES:
                continue
            d2, d1 = self.width_kinds[kind]
            value = self.width(kind)
            if value.dim() == 3:
                for layer in range(value.shape[0]):
                    value[layer].copy_(inits.width_matrix(d2, d1, width, noise, g))
            else:
                value.copy_(inits.width_matrix(d2, d1, width, noise, g))
        if head_kinds:
            layers = t.layers if any(self._per_layer(k) for k in head_kinds) else 1
            for layer in range(layers):
                mats = inits.head_matrices((s.heads, t.heads), (s.kv_heads, t.kv_heads), s.head_dim, width, noise, g)
                for kind in head_kinds:
                    value = self.width(kind)
                    (value[layer] if value.dim() == 3 else value).copy_(mats[kind])

    # -- application -------------------------------------------------------------------------------------------------
    def _expand(self, x: Tensor, tags: tuple[str, ...], first_axis: int) -> Tensor:
        for axis, tag in enumerate(tags):
            matrix = self.width(space_kind(tag))
            if matrix is not None:
                if matrix.dim() == 3 and first_axis == 0:
                    raise AssertionError(f"per-layer space {tag} on a non-layer tensor")
                x = _apply(x, matrix, axis + first_axis)
        return x

    def forward(self) -> dict[str, Tensor]:
        """The target model's canonical weights (fp32, on the operator's device)."""
        out = {}
        for name in self.global_names:
            out[name] = self._expand(getattr(self, self._key("src", name)), CANONICAL[name], 0)
        for module in self.module_types:
            stack = getattr(self, self._key("src", module))  # (L1, ...)
            mix = self.depth(module)
            if mix is not None:
                stack = torch.tensordot(mix, stack, dims=([1], [0]))  # (L2, ...)
            stack = self._expand(stack, CANONICAL["layers.{i}." + module], 1)
            # unbind, not indexing: its backward stacks the layer gradients once instead of one zero-filled copy
            # of the whole stack per layer
            for layer, tensor in enumerate(stack.unbind(0)):
                out[f"layers.{layer}.{module}"] = tensor
        return out

    # -- files ---------------------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"source_spec": self.source.to_dict(), "target_spec": self.target.to_dict(),
                "shared_width": self.shared_width, "learn": self.learn}

    def save(self, path, extra: dict | None = None) -> Path:
        """Write the operator's tensors to a safetensors file; the specs and options go in its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {**self.describe(), **(extra or {})}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.named_operator_tensors().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        save_file(tensors, str(tmp), metadata={"ligo_convert": json.dumps(meta, sort_keys=True)})
        tmp.replace(path)
        return path

    @torch.no_grad()
    def load(self, path) -> dict:
        """Set the operator from a file ``save`` wrote, checking it was made for these two specs.  Returns its
        metadata."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = Path(path)
        if not path.is_file():
            raise LigoError(f"{path}: no such operator file; pass one written by --save-operator")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("ligo_convert", "null"))
            tensors = load_file(str(path))
        except (SafetensorError, json.JSONDecodeError, OSError) as e:
            raise LigoError(f"{path}: not an operator file written by ligo-convert ({e})") from None
        if not isinstance(meta, dict) or "source_spec" not in meta:
            raise LigoError(f"{path}: not an operator file written by ligo-convert (no ligo_convert metadata)")
        for which, spec in (("source", self.source), ("target", self.target)):
            saved = Spec.from_dict(meta[f"{which}_spec"])
            if saved != spec:
                diff = [k for k, v in spec.to_dict().items() if saved.to_dict().get(k) != v and k != "labels"]
                raise LigoError(f"{path}: the operator was made for another {which} model (differs in "
                                f"{', '.join(diff[:4])}); fit a new one")
        if bool(meta.get("shared_width")) != self.shared_width:
            raise LigoError(f"{path}: the operator was made with shared_width={meta.get('shared_width')}; pass the "
                            f"same width variant")
        mine = self.named_operator_tensors()
        if set(tensors) != set(mine):
            raise LigoError(f"{path}: operator tensors {sorted(set(tensors) ^ set(mine))[:3]} do not match; fit a "
                            f"new one")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(mine[name].shape):
                raise LigoError(f"{path}: operator tensor {name} has shape {tuple(value.shape)}, expected "
                                f"{tuple(mine[name].shape)}")
            if not torch.isfinite(value).all():
                raise LigoError(f"{path}: operator tensor {name} has NaN or infinite values")
            mine[name].copy_(value)
        return meta
