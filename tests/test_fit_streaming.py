"""Fitting at scale, proved by equality with the simple path.

- Streamed fitting (each target layer made when it runs, under activation checkpointing) and full materialisation
  give the same loss and operator gradients, for every family, both width variants and every ``--learn`` mode, and
  the same operator after 5 AdamW steps.
- The operator's one-layer-at-a-time application (and the factored vocabulary tables) equals the plain product
  ``B_out (sum_j w_j W_j) B_in^T`` formed densely.
- SDPA and explicit attention agree, with padding and causal masks and grouped-query attention.
- A streamed grow writes the same files as the full path, byte for byte; the writer reads the grown model one tensor
  at a time and never holds it whole.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ligo_convert import data as data_mod
from ligo_convert import forward, from_tensors, init_weights, save
from ligo_convert.descriptors import load_descriptors
from ligo_convert.grow import grow
from ligo_convert.growth.fit import GrowingModel, choose_stream, fit, stream_name
from ligo_convert.growth.operator import LEARN, LigoOperator
from ligo_convert.growth.pretrain import micro_spec
from ligo_convert.model import Chain, Factored
from ligo_convert import objectives
from ligo_convert.objectives import logits_of, loss_terms
from helpers import assert_same_files, max_diff

FAMILIES = sorted(load_descriptors())


def small_spec(family: str, **extra):
    spec = micro_spec(family, layers=2, width=16, heads=2, mlp=24, vocab_size=40, max_positions=24, image_size=8,
                      patch_size=4)
    return spec.replace(**extra) if extra else spec


def specs():
    """Every family's micro spec, plus a GQA decoder, an untied LM head and a post-LN encoder."""
    out = [(family, small_spec(family)) for family in FAMILIES]
    out.append(("llama-gqa", small_spec("llama", heads=4, head_dim=4, kv_heads=2)))
    out.append(("llama-untied", small_spec("llama", tie_embeddings=False)))
    return out


SPECS = specs()


def target_of(spec):
    """Deeper and wider, more heads (same head_dim), the same query heads per key/value head."""
    heads = spec.heads * 2
    return spec.replace(layers=3, width=spec.width * 2, heads=heads, kv_heads=heads * spec.kv_heads // spec.heads,
                        mlp=spec.mlp + 8)


