"""OLMo 2, GPT-NeoX / Pythia and OPT: our canonical forward equals transformers' (padded batches, left padding too),
SDPA equals explicit attention, files round-trip byte for byte, transformers loads what we write, the config we
write describes the same model, every growth baseline writes a model transformers loads, and unsupported variants
are refused by name."""

import json
import math
from functools import partial

import pytest
import torch
import transformers
from safetensors.torch import save_file

from ligo_convert import LigoError, forward, from_tensors, load, save
from ligo_convert.evaluate import evaluate
from ligo_convert.grow import grow
from ligo_convert.growth import baselines as B
from family_checks import (build_case, check_round_trip, edit_config, from_template, growth_report, hf_load, kept,
                           our_outputs, read_whole, reference, refused, refused_to_write, transformers_loss)
from helpers import assert_same_files, max_diff, read_all

TINY = dict(vocab_size=99, num_hidden_layers=2, max_position_embeddings=64)
OLMO = dict(TINY, hidden_size=32, num_attention_heads=4, intermediate_size=37)
NEOX = dict(TINY, hidden_size=32, num_attention_heads=4, intermediate_size=37)
OPT = dict(TINY, hidden_size=32, num_attention_heads=4, ffn_dim=37)

# id -> (model class, config, family)
CASES = {
    # grouped-query attention (4 query heads, 2 key/value heads), untied head, no biases, rope_theta != 10000
    "Olmo2ForCausalLM-gqa": ("Olmo2ForCausalLM", lambda: transformers.Olmo2Config(
        **OLMO, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), "olmo2"),
    # odd head count (3 heads of 16, one key/value head), attention biases, tied head
    "Olmo2ForCausalLM-odd-bias-tied": ("Olmo2ForCausalLM", lambda: transformers.Olmo2Config(
        **{**OLMO, "hidden_size": 48, "num_attention_heads": 3}, num_key_value_heads=1, attention_bias=True,
        tie_word_embeddings=True), "olmo2"),
    # head_dim 16 with 4 heads on width 32: the attention width (64) differs from the hidden size
    "Olmo2ForCausalLM-head_dim": ("Olmo2ForCausalLM", lambda: transformers.Olmo2Config(
        **OLMO, num_key_value_heads=2, head_dim=16), "olmo2"),
    "Olmo2Model": ("Olmo2Model", lambda: transformers.Olmo2Config(**OLMO), "olmo2"),
    # Pythia's layout: parallel residual, a quarter of each head rotary, biases, untied embed_out
    "GPTNeoXForCausalLM-parallel": ("GPTNeoXForCausalLM", lambda: transformers.GPTNeoXConfig(
        **NEOX, rotary_pct=0.25), "gpt_neox"),
    # sequential residual, half rotary, no attention biases, tied head, 3 heads, another rotary base
    "GPTNeoXForCausalLM-sequential-tied": ("GPTNeoXForCausalLM", lambda: transformers.GPTNeoXConfig(
        **{**NEOX, "hidden_size": 48, "num_attention_heads": 3}, rotary_pct=0.5, rotary_emb_base=500.0,
        use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True), "gpt_neox"),
    # whole-head rotary; gpt-neox-20b's gelu_fast (the tanh approximation), kept as spelled on write
    "GPTNeoXModel": ("GPTNeoXModel", lambda: transformers.GPTNeoXConfig(**NEOX, rotary_pct=1.0,
                                                                         hidden_act="gelu_fast"), "gpt_neox"),
    # pre-LN (125m, 1.3b...): final norm, tied head, biases
    "OPTForCausalLM-pre": ("OPTForCausalLM", lambda: transformers.OPTConfig(**OPT), "opt"),
    # post-LN (do_layer_norm_before false): no final norm; untied head, no biases, 3 heads
    "OPTForCausalLM-post-untied-nobias": ("OPTForCausalLM", lambda: transformers.OPTConfig(
        **{**OPT, "hidden_size": 48, "num_attention_heads": 3}, do_layer_norm_before=False, tie_word_embeddings=False,
        enable_bias=False), "opt"),
    # pre-LN fine-tuned before transformers 4.20.1: no final norm
    "OPTForCausalLM-no-final-norm": ("OPTForCausalLM", lambda: transformers.OPTConfig(
        **OPT, _remove_final_layer_norm=True, activation_function="gelu"), "opt"),
    "OPTModel-pre": ("OPTModel", lambda: transformers.OPTConfig(**OPT), "opt"),
    "OPTModel-post": ("OPTModel", lambda: transformers.OPTConfig(**OPT, do_layer_norm_before=False), "opt"),
}

