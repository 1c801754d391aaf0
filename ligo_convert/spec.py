"""The family-neutral description of a transformer and its canonical tensor names.

Every family enters as a :class:`Spec` plus a flat mapping of canonical tensor names to tensors.  Every axis of
every canonical tensor is tagged with the *width space* it lives in (``residual``, ``q``, ``mlp``, ``vocab``...),
so growth, export and inspection never need to know which family a model came from.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

# Canonical tensor name -> the width space of each axis.  ``{i}`` is a layer index.  Spaces whose name is in
# PER_LAYER_SPACES belong to one layer: ``q`` of layer 3 is a different space from ``q`` of layer 4.
CANONICAL: dict[str, tuple[str, ...]] = {
    "embed.tokens": ("vocab", "residual"),
    "embed.positions": ("positions", "residual"),
    "embed.types": ("types", "residual"),
    "embed.patch.weight": ("residual", "channels", "patch", "patch"),
    "embed.patch.bias": ("residual",),
    "embed.cls": ("one", "residual"),
    "embed.dist": ("one", "residual"),
    "embed.norm.weight": ("residual",),
    "embed.norm.bias": ("residual",),
    "layers.{i}.attn_norm.weight": ("residual",),
    "layers.{i}.attn_norm.bias": ("residual",),
    "layers.{i}.q.weight": ("q", "residual"),
    "layers.{i}.q.bias": ("q",),
    "layers.{i}.k.weight": ("k", "residual"),
    "layers.{i}.k.bias": ("k",),
    "layers.{i}.v.weight": ("v", "residual"),
    "layers.{i}.v.bias": ("v",),
    # O reads the attention output: one head_dim slice per query head (heads x head_dim).  Without grouped-query
    # attention it lines up with v[i] channel for channel; with GQA v[i] is smaller (kv_heads x head_dim).
    "layers.{i}.o.weight": ("residual", "o"),
    "layers.{i}.o.bias": ("residual",),
    "layers.{i}.mlp_norm.weight": ("residual",),
    "layers.{i}.mlp_norm.bias": ("residual",),
    "layers.{i}.fc1.weight": ("mlp", "residual"),
    "layers.{i}.fc1.bias": ("mlp",),
    "layers.{i}.gate.weight": ("mlp", "residual"),
    "layers.{i}.gate.bias": ("mlp",),
    "layers.{i}.fc2.weight": ("residual", "mlp"),
    "layers.{i}.fc2.bias": ("residual",),
    "final_norm.weight": ("residual",),
    "final_norm.bias": ("residual",),
    "pooler.weight": ("residual", "residual"),
    "pooler.bias": ("residual",),
    "head.weight": ("classes", "residual"),
    "head.bias": ("classes",),
    "head_dist.weight": ("classes", "residual"),
    "head_dist.bias": ("classes",),
    "mlm.dense.weight": ("residual", "residual"),
    "mlm.dense.bias": ("residual",),
    "mlm.norm.weight": ("residual",),
    "mlm.norm.bias": ("residual",),
    "mlm.bias": ("vocab",),
    "pair_head.weight": ("pair_classes", "residual"),
    "pair_head.bias": ("pair_classes",),
    "lm_head.weight": ("vocab", "residual"),
}

PER_LAYER_SPACES = frozenset({"q", "k", "v", "o", "mlp"})

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def pattern_of(name: str) -> tuple[str, int | None]:
    """``layers.3.q.weight`` -> (``layers.{i}.q.weight``, 3); ``embed.tokens`` -> (``embed.tokens``, None)."""
    m = _LAYER_RE.match(name)
    if m:
        return "layers.{i}." + m.group(2), int(m.group(1))
    return name, None


def spaces(name: str) -> tuple[str, ...]:
    """The width space of each axis of a canonical tensor; per-layer spaces carry their layer: ``q[3]``."""
    pattern, layer = pattern_of(name)
    if pattern not in CANONICAL:
        raise KeyError(f"not a canonical tensor name: {name}")
    tags = CANONICAL[pattern]
    if layer is None:
        return tags
    return tuple(f"{t}[{layer}]" if t in PER_LAYER_SPACES else t for t in tags)


def space_kind(space: str) -> str:
    """``q[3]`` -> ``q``."""
    return space.split("[", 1)[0]


def module_of(name: str) -> str:
    """The module type of a per-layer tensor (``layers.3.q.weight`` -> ``q.weight``), used for depth mixing."""
    pattern, layer = pattern_of(name)
    return pattern[len("layers.{i}."):] if layer is not None else pattern


ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
NORMS = ("layernorm", "rmsnorm")
HEADS = ("none", "classifier", "mlm", "lm")


@dataclass
class Spec:
    """Hyperparameters of one model, free of any family's naming."""

    layers: int
    width: int
    heads: int
    head_dim: int
    mlp: int
    kv_heads: int = 0  # 0 -> same as heads
    gated_mlp: bool = False
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-12
    norm_placement: str = "pre"  # "pre" (norm, sublayer, add) or "post" (sublayer, add, norm)
    embed_norm: bool = False
    final_norm: bool = True
    # token input
    input: str = "tokens"  # "tokens" or "patches"
    vocab_size: int = 0
    type_vocab_size: int = 0
    # positions
    positions: str = "learned"  # "learned", "rotary" or "none"
    max_positions: int = 0  # rows of the learned table for text models
    position_offset: int = 0  # first position id (RoBERTa: pad_token_id + 1)
    pad_token_id: int | None = None  # with a position offset: padding tokens keep position pad_token_id
    rope_theta: float = 10000.0
    # patch input
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 0
    cls_token: bool = False
    dist_token: bool = False
    # attention
    causal: bool = False
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    # outputs
    pooler: bool = False
    head: str = "none"  # "none", "classifier", "mlm", "lm"
    num_classes: int = 0
    dist_head: bool = False
    pair_head: bool = False  # BERT's next-sentence head, on the pooled output
    tie_embeddings: bool = False  # lm/mlm decoder is embed.tokens
    mlm_transform: bool = True  # mlm head has dense + act + norm before the decoder
    labels: list[str] | None = field(default=None, compare=False)

    def __post_init__(self):
        if not self.kv_heads:
            self.kv_heads = self.heads

    # -- sizes of the spaces -------------------------------------------------------------------------------------
    @property
    def prefix_tokens(self) -> int:
        return int(self.cls_token) + int(self.dist_token)

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table."""
        if self.input == "patches":
            return (self.image_size // self.patch_size) ** 2 + self.prefix_tokens
        return self.max_positions

    def space_size(self, space: str) -> int:
        kind = space_kind(space)
        return {
            "residual": self.width,
            "q": self.heads * self.head_dim,
            "k": self.kv_heads * self.head_dim,
            "v": self.kv_heads * self.head_dim,
            "o": self.heads * self.head_dim,
            "mlp": self.mlp,
            "vocab": self.vocab_size,
            "types": self.type_vocab_size,
            "positions": self.num_positions,
            "classes": self.num_classes,
            "pair_classes": 2,
            "channels": self.num_channels,
            "patch": self.patch_size,
            "one": 1,
        }[kind]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.space_size(s) for s in spaces(name))

    # -- which canonical tensors this spec has ---------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        """Every canonical tensor a model of this spec has, in a stable order."""
        has_norm_bias = self.norm == "layernorm"
        names: list[str] = []

        def norm(prefix: str):
            names.append(prefix + ".weight")
            if has_norm_bias:
                names.append(prefix + ".bias")

        if self.input == "tokens":
            names.append("embed.tokens")
            if self.type_vocab_size:
                names.append("embed.types")
        else:
            names += ["embed.patch.weight", "embed.patch.bias"]
            if self.cls_token:
                names.append("embed.cls")
            if self.dist_token:
                names.append("embed.dist")
        if self.positions == "learned":
            names.append("embed.positions")
        if self.embed_norm:
            norm("embed.norm")
        for i in range(self.layers):
            p = f"layers.{i}."
            norm(p + "attn_norm")
            for m in ("q", "k", "v"):
                names.append(p + m + ".weight")
                if self.qkv_bias:
                    names.append(p + m + ".bias")
            names.append(p + "o.weight")
            if self.o_bias:
                names.append(p + "o.bias")
            norm(p + "mlp_norm")
            mats = ("gate", "fc1", "fc2") if self.gated_mlp else ("fc1", "fc2")
            for m in mats:
                names.append(p + m + ".weight")
                if self.mlp_bias:
                    names.append(p + m + ".bias")
        if self.final_norm:
            norm("final_norm")
        if self.pooler:
            names += ["pooler.weight", "pooler.bias"]
        if self.head == "classifier":
            names += ["head.weight", "head.bias"]
            if self.dist_head:
                names += ["head_dist.weight", "head_dist.bias"]
        elif self.head == "mlm":
            if self.mlm_transform:
                names += ["mlm.dense.weight", "mlm.dense.bias"]
                norm("mlm.norm")
            names.append("mlm.bias")
            if not self.tie_embeddings:
                names.append("lm_head.weight")
        elif self.head == "lm":
            if not self.tie_embeddings:
                names.append("lm_head.weight")
        if self.pair_head:
            names += ["pair_head.weight", "pair_head.bias"]
        return names

    # -- (de)serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Spec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes) -> "Spec":
        return dataclasses.replace(self, **changes)

    def parameter_count(self) -> int:
        total = 0
        for name in self.tensor_names():
            n = 1
            for d in self.shape_of(name):
                n *= d
            total += n
        return total

    def check(self) -> None:
        """Raise ValueError on an inconsistent spec."""
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r} (known: {', '.join(ACTIVATIONS)})")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r} (known: {', '.join(NORMS)})")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r} (known: {', '.join(HEADS)})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError("rotary positions need an even head_dim")
