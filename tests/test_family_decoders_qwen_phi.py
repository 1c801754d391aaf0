"""Qwen3 and Phi-3 descriptors, and the sliding windows of Mistral and Qwen2 (llama.toml): our canonical forward
equals transformers' (windows shorter than the sequence, per-head q/k norms, head_dim apart from width / heads, fused
q|k|v and gate|up, partial rotary), SDPA equals explicit attention, files round-trip byte for byte, transformers
loads what we write (from a source config and from none), config values read back the same, refusals are one line,
every growth baseline writes a loadable model whose function-preserving claim holds, and eval gives
transformers' loss."""

import json

import pytest
import torch
import transformers

from ligo_convert import LigoError, forward, from_tensors, load, save
from ligo_convert.grow import grow
from family_checks import (DELETE, check_round_trip, edit_config, from_template, grown_or_refused, growth_report,
                           hf_load, kept, read_whole, refused, refused_to_write, transformers_loss)
from helpers import loading_problems, max_diff

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
THREE = dict(TINY, num_hidden_layers=3)
# windows of 3 keys on sequences of 11: most queries lose keys
QWEN_WINDOW = dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)


def qwen3(**kw):
    return lambda: transformers.Qwen3Config(**{**TINY, "num_key_value_heads": 2, **kw})


def phi3(**kw):
    # Phi3Config's pad_token_id (32000) is past a tiny vocabulary
    return lambda: transformers.Phi3Config(**{**TINY, "pad_token_id": 0, **kw})


# id -> (model class, config factory, family)
CASES = {
    # head_dim 16 with 4 heads on a width of 32; grouped-query attention (2 kv heads); untied, no biases
    "qwen3-hd16-gqa-untied": ("Qwen3ForCausalLM", qwen3(head_dim=16), "qwen3"),
    # odd head counts (3 query heads sharing 1 kv head), all four attention biases, tied head
    "qwen3-odd-bias-tied": ("Qwen3ForCausalLM", qwen3(num_attention_heads=3, num_key_value_heads=1, head_dim=8,
                                                      attention_bias=True, tie_word_embeddings=True), "qwen3"),
    # window on layers 1 and 2 (max_window_layers 1 < 3 layers)
    "qwen3-window": ("Qwen3ForCausalLM", qwen3(**THREE, head_dim=16, **QWEN_WINDOW), "qwen3"),
    "qwen3-model": ("Qwen3Model", qwen3(head_dim=16, attention_bias=True), "qwen3"),
    # fused q|k|v with unequal parts (4 heads, 2 kv heads), partial rotary on half of each head, untied
    "phi3-gqa-partial": ("Phi3ForCausalLM", phi3(num_key_value_heads=2, partial_rotary_factor=0.5), "phi3"),
    # every layer windowed, tied head, 2 heads (head_dim 16)
    "phi3-window-tied": ("Phi3ForCausalLM", phi3(num_attention_heads=2, sliding_window=3, tie_word_embeddings=True),
                         "phi3"),
    "phi3-model": ("Phi3Model", phi3(num_key_value_heads=1, sliding_window=4), "phi3"),
    # Mistral windows every layer; Qwen2 from max_window_layers on (both llama.toml)
    "mistral-window": ("MistralForCausalLM",
                       lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=3), "llama"),
    "qwen2-window": ("Qwen2ForCausalLM",
                     lambda: transformers.Qwen2Config(**THREE, num_key_value_heads=2, **QWEN_WINDOW), "llama"),
    "qwen2-model-window": ("Qwen2Model",
                           lambda: transformers.Qwen2Config(**THREE, num_key_value_heads=4, **QWEN_WINDOW), "llama"),
}
WINDOWED = [c for c in CASES if "window" in c]
CAUSAL_LM = [c for c, (cls, _, _) in CASES.items() if cls.endswith("ForCausalLM")]

