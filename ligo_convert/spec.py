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
    # the token/position/type tables and their norm live in the ``embedding`` space: embedding_size, which is the
    # width itself unless a family embeds in a smaller space and projects into the stream (``embed.proj``: ELECTRA,
    # ALBERT).  Where the two are one size in both models, growth treats ``embedding`` as ``residual``
    "embed.tokens": ("vocab", "embedding"),
    "embed.positions": ("positions", "embedding"),
    "embed.types": ("types", "embedding"),
    "embed.patch.weight": ("residual", "channels", "patch", "patch"),
    "embed.patch.bias": ("residual",),
    "embed.cls": ("one", "residual"),
    "embed.dist": ("one", "residual"),
    # DINOv2's mask token: a residual-stream vector that replaces masked patches in masked-image pretraining; kept
    # (and grown) with the model, unused by the forward, which takes no patch mask
    "embed.mask": ("residual",),
    "embed.norm.weight": ("embedding",),
    "embed.norm.bias": ("embedding",),
    # embedding_size -> width, after the embedding norm; only where embedding_size differs from the width
    "embed.proj.weight": ("residual", "embedding"),
    "embed.proj.bias": ("residual",),
    "layers.{i}.attn_norm.weight": ("residual",),
    "layers.{i}.attn_norm.bias": ("residual",),
    # q/k norms: per head (one head_dim vector shared by every head: Qwen3, Gemma 3) or over the whole projection
    # (OLMo 2); head_dim never grows, so a per-head norm is only mixed in depth
    "layers.{i}.q_norm.weight": ("head_dim",),
    "layers.{i}.k_norm.weight": ("head_dim",),
    "layers.{i}.q_proj_norm.weight": ("q",),
    "layers.{i}.k_proj_norm.weight": ("k",),
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
    # norms on a sublayer's output before the residual add (Gemma 2/3 "sandwich", OLMo 2 "output" placement)
    "layers.{i}.attn_out_norm.weight": ("residual",),
    "layers.{i}.attn_out_norm.bias": ("residual",),
    # LayerScale: a per-channel gain on each sublayer's output (DINOv2)
    "layers.{i}.attn_scale": ("residual",),
    "layers.{i}.mlp_scale": ("residual",),
    "layers.{i}.mlp_norm.weight": ("residual",),
    "layers.{i}.mlp_norm.bias": ("residual",),
    "layers.{i}.fc1.weight": ("mlp", "residual"),
    "layers.{i}.fc1.bias": ("mlp",),
    "layers.{i}.gate.weight": ("mlp", "residual"),
    "layers.{i}.gate.bias": ("mlp",),
    "layers.{i}.fc2.weight": ("residual", "mlp"),
    "layers.{i}.fc2.bias": ("residual",),
    "layers.{i}.mlp_out_norm.weight": ("residual",),
    "layers.{i}.mlp_out_norm.bias": ("residual",),
    "final_norm.weight": ("residual",),
    "final_norm.bias": ("residual",),
    "pooler.weight": ("residual", "residual"),
    "pooler.bias": ("residual",),
    # a norm on the pooled token only, not on the last hidden states (CLIP's vision post_layernorm)
    "pool_norm.weight": ("residual",),
    "pool_norm.bias": ("residual",),
    # a projection of the pooled token into a fixed-size embedding space (CLIP's visual / text projections): the
    # projection space is fixed by what the embeddings are compared with, so it never grows
    "proj.weight": ("projection", "residual"),
    "head.weight": ("classes", "residual"),
    "head.bias": ("classes",),
    # the classifier's columns that read the mean of the patch tokens (DINOv2: logits = W [cls; mean] + b, one
    # (classes, 2 x width) tensor on disk): both halves live in the residual space
    "head_mean.weight": ("classes", "residual"),
    "head_dist.weight": ("classes", "residual"),
    "head_dist.bias": ("classes",),
    # the MLM transform writes the space its decoder (the tied token table) reads: the embedding space
    "mlm.dense.weight": ("embedding", "residual"),
    "mlm.dense.bias": ("embedding",),
    "mlm.norm.weight": ("embedding",),
    "mlm.norm.bias": ("embedding",),
    "mlm.bias": ("vocab",),
    # a per-token binary head (ELECTRA's replaced-token discriminator): dense + activation, then one logit per token
    "token_head.dense.weight": ("residual", "residual"),
    "token_head.dense.bias": ("residual",),
    "token_head.weight": ("one", "residual"),
    "token_head.bias": ("one",),
    "pair_head.weight": ("pair_classes", "residual"),
    "pair_head.bias": ("pair_classes",),
    # an untied LM/MLM decoder reads what a tied one reads: the embedding space (the width for LM heads)
    "lm_head.weight": ("vocab", "embedding"),
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


ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "quick_gelu")
NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post", "sandwich", "output")
QK_NORMS = ("none", "head", "proj")
HEADS = ("none", "classifier", "mlm", "lm", "token_binary")
POOLS = ("none", "first", "eos")


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
    gate_activation: str = ""  # the gate's activation in a gated MLP, where it is not ``activation`` (DINOv2: silu)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-12
    # "pre" (norm, sublayer, add), "post" (sublayer, add, norm), "sandwich" (norm, sublayer, norm, add) or "output"
    # (sublayer, norm, add)
    norm_placement: str = "pre"
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    embed_norm: bool = False
    final_norm: bool = True
    parallel_residual: bool = False  # x + attn(attn_norm(x)) + mlp(mlp_norm(x)) (GPT-NeoX)
    layer_scale: bool = False  # attn_scale / mlp_scale gains on the sublayer outputs
    # token input
    input: str = "tokens"  # "tokens" or "patches"
    embed_scale: bool = False  # token embeddings multiplied by sqrt(width), rounded to the model's dtype (Gemma)
    vocab_size: int = 0
    type_vocab_size: int = 0
    # the width of the token/position/type tables (and an MLM head's decoder); 0: the width itself.  A different
    # size adds embed.proj (embedding_size -> width); a value equal to the width is stored as 0
    embedding_size: int = 0
    # positions
    positions: str = "learned"  # "learned", "rotary" or "none"
    max_positions: int = 0  # rows of the learned table for text models
    position_offset: int = 0  # first position id (RoBERTa: pad_token_id + 1)
    positions_from_mask: bool = False  # position ids count the attended tokens before each one (OPT)
    pad_token_id: int | None = None  # with a position offset: padding tokens keep position pad_token_id
    rope_theta: float = 10000.0
    rope_local_theta: float = 0.0  # rotary base of windowed layers (Gemma 3); 0: rope_theta
    rotary_fraction: float = 1.0  # rotary positions turn the first int(head_dim * fraction) dims of a head
    # patch input
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 0
    cls_token: bool = False
    dist_token: bool = False
    patch_bias: bool = True  # the patch embedding has a bias (CLIP's has none)
    mask_token: bool = False  # embed.mask: DINOv2's mask token (carried, unused by the forward)
    # images of another size than image_size resample the patch rows of the position table (bicubic, as DINOv2)
    interpolate_positions: bool = False
    # attention
    causal: bool = False
    qk_norm: str = "none"  # "none", "head" (q_norm/k_norm over head_dim) or "proj" (over the whole q/k width)
    score_scale_dim: float = 0.0  # scores are divided by sqrt(this); 0: head_dim (Gemma 2: query_pre_attn_scalar)
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) (Gemma 2); 0: none
    # sliding-window attention: a windowed layer's query i sees keys j with i - window < j <= i.  Layer i is windowed
    # when sliding_window > 0, i >= window_start and (window_period == 0 or (i + 1) % window_period != 0): every
    # layer (Mistral), from a layer on (Qwen2's max_window_layers), or all but every period-th (Gemma 2/3)
    sliding_window: int = 0
    window_start: int = 0
    window_period: int = 0
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
    mlm_activation: str = ""  # the MLM transform's activation where it is not ``activation`` (ELECTRA: gelu)
    final_softcap: float = 0.0  # LM logits -> cap * tanh(logits / cap) (Gemma 2); 0: none
    # the pooled output without a dense pooler: "none", "first" (the first token: DINOv2, CLIP vision) or "eos" (the
    # first place of pool_token_id in each row, or with pool_token_id -1 the place of the row's highest id: CLIP text)
    pool: str = "none"
    pool_token_id: int = -1
    pool_norm: bool = False  # pool_norm on the pooled token (CLIP vision's post_layernorm)
    head_mean: bool = False  # the classifier also reads the mean of the patch tokens (DINOv2): head_mean.weight
    projection: bool = False  # proj.weight: the pooled output projected to projection_dim ("embeds"; CLIP)
    projection_dim: int = 0
    labels: list[str] | None = field(default=None, compare=False)

    def __post_init__(self):
        if not self.kv_heads:
            self.kv_heads = self.heads
        if self.embedding_size == self.width:
            self.embedding_size = 0

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

    @property
    def embed_width(self) -> int:
        """Size of the embedding space: embedding_size, or the width where it is 0."""
        return self.embedding_size or self.width

    @property
    def embed_proj(self) -> bool:
        """Whether the embeddings are projected into the residual stream (embedding_size differs from the width)."""
        return self.embed_width != self.width

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head the rotary positions turn."""
        return int(self.head_dim * self.rotary_fraction)

    def windowed(self, layer: int) -> bool:
        """Whether layer ``layer`` attends within the sliding window."""
        return (self.sliding_window > 0 and layer >= self.window_start
                and (self.window_period == 0 or (layer + 1) % self.window_period != 0))

    def space_size(self, space: str) -> int:
        kind = space_kind(space)
        return {
            "residual": self.width,
            "embedding": self.embed_width,
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
            "projection": self.projection_dim,
            "head_dim": self.head_dim,
        }[kind]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.space_size(s) for s in spaces(name))

    # -- which canonical tensors this spec has ---------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        """Every canonical tensor a model of this spec has, in a stable order: inputs, layers, outputs."""
        block = self._block_modules()
        layers = [f"layers.{i}.{m}" for i in range(self.layers) for m in block]
        return self._input_names() + layers + self._output_names()

    def _norm(self, prefix: str) -> list[str]:
        return [prefix + ".weight", prefix + ".bias"] if self.norm == "layernorm" else [prefix + ".weight"]

    def _input_names(self) -> list[str]:
        """Embeddings: token or patch tables, class/distillation/mask tokens, positions, their norm and projection."""
        if self.input == "tokens":
            names = ["embed.tokens"] + (["embed.types"] if self.type_vocab_size else [])
        else:
            names = ["embed.patch.weight"] + (["embed.patch.bias"] if self.patch_bias else [])
            names += [n for n, on in (("embed.mask", self.mask_token), ("embed.cls", self.cls_token),
                                      ("embed.dist", self.dist_token)) if on]
        if self.positions == "learned":
            names.append("embed.positions")
        if self.embed_norm:
            names += self._norm("embed.norm")
        if self.embed_proj:
            names += ["embed.proj.weight", "embed.proj.bias"]
        return names

    def _block_modules(self) -> list[str]:
        """One block's module names (``q.weight``...), the same for every layer."""
        in_norms = self.norm_placement != "output"  # pre/post/sandwich have attn_norm and mlp_norm
        out_norms = self.norm_placement in ("sandwich", "output")
        names = self._norm("attn_norm") if in_norms else []
        for m in ("q", "k", "v"):
            names += [m + ".weight"] + ([m + ".bias"] if self.qkv_bias else [])
        names += {"head": ["q_norm.weight", "k_norm.weight"],
                  "proj": ["q_proj_norm.weight", "k_proj_norm.weight"]}.get(self.qk_norm, [])
        names += ["o.weight"] + (["o.bias"] if self.o_bias else [])
        names += (self._norm("attn_out_norm") if out_norms else []) + (["attn_scale"] if self.layer_scale else [])
        names += self._norm("mlp_norm") if in_norms else []
        for m in ("gate", "fc1", "fc2") if self.gated_mlp else ("fc1", "fc2"):
            names += [m + ".weight"] + ([m + ".bias"] if self.mlp_bias else [])
        names += (self._norm("mlp_out_norm") if out_norms else []) + (["mlp_scale"] if self.layer_scale else [])
        return names

    def _output_names(self) -> list[str]:
        """Final norm, pooler / pooled-token norm and projection, and the head."""
        names = self._norm("final_norm") if self.final_norm else []
        if self.pooler:
            names += ["pooler.weight", "pooler.bias"]
        if self.pool_norm:
            names += self._norm("pool_norm")
        if self.projection:
            names.append("proj.weight")
        if self.head == "classifier":
            names += ["head.weight", "head.bias"] + (["head_mean.weight"] if self.head_mean else [])
            if self.dist_head:
                names += ["head_dist.weight", "head_dist.bias"]
        elif self.head == "mlm":
            if self.mlm_transform:
                names += ["mlm.dense.weight", "mlm.dense.bias"] + self._norm("mlm.norm")
            names.append("mlm.bias")
        elif self.head == "token_binary":
            names += ["token_head.dense.weight", "token_head.dense.bias", "token_head.weight", "token_head.bias"]
        if self.head in ("mlm", "lm") and not self.tie_embeddings:
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
        for act in (self.activation, self.gate_activation or self.activation, self.mlm_activation or self.activation):
            if act not in ACTIVATIONS:
                raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r} (known: {', '.join(POOLS)})")
        if self.pool == "eos" and self.input != "tokens":
            raise ValueError("pool 'eos' (the end-of-text token) needs token input")
        if (self.projection or self.pool_norm) and self.pool == "none":
            raise ValueError("a projection or pool norm needs a pooled token (pool 'first' or 'eos')")
        if self.projection and self.projection_dim <= 0:
            raise ValueError(f"a projection needs a positive projection_dim, not {self.projection_dim}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r} (known: {', '.join(NORMS)})")
        if self.norm_placement not in PLACEMENTS:
            raise ValueError(f"unknown norm placement {self.norm_placement!r} (known: {', '.join(PLACEMENTS)})")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"unknown qk_norm {self.qk_norm!r} (known: {', '.join(QK_NORMS)})")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r} (known: {', '.join(HEADS)})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.embedding_size < 0:
            raise ValueError(f"embedding_size must be positive (0: the width), not {self.embedding_size}")
        if self.embed_proj and self.input != "tokens":
            raise ValueError("an embedding size apart from the width needs token input")
        if self.embed_proj and (self.head == "lm" or (self.head == "mlm" and not self.mlm_transform)):
            raise ValueError(f"a decoder that reads the last hidden states (width {self.width}) cannot use tables of "
                             f"embedding_size {self.embedding_size}")
        if self.positions == "rotary" and (self.rotary_dim % 2 or self.rotary_dim <= 0):
            raise ValueError(f"rotary positions need an even, positive number of rotary dims (head_dim "
                             f"{self.head_dim} x fraction {self.rotary_fraction} = {self.rotary_dim})")
