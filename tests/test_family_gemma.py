"""Gemma, Gemma 2 and Gemma 3 (text): our canonical forward equals transformers' (eager attention: Gemma 2's
soft-capped scores have no SDPA path there), files round-trip byte for byte, transformers loads what we write, the
config we write describes the same model, every growth baseline writes a loadable model whose function-preserving
claims hold, and the variants we cannot represent are refused by name."""

import json
from functools import partial

import pytest
import torch
import transformers

from ligo_convert import LigoError, forward, from_tensors, load, save
from ligo_convert.grow import grow
from family_checks import (DELETE, assert_close, build_case, check_round_trip, edit_config, from_template,
                           grown_or_refused, growth_report, hf_load, kept, our_outputs, read_whole, reference, refused,
                           refused_by_cli, refused_to_write, save_randomised, transformers_loss)
from helpers import assert_same_files, max_diff

# head_dim 16 with 4 heads: the attention width (64) differs from the hidden size (32), as in the real models
BASE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=37, max_position_embeddings=64)
EAGER = dict(attn_implementation="eager")


def gemma(**kw):
    return lambda: transformers.GemmaConfig(**{**BASE, **kw}, **EAGER)


def gemma2(**kw):
    return lambda: transformers.Gemma2Config(**{**BASE, **kw}, **EAGER)


def gemma3(**kw):
    return lambda: transformers.Gemma3TextConfig(**{**BASE, **kw}, **EAGER)


# id -> (model class, config, family).  Windows (3-4) are shorter than the test sequences (11); soft caps are small
# enough to bite.
CASES = {
    # gemma-2b-like: multi-query attention, tied head
    "gemma-mqa-tied": ("GemmaForCausalLM", gemma(num_key_value_heads=1), "gemma"),
    "gemma-gqa-untied-bias": ("GemmaForCausalLM", gemma(tie_word_embeddings=False, attention_bias=True,
                                                        rope_theta=500.0), "gemma"),
    # three heads of 8 on a width of 32: odd head count, q width 24
    "gemma-model-odd-heads": ("GemmaModel", gemma(num_attention_heads=3, num_key_value_heads=3, head_dim=8,
                                                  num_hidden_layers=2), "gemma"),
    "gemma2-gqa-tied": ("Gemma2ForCausalLM", gemma2(sliding_window=4, query_pre_attn_scalar=12,
                                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
                        "gemma2"),
    # no soft caps at all (null in the config), biases, no GQA
    "gemma2-untied-bias-nocap": ("Gemma2ForCausalLM", gemma2(num_key_value_heads=4, tie_word_embeddings=False,
                                                             attention_bias=True, sliding_window=3,
                                                             attn_logit_softcapping=None,
                                                             final_logit_softcapping=None), "gemma2"),
    "gemma2-model-mqa": ("Gemma2Model", gemma2(num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3,
                                               sliding_window=3, attn_logit_softcapping=1.5), "gemma2"),
    # two full layers of four... every third layer global, own local rotary base
    "gemma3-gqa-tied": ("Gemma3ForCausalLM", gemma3(sliding_window=4, sliding_window_pattern=3, rope_theta=1000.0,
                                                    rope_local_base_freq=50.0, query_pre_attn_scalar=20),
                        "gemma3_text"),
    "gemma3-mqa-untied-bias": ("Gemma3ForCausalLM", gemma3(num_key_value_heads=1, tie_word_embeddings=False,
                                                           attention_bias=True, sliding_window=3,
                                                           layer_types=["sliding_attention", "full_attention"] * 2,
                                                           final_logit_softcapping=3.0), "gemma3_text"),
    # the default 5:1 pattern on 3 layers: every layer windowed
    "gemma3-model": ("Gemma3TextModel", gemma3(num_hidden_layers=3, sliding_window=3), "gemma3_text"),
}

# Config values transformers must read back the same from what we write.
COMPARED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
            "attention_bias", "rms_norm_eps", "hidden_act", "hidden_activation", "architectures",
            "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
            "layer_types", "rope_parameters", "use_bidirectional_attention", "pad_token_id", "bos_token_id",
            "eos_token_id")


def text_inputs(seq: int = 11) -> dict:
    """Two sequences, the second right-padded (padded places are not compared: causal models leave them
    undefined)."""
    ids = torch.randint(3, 99, (2, seq))
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 3:] = 0
    return dict(input_ids=ids, attention_mask=mask)


