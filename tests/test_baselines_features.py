"""The function-preserving baselines (net2net, LEMON, stack) against every canonical feature the newer families
brought: Gemma's norm offset and sqrt(width) embedding scale, q/k norms per head and over the projection,
sandwich and output norms, parallel residuals, LayerScale, soft-capping, query scaling and sliding windows.  Each
feature either keeps the source's function exactly where ``preservation`` says so (checked on the outputs), or the
method says "approximate" / refuses with the reason."""

from __future__ import annotations

import pytest
import torch

from ligo_convert import LigoError
from ligo_convert.growth import baselines as B
from ligo_convert.growth.pretrain import micro_spec
from test_baselines import inputs, logit_diff, wider
from ligo_convert.model import init_weights

# feature -> spec changes on a 2-layer pre-LN RMSNorm decoder with GQA (4 query / 2 key-value heads)
FEATURES = {
    "gemma": dict(norm_offset=1.0, embed_scale=True, activation="gelu_tanh"),
    "qk-norm-head": dict(qk_norm="head"),
    "qk-norm-proj": dict(qk_norm="proj"),
    "sandwich": dict(norm_placement="sandwich"),
    "output-norms": dict(norm_placement="output"),
    "parallel": dict(parallel_residual=True),
    "layer-scale": dict(layer_scale=True),
    "softcap": dict(attn_softcap=5.0, final_softcap=3.0, score_scale_dim=12.0),
    # windows shorter than the 9-token inputs, every other layer full, a separate rotary base for windowed layers
    "windows": dict(sliding_window=3, window_period=2, rope_local_theta=100.0),
}


def model(feature: str):
    spec = micro_spec("llama", layers=2, width=32, heads=4, mlp=48, kv_heads=2).replace(**FEATURES[feature])
    spec.check()
    w = init_weights(spec, seed=0, std=0.2, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for k, v in w.items():  # norms, biases and LayerScale gains away from their neutral values
        if "norm" in k or k.endswith(("bias", "_scale")):
            w[k] = v + 0.2 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    return spec, w


def exact_cases(spec):
    out = [("net2net", wider(spec)), ("lemon", wider(spec)), ("stack", wider(spec))]
    # zero-output blocks: the fewest added layers that keep every source layer on a layer of its own kind
    deeper = next(spec.replace(layers=n) for n in range(3, 9) if B._window_changes("lemon", spec, spec.replace(
        layers=n)) is None)
    out.append(("lemon", deeper))
    if B._not_plain_pre_ln(spec) is None:  # average/zero expansion of the stream (heads doubled: balanced copies)
        out.append(("lemon", wider(spec, 5, 4, layers=deeper.layers).replace(heads=8, kv_heads=4)))
    return out


@pytest.mark.parametrize("feature", list(FEATURES))
def test_exact_claims_hold(feature):
    spec, w = model(feature)
    for method, target in exact_cases(spec):
        exact, why = B.preservation(method, spec, target)
        assert exact, (method, why)
        grown = B.expand(method, spec, w, target, seed=3, dtype=torch.float64)
        assert logit_diff(spec, w, target, grown) <= 1e-5, (method, target.layers, target.width)


@pytest.mark.parametrize("feature", ["gemma", "sandwich", "output-norms", "layer-scale"])
def test_lemon_refuses_average_expansion_through_a_changed_stream(feature):
    spec, w = model(feature)
    with pytest.raises(LigoError, match="average/zero expansion") as e:
        B.expand("lemon", spec, w, wider(spec, 5, 4))
    assert "\n" not in str(e.value) and "multiple of 32" in str(e.value)


def test_gemma_embedding_scale_is_undone_for_the_copies():
    """Without the sqrt(D1/D2) factor on the copied embedding rows (and its inverse on the tied decoder's norm),
    the widened model would not be the source: the test above would fail; here the factors themselves."""
    spec, w = model("gemma")
    target = wider(spec)
    grown = B.expand("net2net", spec, w, target, seed=3, dtype=torch.float64)
    ratio = grown["embed.tokens"][:, :32] / w["embed.tokens"]
    assert torch.allclose(ratio, torch.full_like(ratio, (32 / 64) ** 0.5))


def test_projection_qk_norm_needs_balanced_heads():
    spec, w = model("qk-norm-proj")
    uneven = spec.replace(width=64, heads=6, kv_heads=3, mlp=64)  # 4 -> 6 heads: some copied twice, some once
    exact, why = B.preservation("net2net", spec, uneven)
    assert not exact and "q/k norms" in why
    assert logit_diff(spec, w, uneven, B.expand("net2net", spec, w, uneven, dtype=torch.float64)) > 1e-3
    with pytest.raises(LigoError, match="q/k norms over the whole projection"):
        B.expand("lemon", spec, w, uneven)
    per_head = model("qk-norm-head")[0]  # a per-head norm does not care how often a head is copied
    assert B.preservation("net2net", per_head, per_head.replace(width=64, heads=8, kv_heads=4, mlp=64))[0]


def test_windows_follow_the_layer_index():
    spec, w = model("windows")
    assert [spec.windowed(i) for i in range(2)] == [True, False]
    # LEMON 2 -> 4 layers puts source layer 1 (full) on target layer 2 (windowed): refused, not silently wrong
    with pytest.raises(LigoError, match="source layer 1 lands on target layer 2, which is windowed"):
        B.expand("lemon", spec, w, spec.replace(layers=4))
    exact, _ = B.preservation("stack", spec, spec.replace(layers=4))
    assert not exact