# Config values transformers must read back the same from what we write (where the class has them).
COMPARED = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "ffn_dim", "max_position_embeddings", "vocab_size",
            "tie_word_embeddings", "attention_bias", "enable_bias", "pad_token_id", "bos_token_id", "eos_token_id",
            "rms_norm_eps", "layer_norm_eps", "hidden_act", "activation_function", "rope_parameters",
            "use_parallel_residual", "do_layer_norm_before", "_remove_final_layer_norm", "word_embed_proj_dim",
            "layer_norm_elementwise_affine")


def text_inputs() -> dict:
    """Three sequences: full, right-padded, left-padded (OPT's positions count the attended tokens)."""
    ids = torch.randint(3, 99, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    ids[mask == 0] = 1
    return dict(input_ids=ids, attention_mask=mask)


build = partial(build_case, CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers(tmp_path, case):
    model, family = build(tmp_path, case)
    ours = read_whole(tmp_path / "src", family)
    x = text_inputs()
    ref = reference(model, x)
    w = ours.materialize()
    with torch.no_grad():
        out = forward(ours.spec, w, **x)
        explicit = forward(ours.spec, w, **x, attention="explicit")
    for k, v in ref.items():
        assert max_diff(kept(v, x), kept(out[k], x)) <= 1e-5, (k, max_diff(kept(v, x), kept(out[k], x)))
        assert max_diff(kept(out[k], x), kept(explicit[k], x)) <= 1e-5, k  # SDPA == explicit attention
    # no padding at all: the SDPA path takes the causal kernel
    full = dict(input_ids=x["input_ids"][:1], attention_mask=torch.ones(1, 9, dtype=torch.long))
    with torch.no_grad():
        a, b = forward(ours.spec, w, **full), forward(ours.spec, w, **full, attention="explicit")
    k = next(iter(ref))
    assert max_diff(a[k], reference(model, full)[k]) <= 1e-5 and max_diff(a[k], b[k]) <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    model, _ = build(tmp_path, case)
    check_round_trip(tmp_path, model, getattr(transformers, CASES[case][0]), text_inputs, reference, COMPARED)


@pytest.mark.parametrize("case", [c for c in CASES if "ForCausalLM" in c])
def test_written_from_tensors_without_source_config(tmp_path, case):
    """A model made in memory (as growth makes one): the descriptor alone writes a config that transformers' Auto
    class loads into the same model class, with the same outputs."""
    model, family = build(tmp_path, case)
    ours, again = from_template(tmp_path, model, family, transformers.AutoModelForCausalLM)
    x = text_inputs()
    assert torch.equal(reference(model, x)["logits"], reference(again, x)["logits"])
    assert load(tmp_path / "out").spec == ours.spec


# --- OLMo 2 ----------------------------------------------------------------------------------------------------------


def test_olmo2_spec(tmp_path):
    build(tmp_path, "Olmo2ForCausalLM-gqa")
    ours = load(tmp_path / "src")
    spec = ours.spec
    assert (spec.heads, spec.kv_heads, spec.head_dim) == (4, 2, 8)
    assert spec.norm_placement == "output" and spec.qk_norm == "proj" and spec.norm == "rmsnorm"
    assert spec.rope_theta == 500000.0 and not spec.tie_embeddings and not spec.qkv_bias and not spec.mlp_bias
    # q_norm spans the whole q projection (4 x 8), k_norm the k projection (2 x 8)
    assert ours.tensors["layers.0.q_proj_norm.weight"].shape == (32,)
    assert ours.tensors["layers.0.k_proj_norm.weight"].shape == (16,)
    # post_attention_layernorm is the attention's OUTPUT norm here, not the MLP's input norm
    assert ours.mapping.locations["layers.1.attn_out_norm.weight"].key == "model.layers.1.post_attention_layernorm.weight"
    assert "layers.0.attn_norm.weight" not in ours.tensors and "layers.0.mlp_norm.weight" not in ours.tensors


def test_olmo2_missing_qk_norm_is_refused(tmp_path):
    build(tmp_path, "Olmo2Model")
    tensors = {k: v for k, v in read_all(tmp_path / "src").items() if "k_norm" not in k}
    (tmp_path / "cut").mkdir()
    save_file(tensors, tmp_path / "cut" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "cut" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    with pytest.raises(LigoError, match="k_norm.weight is missing"):
        load(tmp_path / "cut")


# --- GPT-NeoX ----------------------------------------------------------------------------------------------------------


def test_neox_query_key_value_is_interleaved_by_head(tmp_path):
    """query_key_value rows are [q_0 k_0 v_0 q_1 ...], head_dim each, for weight and bias."""
    model, _ = build(tmp_path, "GPTNeoXForCausalLM-parallel")
    ours = load(tmp_path / "src")
    qkv = model.gpt_neox.layers[1].attention.query_key_value
    w, b = qkv.weight.detach().view(4, 3, 8, 32), qkv.bias.detach().view(4, 3, 8)
    assert torch.equal(ours.tensors["layers.1.q.weight"], w[:, 0].reshape(32, 32))
    assert torch.equal(ours.tensors["layers.1.k.weight"], w[:, 1].reshape(32, 32))
    assert torch.equal(ours.tensors["layers.1.v.bias"], b[:, 2].reshape(32))
    spec = ours.spec
    assert spec.rotary_fraction == 0.25 and spec.rotary_dim == 2 and spec.parallel_residual
    assert spec.qkv_bias and spec.o_bias and spec.mlp_bias and not spec.tie_embeddings
    assert ours.mapping.locations["lm_head.weight"].key == "embed_out.weight"


def test_neox_transformers4_config_and_old_buffers(tmp_path):
    """Pythia's hub files: a config with rotary_pct / rotary_emb_base and no rope_parameters, causal-mask buffers and
    rotary inverse frequencies stored beside the weights, and bare names (no gpt_neox. prefix) for GPTNeoXModel."""
    model, _ = build(tmp_path, "GPTNeoXForCausalLM-sequential-tied")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    tensors = read_all(tmp_path / "src")
    buffers = {}
    for i in range(2):
        buffers[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
        buffers[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        buffers[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    old = tmp_path / "old"
    old.mkdir()
    save_file({**tensors, **buffers}, old / "model.safetensors", metadata={"format": "pt"})
    (old / "config.json").write_text(json.dumps(config))

    ours = load(old)
    assert sorted(ours.mapping.dropped) == sorted(buffers)
    assert ours.spec.rotary_fraction == 0.5 and ours.spec.rope_theta == 500.0 and not ours.spec.parallel_residual
    x = text_inputs()
    out = our_outputs(ours, x)
    assert max_diff(kept(reference(model, x)["logits"], x), kept(out["logits"], x)) <= 1e-5
    save(ours, tmp_path / "out")
    assert_same_files(old, tmp_path / "out")  # buffers carried byte for byte on an unchanged round trip
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    # both transformers generations read the same rotary settings
    assert written["rotary_pct"] == written["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert written["rotary_emb_base"] == written["rope_parameters"]["rope_theta"] == 500.0
    again = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(reference(model, x)["logits"], reference(again, x)["logits"])

    # GPTNeoXModel saved with bare names
    base = transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**NEOX)).eval()
    base.save_pretrained(tmp_path / "base")
    assert "embed_in.weight" in read_all(tmp_path / "base")
    assert load(tmp_path / "base").mapping.prefix == ""


def test_neox_reads_lm_head_name(tmp_path):
    """A file naming the head lm_head.weight (transformers 5's in-memory name) reads as embed_out."""
    model, _ = build(tmp_path, "GPTNeoXForCausalLM-parallel")
    tensors = read_all(tmp_path / "src")
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    (tmp_path / "renamed").mkdir()
    save_file(tensors, tmp_path / "renamed" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "renamed" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    ours = load(tmp_path / "renamed")
    assert ours.mapping.renamed == {"lm_head.weight": "embed_out.weight"}
    x = text_inputs()
    out = our_outputs(ours, x)
    assert max_diff(kept(reference(model, x)["logits"], x), kept(out["logits"], x)) <= 1e-5


def test_neox_cannot_hold_grouped_query_attention_or_other_head_dims(tmp_path):
    """query_key_value has 3 x hidden rows and head_size = hidden / heads: fewer k/v heads or another head_dim have
    no GPT-NeoX form (refused on write, nothing written)."""
    build(tmp_path, "GPTNeoXForCausalLM-parallel")
    ours = load(tmp_path / "src")
    w = ours.materialize()
    gqa = dict(w)
    for i in range(2):
        for m in ("k", "v"):
            gqa[f"layers.{i}.{m}.weight"] = w[f"layers.{i}.{m}.weight"][:16]
            gqa[f"layers.{i}.{m}.bias"] = w[f"layers.{i}.{m}.bias"][:16]
    with pytest.raises(LigoError, match="kv_heads"):
        save(from_tensors(ours.spec.replace(kv_heads=2), gqa, "gpt_neox"), tmp_path / "gqa")
    with pytest.raises(LigoError, match="head_dim"):
        save(from_tensors(ours.spec.replace(heads=2, kv_heads=2), w, "gpt_neox"), tmp_path / "head-dim")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- OPT ---------------------------------------------------------------------------------------------------------------


def test_opt_positions_follow_the_mask(tmp_path):
    """Positions count attended tokens: a left-padded sequence gets the same outputs as the same tokens unpadded."""
    model, _ = build(tmp_path, "OPTForCausalLM-pre")
    ours = load(tmp_path / "src")
    spec = ours.spec
    assert spec.positions_from_mask and spec.position_offset == 2
    assert spec.max_positions == 66  # max_position_embeddings + 2 rows
    assert json.loads((tmp_path / "src" / "config.json").read_text())["max_position_embeddings"] == 64
    w = ours.materialize()
    ids = torch.randint(3, 99, (1, 6))
    padded = torch.cat([torch.ones(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = forward(spec, w, input_ids=ids, attention_mask=torch.ones_like(ids))["logits"]
        left = forward(spec, w, input_ids=padded, attention_mask=mask)["logits"][:, 3:]
        hf = model(input_ids=padded, attention_mask=mask).logits[:, 3:]
    assert max_diff(alone, left) <= 1e-5 and max_diff(hf, left) <= 1e-5


def test_opt_spec_variants(tmp_path):
    build(tmp_path, "OPTForCausalLM-post-untied-nobias", "post")
    spec = load(tmp_path / "post").spec
    assert spec.norm_placement == "post" and not spec.final_norm and not spec.tie_embeddings
    assert not (spec.qkv_bias or spec.o_bias or spec.mlp_bias) and spec.norm_eps == 1e-5
    build(tmp_path, "OPTForCausalLM-no-final-norm", "removed")
    spec = load(tmp_path / "removed").spec
    assert spec.norm_placement == "pre" and not spec.final_norm and spec.activation == "gelu"
    assert "model.decoder.final_layer_norm.weight" not in read_all(tmp_path / "removed")


def test_opt_hub_layout_with_bare_decoder_names(tmp_path):
    """facebook/opt-* files store `decoder.` keys under OPTForCausalLM: read, kept on write, loaded by transformers."""
    model, _ = build(tmp_path, "OPTForCausalLM-pre")
    tensors = {k.removeprefix("model."): v for k, v in read_all(tmp_path / "src").items()}
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(tensors, hub / "model.safetensors", metadata={"format": "pt"})
    (hub / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    ours = load(hub)
    assert ours.mapping.prefix == "decoder." and ours.spec.head == "lm" and ours.spec.tie_embeddings
    save(ours, tmp_path / "out")
    assert_same_files(hub, tmp_path / "out")
    again = hf_load(transformers.OPTForCausalLM, tmp_path / "out")
    x = text_inputs()
    assert torch.equal(reference(model, x)["logits"], reference(again, x)["logits"])


def test_opt_post_ln_cannot_have_a_final_norm(tmp_path):
    build(tmp_path, "OPTForCausalLM-pre")
    ours = load(tmp_path / "src")
    refused_to_write(ours.spec.replace(norm_placement="post"), ours.materialize(), "opt", tmp_path / "out",
                     "no model class")


# --- refusals: one line naming the config key, exit 2, nothing written -----------------------------------------------


def test_opt_refuses_word_embed_projection(tmp_path):
    """opt-350m's word_embed_proj_dim != hidden_size adds project_in / project_out: refused by the key's name."""
    transformers.OPTForCausalLM(transformers.OPTConfig(**OPT, word_embed_proj_dim=16, do_layer_norm_before=False)) \
        .save_pretrained(tmp_path / "src")
    refused(tmp_path, "word_embed_proj_dim", leaves=["src"])


def test_opt_refuses_norms_without_weights(tmp_path):
    transformers.OPTModel(transformers.OPTConfig(**OPT, layer_norm_elementwise_affine=False)).save_pretrained(
        tmp_path / "src")
    refused(tmp_path, "layer_norm_elementwise_affine", leaves=["src"])


@pytest.mark.parametrize("case, change, key", [
    ("GPTNeoXForCausalLM-parallel",
     {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
     "rope_parameters.rope_type"),
    ("GPTNeoXForCausalLM-parallel", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
    ("Olmo2Model", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_parameters.rope_type"),
    ("OPTModel-pre", {"activation_function": "quick_gelu"}, "activation_function"),
])
def test_refuses_by_config_key(tmp_path, case, change, key):
    build(tmp_path, case)
    edit_config(tmp_path / "src", **change)
    refused(tmp_path, key, leaves=["src"])


# --- growth: every baseline writes a model transformers loads -------------------------------------------------------

GROW = {
    "olmo2": ("Olmo2ForCausalLM-gqa", dict(layers=3, width=64, heads=8, kv_heads=4, mlp=80)),
    "gpt_neox": ("GPTNeoXForCausalLM-parallel", dict(layers=3, width=64, heads=8, mlp=80)),
    "opt-pre": ("OPTForCausalLM-pre", dict(layers=3, width=64, heads=8, mlp=80)),
    # post-LN: LEMON cannot add layers losslessly, so only the width grows
    "opt-post": ("OPTForCausalLM-post-untied-nobias", dict(layers=2, width=96, heads=6, mlp=80)),
}


@pytest.mark.parametrize("which", list(GROW))
def test_every_baseline_loads_in_transformers(tmp_path, which):
    case, sizes = GROW[which]
    model, family = build(tmp_path, case)
    x = text_inputs()
    before = reference(model, x)["logits"]
    for method in ("net2net", "lemon", "stack", "interpolate", "aki", "scratch"):
        result = grow(tmp_path / "src", out=tmp_path / method, method=method, seq_len=16, batch_size=2,
                      eval_batches=1, **sizes)
        grown = load(tmp_path / method)
        assert grown.family == family
        assert (grown.spec.layers, grown.spec.width, grown.spec.heads, grown.spec.mlp) == \
            (sizes["layers"], sizes["width"], sizes["heads"], sizes["mlp"])
        cls = getattr(transformers, json.loads((tmp_path / method / "config.json").read_text())["architectures"][0])
        again = hf_load(cls, tmp_path / method, method)
        after = reference(again, x)["logits"]
        with torch.no_grad():
            ours = forward(grown.spec, grown.materialize(), **x)["logits"]
        assert max_diff(kept(after, x), kept(ours, x)) <= 1e-5, method  # transformers computes what we grew
        exact, why = B.preservation(method, load(tmp_path / "src").spec, result.spec)
        growth_report(tmp_path / method, method)
        if exact:  # ...and, where claimed, what the source computed
            assert max_diff(kept(after, x), kept(before, x)) <= 1e-4, (method, why)


# --- eval: PyTorch loss equals transformers', onnxruntime agrees ---------------------------------------------------


def test_eval_both_engines(tmp_path):
    """OPT (the mask-driven positions are the part an exporter could get wrong); the ONNX export of all three
    families is checked in tests/test_export.py."""
    model, _ = build(tmp_path, "OPTForCausalLM-pre")
    folder = tmp_path / "src"
    got = evaluate(folder, max_batches=1, batch_size=4, seq_len=16)
    ref = transformers_loss(model, folder, batch_size=4, seq_len=16)
    assert got["loss"] == pytest.approx(ref, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    onnx_run = evaluate(folder, engine="onnx", max_batches=1, batch_size=4, seq_len=16)
    assert onnx_run["count"] == got["count"]
    assert abs(onnx_run["loss"] - got["loss"]) <= 1e-4 * max(1.0, abs(got["loss"]))
