"""Growth baselines (stack, interpolate, net2net, aki, lemon, scratch): every function-preserving claim is checked
against the source's own outputs for every family and norm placement, every refusal and every "approximate" is
shown, and every method's model loads with transformers' from_pretrained and trains."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

from ligo_convert import LigoError, forward, from_tensors, load, save
from ligo_convert import data as data_mod
from ligo_convert.descriptors import get_descriptor, load_descriptors
from ligo_convert.growth import baselines as B
from ligo_convert.growth.operator import LigoOperator
from ligo_convert.growth.pretrain import micro_spec
from ligo_convert.model import init_weights
from ligo_convert.objectives import task_loss
from helpers import loading_problems, max_diff

FAMILIES = sorted(load_descriptors())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is faster than two contending for a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(family: str, **sizes):
    """A 2-layer, width-32 model of ``family`` (grouped-query attention where the family's config can say so), with
    random weights and randomised norms/biases so that a wrong norm or bias shows in the outputs."""
    gqa = "kv_heads" in get_descriptor(family).config_fields
    spec = micro_spec(family, **{**dict(layers=2, width=32, heads=4, mlp=48, kv_heads=2 if gqa else 0), **sizes})
    w = init_weights(spec, seed=0, std=0.2, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for k, v in w.items():
        if "norm" in k or k.endswith("bias"):
            w[k] = v + 0.2 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    return spec, w


def inputs(spec, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(2)
    if spec.input == "patches":
        return {"pixel_values": torch.randn(2, spec.num_channels, spec.image_size, spec.image_size, generator=g,
                                            dtype=dtype)}
    return {"input_ids": torch.randint(0, spec.vocab_size - 2, (2, 9), generator=g)}


def wider(spec, factor_num: int = 2, factor_den: int = 1, layers: int | None = None, mlp: int | None = None):
    """``spec`` grown in width by num/den (heads likewise, head_dim kept; kv heads too where they divide the heads,
    else one per head), mlp to ``mlp`` (default: a size that is no multiple of the old one)."""
    heads, kv = spec.heads * factor_num // factor_den, spec.kv_heads * factor_num // factor_den
    return spec.replace(width=spec.width * factor_num // factor_den, heads=heads, kv_heads=kv if heads % kv == 0
                        else heads, mlp=mlp or 2 * spec.mlp + 6, layers=layers or spec.layers)


def logit_diff(spec, w, target, grown) -> float:
    """How far the grown model's outputs are from the source's: the logits; for a bare tower (no head) its
    fixed-size projected embeddings, else its last hidden states on the source's channels."""
    x = inputs(spec)
    with torch.no_grad():
        before, after = forward(spec, w, **x), forward(target, grown, **x)
    for key in ("logits", "embeds"):
        if key in before:
            return max_diff(before[key], after[key])
    return max_diff(before["hidden"], after["hidden"][..., :spec.width])


def cases(spec):
    """(method, target) pairs each method claims to grow exactly, for this model's norm placement."""
    width = wider(spec)  # integer factor: balanced copies, every placement
    out = [(m, width) for m in ("net2net", "lemon", "stack", "interpolate")]
    out.append(("aki", spec.replace(width=64)))  # aki with only the residual stream growing is net2net
    if spec.norm_placement == "pre":  # zero-output blocks and LEMON's average/zero expansion
        out += [("lemon", wider(spec, layers=5)), ("lemon", spec.replace(layers=4))]
        average = wider(spec, 5, 4, layers=3)
        try:  # refused where the stream is not plain pre-LN (LayerScale, a norm on the embeddings...)
            B.residual_mode("lemon", spec, average)
            out.append(("lemon", average))
        except LigoError:
            pass
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_function_preserving_claims_hold(family):
    spec, w = small(family)
    assert spec.head != "none" or spec.final_norm or spec.projection  # outputs to compare (see logit_diff)
    for method, target in cases(spec):
        exact, why = B.preservation(method, spec, target)
        assert exact, (method, why)
        grown = B.expand(method, spec, w, target, seed=3, dtype=torch.float64)
        assert set(grown) == set(target.tensor_names())
        assert all(tuple(grown[k].shape) == target.shape_of(k) for k in grown)
        # float64 throughout, except model.py's RMSNorm, which computes in float32 as transformers does
        assert logit_diff(spec, w, target, grown) <= 1e-5, (method, target.layers, target.width)


@pytest.mark.parametrize("family", FAMILIES)
def test_approximate_methods_say_so_and_differ(family):
    spec, w = small(family)
    odd = wider(spec, 5, 4)  # 32 -> 40: residual channels copied unequal numbers of times
    for method, target in [("net2net", odd), ("stack", spec.replace(layers=4)), ("interpolate", spec.replace(
            layers=3)), ("net2net", spec.replace(layers=3)), ("aki", wider(spec)), ("scratch", wider(spec))]:
        exact, why = B.preservation(method, spec, target)
        assert not exact and why, method
        assert logit_diff(spec, w, target, B.expand(method, spec, w, target, dtype=torch.float64)) > 1e-3, method


@pytest.mark.parametrize("family", [f for f in FAMILIES if small(f)[0].norm_placement == "post"])
def test_lemon_refuses_what_post_ln_cannot_do_losslessly(family):
    spec, w = small(family)
    with pytest.raises(LigoError, match="post-LN model losslessly") as e:
        B.expand("lemon", spec, w, spec.replace(layers=3))
    assert "\n" not in str(e.value)
    with pytest.raises(LigoError, match="multiple of 32"):
        B.expand("lemon", spec, w, wider(spec, 5, 4))
    with pytest.raises(LigoError, match="post-LN"):
        B.preservation("lemon", spec, spec.replace(layers=3))


def test_grouped_query_heads_copy_whole_groups():
    spec, w = small("llama")  # 4 query heads, 2 key/value heads, rotary
    assert (spec.heads, spec.kv_heads, spec.positions) == (4, 2, "rotary")
    # 2 query heads per group -> 1: each old group needs two copies to keep both its query heads
    target = spec.replace(heads=8, kv_heads=8)
    for method in ("net2net", "lemon"):
        assert logit_diff(spec, w, target, B.expand(method, spec, w, target, dtype=torch.float64)) <= 1e-5
    kv, query = B.head_selection(spec, target, torch.Generator().manual_seed(0))
    assert kv[:2].tolist() == [0, 1] and sorted(set(query.tolist())) == [0, 1, 2, 3]
    assert all(int(query[h]) // 2 == int(kv[h]) for h in range(8))  # a query head keeps its own keys
    with pytest.raises(LigoError, match="kv_heads >= 4"):
        B.expand("net2net", spec.replace(heads=8, kv_heads=2), w, spec.replace(heads=9, kv_heads=3))


def test_stack_and_interpolate_are_ligo_special_cases():
    """Identity width + noiseless stack / interleave depth in LiGO's operator give exactly StackBERT / interpolation."""
    spec, w = small("hf-gpt2")
    w = {k: v.float() for k, v in w.items()}
    target = spec.replace(layers=5)
    for method, scheme in (("stack", "stack"), ("interpolate", "interleave")):
        op = LigoOperator(spec, target, w)
        op.initialize(scheme, "random", noise=0.0)
        with torch.no_grad():
            ligo = op()
        grown = B.expand(method, spec, w, target)
        assert set(ligo) == set(grown)
        assert all(torch.equal(ligo[k], grown[k]) for k in ligo), method
    assert [s for s, _ in B.depth_map("stack", 2, 5)] == [0, 1, 0, 1, 0]
    assert [s for s, _ in B.depth_map("interpolate", 2, 4)] == [0, 0, 1, 1]
    assert B.depth_map("lemon", 2, 4) == [(0, False), (0, True), (1, False), (1, True)]


def test_methods_are_deterministic_and_documented():
    spec, w = small("hf-vit")
    target = wider(spec, layers=3)
    for method in B.METHODS:
        assert method in B.METHOD_NOTES and B.METHOD_NOTES[method]
        a, b = B.expand(method, spec, w, target, seed=5), B.expand(method, spec, w, target, seed=5)
        assert all(torch.equal(a[k], b[k]) for k in a), method
    assert not torch.equal(B.expand("net2net", spec, w, target, 1)["layers.0.fc1.weight"],
                           B.expand("net2net", spec, w, target, 2)["layers.0.fc1.weight"])
    with pytest.raises(LigoError, match="unknown growth method"):
        B.expand("bogus", spec, w, target)
    with pytest.raises(LigoError, match="smaller"):
        B.expand("stack", target, B.expand("stack", spec, w, target), spec)


# --- real transformers models ------------------------------------------------------------------------------------------

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
HF = {
    "BertForMaskedLM": transformers.BertConfig(**TINY),
    "GPT2LMHeadModel": transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "LlamaForCausalLM": transformers.LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=64),
    "RobertaForMaskedLM": transformers.RobertaConfig(**TINY, max_position_embeddings=66),
    "ViTForImageClassification": transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=48, image_size=8, patch_size=4,
                                                        num_labels=3),
    "DeiTForImageClassificationWithTeacher": transformers.DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
        patch_size=4, num_labels=3),
}