# Gemma's norm weights (gain 1 + weight) are randomised too: a missing 1 + offset shows in the outputs
build = partial(build_case, CASES)


def hf_class(case: str):
    return getattr(transformers, CASES[case][0])


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers(tmp_path, case):
    model, family = build(tmp_path, case)
    ours = read_whole(tmp_path / "src", family)
    x = text_inputs()
    assert_close(reference(model, x), our_outputs(ours, x), padded=x)


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_matches_explicit(tmp_path, case):
    build(tmp_path, case)
    ours = load(tmp_path / "src")
    x = text_inputs()
    with torch.no_grad():
        fused = forward(ours.spec, ours.materialize(), **x, attention="sdpa")
        spelled = forward(ours.spec, ours.materialize(), **x, attention="explicit")
    for k in fused:
        if isinstance(fused[k], torch.Tensor):
            assert max_diff(kept(fused[k], x), kept(spelled[k], x)) <= 1e-5, k


def test_specs_say_what_the_configs_say(tmp_path):
    """The mechanisms each case exercises are really in its spec."""
    specs = {}
    for case in CASES:
        build(tmp_path, case, case)
        specs[case] = load(tmp_path / case).spec
    g1, g2, g3 = specs["gemma-mqa-tied"], specs["gemma2-gqa-tied"], specs["gemma3-gqa-tied"]
    assert (g1.norm_offset, g1.embed_scale, g1.activation, g1.kv_heads, g1.head_dim) == (1.0, True, "gelu_tanh", 1, 16)
    assert g1.norm_placement == "pre" and g1.tie_embeddings and not g1.sliding_window
    assert specs["gemma-gqa-untied-bias"].qkv_bias and specs["gemma-gqa-untied-bias"].o_bias
    assert not specs["gemma-gqa-untied-bias"].tie_embeddings and specs["gemma-gqa-untied-bias"].rope_theta == 500.0
    assert specs["gemma-model-odd-heads"].head == "none" and specs["gemma-model-odd-heads"].heads == 3
    assert (g2.norm_placement, g2.score_scale_dim, g2.attn_softcap, g2.final_softcap) == ("sandwich", 12, 2.0, 3.0)
    assert (g2.sliding_window, g2.window_start, g2.window_period) == (4, 0, 2)
    assert [g2.windowed(i) for i in range(4)] == [True, False, True, False]
    nocap = specs["gemma2-untied-bias-nocap"]
    assert nocap.attn_softcap == 0 and nocap.final_softcap == 0 and nocap.kv_heads == nocap.heads
    assert (g3.qk_norm, g3.rope_theta, g3.rope_local_theta, g3.attn_softcap, g3.final_softcap) == \
        ("head", 1000.0, 50.0, 0.0, 0.0)
    assert [g3.windowed(i) for i in range(4)] == [True, True, False, True] and g3.score_scale_dim == 20
    assert specs["gemma3-mqa-untied-bias"].window_period == 2 and specs["gemma3-mqa-untied-bias"].final_softcap == 3
    assert all(specs["gemma3-model"].windowed(i) for i in range(3))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    model, _ = build(tmp_path, case)
    check_round_trip(tmp_path, model, hf_class(case), text_inputs, reference, COMPARED, **EAGER)


@pytest.mark.parametrize("case", ["gemma-mqa-tied", "gemma-gqa-untied-bias", "gemma2-gqa-tied",
                                  "gemma2-untied-bias-nocap", "gemma3-gqa-tied", "gemma3-mqa-untied-bias"])
def test_written_from_tensors_without_source_config(tmp_path, case):
    """A model made in memory (as growth makes one) has no source config: the descriptor's template alone writes
    a config that transformers loads into the same model (class, tie and bias flags, windows, caps, rotary bases)."""
    model, family = build(tmp_path, case)
    ours, again = from_template(tmp_path, model, family, transformers.AutoModelForCausalLM, **EAGER)
    x = text_inputs()
    assert torch.equal(reference(model, x)["logits"], reference(again, x)["logits"])
    assert load(tmp_path / "out").spec == ours.spec