def batch_for(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    if spec.input == "patches":
        return {"pixel_values": torch.randn(3, spec.num_channels, spec.image_size, spec.image_size, generator=g),
                "labels": torch.randint(max(spec.num_classes, 1), (3,), generator=g)}
    ids = torch.randint(spec.vocab_size - 2, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding
    batch = {"input_ids": ids, "attention_mask": mask}
    if spec.type_vocab_size:
        batch["token_type_ids"] = torch.zeros_like(ids)
    batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def objective(op, spec):
    """(objective, teacher): the task where the model has a head; a bare tower (no head, no task loss) distils the
    source, as grow does."""
    if spec.head != "none":
        return "task", None
    source, weights = op.source, op.source_weights()
    return "distill", lambda batch: forward(source, weights, **data_mod.model_inputs(batch))


def loss_and_grads(op, spec, batch, stream):
    return _backward(op, spec, batch, lambda: GrowingModel(op, stream)(**data_mod.model_inputs(batch)))


def _backward(op, spec, batch, run):
    """Loss and operator gradients of ``run()``'s outputs on ``batch``."""
    op.zero_grad(set_to_none=True)
    out = run()
    kind, teacher = objective(op, spec)
    total, count = loss_terms(spec, kind, out, batch, teacher(batch) if teacher else None)
    loss = total / count
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in op.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared"])
@pytest.mark.parametrize("family,spec", SPECS, ids=[name for name, _ in SPECS])
def test_streamed_and_full_fitting_agree(family, spec, shared):
    target = target_of(spec)
    op = LigoOperator(spec, target, init_weights(spec, seed=1), shared_width=shared)
    batch = batch_for(target)
    full_loss, full_grads = loss_and_grads(op, target, batch, stream=False)
    assert torch.isfinite(full_loss) and full_grads
    for stream in (True, "selective"):  # every layer recomputed; only the cheap ops recomputed
        streamed_loss, streamed_grads = loss_and_grads(op, target, batch, stream=stream)
        assert max_diff(full_loss, streamed_loss) <= 1e-6
        assert full_grads.keys() == streamed_grads.keys()
        for name, g in full_grads.items():
            assert max_diff(g, streamed_grads[name]) <= 1e-6 * max(1.0, g.abs().max().item()), (stream, name)


def dense_loss_and_grads(op, spec, batch):
    """The simple path: every layer's weights formed densely (``layer_weights``), logits decoded whole."""
    return _backward(op, spec, batch, lambda: forward(spec, op.global_weights(factored=True),
                                                      **data_mod.model_inputs(batch), layer_weights=op.layer_weights))


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared"])
@pytest.mark.parametrize("family,spec", SPECS, ids=[name for name, _ in SPECS])
def test_factored_layers_give_the_dense_loss_and_gradients(family, spec, shared):
    """The fitting forward runs each grown matrix as its factors (``Chain``); loss and operator gradients equal
    those of the dense weights."""
    target = target_of(spec)
    op = LigoOperator(spec, target, init_weights(spec, seed=5), shared_width=shared)
    batch = batch_for(target)
    factored = op.layer_factors(0)
    assert any(isinstance(t, Chain) for t in factored.values())
    # at the text batch's 3 x 9 rows, the full path applies some shared expansions to the source matrices first
    assert op.expanded_sources(27)
    dense_loss, dense_grads = dense_loss_and_grads(op, target, batch)
    for stream in (True, False):  # every product inside its layer; shared expansions applied once per step
        loss, grads = loss_and_grads(op, target, batch, stream=stream)
        assert torch.isfinite(loss) and max_diff(loss, dense_loss) <= 1e-6 * max(1.0, dense_loss.abs().item())
        assert grads.keys() == dense_grads.keys() and grads
        for name, g in dense_grads.items():
            assert max_diff(g, grads[name]) <= 1e-6 * max(1.0, g.abs().max().item()), (stream, name)


def test_shared_expansions_are_applied_first_where_that_saves_multiply_adds():
    """A GPT-2 6x512 -> 12x1024 shape: at a fitting batch the shared-width operator expands the source fc1/fc2 on
    their MLP side once per step (B_mlp against 6 source layers instead of 12 target layers); with a few rows, or
    per-layer MLP matrices, it does not."""
    source = micro_spec("hf-gpt2", layers=6, width=512, heads=8, mlp=2048, vocab_size=64, max_positions=16)
    target = source.replace(layers=12, width=1024, heads=16, kv_heads=16, mlp=4096)
    zeros = {n: torch.zeros(source.shape_of(n)) for n in source.tensor_names()}
    shared = LigoOperator(source, target, zeros, shared_width=True)
    expanded = shared.expanded_sources(512)
    assert {m: (side, tuple(t.shape)) for m, (side, t) in expanded.items()} == \
        {"fc1.weight": (0, (6, 4096, 512)), "fc2.weight": (1, (6, 512, 4096))}
    assert shared.expanded_sources(16) == {}
    per_layer = LigoOperator(source, target, zeros)
    assert not {"fc1.weight", "fc2.weight"} & set(per_layer.expanded_sources(4096))


@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (40, 8, 16, 64), (40, 64, 16, 8), (3, 16, 32, 64)])
def test_every_product_order_of_a_chain_gives_the_same_rows(shape):
    """Each of the five bracketings ``x R C^T L^T`` (and ``dense``) gives ``x @ W.T`` with W formed densely, with
    either side not growing; ``apply`` (whatever order the cost model picks) too."""
    n, a, b, c = shape  # rows, D1 out, D1 in, D2 (both sides)
    g = torch.Generator().manual_seed(0)
    left, core, right = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((c, a), (a, b), (c, b)))
    x = torch.randn(n, max(a, b, c), generator=g, dtype=torch.float64)
    for lft, rgt in ((left, right), (None, right), (left, None)):
        chain = Chain(lft, core, rgt)
        w = (lft if lft is not None else torch.eye(a, dtype=x.dtype)) @ core @ (
            rgt if rgt is not None else torch.eye(b, dtype=x.dtype)).T
        rows = x[:, :w.shape[1]]
        assert chain.shape == tuple(w.shape)
        assert max_diff(chain.dense(), w) <= 1e-10
        for order in ("rows", "left", "right", "dense-left", "dense-right"):
            assert max_diff(chain._product(order, rows), rows @ w.T) <= 1e-10, order
        assert max_diff(chain.apply(rows), rows @ w.T) <= 1e-10