# Config values transformers must read back the same from what we write.
COMPARED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
            "attention_bias", "rms_norm_eps", "hidden_act", "architectures", "pad_token_id", "rope_parameters",
            "sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def text_inputs(seq: int = 11) -> dict:
    """Two sequences, the second right-padded (its last 3 places masked)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 99, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 3:] = 0
    ids[1, seq - 3:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def reference(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def ours_of(spec, weights, x: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = forward(spec, weights, **x, **kw)
    return out["logits"] if "logits" in out else out["hidden"]


def randomise(model) -> None:
    """transformers leaves RMSNorm weights at 1 and biases at 0: randomise them so a swapped or dropped tensor
    shows in the outputs."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.copy_((0.5 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))


def build(tmp_path, case: str, folder: str = "src"):
    cls, config, family = CASES[case]
    model = getattr(transformers, cls)(config()).eval()
    randomise(model)
    model.save_pretrained(tmp_path / folder)
    return model, family


# --- the canonical forward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers(tmp_path, case):
    model, family = build(tmp_path, case)
    ours = read_whole(tmp_path / "src", family)
    x = text_inputs()
    ref = kept(reference(model, x), x)
    weights = ours.materialize()
    assert max_diff(ref, kept(ours_of(ours.spec, weights, x), x)) <= 1e-5
    if case in WINDOWED:  # the window is shorter than the sequence: without it the outputs differ
        assert 0 < ours.spec.sliding_window < x["input_ids"].shape[1]
        full = ours_of(ours.spec.replace(sliding_window=0), weights, x)
        assert max_diff(ref, kept(full, x)) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_matches_explicit(tmp_path, case):
    build(tmp_path, case)
    ours = load(tmp_path / "src")
    weights = ours.materialize()
    x = text_inputs()
    sdpa = ours_of(ours.spec, weights, x, attention="sdpa")
    explicit = ours_of(ours.spec, weights, x, attention="explicit")
    assert max_diff(kept(sdpa, x), kept(explicit, x)) <= 1e-5
    x = {"input_ids": x["input_ids"][:1]}  # no padding: SDPA's own causal kernel where there is no window
    assert max_diff(ours_of(ours.spec, weights, x, attention="sdpa"),
                    ours_of(ours.spec, weights, x, attention="explicit")) <= 1e-5


def test_specs_say_what_the_configs_say(tmp_path):
    specs = {}
    for case in CASES:
        build(tmp_path / case, case)
        specs[case] = load(tmp_path / case / "src").spec
    s = specs["qwen3-hd16-gqa-untied"]
    assert (s.qk_norm, s.head_dim, s.heads, s.kv_heads, s.qkv_bias, s.o_bias, s.mlp_bias, s.tie_embeddings) == \
        ("head", 16, 4, 2, False, False, False, False)
    s = specs["qwen3-odd-bias-tied"]
    assert (s.heads, s.kv_heads, s.head_dim, s.qkv_bias, s.o_bias, s.tie_embeddings) == (3, 1, 8, True, True, True)
    s = specs["qwen3-window"]
    assert (s.sliding_window, s.window_start, s.window_period) == (3, 1, 0)
    assert [s.windowed(i) for i in range(3)] == [False, True, True]
    s = specs["phi3-gqa-partial"]
    assert (s.rotary_fraction, s.rotary_dim, s.kv_heads, s.sliding_window, s.qk_norm) == (0.5, 4, 2, 0, "none")
    assert not (s.qkv_bias or s.o_bias or s.mlp_bias)
    assert (specs["phi3-window-tied"].sliding_window, specs["phi3-window-tied"].window_start) == (3, 0)
    assert [specs["mistral-window"].windowed(i) for i in range(2)] == [True, True]
    assert [specs["qwen2-window"].windowed(i) for i in range(3)] == [False, True, True]


def test_phi3_fused_tensors_split_as_transformers_does(tmp_path):
    """qkv_proj rows are q (heads x head_dim) | k | v (kv_heads x head_dim each); gate_up_proj's first half is the
    gate, the activated one."""
    model, _ = build(tmp_path, "phi3-gqa-partial")
    ours = load(tmp_path / "src")
    layer = model.model.layers[1]
    qkv = layer.self_attn.qkv_proj.weight.detach()
    assert torch.equal(ours.tensors["layers.1.q.weight"], qkv[:32])
    assert torch.equal(ours.tensors["layers.1.k.weight"], qkv[32:48])
    assert torch.equal(ours.tensors["layers.1.v.weight"], qkv[48:])
    gate_up = layer.mlp.gate_up_proj.weight.detach()
    assert torch.equal(ours.tensors["layers.1.gate.weight"], gate_up[:37])
    assert torch.equal(ours.tensors["layers.1.fc1.weight"], gate_up[37:])


