"""HF XLM-RoBERTa, CamemBERT (descriptors extending hf-roberta) and DistilBERT: our canonical forward equals
transformers', files round-trip byte for byte, transformers loads what we write, and the config we write describes the
same model."""

from functools import partial

import pytest
import torch
import transformers

from ligo_convert import LigoError, load, save
from ligo_convert.descriptors import _merged, get_descriptor
from family_checks import (assert_close, build_case, check_round_trip, edit_config, from_template, hf_load,
                           our_outputs, padded_text_inputs as text_inputs, read_whole, reference, refused,
                           refused_to_write)
from helpers import assert_same_files, max_diff

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=66)
DISTIL = dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)

# id -> (model class, config, family)
CASES = {
    "XLMRobertaModel": ("XLMRobertaModel", lambda: transformers.XLMRobertaConfig(**TINY), "xlm-roberta"),
    "XLMRobertaForMaskedLM": ("XLMRobertaForMaskedLM", lambda: transformers.XLMRobertaConfig(**TINY), "xlm-roberta"),
    "CamembertModel": ("CamembertModel", lambda: transformers.CamembertConfig(**TINY), "camembert"),
    "CamembertForMaskedLM": ("CamembertForMaskedLM", lambda: transformers.CamembertConfig(**TINY), "camembert"),
    "DistilBertModel": ("DistilBertModel", lambda: transformers.DistilBertConfig(**DISTIL), "distilbert"),
    "DistilBertForMaskedLM": ("DistilBertForMaskedLM", lambda: transformers.DistilBertConfig(**DISTIL),
                              "distilbert"),
    # an untied decoder: vocab_projector.weight is the model's own tensor, not a copy of the word embeddings
    "DistilBertForMaskedLM-untied": ("DistilBertForMaskedLM",
                                     lambda: transformers.DistilBertConfig(**DISTIL, tie_word_embeddings=False),
                                     "distilbert"),
}
MLM = [c for c in CASES if "ForMaskedLM" in c]

# Config values transformers must read back the same from what we write (where the class has them).
COMPARED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "vocab_size", "type_vocab_size", "tie_word_embeddings", "pad_token_id",
            "bos_token_id", "eos_token_id", "layer_norm_eps", "hidden_act", "position_embedding_type", "architectures",
            "dim", "n_layers", "n_heads", "hidden_dim", "activation", "sinusoidal_pos_embds")