@pytest.mark.parametrize("learn", LEARN)
@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared"])
def test_five_steps_give_the_same_operator_streamed_or_full(learn, shared):
    spec = small_spec("llama", heads=4, head_dim=4, kv_heads=2)
    target = target_of(spec)
    ops = {}
    for stream in (False, True):
        op = LigoOperator(spec, target, init_weights(spec, seed=1), shared_width=shared, learn=learn)
        batches = (batch_for(target, seed=s) for s in itertools.count())
        result = fit(op, target, batches, "task", steps=5, lr=0.05, stream=stream)
        assert len(result.losses) == 5
        ops[stream] = op.named_operator_tensors()
    before = LigoOperator(spec, target, init_weights(spec, seed=1), shared_width=shared).named_operator_tensors()
    assert any(max_diff(ops[True][k], before[k]) > 1e-4 for k in before)  # the steps did move it
    for name, value in ops[False].items():
        assert max_diff(value, ops[True][name]) <= 1e-5, name


def dense_growth(op, name):
    """``B_out (sum_j w[l, j] W_j) B_in^T`` formed the obvious way, axis by axis, from the stacked operator."""
    from ligo_convert.spec import CANONICAL, module_of, pattern_of, space_kind

    pattern, layer = pattern_of(name)
    src = op.source_weights()
    if layer is None:
        x = src[name]
    else:
        module = module_of(name)
        layers = torch.stack([src[f"layers.{j}.{module}"] for j in range(op.source.layers)])
        mix = op.depth(module)
        x = torch.einsum("j,j...->...", mix[layer], layers) if mix is not None else layers[layer]
    for axis, tag in enumerate(CANONICAL[pattern]):
        b = op.width(space_kind(tag))
        if b is not None:
            b = b[layer] if b.dim() == 3 else b
            x = torch.tensordot(b, x.movedim(axis, 0), dims=1).movedim(0, axis)
    return x


@pytest.mark.parametrize("family,spec", SPECS, ids=[name for name, _ in SPECS])
def test_layer_at_a_time_application_equals_the_dense_product(family, spec):
    target = target_of(spec)
    op = LigoOperator(spec, target, init_weights(spec, seed=2))
    with torch.no_grad():
        whole = op()
        grown = op.grown()
        factored = op.global_weights(factored=True)
    assert sorted(whole) == sorted(target.tensor_names()) == sorted(grown)
    for name in target.tensor_names():
        reference = dense_growth(op, name)
        assert whole[name].shape == reference.shape == target.shape_of(name), name
        assert max_diff(whole[name], reference) <= 1e-5, name
        assert torch.equal(grown[name], whole[name].detach()), name  # the writer's tensors are the forward's
        assert grown.meta(name)[0] == target.shape_of(name)
    vocab_tables = [n for n, t in factored.items() if isinstance(t, Factored)]
    if target.input == "tokens":
        assert "embed.tokens" in vocab_tables
        assert max_diff(factored["embed.tokens"].dense(), whole["embed.tokens"]) <= 1e-5


@pytest.mark.parametrize("family,spec", SPECS, ids=[name for name, _ in SPECS])
def test_factored_forward_equals_the_materialised_one(family, spec):
    target = target_of(spec)
    op = LigoOperator(spec, target, init_weights(spec, seed=3))
    inputs = data_mod.model_inputs(batch_for(target))
    with torch.no_grad():
        ours = GrowingModel(op)(**inputs)
        plain = forward(target, op(), **inputs)
    for key in plain:
        mine = logits_of(ours) if key == "logits" else ours[key]  # LM heads decode lazily in the growing model
        assert max_diff(mine, plain[key]) <= 1e-5, key


@pytest.mark.parametrize("family,spec", [(n, s) for n, s in SPECS if s.head in ("lm", "mlm")],
                         ids=[n for n, s in SPECS if s.head in ("lm", "mlm")])
def test_chunked_vocabulary_loss_equals_the_plain_one(family, spec, monkeypatch):
    """The LM/MLM loss decoded a few rows at a time under checkpointing: same loss and operator gradients as the
    plain logits, with several chunks."""
    monkeypatch.setattr(objectives, "DECODE_CHUNK_ELEMENTS", spec.vocab_size * 4)  # 4 rows a chunk
    target = target_of(spec)
    op = LigoOperator(spec, target, init_weights(spec, seed=7))
    batch = batch_for(target)
    inputs = data_mod.model_inputs(batch)
    results = []
    for lazy in (True, False):
        op.zero_grad(set_to_none=True)
        out = forward(target, op.global_weights(factored=True), **inputs, layer_weights=op.layer_weights,
                      lazy_logits=lazy)
        assert ("decode" in out) is lazy
        total, count = loss_terms(target, "task", out, batch)
        assert count > 8  # more than two chunks
        (total / count).backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in op.named_parameters() if p.requires_grad}))
    (lazy_total, lazy_grads), (plain_total, plain_grads) = results
    assert max_diff(lazy_total, plain_total) <= 1e-5 * max(1.0, plain_total.abs().item())
    for name, g in plain_grads.items():
        assert max_diff(g, lazy_grads[name]) <= 1e-6 * max(1.0, g.abs().max().item()), name


