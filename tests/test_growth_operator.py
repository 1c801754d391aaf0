"""The LiGO operator: Kronecker-factored application equals an explicit dense M; stacking and interleaving reproduce
StackBERT and interpolation exactly; head-aware initialisation copies whole heads (GQA-consistent); saved operators
load back; the tying table follows from the width spaces."""

import pytest
import torch

from ligo_convert import LigoError, Spec, init_weights
from ligo_convert.growth import init as inits
from ligo_convert.growth.operator import LigoOperator
from ligo_convert.spec import CANONICAL, module_of, pattern_of, space_kind, spaces

TEXT = Spec(layers=2, width=8, heads=2, head_dim=4, mlp=12, vocab_size=11, type_vocab_size=2, max_positions=16,
            head="mlm", tie_embeddings=True, embed_norm=True, norm_placement="post", final_norm=False, pooler=True)
IMAGE = Spec(layers=2, width=8, heads=2, head_dim=4, mlp=12, input="patches", image_size=4, patch_size=2,
             num_channels=3, cls_token=True, dist_token=True, head="classifier", num_classes=3, dist_head=True)
GQA = Spec(layers=2, width=8, heads=4, head_dim=2, kv_heads=2, mlp=12, vocab_size=11, positions="rotary",
           norm="rmsnorm", gated_mlp=True, qkv_bias=False, o_bias=False, mlp_bias=False, causal=True, head="lm")


def grown(spec: Spec, **sizes) -> Spec:
    return spec.replace(**sizes)


CASES = {
    "text-both": (TEXT, dict(layers=3, width=12, heads=3, kv_heads=3, mlp=20)),
    "image-both": (IMAGE, dict(layers=4, width=12, heads=3, kv_heads=3, mlp=16)),
    "gqa-both": (GQA, dict(layers=3, width=12, heads=6, kv_heads=3, mlp=18)),
    "gqa-ratio-change": (GQA, dict(layers=2, width=12, heads=8, kv_heads=2, mlp=12)),
    "depth-only": (TEXT, dict(layers=5)),
    "width-only": (TEXT, dict(width=16, heads=4, kv_heads=4, mlp=24)),
}


def dense_reference(op: LigoOperator, small: dict, names_small: list[str], names_big: list[str]) -> torch.Tensor:
    """Build M explicitly, block by block: block(t, s) = w[l, j] * kron(B_axis0, B_axis1, ...) (row-major vec), and
    return M @ vec(theta_small)."""
    s_spec, t_spec = op.source, op.target
    offsets, total = {}, 0
    for n in names_small:
        offsets[n] = total
        total += small[n].numel()
    theta = torch.cat([small[n].reshape(-1).double() for n in names_small])
    rows = []
    for name in names_big:
        pattern, layer = pattern_of(name)
        tags = CANONICAL[pattern]
        mats = []
        for axis, tag in enumerate(tags):
            b = op.width(space_kind(tag))
            if b is None:
                mats.append(torch.eye(s_spec.shape_of(name.replace(f"layers.{layer}.", "layers.0.")
                                                      if layer is not None else name)[axis], dtype=torch.float64))
            else:
                mats.append((b[layer] if b.dim() == 3 else b).double())
        kron = mats[0]
        for m in mats[1:]:
            kron = torch.kron(kron, m)
        block_row = torch.zeros(kron.shape[0], total, dtype=torch.float64)
        if layer is None:
            block_row[:, offsets[name]:offsets[name] + kron.shape[1]] = kron
        else:
            module = module_of(name)
            mix = op.depth(module)
            for j in range(s_spec.layers):
                coef = float(mix[layer, j].detach()) if mix is not None else float(layer == j)
                src = f"layers.{j}.{module}"
                block_row[:, offsets[src]:offsets[src] + kron.shape[1]] += coef * kron
        rows.append(block_row)
    m = torch.cat(rows)
    assert m.shape == (t_spec.parameter_count(), total)
    return m @ theta


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared"])
@pytest.mark.parametrize("case", list(CASES))
def test_factored_equals_dense_m(case, shared):
    source, sizes = CASES[case]
    target = grown(source, **sizes)
    small = init_weights(source, seed=3)
    small = {k: v + 0.1 * torch.randn_like(v) for k, v in small.items()}  # no structure the check could hide behind
    op = LigoOperator(source, target, small, shared_width=shared)
    op.initialize("stack", "random", noise=0.03, seed=1)
    with torch.no_grad():  # perturb so no matrix is special (identity blocks, equal rows)
        for t in op.named_operator_tensors().values():
            t.add_(0.05 * torch.randn_like(t))
    big = {k: v.detach() for k, v in op().items()}
    names_big = target.tensor_names()
    for n in names_big:
        assert tuple(big[n].shape) == target.shape_of(n), n
    expected = dense_reference(op, small, source.tensor_names(), names_big)
    got = torch.cat([big[n].reshape(-1).double() for n in names_big])
    assert (expected - got).abs().max().item() <= 1e-6


