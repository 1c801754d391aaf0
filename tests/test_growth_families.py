"""Growth works for every family with a descriptor: a tiny transformers model of the family is grown (depth, width,
heads; a few fitting steps on the embedded data), the result loads with transformers' ``from_pretrained`` with no
missing, unexpected or mismatched keys, and transformers' outputs equal our canonical forward of the grown weights.

The test runs once per descriptor in ``architectures/``; a family without a builder here fails, so a new family
cannot skip growth."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from ligo_convert import forward, load, save
from ligo_convert.descriptors import load_descriptors
from ligo_convert.grow import grow
from helpers import max_diff

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
IMAGE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
             patch_size=4, num_labels=10)
# head_dim 8 everywhere: width 48 -> 6 heads
BIG = dict(layers=3, width=48, heads=6, mlp=64)

# family -> [(case id, model class, config, target sizes, kind of input, written family)]
BUILDERS = {
    "hf-bert": [("BertForMaskedLM", "BertForMaskedLM", lambda: transformers.BertConfig(**TEXT), BIG, "text")],
    "hf-roberta": [("RobertaForMaskedLM", "RobertaForMaskedLM",
                    lambda: transformers.RobertaConfig(**TEXT, max_position_embeddings=66), BIG, "text")],
    "xlm-roberta": [("XLMRobertaForMaskedLM", "XLMRobertaForMaskedLM",
                     lambda: transformers.XLMRobertaConfig(**TEXT, max_position_embeddings=66), BIG, "text")],
    "camembert": [("CamembertForMaskedLM", "CamembertForMaskedLM",
                   lambda: transformers.CamembertConfig(**TEXT, max_position_embeddings=66), BIG, "text")],
    "distilbert": [("DistilBertForMaskedLM", "DistilBertForMaskedLM",
                    lambda: transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                                          max_position_embeddings=64), BIG, "text")],
    "hf-gpt2": [("GPT2LMHeadModel", "GPT2LMHeadModel",
                 lambda: transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 n_inner=37, bos_token_id=0, eos_token_id=0), BIG,
                 "text")],
    "llama": [
        ("llama-gqa", "LlamaForCausalLM",
         lambda: transformers.LlamaConfig(**TEXT, num_key_value_heads=2, max_position_embeddings=64),
         dict(BIG, kv_heads=3), "text"),
        # kv heads stay 2 while query heads double: 2 -> 4 query heads per group
        ("llama-gqa-ratio", "LlamaForCausalLM",
         lambda: transformers.LlamaConfig(**TEXT, num_key_value_heads=2, max_position_embeddings=64),
         dict(layers=3, width=64, heads=8, kv_heads=2, mlp=64), "text"),
    ],
    "hf-vit": [("ViTForImageClassification", "ViTForImageClassification",
                lambda: transformers.ViTConfig(**IMAGE), BIG, "image")],
    "hf-deit": [("DeiTWithTeacher", "DeiTForImageClassificationWithTeacher",
                 lambda: transformers.DeiTConfig(**IMAGE), BIG, "image")],
    # timm cannot be installed here: the source is an HF ViT converted to timm's layout by its descriptor
    "timm-vit": [("timm-from-ViT", "ViTForImageClassification",
                  lambda: transformers.ViTConfig(**IMAGE, layer_norm_eps=1e-6), BIG, "image")],
    # DINOv2: mlp = width x an integer mlp_ratio (128 here -> 144 = 48 x 3); SwiGLU takes 2/3 of it in 8s (88 -> 96)
    "dinov2": [("Dinov2ForImageClassification", "Dinov2ForImageClassification",
                lambda: transformers.Dinov2Config(**IMAGE), dict(BIG, mlp=144), "image"),
               ("Dinov2Model-swiglu", "Dinov2Model", lambda: transformers.Dinov2Config(**IMAGE, use_swiglu_ffn=True),
                dict(BIG, mlp=96), "image")],
    "clip-vision": [("CLIPVisionModelWithProjection", "CLIPVisionModelWithProjection",
                     lambda: transformers.CLIPVisionConfig(**{**IMAGE, "intermediate_size": 37}, projection_dim=24),
                     BIG, "image")],
    "clip-text": [("CLIPTextModelWithProjection", "CLIPTextModelWithProjection",
                   lambda: transformers.CLIPTextConfig(**TEXT, max_position_embeddings=32, projection_dim=24,
                                                       eos_token_id=2), BIG, "text")],
    "siglip-vision": [("SiglipVisionModel", "SiglipVisionModel",
                       lambda: transformers.SiglipVisionConfig(**IMAGE, vision_use_head=False), BIG, "image")],
    # Gemma's head_dim defaults to 256: give it.  Windows (4) shorter than the inputs (9), small soft caps.
    "gemma": [("GemmaForCausalLM-mqa", "GemmaForCausalLM",
               lambda: transformers.GemmaConfig(**TEXT, num_key_value_heads=1, head_dim=8,
                                                max_position_embeddings=64), dict(BIG, kv_heads=2), "text")],
    "gemma2": [("Gemma2ForCausalLM", "Gemma2ForCausalLM",
                lambda: transformers.Gemma2Config(**TEXT, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                                  query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
                                                  final_logit_softcapping=8.0, max_position_embeddings=64),
                dict(BIG, kv_heads=3), "text")],
    "gemma3_text": [("Gemma3ForCausalLM", "Gemma3ForCausalLM",
                     lambda: transformers.Gemma3TextConfig(**TEXT, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                                           sliding_window_pattern=2, rope_local_base_freq=100.0,
                                                           max_position_embeddings=64), dict(BIG, kv_heads=3),
                     "text")],
}

# OLMo 2: output norms, q/k norms over the whole projection, GQA; GPT-NeoX: fused per-head qkv, partial rotary,
# parallel residual; OPT: positions from the mask (offset 2), pre- and post-LN
BUILDERS["olmo2"] = [("Olmo2ForCausalLM-gqa", "Olmo2ForCausalLM",
                      lambda: transformers.Olmo2Config(**TEXT, num_key_value_heads=2, max_position_embeddings=64),
                      dict(BIG, kv_heads=3), "text")]
BUILDERS["gpt_neox"] = [("GPTNeoXForCausalLM", "GPTNeoXForCausalLM",
                         lambda: transformers.GPTNeoXConfig(**TEXT, max_position_embeddings=64, rotary_pct=0.25),
                         BIG, "text"),
                        ("GPTNeoXForCausalLM-sequential", "GPTNeoXForCausalLM",
                         lambda: transformers.GPTNeoXConfig(**TEXT, max_position_embeddings=64, rotary_pct=0.5,
                                                            use_parallel_residual=False), BIG, "text")]
BUILDERS["opt"] = [("OPTForCausalLM", "OPTForCausalLM",
                    lambda: transformers.OPTConfig(**{k: v for k, v in TEXT.items() if k != "intermediate_size"},
                                                   ffn_dim=37, max_position_embeddings=64), BIG, "text"),
                   ("OPTForCausalLM-post", "OPTForCausalLM",
                    lambda: transformers.OPTConfig(**{k: v for k, v in TEXT.items() if k != "intermediate_size"},
                                                   ffn_dim=37, max_position_embeddings=64, do_layer_norm_before=False),
                    BIG, "text")]

# Qwen3: per-head q/k norms, head_dim 16 apart from width / heads, windows (3 keys, shorter than the inputs' 9) from
# layer 1 on; Phi-3: fused q|k|v (unequal parts) and gate|up, rotary on half of each head, every layer windowed;
# Mistral / Qwen2 (llama.toml): their windows
BUILDERS["qwen3"] = [("Qwen3ForCausalLM-window", "Qwen3ForCausalLM",
                      lambda: transformers.Qwen3Config(**TEXT, num_key_value_heads=2, head_dim=16,
                                                       max_position_embeddings=64, use_sliding_window=True,
                                                       sliding_window=3, max_window_layers=1),
                      dict(BIG, kv_heads=3), "text")]
BUILDERS["phi3"] = [("Phi3ForCausalLM-window", "Phi3ForCausalLM",
                     lambda: transformers.Phi3Config(**TEXT, num_key_value_heads=2, max_position_embeddings=64,
                                                     pad_token_id=0, partial_rotary_factor=0.5, sliding_window=3),
                     dict(BIG, kv_heads=3), "text")]
BUILDERS["llama"] = BUILDERS["llama"] + [
    ("mistral-window", "MistralForCausalLM",
     lambda: transformers.MistralConfig(**TEXT, num_key_value_heads=2, max_position_embeddings=64, sliding_window=3),
     dict(BIG, kv_heads=3), "text"),
    ("qwen2-window", "Qwen2ForCausalLM",
     lambda: transformers.Qwen2Config(**TEXT, num_key_value_heads=2, max_position_embeddings=64,
                                      use_sliding_window=True, sliding_window=3, max_window_layers=1),
     dict(BIG, kv_heads=3), "text")]

# ELECTRA: the discriminator with tables of embedding_size 16 projected into a width of 32 (growth keeps 16, fits by
# distillation); the generator with embedding_size = hidden_size (its tables grow with the width)
ELECTRA = dict(TEXT, max_position_embeddings=64)
BUILDERS["electra"] = [("ElectraForPreTraining-emb16", "ElectraForPreTraining",
                        lambda: transformers.ElectraConfig(**ELECTRA, embedding_size=16), BIG, "text"),
                       ("ElectraForMaskedLM-emb32", "ElectraForMaskedLM",
                        lambda: transformers.ElectraConfig(**ELECTRA, embedding_size=32), BIG, "text")]

CASES = [(family, case) for family in sorted(load_descriptors()) for case in BUILDERS.get(family, [(None,) * 5])]



def inputs(kind: str) -> dict:
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16)}
    ids = torch.randint(3, 99, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hf_output(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def reload_hf(folder):
    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("family,case", CASES, ids=[f"{f}-{c[0]}" for f, c in CASES])
def test_grow_every_family(tmp_path, family, case):
    case_id, cls, make_config, sizes, kind = case
    if case_id is None:
        pytest.fail(f"family {family} has no growth builder in tests/test_growth_families.py; add one")
    model = getattr(transformers, cls)(make_config()).eval()
    model.save_pretrained(tmp_path / "hf")
    src = tmp_path / "hf"
    if family != load(src).family:  # a layout transformers cannot build: convert the HF model into it
        save(load(src), tmp_path / "src", family=family)
        src = tmp_path / "src"
    assert load(src).family == family

    result = grow(src, out=tmp_path / "big", steps=2, batch_size=4, seq_len=16, eval_batches=1, **sizes)
    grown = load(tmp_path / "big")
    assert grown.family == family
    assert (grown.spec.layers, grown.spec.width, grown.spec.heads, grown.spec.mlp) == \
        (sizes["layers"], sizes["width"], sizes["heads"], sizes["mlp"])
    assert grown.spec.head_dim == load(src).spec.head_dim
    weights = grown.materialize()
    for name, value in result.weights.items():  # what was written is what growth made
        assert torch.equal(weights[name], value), name
    report = json.loads((tmp_path / "big" / "growth.json").read_text())
    assert report["steps"] == 2 and report["method"] == "ligo" and report["family"] == family

    hf_folder = tmp_path / "big"
    if family == "timm-vit":  # transformers reads it through the HF layout of the same weights
        save(grown, tmp_path / "big-hf", family="hf-vit")
        hf_folder = tmp_path / "big-hf"
    hf = reload_hf(hf_folder)
    x = inputs(kind)
    with torch.no_grad():
        out = forward(grown.spec, weights, **x)
    ours = out["logits"] if "logits" in out else out["hidden"]
    theirs = hf_output(hf, x)
    if kind == "text":  # padded places are not compared (their values are undefined for causal models)
        keep = x["attention_mask"].bool()
        ours, theirs = ours[keep], theirs[keep]
    assert max_diff(theirs, ours) <= 1e-5