def test_bfloat16_checkpoint(tmp_path):
    """The real checkpoints are bfloat16: files round-trip byte for byte, and the embedding scale is rounded to
    bfloat16 as transformers rounds it (sqrt(32) = 5.657 -> 5.65625), so the embedded input is bit-identical."""
    model, _ = build(tmp_path, "gemma2-gqa-tied")
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    ours = load(tmp_path / "bf16")
    save(ours, tmp_path / "out")
    assert_same_files(tmp_path / "bf16", tmp_path / "out")
    from ligo_convert.model import embed

    ids = text_inputs()["input_ids"]
    with torch.no_grad():
        assert torch.equal(embed(ours.spec, ours.materialize(), ids), model.model.embed_tokens(ids))
    x = text_inputs()
    with torch.no_grad():
        out = forward(ours.spec, ours.materialize(), **x)["logits"]
    assert out.dtype == torch.bfloat16
    assert max_diff(kept(reference(model, x)["logits"], x), kept(out, x)) <= 0.05  # bfloat16 rounding only


def test_gemma_legacy_config(tmp_path):
    """The official Gemma configs (transformers 4.38): hidden_act "gelu" meaning the tanh GELU, top-level rope_theta,
    no rope_parameters."""
    model, _ = build(tmp_path, "gemma-gqa-untied-bias")
    edit_config(tmp_path / "src", hidden_act="gelu", hidden_activation=None, rope_theta=500.0, rope_scaling=None,
                rope_parameters=DELETE)
    ours = load(tmp_path / "src")
    assert ours.spec.activation == "gelu_tanh" and ours.spec.rope_theta == 500.0
    x = text_inputs()
    out = our_outputs(ours, x)
    assert max_diff(kept(reference(model, x)["logits"], x), kept(out["logits"], x)) <= 1e-5
    save(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    # both transformers 4 (hidden_activation) and 5 (hidden_act) read the tanh GELU
    assert written["hidden_act"] == written["hidden_activation"] == "gelu_pytorch_tanh"
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 500.0


def test_gemma_exact_gelu_cannot_be_written(tmp_path):
    build(tmp_path, "gemma-mqa-tied")
    ours = load(tmp_path / "src")
    refused_to_write(ours.spec.replace(activation="gelu"), ours.materialize(), "gemma", tmp_path / "out",
                     "hidden_act cannot express 'gelu'")


def test_gemma2_transformers4_config(tmp_path):
    """transformers-4 Gemma 2 configs have no layer_types (windows on even layers by rule) and a top-level
    rope_theta; the caps' keys missing mean the class defaults (50 / 30)."""
    build(tmp_path, "gemma2-gqa-tied")
    edit_config(tmp_path / "src", layer_types=DELETE, rope_parameters=DELETE, rope_theta=10000.0,
                attn_logit_softcapping=DELETE, final_logit_softcapping=DELETE)
    spec = load(tmp_path / "src").spec
    assert (spec.window_period, spec.sliding_window, spec.attn_softcap, spec.final_softcap) == (2, 4, 50.0, 30.0)
    model = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "src", **EAGER).eval()
    assert (model.config.attn_logit_softcapping, model.config.final_logit_softcapping) == (50.0, 30.0)
    x = text_inputs()
    with torch.no_grad():
        out = forward(spec, load(tmp_path / "src").materialize(), **x)
    assert max_diff(kept(reference(model, x)["logits"], x), kept(out["logits"], x)) <= 1e-5


def test_gemma2_null_caps_are_written_null(tmp_path):
    """A null cap means none: read as 0 and written back as null (a 0 cap would divide by zero in transformers)."""
    build(tmp_path, "gemma2-untied-bias-nocap")
    ours = load(tmp_path / "src")
    save(from_tensors(ours.spec, ours.materialize(), "gemma2"), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["attn_logit_softcapping"] is None and written["final_logit_softcapping"] is None
    assert written["layer_types"] == ["sliding_attention", "full_attention"] * 2


def test_gemma3_transformers4_config(tmp_path):
    """transformers-4 Gemma 3 configs: rope_theta / rope_local_base_freq and sliding_window_pattern instead of
    rope_parameters per layer type and layer_types: the same spec."""
    model, _ = build(tmp_path, "gemma3-gqa-tied")
    new = load(tmp_path / "src").spec
    edit_config(tmp_path / "src", rope_parameters=DELETE, layer_types=DELETE, rope_theta=1000.0,
                rope_local_base_freq=50.0, sliding_window_pattern=3, rope_scaling=None)
    old = load(tmp_path / "src").spec
    assert old == new
    again = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "src", **EAGER).eval()
    x = text_inputs()
    assert torch.equal(reference(model, x)["logits"], reference(again, x)["logits"])