def test_tying_table_falls_out_of_spaces():
    """O's input uses V's matrix, fc2's input fc1's (the mlp space), every residual axis B_emb; class and vocab axes
    are not grown; per-layer matrices differ per target layer."""
    target = grown(TEXT, layers=3, width=12, heads=3, kv_heads=3, mlp=20)
    op = LigoOperator(TEXT, target, init_weights(TEXT))
    assert torch.equal(op.width("o"), op.width("v")) and "width.o" not in op.named_operator_tensors()  # one matrix
    assert op.width("vocab") is None and op.width("positions") is None and op.width("types") is None
    assert spaces("layers.1.fc2.weight") == ("residual", "mlp[1]")
    assert op.width("mlp").shape == (3, 20, 12) and op.width("residual").shape == (12, 8)
    assert not torch.equal(op.width("q")[0], op.width("q")[1])
    # a tied LM head stays tied: there is no lm_head tensor, the decoder is the grown embedding
    assert "lm_head.weight" not in op()


@pytest.mark.parametrize("scheme", ["stack", "interleave"])
def test_identity_width_stacking_reproduces_stackbert_and_interpolation(scheme):
    source = TEXT.replace(layers=3)
    target = source.replace(layers=6)
    small = init_weights(source, seed=5)
    op = LigoOperator(source, target, small)
    op.initialize(scheme, noise=0.0)
    big = op()
    for name in target.tensor_names():
        pattern, layer = pattern_of(name)
        if layer is None:
            assert torch.equal(big[name], small[name]), name
            continue
        j = layer % 3 if scheme == "stack" else layer // 2  # StackBERT: W[l mod L1]; interpolation: W[l // k]
        assert torch.equal(big[name], small[f"layers.{j}.{module_of(name)}"]), name


def test_noisy_depth_init_is_the_official_recipe():
    w = inits.depth_matrix(6, 3, "stack", 0.03, torch.Generator().manual_seed(0))
    assert torch.allclose(w.sum(1), torch.ones(6))
    assert (w.argmax(1) == torch.tensor([0, 1, 2, 0, 1, 2])).all()
    assert (w.max(1).values > 0.9).all() and (w.max(1).values < 1).all()


