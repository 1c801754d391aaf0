"""One validation loss per model and data (issue 14, point 6): grow's reported loss is `eval`'s of the written folder,
on the same held-out examples whatever --batch-size, --seed or the data loader's piece size."""

import pytest
import torch
import transformers

from ligo_convert import data, grow, load
from ligo_convert.evaluate import evaluate

VIT = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=16, patch_size=4, num_labels=10)
BERT = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, max_position_embeddings=64)


@pytest.fixture(scope="module")
def vit_src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit") / "src"
    transformers.ViTForImageClassification(VIT).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert") / "src"
    transformers.BertForMaskedLM(BERT).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("batch_size", [8, 32])
def test_grow_reports_evals_loss(vit_src, tmp_path, batch_size):
    out = tmp_path / f"grown-{batch_size}"
    result = grow(vit_src, layers=3, width=48, steps=2, batch_size=batch_size, seed=batch_size, eval_batches=6,
                  out=out)
    report = result.report
    assert report["objective"] == "task"
    written = evaluate(out, max_batches=6)  # eval's own batch size (16) and seed
    assert written["count"] == 6 * data.VAL_CHUNK
    assert abs(report["loss_final"] - written["loss"]) <= 1e-5
    assert abs(evaluate(out, max_batches=6, batch_size=5, seed=3)["loss"] - written["loss"]) <= 1e-5


def test_init_loss_does_not_depend_on_the_batch_size(vit_src):
    at = {b: grow(vit_src, layers=3, width=48, steps=0, batch_size=b, eval_batches=4, write=False,
                  method="stack").report["loss_init"] for b in (4, 16, 64)}
    assert max(at.values()) - min(at.values()) <= 1e-5, at


def test_val_examples_and_masks_are_the_same_at_any_batch_size(bert_src):
    spec = load(bert_src).spec

    def rows(batch_size):
        got = list(data.val_batches(spec, None, bert_src, batch_size, 32, chunks=3))
        return {k: torch.cat([b[k] for b in got]) for k in ("input_ids", "labels")}, [len(b["input_ids"]) for b in got]

    (ref, sizes16), (other, sizes7) = rows(16), rows(7)
    assert sizes16 == [16, 16, 16] and sizes7 == [7] * 6 + [6]
    assert torch.equal(ref["input_ids"], other["input_ids"]) and torch.equal(ref["labels"], other["labels"])
    assert (ref["labels"] != data.IGNORE_INDEX).any()  # masked places exist, and are the same ones
    a, b = evaluate(bert_src, max_batches=3, seq_len=32), evaluate(bert_src, max_batches=3, seq_len=32, batch_size=7)
    assert a["count"] == b["count"] and abs(a["loss"] - b["loss"]) <= 1e-5
