"""FLOPs of one LiGO fitting step against one plain training step (arithmetic, no run): GPT-2 6x512 -> 12x1024
(16 heads, MLP 4096, vocab 50257), per-layer width operator, at 4/16/64 x 128 tokens.  Before: every grown matrix
formed densely each step (x3 with its backward; streamed adds the checkpoint's recompute); after: the rows run through
the factors B_out W_mix B_in^T in the cheapest of the five bracketings (model.Chain's rule).  Every matmul counts x3
for forward + backward; attention without the causal saving; AdamW not counted.

    python benchmarks/fit_flops.py        # the table in results/fit_scale.md, "layer factors"
"""


def cheapest_macs(n, a, b, c, d):
    costs = {"dense-left": c*a*b + c*b*d + n*d*c, "dense-right": a*b*d + c*a*d + n*d*c,
             "rows": n*d*b + n*b*a + n*a*c, "left": c*a*b + n*d*b + n*b*c, "right": a*b*d + n*d*a + n*a*c}
    k = min(costs, key=costs.get)
    return k, costs[k]

L2, D2, F2, L1, D1, F1, V, B, T = 12, 1024, 4096, 6, 512, 2048, 50257, 4, 128
mats = {"q": (D1, D1, D2, D2), "k": (D1, D1, D2, D2), "v": (D1, D1, D2, D2), "o": (D1, D1, D2, D2),
        "fc1": (F1, D1, F2, D2), "fc2": (D1, F1, D2, F2)}  # (a=D1out, b=D1in, c=D2out, d=D2in)
for bsz in (4, 16, 64):
    N = bsz * T
    G = 1e9
    lin_plain = sum(2*N*c*d for a, b, c, d in mats.values())  # per layer fwd
    attn = 4 * bsz * T * T * D2  # per layer fwd (scores + values, no causal saving)
    head_plain = 2 * N * V * D2
    plain = L2 * 3 * (lin_plain + attn) + 3 * head_plain
    mat = sum(2*min(c*a*b + c*b*d, a*b*d + c*a*d) for a, b, c, d in mats.values())  # per layer fwd, dense
    head_ligo_f = 2*N*D2*D1 + 2*N*D1*V
    head_ligo = 3*2*N*D2*D1 + 2*2*N*D1*V  # core frozen: no weight grad for the vocab table
    old_full = L2 * (3*mat + 3*(lin_plain + attn)) + head_ligo
    old_stream = old_full + L2 * (mat + lin_plain + attn) + 2*N*D1*V
    chain = {m: cheapest_macs(N, *s) for m, s in mats.items()}
    lin_chain = sum(2*v for _, v in chain.values())
    new_full = L2 * 3 * (lin_chain + attn) + head_ligo
    new_stream = new_full + L2 * (lin_chain + attn) + 2*N*D1*V
    print(f"batch {bsz}x{T} ({N} tokens): plain {plain/G:.0f} GFLOP; dense materialisation {L2*mat/G:.0f} fwd "
          f"(x3 with bwd {3*L2*mat/G:.0f}); old LiGO full {old_full/G:.0f} ({old_full/plain:.2f}x), streamed "
          f"{old_stream/G:.0f} ({old_stream/plain:.2f}x); chain orders {dict((m, k) for m, (k, _) in chain.items())}: "
          f"linears/layer fwd {lin_chain/G:.1f} vs plain {lin_plain/G:.1f}; new full {new_full/G:.0f} "
          f"({new_full/plain:.2f}x), streamed {new_stream/G:.0f} ({new_stream/plain:.2f}x)")