def hf_source(tmp_path, cls):
    model = getattr(transformers, cls)(HF[cls]).eval()
    with torch.no_grad():  # transformers leaves norms at 1/0: randomise them so a dropped norm shows
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.1)
    model.save_pretrained(tmp_path / "src")
    return model


def hf_logits(model, spec):
    x = inputs(spec, torch.float32)
    with torch.no_grad():
        return model(**x).logits, x


@pytest.mark.parametrize("cls", list(HF))
def test_every_method_loads_in_transformers(tmp_path, cls):
    model = hf_source(tmp_path, cls)
    src = load(tmp_path / "src")
    spec, w = src.spec, src.materialize()
    deeper = spec.norm_placement == "pre"
    target = wider(spec, layers=3 if deeper else 2)
    before, x = hf_logits(model, spec)
    for method in B.METHODS:
        grown = B.expand(method, spec, w, target, seed=0)
        out = save(from_tensors(target, grown, src.family), tmp_path / method)
        again, info = getattr(transformers, cls).from_pretrained(out, output_loading_info=True)
        assert loading_problems(info) == {}, (method, info)
        after, _ = hf_logits(again.eval(), spec)
        with torch.no_grad():
            ours = forward(target, grown, **x)["logits"]
        assert max_diff(after, ours) <= 1e-5, method  # transformers computes what we grew
        if B.preservation(method, spec, target)[0]:
            assert max_diff(after, before) <= 1e-5, method  # ...and, where claimed, what the source computed
    assert B.preservation("lemon", spec, target)[0]
    assert B.preservation("net2net", spec, target)[0] == (not deeper)


