"""HF RoBERTa, GPT-2 and LLaMA-style decoders (LLaMA, Qwen2, Mistral): our canonical forward equals transformers',
files round-trip byte for byte, transformers loads what we write, and the config we write describes the same model."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import save_file

from ligo_convert import LigoError, load, save
from family_checks import (assert_close, check_round_trip, edit_config, from_template, our_outputs,
                           padded_text_inputs as text_inputs, read_whole, reference, save_randomised)
from helpers import assert_same_files, max_diff, read_all

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
GPT2 = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
LLAMA = dict(TINY, num_key_value_heads=2, max_position_embeddings=64)

# id -> (model class, config, family, what to compare)
CASES = {
    "RobertaModel": ("RobertaModel", transformers.RobertaConfig(**TINY, max_position_embeddings=66), "hf-roberta",
                     "hidden+pooled"),
    "RobertaForMaskedLM": ("RobertaForMaskedLM", transformers.RobertaConfig(**TINY, max_position_embeddings=66),
                           "hf-roberta", "logits"),
    "GPT2Model": ("GPT2Model", transformers.GPT2Config(**GPT2), "hf-gpt2", "hidden"),
    "GPT2LMHeadModel": ("GPT2LMHeadModel", transformers.GPT2Config(**GPT2), "hf-gpt2", "logits"),
    "LlamaForCausalLM-untied": ("LlamaForCausalLM", transformers.LlamaConfig(**LLAMA, rope_theta=500000.0),
                                "llama", "logits"),
    "LlamaForCausalLM-tied": ("LlamaForCausalLM", transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True),
                              "llama", "logits"),
    "LlamaModel": ("LlamaModel", transformers.LlamaConfig(**LLAMA), "llama", "hidden"),
    "Qwen2ForCausalLM": ("Qwen2ForCausalLM", transformers.Qwen2Config(**LLAMA, rope_theta=1000000.0), "llama",
                         "logits"),
    # head_dim 16 with 4 heads: the attention width (64) differs from the hidden size (32)
    "MistralForCausalLM": ("MistralForCausalLM", transformers.MistralConfig(**LLAMA, head_dim=16), "llama",
                           "logits"),
}

# Config values transformers must read back the same from what we write (None where the class lacks one).
COMPARED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
            "attention_bias", "mlp_bias", "pad_token_id", "layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps",
            "hidden_act", "activation_function", "architectures")


def rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None)
    return params.get("rope_theta") if params else None


def pad_id(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def build(tmp_path, case: str):
    cls, config, family, _ = CASES[case]
    return save_randomised(cls, config, tmp_path / "src"), family


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers(tmp_path, case):
    model, family = build(tmp_path, case)
    ours = read_whole(tmp_path / "src", family)
    x = text_inputs(pad_id(model))
    assert_close(reference(model, x), our_outputs(ours, x))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    model, _ = build(tmp_path, case)
    # keys the source class lacks (Qwen2's head_dim, mlp_bias) may be written, unused: not compared
    _, src, out = check_round_trip(tmp_path, model, getattr(transformers, CASES[case][0]),
                                   lambda: text_inputs(pad_id(model)), reference, COMPARED)
    assert rope_theta(out) == rope_theta(src)


@pytest.mark.parametrize("case", ["LlamaForCausalLM-untied", "LlamaForCausalLM-tied", "Qwen2ForCausalLM",
                                  "MistralForCausalLM"])
def test_llama_config_written_for_both_transformers_versions(tmp_path, case):
    model, _ = build(tmp_path, case)
    ours = load(tmp_path / "src")
    assert ours.spec.kv_heads == 2 and ours.spec.heads == 4
    assert ours.spec.tie_embeddings == model.config.tie_word_embeddings
    assert ours.spec.rope_theta == rope_theta(model.config)
    save(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    # transformers 4 reads rope_theta, transformers 5 rope_parameters: both hold the same value
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == ours.spec.rope_theta
    assert written["rope_parameters"]["rope_type"] == "default"
    assert written["model_type"] == model.config.model_type
    assert written["architectures"] == [CASES[case][0]]
    assert written["tie_word_embeddings"] == ours.spec.tie_embeddings
    assert written["num_key_value_heads"] == 2 and written["head_dim"] == ours.spec.head_dim
    if written["model_type"] == "llama":  # LLaMA's one flag covers all four attention projections
        assert written["attention_bias"] == ours.spec.qkv_bias == ours.spec.o_bias
    assert ("lm_head.weight" in read_all(tmp_path / "out")) == (not ours.spec.tie_embeddings)


def test_llama_config_with_only_rope_theta(tmp_path):
    """A transformers-4 style config (top-level rope_theta, no rope_parameters) reads the same theta."""
    build(tmp_path, "LlamaForCausalLM-untied")
    path = tmp_path / "src" / "config.json"
    config = json.loads(path.read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    path.write_text(json.dumps(config))
    ours = load(tmp_path / "src")
    assert ours.spec.rope_theta == 500000.0
    save(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_parameters"] == {"rope_theta": 500000.0, "rope_type": "default"}
    assert written["rope_theta"] == 500000.0


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
])
def test_llama_refuses_scaled_rope(tmp_path, change, message):
    build(tmp_path, "LlamaForCausalLM-untied")
    edit_config(tmp_path / "src", **change)
    with pytest.raises(LigoError, match=message):
        load(tmp_path / "src")


def test_gpt2_bare_names_with_mask_buffers(tmp_path):
    """Hub `gpt2` files use bare `h.N` names and old ones carry attn.bias / attn.masked_bias causal-mask buffers;
    gpt2-medium's config has no model_type."""
    model, _ = build(tmp_path, "GPT2LMHeadModel")
    tensors = {k.removeprefix("transformer."): v for k, v in read_all(tmp_path / "src").items()}
    assert "h.0.attn.c_attn.weight" in tensors
    buffers = {}
    for i in range(2):
        buffers[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.uint8)).view(1, 1, 64, 64)
        buffers[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({**tensors, **buffers}, bare / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    del config["model_type"]
    (bare / "config.json").write_text(json.dumps(config))

    ours = load(bare)
    assert ours.family == "hf-gpt2" and ours.mapping.prefix == ""
    assert sorted(ours.mapping.dropped) == sorted(buffers)
    assert ours.spec.head == "lm" and ours.spec.tie_embeddings
    x = text_inputs(0)
    out = our_outputs(ours, x)
    assert max_diff(reference(model, x)["logits"], out["logits"]) <= 1e-5

    save(ours, tmp_path / "out")
    assert_same_files(bare, tmp_path / "out")  # names kept bare, buffers carried byte for byte
    again, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    _, src_info = transformers.GPT2LMHeadModel.from_pretrained(bare, output_loading_info=True)
    assert info["unexpected_keys"] == src_info["unexpected_keys"]  # transformers sees what the source had
    assert torch.equal(reference(model, x)["logits"], reference(again.eval(), x)["logits"])


def test_gpt2_fused_qkv_is_split_by_columns(tmp_path):
    """c_attn (D, 3D) is (in, out): q is the first D columns, transposed to the canonical (out, in)."""
    model, _ = build(tmp_path, "GPT2LMHeadModel")
    ours = load(tmp_path / "src")
    c_attn = model.transformer.h[1].attn.c_attn.weight.detach()
    assert torch.equal(ours.tensors["layers.1.q.weight"], c_attn[:, :32].t())
    assert torch.equal(ours.tensors["layers.1.v.weight"], c_attn[:, 64:].t())
    assert torch.equal(ours.tensors["layers.1.k.bias"], model.transformer.h[1].attn.c_attn.bias.detach()[32:64])


@pytest.mark.parametrize("key, value", [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False)])
def test_gpt2_refuses_other_attention_scaling(tmp_path, key, value):
    build(tmp_path, "GPT2Model")
    edit_config(tmp_path / "src", **{key: value})
    with pytest.raises(LigoError, match=key):
        load(tmp_path / "src")


def test_roberta_positions_start_after_padding_id(tmp_path):
    build(tmp_path, "RobertaForMaskedLM")
    ours = load(tmp_path / "src")
    assert ours.spec.pad_token_id == 1 and ours.spec.position_offset == 2 and ours.spec.max_positions == 66


def test_roberta_drops_stored_decoder_copy(tmp_path):
    """Older RoBERTa files store the tied decoder as lm_head.decoder.{weight,bias}: dropped on read, carried on
    an unchanged round trip."""
    model, _ = build(tmp_path, "RobertaForMaskedLM")
    tensors = read_all(tmp_path / "src")
    tensors["lm_head.decoder.weight"] = tensors["roberta.embeddings.word_embeddings.weight"].clone()
    tensors["lm_head.decoder.bias"] = tensors["lm_head.bias"].clone()
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tmp_path / "src" / "config.json", old / "config.json")
    ours = load(old)
    assert sorted(ours.mapping.dropped) == ["lm_head.decoder.bias", "lm_head.decoder.weight"]
    x = text_inputs(1)
    out = our_outputs(ours, x)
    assert max_diff(reference(model, x)["logits"], out["logits"]) <= 1e-5
    save(ours, tmp_path / "out")
    assert_same_files(old, tmp_path / "out")


@pytest.mark.parametrize("case", ["LlamaForCausalLM-tied", "LlamaForCausalLM-untied", "Qwen2ForCausalLM",
                                  "GPT2LMHeadModel", "RobertaForMaskedLM"])
def test_written_from_tensors_without_source_config(tmp_path, case):
    """A model made in memory (as growth makes one) has no source config: the descriptor alone writes a config that
    transformers loads into the same model, with the model class, tie and bias flags matching the tensors."""
    model, family = build(tmp_path, case)
    auto = transformers.AutoModelForMaskedLM if case.startswith("Roberta") else transformers.AutoModelForCausalLM
    _, again = from_template(tmp_path, model, family, auto)
    x = text_inputs(pad_id(model))
    assert torch.equal(reference(model, x)["logits"], reference(again, x)["logits"])


def test_position_schemes_do_not_cross_silently(tmp_path):
    """BERT positions start at 0, RoBERTa's after the padding id: writing one as the other is refused."""
    from ligo_convert import LigoError

    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=66)).eval()
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(LigoError, match="position_offset"):
        save(load(tmp_path / "bert"), tmp_path / "as-roberta", family="hf-roberta")
    assert not (tmp_path / "as-roberta").exists()
