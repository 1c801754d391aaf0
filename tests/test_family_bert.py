"""HF BERT: our canonical forward equals transformers', and files round-trip byte for byte."""

import pytest
import torch
import transformers

from ligo_convert import forward, load, save
from helpers import assert_same_files, max_diff

CONFIG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64)


def inputs():
    ids = torch.randint(0, 99, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.randint(0, 2, (2, 7)))


@pytest.mark.parametrize("cls", ["BertModel", "BertForMaskedLM", "BertForPreTraining"])
def test_bert_forward_and_round_trip(tmp_path, cls):
    model = getattr(transformers, cls)(transformers.BertConfig(**CONFIG)).eval()
    model.save_pretrained(tmp_path / "src")
    ours = load(tmp_path / "src")
    assert ours.family == "hf-bert"
    x = inputs()
    with torch.no_grad():
        ref = model(**x)
        out = forward(ours.spec, ours.materialize(), **x)
    if cls == "BertModel":
        assert max_diff(ref.last_hidden_state, out["hidden"]) <= 1e-5
        assert max_diff(ref.pooler_output, out["pooled"]) <= 1e-5
    elif cls == "BertForMaskedLM":
        assert max_diff(ref.logits, out["logits"]) <= 1e-5
    else:
        assert max_diff(ref.prediction_logits, out["logits"]) <= 1e-5
        assert max_diff(ref.seq_relationship_logits, out["pair_logits"]) <= 1e-5

    save(ours, tmp_path / "out")
    assert_same_files(tmp_path / "src", tmp_path / "out")
    again = getattr(transformers, cls).from_pretrained(tmp_path / "out").eval()
    assert again.config.to_dict()["hidden_size"] == 32
    with torch.no_grad():
        ref2 = again(**x)
    first = ref.last_hidden_state if cls == "BertModel" else (ref.logits if cls == "BertForMaskedLM"
                                                             else ref.prediction_logits)
    second = ref2.last_hidden_state if cls == "BertModel" else (ref2.logits if cls == "BertForMaskedLM"
                                                               else ref2.prediction_logits)
    assert torch.equal(first, second)