build = partial(build_case, CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers(tmp_path, case):
    model, family = build(tmp_path, case)
    ours = read_whole(tmp_path / "src", family)
    x = text_inputs(model.config.pad_token_id)
    assert_close(reference(model, x), our_outputs(ours, x))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    model, _ = build(tmp_path, case)
    check_round_trip(tmp_path, model, getattr(transformers, CASES[case][0]),
                     lambda: text_inputs(model.config.pad_token_id), reference, COMPARED)


@pytest.mark.parametrize("case", MLM)
def test_written_from_tensors_without_source_config(tmp_path, case):
    """A model made in memory (as growth makes one): the descriptor's template alone writes a config that
    transformers' Auto classes load into the same model class with the same outputs."""
    model, family = build(tmp_path, case)
    _, again = from_template(tmp_path, model, family, transformers.AutoModelForMaskedLM)
    x = text_inputs(model.config.pad_token_id)
    assert torch.equal(reference(model, x)["logits"], reference(again, x)["logits"])


# --- extends: XLM-RoBERTa and CamemBERT are RoBERTa under their own names -----------------------------------------


def test_extends_merges_the_parent():
    roberta, xlmr = get_descriptor("hf-roberta"), get_descriptor("xlm-roberta")
    assert xlmr.tensors == roberta.tensors and xlmr.prefixes == roberta.prefixes == ["roberta.", ""]
    assert xlmr.derive == roberta.derive and xlmr.config_require == roberta.config_require
    assert xlmr.model_types == ["xlm-roberta"] and xlmr.detect_keys == []
    assert [a.name for a in xlmr.architectures] == ["XLMRobertaForMaskedLM", "XLMRobertaModel"]
    assert xlmr.config_template == {**roberta.config_template, "model_type": "xlm-roberta"}
    assert get_descriptor("camembert").title == "Hugging Face CamemBERT"
    # tables merge key by key; lists and values the child gives replace the parent's
    assert _merged({"a": {"x": 2}, "l": [3]}, {"a": {"x": 1, "y": 1}, "l": [1, 2], "k": 0}) == \
        {"a": {"x": 2, "y": 1}, "l": [3], "k": 0}


@pytest.mark.parametrize("case", ["XLMRobertaForMaskedLM", "CamembertModel"])
def test_converts_to_roberta(tmp_path, case):
    """The same weights written as hf-roberta load into transformers' Roberta class with the same outputs."""
    model, _ = build(tmp_path, case)
    save(load(tmp_path / "src"), tmp_path / "roberta", family="hf-roberta")
    assert load(tmp_path / "roberta").family == "hf-roberta"
    cls = transformers.RobertaForMaskedLM if case.endswith("MaskedLM") else transformers.RobertaModel
    again = hf_load(cls, tmp_path / "roberta")
    x = text_inputs(1)
    for k, v in reference(model, x).items():
        assert torch.equal(v, reference(again, x)[k]), k


# --- DistilBERT ----------------------------------------------------------------------------------------------------


def test_distilbert_spec(tmp_path):
    build(tmp_path, "DistilBertForMaskedLM")
    spec = load(tmp_path / "src").spec
    assert (spec.layers, spec.width, spec.heads, spec.mlp, spec.max_positions) == (2, 32, 4, 37, 64)
    assert spec.norm_eps == 1e-12 and spec.norm_placement == "post" and spec.embed_norm and not spec.final_norm
    assert spec.type_vocab_size == 0 and spec.position_offset == 0 and not spec.pooler
    assert spec.head == "mlm" and spec.tie_embeddings and spec.pad_token_id == 0
    # the fixed eps is a family constant: a model with another one has no DistilBERT form
    refused_to_write(spec.replace(norm_eps=1e-5), load(tmp_path / "src").materialize(), "distilbert",
                     tmp_path / "other-eps", "norm_eps")


def test_distilbert_drops_stored_decoder_copy(tmp_path):
    """Older DistilBERT files (distilbert-base-uncased) store the tied vocab_projector.weight: dropped on read."""
    from safetensors.torch import save_file

    from helpers import read_all

    model, _ = build(tmp_path, "DistilBertForMaskedLM")
    tensors = read_all(tmp_path / "src")
    tensors["vocab_projector.weight"] = tensors["distilbert.embeddings.word_embeddings.weight"].clone()
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    (old / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    ours = load(old)
    assert ours.mapping.dropped == ["vocab_projector.weight"]
    x = text_inputs(0)
    out = our_outputs(ours, x)
    assert max_diff(reference(model, x)["logits"], out["logits"]) <= 1e-5
    save(ours, tmp_path / "out")
    assert_same_files(old, tmp_path / "out")


def test_distilbert_untied_decoder_is_its_own_tensor(tmp_path):
    """With tie_word_embeddings false the stored vocab_projector.weight is read as the decoder (not dropped as a tied
    copy), differs from the word embeddings, and is written back under its own name with the switch kept."""
    build(tmp_path, "DistilBertForMaskedLM-untied")
    ours = load(tmp_path / "src")
    assert not ours.spec.tie_embeddings and ours.mapping.locations["lm_head.weight"].key == "vocab_projector.weight"
    assert not torch.equal(ours.tensors["lm_head.weight"], ours.tensors["embed.tokens"])
    save(ours, tmp_path / "out")
    assert_same_files(tmp_path / "src", tmp_path / "out")


@pytest.mark.parametrize("key, value", [("sinusoidal_pos_embds", True)])
def test_distilbert_refuses_by_config_key(tmp_path, key, value):
    """Sinusoidal positions are refused by name: one line, exit 2, nothing written."""
    build(tmp_path, "DistilBertForMaskedLM")
    edit_config(tmp_path / "src", **{key: value})
    refused(tmp_path, key, leaves=["src"])


@pytest.mark.parametrize("cls, key", [("DistilBertForSequenceClassification", "classifier.bias"),
                                      ("DistilBertForQuestionAnswering", "qa_outputs.bias")])
def test_distilbert_task_heads_refused(tmp_path, cls, key):
    """Other DistilBert* classes are out of scope: a clear refusal naming a tensor of the head, not a wrong model."""
    getattr(transformers, cls)(transformers.DistilBertConfig(**DISTIL)).save_pretrained(tmp_path / "src")
    with pytest.raises(LigoError, match="DistilBERT task head") as e:
        load(tmp_path / "src")
    assert f"tensor {key} belongs to" in str(e.value)