# --- writing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    model, _ = build(tmp_path, case)
    check_round_trip(tmp_path, model, getattr(transformers, CASES[case][0]), text_inputs, reference, COMPARED)


@pytest.mark.parametrize("case", CAUSAL_LM)
def test_written_from_tensors_without_source_config(tmp_path, case):
    """A model made in memory (as growth makes one) has no source config: the descriptor alone writes one that
    transformers loads into the same model (model class, head_dim, tie and bias flags, window switch and layers)."""
    model, family = build(tmp_path, case)
    ours, again = from_template(tmp_path, model, family, transformers.AutoModelForCausalLM)
    x = text_inputs()
    assert torch.equal(kept(reference(model, x), x), kept(reference(again, x), x))
    assert load(tmp_path / "out").spec == ours.spec


def test_windowed_llama_is_written_as_mistral(tmp_path):
    """LlamaForCausalLM has no window: a LLaMA model given one is written as MistralForCausalLM (every layer
    windowed), and transformers' Mistral computes our windowed forward."""
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2)).save_pretrained(
        tmp_path / "src")
    llama = load(tmp_path / "src")
    assert llama.spec.sliding_window == 0
    spec = llama.spec.replace(sliding_window=3)
    weights = llama.materialize()
    save(from_tensors(spec, weights, "llama", config=llama.config), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["architectures"], written["model_type"], written["sliding_window"]) == \
        (["MistralForCausalLM"], "mistral", 3)
    again, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(again) is transformers.MistralForCausalLM and loading_problems(info) == {}
    x = text_inputs()
    assert max_diff(kept(reference(again.eval(), x), x), kept(ours_of(spec, weights, x), x)) <= 1e-5
    # a window from a layer on is Qwen2's, which biases q/k/v: no LLaMA-family class holds it without biases
    refused_to_write(spec.replace(window_start=1), weights, "llama", tmp_path / "none", "no model class")


def test_unwindowed_configs_write_no_window(tmp_path):
    """Without a window the switch is off and sliding_window null, whatever the source's class."""
    for case in ("qwen3-hd16-gqa-untied", "phi3-gqa-partial"):
        build(tmp_path / case, case)
        save(load(tmp_path / case / "src"), tmp_path / case / "out")
        written = json.loads((tmp_path / case / "out" / "config.json").read_text())
        assert written["sliding_window"] is None
        assert written.get("use_sliding_window") in (None, False)
        assert transformers.AutoConfig.from_pretrained(tmp_path / case / "out").sliding_window is None


# --- configs of other transformers versions and real checkpoints ---------------------------------------------------


def test_qwen_transformers4_configs(tmp_path):
    """Configs without layer_types (transformers 4, every hub Qwen2/Qwen3 checkpoint) read the window from
    use_sliding_window and max_window_layers; real checkpoints carry a sliding_window with the switch off: none."""
    for case in ("qwen2-window", "qwen3-window"):
        model, _ = build(tmp_path / case, case)
        folder = tmp_path / case / "src"
        edit_config(folder, layer_types=DELETE)
        spec = load(folder).spec
        assert (spec.sliding_window, spec.window_start) == (3, 1)
        x = text_inputs()
        weights = load(folder).materialize()
        assert max_diff(kept(reference(model, x), x), kept(ours_of(spec, weights, x), x)) <= 1e-5
        # Qwen2.5 / Qwen3 hub style: sliding_window set, switch off
        edit_config(folder, use_sliding_window=False, sliding_window=32768, max_window_layers=21)
        spec = load(folder).spec
        assert spec.sliding_window == 0 and not any(spec.windowed(i) for i in range(3))
        # the switch on without a sliding_window key: the class default (4096), from max_window_layers on
        edit_config(folder, use_sliding_window=True, sliding_window=DELETE, max_window_layers=DELETE)
        spec = load(folder).spec
        assert (spec.sliding_window, spec.window_start) == (4096, 28)
        edit_config(folder, sliding_window=None)  # present as null: no window, as transformers reads it
        assert load(folder).spec.sliding_window == 0