def test_random_width_init_is_identity_then_convex_rows():
    b = inits.width_matrix(7, 4, "random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(b[:4], torch.eye(4))
    assert torch.allclose(b[4:].sum(1), torch.ones(3)) and (b[4:] >= 0).all()


@pytest.mark.parametrize("case", ["text-both", "gqa-both", "gqa-ratio-change"])
def test_head_aware_select_init_copies_whole_heads_consistently(case):
    """With 'select' and no noise, every new query head is exactly one old query head, every new key/value head one
    old key/value head, and a query head's key/value group is built from the old group of its source head."""
    source, sizes = CASES[case]
    target = grown(source, **sizes)
    small = init_weights(source, seed=2)
    op = LigoOperator(source, target, small)
    op.initialize("stack", "select", noise=0.0, seed=4)
    big = op()
    hd = source.head_dim
    r1, r2 = source.heads // source.kv_heads, target.heads // target.kv_heads
    # undo the residual expansion on the input side: the first D1 columns of B_emb are the identity rows
    for layer in range(target.layers):
        j = layer % source.layers
        q_new = big[f"layers.{layer}.q.weight"]
        k_new = big[f"layers.{layer}.k.weight"]
        q_old, k_old = small[f"layers.{j}.q.weight"], small[f"layers.{j}.k.weight"]
        b_emb = op.width("residual")
        kv_src = []
        for g in range(target.kv_heads):
            rows = k_new[g * hd:(g + 1) * hd]
            hits = [h for h in range(source.kv_heads)
                    if torch.allclose(rows, (k_old[h * hd:(h + 1) * hd] @ b_emb.T) if b_emb is not None
                                      else k_old[h * hd:(h + 1) * hd], atol=1e-6)]
            assert len(hits) >= 1, (layer, g)
            kv_src.append(hits[0])
        for h in range(target.heads):
            rows = q_new[h * hd:(h + 1) * hd]
            hits = [o for o in range(source.heads)
                    if torch.allclose(rows, (q_old[o * hd:(o + 1) * hd] @ b_emb.T) if b_emb is not None
                                      else q_old[o * hd:(o + 1) * hd], atol=1e-6)]
            assert hits, (layer, h)
            assert hits[0] // r1 == kv_src[h // r2], (layer, h)  # the query head sits in its source's group


def test_operator_save_and_load(tmp_path):
    target = grown(GQA, layers=3, width=12, heads=6, kv_heads=3, mlp=18)
    small = init_weights(GQA)
    op = LigoOperator(GQA, target, small, shared_width=True)
    op.initialize(seed=7)
    with torch.no_grad():
        op.width("residual").add_(0.1)
    op.save(tmp_path / "op.safetensors", {"steps": 3})
    again = LigoOperator(GQA, target, small, shared_width=True)
    meta = again.load(tmp_path / "op.safetensors")
    assert meta["steps"] == 3
    for name, value in op.named_operator_tensors().items():
        assert torch.equal(value, again.named_operator_tensors()[name])
    other = LigoOperator(GQA, target.replace(layers=4), small, shared_width=True)
    with pytest.raises(LigoError, match="another target model"):
        other.load(tmp_path / "op.safetensors")
    per_layer = LigoOperator(GQA, target, small)
    with pytest.raises(LigoError, match="shared_width"):
        per_layer.load(tmp_path / "op.safetensors")


def test_refuses_shrinking_and_head_dim_changes():
    with pytest.raises(LigoError, match="smaller than the source on width"):
        LigoOperator(TEXT, TEXT.replace(width=4), init_weights(TEXT))
    with pytest.raises(LigoError, match="head_dim"):
        LigoOperator(TEXT, TEXT.replace(head_dim=8), init_weights(TEXT))


def test_learn_width_only_keeps_depth_fixed():
    target = grown(TEXT, layers=3, width=12, heads=3, kv_heads=3, mlp=20)
    op = LigoOperator(TEXT, target, init_weights(TEXT), learn="width")
    trainable = {n.split(".")[-1] for n, p in op.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("width") for n in trainable)
    assert op.depth("q.weight") is not None and not op.depth("q.weight").requires_grad


def test_per_layer_operator_saves_and_loads_layer_by_layer(tmp_path):
    """A per-layer operator round-trips exactly; the file holds each kind stacked (L2, D2, D1), as safetensors reads
    it; a non-finite value in one layer's matrix is refused before anything is set."""
    from safetensors.torch import load_file, save_file

    target = grown(GQA, layers=3, width=12, heads=6, kv_heads=3, mlp=18)
    small = init_weights(GQA)
    op = LigoOperator(GQA, target, small)
    op.initialize(seed=3)
    with torch.no_grad():
        for p in op.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    op.save(tmp_path / "op.safetensors", {"steps": 2})
    stored = load_file(str(tmp_path / "op.safetensors"))
    mine = op.named_operator_tensors()
    assert set(stored) == set(mine) and all(torch.equal(stored[k], v) for k, v in mine.items())
    assert any(v.dim() == 3 and v.shape[0] == target.layers for v in stored.values())  # per-layer kinds stacked
    again = LigoOperator(GQA, target, small)
    assert again.load(tmp_path / "op.safetensors")["steps"] == 2
    assert all(torch.equal(v, again.named_operator_tensors()[k]) for k, v in mine.items())
    # one layer's matrix broken: refused, and the operator it was loading into keeps its values
    name = next(k for k, v in stored.items() if v.dim() == 3)
    stored[name][-1, 0, 0] = float("nan")
    meta = {"ligo_convert": __import__("safetensors").safe_open(str(tmp_path / "op.safetensors"), "pt").metadata()[
        "ligo_convert"]}
    save_file(stored, str(tmp_path / "bad.safetensors"), metadata=meta)
    fresh = LigoOperator(GQA, target, small)
    before = {k: v.clone() for k, v in fresh.named_operator_tensors().items()}
    with pytest.raises(LigoError, match=f"operator tensor {name} has NaN"):
        fresh.load(tmp_path / "bad.safetensors")
    assert all(torch.equal(v, fresh.named_operator_tensors()[k]) for k, v in before.items())


def test_counting_saving_and_loading_a_per_layer_operator_never_stack_it(tmp_path, monkeypatch):
    """The per-layer operator is the size of the grown model's layers: counting its parameters, saving it and loading
    it handle one layer's matrix at a time, never the stacked (L2, D2, D1) kinds (which are most of the operator)."""
    target = grown(GQA, layers=4, width=16, heads=8, kv_heads=4, mlp=24)
    small = init_weights(GQA)
    op = LigoOperator(GQA, target, small)
    layer_matrix = max(p.numel() for p in op.layer_ops[0].parameters())
    largest = []
    stack = torch.stack

    def spy(tensors, *args, **kwargs):
        out = stack(tensors, *args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "stack", spy)
    assert op.operator_parameter_count() == sum(v.numel() for v in op.named_operator_tensors().values())
    assert max(largest) > layer_matrix  # the spy sees the stacks named_operator_tensors makes
    largest.clear()
    op.operator_parameter_count()
    op.save(tmp_path / "op.safetensors")
    LigoOperator(GQA, target, small).load(tmp_path / "op.safetensors")
    assert max(largest, default=0) <= layer_matrix  # nothing stacked across layers


def test_saving_a_per_layer_operator_adds_no_copy_of_it_to_peak_memory(tmp_path):
    """Peak RSS while counting and saving a ~200 MB per-layer operator rises by at most a fifth of it (before:
    counting stacked a whole copy, saving two)."""
    from pathlib import Path

    status, reset = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    if not status.exists():
        pytest.skip("needs Linux's /proc")

    def kb(field: str) -> int:
        return int(next(line for line in status.read_text().splitlines() if line.startswith(field)).split()[1])

    source = GQA.replace(layers=2, width=64, heads=4, head_dim=16, kv_heads=2, mlp=1024)
    target = source.replace(layers=12, width=512, heads=32, kv_heads=16, mlp=4096)
    op = LigoOperator(source, target, init_weights(source))
    op_kb = op.operator_parameter_count() * 4 / 1024
    assert op_kb > 150 * 1024
    for call in (op.operator_parameter_count, lambda: op.save(tmp_path / "op.safetensors")):
        try:
            reset.write_text("5")  # the peak counter (VmHWM) starts again from the current RSS
        except OSError:
            pytest.skip("the peak-RSS counter cannot be reset here")
        start = kb("VmRSS:")
        call()
        assert kb("VmHWM:") - start < op_kb / 5, call