@pytest.mark.parametrize("family,spec", SPECS, ids=[name for name, _ in SPECS])
def test_sdpa_and_explicit_attention_agree(family, spec):
    weights = init_weights(spec, seed=4, std=0.2)  # large weights: peaked attention, so a wrong mask shows
    for variant in ("padded", "unpadded"):
        inputs = data_mod.model_inputs(batch_for(spec))
        if variant == "unpadded":
            inputs.pop("attention_mask", None)
        with torch.no_grad():
            fused = forward(spec, weights, **inputs, attention="sdpa")
            explicit = forward(spec, weights, **inputs, attention="explicit")
        for key in explicit:
            assert max_diff(fused[key], explicit[key]) <= 1e-5, (variant, key)


def test_sdpa_handles_left_padding_of_causal_models_like_the_explicit_form():
    """Left padding leaves a causal model's first rows with every key masked: both forms must give the same numbers
    there (the additive bias, not a boolean mask that would give NaN)."""
    spec = small_spec("llama", heads=4, head_dim=4, kv_heads=2)
    weights = init_weights(spec, seed=5, std=0.2)
    ids = torch.randint(30, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        fused = forward(spec, weights, input_ids=ids, attention_mask=mask, attention="sdpa")
        explicit = forward(spec, weights, input_ids=ids, attention_mask=mask, attention="explicit")
    assert torch.isfinite(fused["logits"]).all()
    assert max_diff(fused["logits"], explicit["logits"]) <= 1e-5


def test_auto_streams_large_targets_only():
    small = micro_spec("hf-gpt2")
    assert choose_stream(small, "auto") is False
    assert choose_stream(small.replace(layers=24, width=1024, heads=16, mlp=4096, vocab_size=50257), "auto") is True
    assert choose_stream(small, "layers") is True and choose_stream(small.replace(layers=48), "full") is False
    assert choose_stream(small, "selective") == "selective"
    assert [stream_name(choose_stream(small, m)) for m in ("layers", "selective", "full")] == \
        ["layers", "selective", "full"]


def count_products(run) -> int:
    """How many matrix products (model.KEPT_OPS) ``run()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ligo_convert.model import KEPT_OPS

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in KEPT_OPS
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Count.n


def test_a_selective_checkpoint_makes_no_product_again():
    """The backward of a selective checkpoint runs as many matrix products as the full path's (none recomputed);
    the plain checkpoint's runs each layer's forward products again."""
    spec = small_spec("llama", heads=4, head_dim=4, kv_heads=2)
    target = target_of(spec)
    op = LigoOperator(spec, target, init_weights(spec, seed=1))
    batch = batch_for(target)
    inputs = data_mod.model_inputs(batch)
    runs = {mode: GrowingModel(op, mode) for mode in (False, "selective", True)}
    # the full path with the layer-streamed mode's arithmetic (every product made inside its layer)
    runs["full, products in layers"] = lambda **x: forward(target, op.global_weights(factored=True), **x,
                                                          layer_weights=op.step_factors(expand_first=False),
                                                          lazy_logits=True)
    counts = {}
    for mode, run in runs.items():
        out = {}
        forward_products = count_products(lambda: out.update(loss=run(**inputs)["hidden"].square().mean()))
        counts[mode] = forward_products, count_products(lambda: out["loss"].backward())
    assert counts["selective"] == counts[False]  # the same forward, and no product made again
    assert counts[True][0] == counts["full, products in layers"][0]
    assert counts[True][1] > counts["full, products in layers"][1]


@pytest.fixture(scope="module")
def gpt2_source(tmp_path_factory):
    spec = small_spec("hf-gpt2")
    folder = tmp_path_factory.mktemp("src") / "gpt2"
    save(from_tensors(spec, init_weights(spec, seed=6), family="hf-gpt2"), folder)
    return folder


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared"])
def test_streamed_grow_writes_the_same_files_as_the_full_path(tmp_path, gpt2_source, shared, monkeypatch):
    def run(mode, out):
        result = grow(gpt2_source, layers=3, width=32, steps=4, batch_size=4, seq_len=16, eval_batches=1,
                      materialize=mode, shared_width=shared, out=out, device="cpu")
        assert result.report["materialize"] == mode
        return result.report["loss_final"]

    # selective streaming keeps the full path's arithmetic (shared expansions applied once per step)
    losses = {mode: run(mode, tmp_path / mode) for mode in ("full", "layers", "selective")}
    assert_same_files(tmp_path / "full", tmp_path / "selective")
    assert losses["full"] == losses["selective"]
    # `layers` makes every product inside its layer: the same model up to the order of the products...
    assert losses["layers"] == pytest.approx(losses["full"], rel=1e-5)
    # ...and with the full path on that arithmetic too, byte for byte the same files
    monkeypatch.setattr(LigoOperator, "expanded_sources", lambda self, rows: {})
    assert run("full", tmp_path / "full-in-layers") == losses["layers"]
    assert_same_files(tmp_path / "full-in-layers", tmp_path / "layers")


def test_writing_reads_one_tensor_at_a_time(tmp_path, gpt2_source, monkeypatch):
    """The writer asks the operator for each tensor as it writes it; the whole grown model is never made."""
    calls = []
    original = LigoOperator.forward

    def whole(self):
        calls.append("whole")
        return original(self)

    monkeypatch.setattr(LigoOperator, "forward", whole)
    grow(gpt2_source, layers=3, width=32, steps=2, batch_size=4, seq_len=16, eval_batches=1, materialize="layers",
         out=tmp_path / "out", device="cpu")
    assert calls == []


def test_a_grown_vocabulary_table_is_written_a_block_of_rows_at_a_time(tmp_path, gpt2_source, monkeypatch):
    """The (vocab x width) table is written as ``W_src[i:j] B^T`` blocks, never made whole, and the files equal those
    written with the table in one block (byte for byte here; every other tensor always)."""
    from ligo_convert import canonical
    from ligo_convert.growth.operator import GrownTensors
    from helpers import read_all

    def run(out):
        grow(gpt2_source, layers=3, width=32, steps=2, batch_size=4, seq_len=16, eval_batches=1, out=out,
             device="cpu")

    run(tmp_path / "one-block")  # 40 rows of 32 fp32: one block at the default size
    made_whole, blocks = [], []
    original_get, original_blocks = GrownTensors.__getitem__, LigoOperator.tensor_blocks
    monkeypatch.setattr(GrownTensors, "__getitem__", lambda self, name: (made_whole.append(name),
                                                                         original_get(self, name))[1])
    monkeypatch.setattr(LigoOperator, "tensor_blocks", lambda self, name, rows: (blocks.append((name, rows)) or
                                                                                 original_blocks(self, name, rows)))
    monkeypatch.setattr(canonical, "WRITE_BLOCK_BYTES", 32 * 4 * 16)  # 16 rows a block: 3 blocks of the 40
    run(tmp_path / "blocks")
    assert ("embed.tokens", 16) in blocks and "embed.tokens" not in made_whole
    assert_same_files(tmp_path / "one-block", tmp_path / "blocks")
    assert read_all(tmp_path / "blocks")["transformer.wte.weight"].shape == (40, 32)


@pytest.mark.parametrize("family,spec", SPECS, ids=[name for name, _ in SPECS])
def test_validation_makes_each_layer_once_and_gives_the_materialised_loss(family, spec, monkeypatch):
    from ligo_convert.growth.fit import evaluate_loss

    target = target_of(spec)
    op = LigoOperator(spec, target, init_weights(spec, seed=8))
    batches = [batch_for(target, seed=s) for s in range(3)]
    made = []
    original = op.layer_weights
    monkeypatch.setattr(op, "layer_weights", lambda i: made.append(i) or original(i))
    cpu = torch.device("cpu")
    kind, teacher = objective(op, target)
    layered = evaluate_loss(target, GrowingModel(op), batches, kind, teacher, cpu)
    assert made == list(range(target.layers))  # once per layer, not once per layer and batch
    with torch.no_grad():
        dense = evaluate_loss(target, op(), batches, kind, teacher, cpu)
    assert abs(layered - dense) <= 1e-5 * max(1.0, abs(dense))