def test_mistral_window_defaults(tmp_path):
    """MistralConfig windows every layer with 4096 keys where the key is missing, none where it is null."""
    build(tmp_path, "mistral-window")
    edit_config(tmp_path / "src", sliding_window=DELETE)
    spec = load(tmp_path / "src").spec
    assert (spec.sliding_window, spec.window_start) == (4096, 0)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "src").sliding_window == 4096
    save(load(tmp_path / "src"), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] == 4096
    edit_config(tmp_path / "src", sliding_window=None)
    assert load(tmp_path / "src").spec.sliding_window == 0
    save(load(tmp_path / "src"), tmp_path / "out2")
    written = json.loads((tmp_path / "out2" / "config.json").read_text())
    assert written["sliding_window"] is None and written["architectures"] == ["MistralForCausalLM"]
    assert load(tmp_path / "out2").spec == load(tmp_path / "src").spec


def test_phi3_transformers4_config(tmp_path):
    """transformers 4 wrote partial_rotary_factor and rope_theta at the top level and rope_scaling null."""
    model, _ = build(tmp_path, "phi3-gqa-partial")
    config = edit_config(tmp_path / "src", rope_parameters=DELETE, rope_theta=10000.0, partial_rotary_factor=0.5,
                         rope_scaling=None)
    assert "rope_parameters" not in config
    spec = load(tmp_path / "src").spec
    assert (spec.rotary_fraction, spec.rope_theta) == (0.5, 10000.0)
    x = text_inputs()
    assert max_diff(kept(reference(model, x), x),
                    kept(ours_of(spec, load(tmp_path / "src").materialize(), x), x)) <= 1e-5
    save(load(tmp_path / "src"), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["partial_rotary_factor"] == written["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert written["rope_parameters"]["rope_theta"] == written["rope_theta"] == 10000.0


def test_qwen3_head_dim_defaults_to_128(tmp_path):
    """Qwen3Config's head_dim is 128 where the key is missing, not width / heads: such a config does not describe
    weights of head_dim 8, and says so."""
    build(tmp_path, "qwen3-odd-bias-tied")
    edit_config(tmp_path / "src", head_dim=DELETE)
    with pytest.raises(LigoError, match="head_dim"):
        load(tmp_path / "src")


def test_families_are_detected_without_model_type(tmp_path):
    """Tensor names alone tell Qwen3 (q_norm) and Phi-3 (qkv_proj) from LLaMA."""
    for case, family in (("qwen3-hd16-gqa-untied", "qwen3"), ("phi3-gqa-partial", "phi3")):
        build(tmp_path / case, case)
        edit_config(tmp_path / case / "src", model_type=DELETE, architectures=DELETE)
        assert load(tmp_path / case / "src").family == family


# --- refusals ----------------------------------------------------------------------------------------------------


LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [2.0, 2.0]}


@pytest.mark.parametrize("case, change, key", [
    ("phi3-gqa-partial", {"rope_scaling": LONGROPE}, "rope_scaling.type"),  # Phi-3-mini-128k, Phi-3.5 (v4 configs)
    ("phi3-gqa-partial", {"rope_scaling": {**LONGROPE, "type": "su"}}, "rope_scaling.type"),
    ("phi3-gqa-partial", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5}}, "rope_parameters.rope_type"),
    ("qwen3-hd16-gqa-untied", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ("qwen3-hd16-gqa-untied", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
     "rope_parameters.rope_type"),
    ("qwen2-window", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling.type"),
])
def test_refuses_by_config_key(tmp_path, case, change, key):
    build(tmp_path, case)
    edit_config(tmp_path / "src", **change)
    refused(tmp_path, key)


def test_periodic_windows_have_no_class(tmp_path):
    """A transformers-5 layer_types list that no max_window_layers gives (alternating) is read, but no Qwen class
    can write it for transformers 4: saving refuses instead of writing a different model."""
    build(tmp_path, "qwen2-window")
    edit_config(tmp_path / "src", layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    spec = load(tmp_path / "src").spec
    assert spec.window_period == 2
    with pytest.raises(LigoError, match="no model class"):
        save(load(tmp_path / "src"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- growth ------------------------------------------------------------------------------------------------------

# one source per family (windows shorter than the sequence); every baseline grows it wider and deeper
GROW_SOURCES = {
    "qwen3": "qwen3-window",
    "phi3": "phi3-gqa-partial",
    "phi3-window": "phi3-window-tied",
    "mistral": "mistral-window",
    "qwen2": "qwen2-window",
}
BASELINE_TARGETS = {
    "net2net": dict(width=64),
    "lemon": dict(width=64),
    "stack": dict(width=64),
    "interpolate": dict(width=64),
    "aki": dict(width=64),
    "scratch": dict(width=64),
}


@pytest.mark.parametrize("source", list(GROW_SOURCES))
def test_grow_with_every_baseline(tmp_path, source):
    """Every baseline writes a model transformers loads without missing/unexpected keys; where growth.json claims
    the function is preserved, transformers' logits of the grown model equal the source's; lemon also adds a
    layer."""
    case = GROW_SOURCES[source]
    model, family = build(tmp_path, case)
    layers = model.config.num_hidden_layers
    cls = getattr(transformers, CASES[case][0])
    x = text_inputs()
    before = kept(reference(model, x), x)
    wrong, ran = [], []
    targets = [(m, dict(sizes, layers=layers)) for m, sizes in BASELINE_TARGETS.items()]
    targets.append(("lemon", dict(width=64, layers=layers + 1)))
    for method, sizes in targets:
        out = tmp_path / f"{method}-{sizes['layers']}"
        grown = grown_or_refused(tmp_path / "src", out, method, eval_batches=1, batch_size=2, seq_len=16, **sizes)
        if grown is None:  # refused in one line, nothing written
            continue
        assert grown.family == family and (grown.spec.layers, grown.spec.width) == (sizes["layers"], 64)
        assert grown.spec.head_dim == load(tmp_path / "src").spec.head_dim
        again = hf_load(cls, out, method)
        assert again.config.sliding_window == (model.config.sliding_window if model.config.sliding_window else None)
        report = growth_report(out, method)
        ran.append(method)
        after = kept(reference(again, x), x)
        if report["function_preserving"] and max_diff(before, after) > 1e-4:
            wrong.append((method, max_diff(before, after), report["function_preserving_reason"]))
    assert set(ran) >= set(BASELINE_TARGETS) - {"lemon"}, ran
    assert wrong == [], f"{source}: function-preserving claims that do not hold: {wrong}"


def test_grown_qwen3_window_follows_the_layers(tmp_path):
    """LiGO growth 3 -> 5 layers of a Qwen3 windowed from layer 1 on: the written layer_types / max_window_layers
    describe 5 layers, and transformers' logits equal our forward of the grown weights."""
    build(tmp_path, "qwen3-window")
    result = grow(tmp_path / "src", out=tmp_path / "big", layers=5, width=48, heads=6, mlp=64, steps=1,
                  batch_size=2, seq_len=16, eval_batches=1)
    again = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "big").eval()
    assert again.config.layer_types == ["full_attention"] + ["sliding_attention"] * 4
    assert (again.config.max_window_layers, again.config.use_sliding_window, again.config.head_dim) == (1, True, 16)
    x = text_inputs()
    ours = ours_of(result.spec, load(tmp_path / "big").materialize(), x)
    assert max_diff(kept(reference(again, x), x), kept(ours, x)) <= 1e-5


# --- evaluation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["qwen3-window", "phi3-gqa-partial"])
def test_eval_equals_transformers_loss(tmp_path, case):
    """`eval` with PyTorch gives transformers' own loss.  (The ONNX engine runs the exported file, which
    tests/test_export.py checks against transformers for both families; exporting costs ~30 s, so not again here.)"""
    from ligo_convert.evaluate import evaluate

    model, _ = build(tmp_path, case)
    got = evaluate(tmp_path / "src", max_batches=1, batch_size=4, seq_len=16)
    ref = transformers_loss(model, tmp_path / "src", batch_size=4, seq_len=16)
    assert got["loss"] == pytest.approx(ref, rel=1e-5)
