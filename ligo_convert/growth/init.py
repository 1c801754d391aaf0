"""Initial values of the LiGO operator (paper appendix / official code).

Depth (an ``L2 x L1`` matrix per module type, rows sum to 1):
- ``stack``: new layer i starts from small layer ``i mod L1`` (StackBERT);
- ``interleave``: new layer i starts from small layer ``floor(i L1 / L2)`` (each layer repeated in place);
both with the official "noisy" recipe: ``v = U(0, noise)^L1, v[chosen] = 1, v /= v.sum()`` (noise 0.03: the chosen
layer keeps ~0.93).  ``noise=0`` gives the exact StackBERT / interpolation operators.

Width (a ``D2 x D1`` matrix per space): the first D1 rows are the identity (old neurons stay where they were), each new
row is
- ``random``: a random convex combination of old neurons (U(0, 1) weights normalised to sum 1), as the official code;
- ``select``: a copy of one random old neuron (Net2Net-like), blended with ``noise`` of a random convex combination.
Head-structured spaces (q, k, v, o) are initialised per head: a new head is a combination of whole old heads, channel
d of the new head from channel d of the old ones, so per-head layouts (rotary half-split pairs) survive.  The same
head choice is used for q, k, v and o of a layer, and with grouped-query attention a new query head draws from the
query heads of the key/value group its own group was built from.
"""

from __future__ import annotations

import torch

DEPTH_INITS = ("stack", "interleave")
WIDTH_INITS = ("random", "select")
DEFAULT_NOISE = 0.03


def depth_matrix(l2: int, l1: int, scheme: str = "stack", noise: float = DEFAULT_NOISE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(l2, l1) mixing weights; row i says how new layer i combines the small model's layers."""
    if scheme not in DEPTH_INITS:
        raise ValueError(f"unknown depth init {scheme!r} (known: {', '.join(DEPTH_INITS)})")
    w = torch.rand(l2, l1, generator=generator) * noise if noise else torch.zeros(l2, l1)
    for i in range(l2):
        w[i, i % l1 if scheme == "stack" else (i * l1) // l2] = 1.0
    return w / w.sum(1, keepdim=True)


def _new_rows(n_new: int, n_old: int, scheme: str, noise: float, generator) -> torch.Tensor:
    """(n_new, n_old) combination weights for new units (neurons or heads), rows summing to 1."""
    if n_new == 0:
        return torch.zeros(0, n_old)
    mix = torch.rand(n_new, n_old, generator=generator)
    mix = mix / mix.sum(1, keepdim=True)
    if scheme == "random":
        return mix
    if scheme != "select":
        raise ValueError(f"unknown width init {scheme!r} (known: {', '.join(WIDTH_INITS)})")
    pick = torch.randint(n_old, (n_new,), generator=generator)
    onehot = torch.nn.functional.one_hot(pick, n_old).float()
    return (1 - noise) * onehot + noise * mix


def width_matrix(d2: int, d1: int, scheme: str = "random", noise: float = DEFAULT_NOISE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(d2, d1): identity on the first d1 rows, new rows by ``scheme``."""
    return torch.cat([torch.eye(d1), _new_rows(d2 - d1, d1, scheme, noise, generator)])


def head_matrices(heads: tuple[int, int], kv_heads: tuple[int, int], head_dim: int, scheme: str = "random",
                  noise: float = DEFAULT_NOISE, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Matrices for the query-headed spaces (``q``, ``o``: heads x head_dim) and the key/value spaces (``k``, ``v``:
    kv_heads x head_dim) of one layer, built from one choice of old heads.

    ``heads`` and ``kv_heads`` are (small, large) counts.  New key/value head g combines old key/value heads with
    weights ``c[g]`` (identity for the old ones); query head h of group g, slot m combines the old query heads
    ``k * r1 + m % r1`` with the same weights ``c[g]`` (r = heads per group).  Without GQA this is: new head h is the
    same combination of old heads in q, k, v and o.
    """
    (h1, h2), (g1, g2) = heads, kv_heads
    r1, r2 = h1 // g1, h2 // g2
    groups = torch.cat([torch.eye(g1), _new_rows(g2 - g1, g1, scheme, noise, generator)])  # (g2, g1)
    query = torch.zeros(h2, h1)
    for h in range(h2):
        g, m = divmod(h, r2)
        for k in range(g1):
            query[h, k * r1 + m % r1] += groups[g, k]
    eye = torch.eye(head_dim)
    kv = torch.kron(groups, eye)
    q = torch.kron(query, eye)
    return {"q": q, "o": q, "k": kv, "v": kv}