@pytest.mark.parametrize("method", B.METHODS)
def test_every_method_trains(method):
    """20 AdamW steps on stdlib text lower the causal-LM loss of each method's grown GPT-2."""
    spec = micro_spec("hf-gpt2", layers=2, width=32, heads=4, mlp=64, max_positions=32)
    source = init_weights(spec, seed=0)
    target = wider(spec, layers=3, mlp=128)
    weights = {k: v.requires_grad_(True) for k, v in B.expand(method, spec, source, target, seed=0).items()}
    batch = next(data_mod.batches(target, batch_size=8, seq_len=32, seed=0))
    opt = torch.optim.AdamW(weights.values(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = task_loss(target, forward(target, weights, **data_mod.model_inputs(batch)), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.8 * losses[0], losses


def test_lemon_new_channels_learn():
    """LEMON's zero-output blocks and new channels are not dead: one training step moves their weights."""
    spec, w = small("hf-vit")
    target = wider(spec, 5, 4, layers=3)
    weights = {k: v.float().requires_grad_(True) for k, v in B.expand("lemon", spec, w, target).items()}
    batch = {"pixel_values": inputs(spec, torch.float32)["pixel_values"], "labels": torch.tensor([0, 1])}
    task_loss(target, forward(target, weights, **data_mod.model_inputs(batch)), batch).backward()
    assert weights["layers.1.o.weight"].grad.abs().sum() > 0  # the zero-output copy's output learns
    new = slice(spec.width, target.width)
    assert weights["layers.0.q.weight"].grad[:, new].abs().sum() > 0 or \
        weights["layers.0.fc2.weight"].grad[new].abs().sum() > 0


def test_preservation_is_stated_for_every_method_and_case():
    spec, _ = small("hf-gpt2")
    for method, target in itertools.product(B.METHODS, [wider(spec), spec.replace(layers=4), wider(spec, 5, 4)]):
        exact, why = B.preservation(method, spec, target)
        assert isinstance(exact, bool) and why


def test_ligo_starts_from_other_methods_where_expressible():
    spec, w = small("hf-gpt2")
    w = {k: v.float() for k, v in w.items()}
    deeper = spec.replace(layers=5)
    for method in ("stack", "interpolate", "lemon"):  # depth only: LiGO's form is the method itself
        op = LigoOperator(spec, deeper, w)
        assert B.ligo_init(op, method, seed=4) == B.LIGO_INIT_NOTES[method]
        with torch.no_grad():
            ligo = op()
        grown = B.expand(method, spec, w, deeper, seed=4)
        assert all(torch.equal(ligo[k], grown[k]) for k in grown), method
    # width: the same copies, but one matrix per space cannot also divide the readers by the copy count
    target = wider(spec, layers=3)
    op = LigoOperator(spec, target, w)
    B.ligo_init(op, "net2net", seed=4)
    with torch.no_grad():
        ligo = op()
    grown = B.expand("net2net", spec, w, target, seed=4)
    for name in ("embed.tokens", "embed.positions", "layers.2.fc1.bias", "layers.1.q.bias",
                 "layers.1.attn_norm.weight"):
        assert torch.allclose(ligo[name], grown[name], atol=1e-6), name  # written channels: copied alike
    assert not torch.allclose(ligo["layers.0.fc2.weight"], grown["layers.0.fc2.weight"])  # read: not divided
    for method in ("aki", "scratch"):
        with pytest.raises(LigoError, match="not expressible"):
            B.ligo_init(op, method)