def test_gemma3_writes_both_rotary_spellings(tmp_path):
    build(tmp_path, "gemma3-gqa-tied")
    ours = load(tmp_path / "src")
    save(ours, tmp_path / "out")
    w = json.loads((tmp_path / "out" / "config.json").read_text())
    assert w["rope_parameters"] == {"full_attention": {"rope_theta": 1000.0, "rope_type": "default"},
                                    "sliding_attention": {"rope_theta": 50.0, "rope_type": "default"}}
    assert (w["rope_theta"], w["rope_local_base_freq"], w["sliding_window_pattern"]) == (1000.0, 50.0, 3)


# --- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, change, key", [
    ("gemma-mqa-tied", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_parameters.rope_type"),
    ("gemma-mqa-tied", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
    ("gemma-mqa-tied", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2-gqa-tied", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.rope_type"),
    ("gemma2-gqa-tied", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3-gqa-tied", {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                "rope_theta": 1e6},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope_parameters.full_attention.rope_type"),
    ("gemma3-gqa-tied", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope_scaling.rope_type"),
    ("gemma3-gqa-tied", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_refuses_by_config_key(tmp_path, case, change, key):
    build(tmp_path, case)
    edit_config(tmp_path / "src", **change)
    refused(tmp_path, key)


def test_gemma3_layer_types_without_a_rule_refused(tmp_path):
    build(tmp_path, "gemma3-gqa-tied")
    edit_config(tmp_path / "src", layer_types=["full_attention", "sliding_attention", "full_attention",
                                               "full_attention"])
    refused_by_cli(tmp_path, "layer_types")


def test_multimodal_gemma3_refused_by_name(tmp_path):
    """Gemma3ForConditionalGeneration (model_type gemma3: SigLIP tower + projector + text model) is out of scope:
    one clear line naming the class, not a misread text model."""
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    text = {**BASE, "num_hidden_layers": 2, "sliding_window": 4}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "src")
    with pytest.raises(LigoError, match="Gemma3ForConditionalGeneration"):
        load(tmp_path / "src")
    with pytest.raises(LigoError, match="Gemma3ForConditionalGeneration"):
        load(tmp_path / "src", family="gemma3_text")
    refused_by_cli(tmp_path, "Gemma3ForConditionalGeneration")


def test_families_do_not_cross(tmp_path):
    """Gemma 1 has no output norms, Gemma 2 no q/k norms, LLaMA no norm offset: writing one as another is refused,
    nothing written."""
    build(tmp_path, "gemma2-gqa-tied", "g2")
    build(tmp_path, "gemma3-gqa-tied", "g3")
    with pytest.raises(LigoError, match="has no place for tensor layers.0.attn_out_norm.weight"):
        save(load(tmp_path / "g2"), tmp_path / "as-gemma", family="gemma")
    with pytest.raises(LigoError, match="has no place for tensor layers.0.q_norm.weight"):
        save(load(tmp_path / "g3"), tmp_path / "as-gemma2", family="gemma2")
    # Gemma 1 has LLaMA's tensors: what tells them apart (gain 1 + weight, sqrt(width) embedding scale) leaves no
    # tensor behind, and LLaMA has no config key for it
    build(tmp_path, "gemma-mqa-tied", "g1")
    with pytest.raises(LigoError, match="no config key for norm_offset"):
        save(load(tmp_path / "g1"), tmp_path / "as-llama", family="llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g1", "g2", "g3"]


# --- growth --------------------------------------------------------------------------------------------------------

# a 2-layer source of each family, windows shorter than the sequence; Gemma 3 global every second layer
GROW_SOURCES = {
    "gemma": ("GemmaForCausalLM", gemma(num_hidden_layers=2)),
    "gemma2": ("Gemma2ForCausalLM", gemma2(num_hidden_layers=2, sliding_window=4, attn_logit_softcapping=5.0,
                                           final_logit_softcapping=8.0, query_pre_attn_scalar=12)),
    "gemma3_text": ("Gemma3ForCausalLM", gemma3(num_hidden_layers=2, sliding_window=4, sliding_window_pattern=2,
                                                rope_local_base_freq=100.0, final_logit_softcapping=8.0)),
}
WIDER = dict(width=64, heads=8, kv_heads=4, mlp=80)
# (method, target): each grows what its function-preserving claim is about (and scratch something).  LEMON's
# depth growth is refused where copied layers would land on layers of the other attention kind (Gemma 2/3).
BASELINE_TARGETS = [
    ("net2net", dict(layers=2, **WIDER)),
    ("aki", dict(layers=2, **WIDER)),
    ("lemon", dict(layers=2, **WIDER)),
    ("lemon", dict(layers=4, **WIDER)),
    ("stack", dict(layers=4)),
    ("interpolate", dict(layers=3)),
    ("scratch", dict(layers=3, **WIDER)),
]


@pytest.mark.parametrize("family", list(GROW_SOURCES))
def test_grow_with_every_baseline(tmp_path, family):
    """Every baseline writes a model transformers loads without missing/unexpected keys; where growth.json claims
    the function is preserved, transformers' logits of the grown model equal the source's."""
    cls, make_config = GROW_SOURCES[family]
    model = save_randomised(cls, make_config(), tmp_path / "src")
    x = text_inputs()
    before = kept(reference(model, x)["logits"], x)
    wrong, exact = [], []
    for k, (method, sizes) in enumerate(BASELINE_TARGETS):
        out = tmp_path / f"{method}-{k}"
        grown = grown_or_refused(tmp_path / "src", out, method, eval_batches=1, batch_size=2, seq_len=16, **sizes)
        if grown is None:  # refused in one line, nothing written
            continue
        assert grown.family == family and grown.spec.layers == sizes["layers"]
        again = hf_load(getattr(transformers, cls), out, method, **EAGER)
        if family != "gemma":  # the window pattern is written for the grown layer count
            assert again.config.layer_types == ["sliding_attention" if grown.spec.windowed(i) else "full_attention"
                                                for i in range(sizes["layers"])]
        report = growth_report(out, method)
        after = kept(reference(again, x)["logits"], x)
        if report["function_preserving"]:
            exact.append(method)
            if max_diff(before, after) > 1e-4:
                wrong.append((method, max_diff(before, after), report["function_preserving_reason"]))
    assert wrong == [], f"{family}: function-preserving claims that do not hold: {wrong}"
    assert {"net2net", "lemon"} <= set(exact)  # the claims were really put to the test


def test_grown_gemma3_keeps_its_window_rule(tmp_path):
    """LiGO growth 2 -> 5 layers: the written layer_types follow the spec's rule for 5 layers, and the grown model's
    transformers logits equal our forward of the grown weights."""
    cls, make_config = GROW_SOURCES["gemma3_text"]
    getattr(transformers, cls)(make_config()).save_pretrained(tmp_path / "src")
    result = grow(tmp_path / "src", out=tmp_path / "big", layers=5, steps=1, batch_size=2, seq_len=16,
                  eval_batches=1, **WIDER)
    again = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "big", **EAGER).eval()
    assert again.config.layer_types == ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    assert again.config.rope_parameters["sliding_attention"]["rope_theta"] == 100.0
    x = text_inputs()
    with torch.no_grad():
        ours = forward(result.spec, load(tmp_path / "big").materialize(), **x)["logits"]
    assert max_diff(kept(reference(again, x)["logits"], x), kept(ours, x)) <= 1e-5


# --- evaluation ----------------------------------------------------------------------------------------------------


def test_eval_torch_equals_transformers_and_onnx(tmp_path):
    from ligo_convert.evaluate import evaluate

    cls, make_config = GROW_SOURCES["gemma2"]
    model = getattr(transformers, cls)(make_config()).eval()
    model.save_pretrained(tmp_path / "src")
    got = evaluate(tmp_path / "src", max_batches=1, batch_size=4, seq_len=16)
    ref = transformers_loss(model, tmp_path / "src", batch_size=4, seq_len=16)
    assert got["loss"] == pytest.approx(ref, rel=1e-5)
    onnx = evaluate(tmp_path / "src", engine="onnx", max_batches=1, batch_size=4, seq_len=16)
    assert onnx["count"] == got["count"] and onnx["loss"] == pytest.approx(got["loss"], rel=1e-4)
