"""A real client of the ``hub`` layout: optimum's ORTModelFor* and onnxruntime-genai load what
:func:`ligo_convert.layout.export_hub` writes, and give our outputs and our greedy tokens.

This runs in its own tox environment (``tox -e optimum``): optimum-onnx pins transformers < 4.58, the main suite runs
transformers 5.  The causal LMs are pretrained here on the embedded text (the standard library's source) so that their
greedy path is not one repeated token; the encoder and the classifier have random weights (their outputs, not a
path, are compared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from ligo_convert import from_tensors, init_weights, load, save
from ligo_convert.generate import generate
from ligo_convert.growth.pretrain import micro_spec, pretrain
from ligo_convert.layout import export_hub
from ligo_convert.model import forward

# Two prompts per model: together their continuations must hold several distinct tokens (a non-degenerate path).
PROMPTS = ("import os\ndef ", "if __name__ == ")
NEW_TOKENS = 16
ATOL = 1e-4


def build(folder: Path, spec, weights, family: str) -> tuple[Path, Path]:
    """Save the model in its family's layout, export the hub layout beside it; (model folder, hub folder)."""
    save(from_tensors(spec, weights, family=family), folder)
    hub = folder.with_name(folder.name + "-hub")
    report = export_hub(folder, hub)
    assert report.ok, report.failure()
    return folder, hub


@pytest.fixture(scope="module", params=[("hf-gpt2", 0), ("llama", 2)], ids=["gpt2", "llama-gqa"])
def causal(request, tmp_path_factory):
    """A 2-layer causal LM trained briefly on the embedded text (LLaMA: 4 query heads sharing 2 key/value heads,
    rotary, SwiGLU) and its hub layout with the key/value cache graph."""
    family, kv_heads = request.param
    spec = micro_spec(family, kv_heads=kv_heads)
    weights, losses = pretrain(spec, steps=150, batch_size=32, lr=3e-3)
    assert losses[-1] < losses[0] - 2, losses[::30]  # it learned something
    return build(tmp_path_factory.mktemp(family) / family, spec, weights, family)


def ours(hub: Path, prompt: str):
    """Our own greedy decoding through the hub's cache graph (ligo_convert.generate, engine onnx)."""
    return generate(hub / "onnx" / "model.onnx", prompt, NEW_TOKENS, engine="onnx", stop_at_eos=False)


def greedy_hf(model, prompt_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None, use_cache=True)
    return out[0, len(prompt_ids):].tolist()


def test_optimum_causal_lm_generates_our_tokens(causal):
    from optimum.onnxruntime import ORTModelForCausalLM

    folder, hub = causal
    optimum = ORTModelForCausalLM.from_pretrained(hub, use_cache=True)
    assert optimum.use_cache  # it found our past_key_values inputs and runs through them
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    seen = set()
    for prompt in PROMPTS:
        mine = ours(hub, prompt)
        assert len(mine.tokens) == NEW_TOKENS
        assert greedy_hf(optimum, mine.prompt_tokens) == mine.tokens, prompt
        assert greedy_hf(reference, mine.prompt_tokens) == mine.tokens, prompt
        seen.update(mine.tokens)
    assert len(seen) >= 5, seen  # a real continuation, not one token repeated


def test_optimum_causal_lm_logits_match_ours(causal):
    from optimum.onnxruntime import ORTModelForCausalLM

    folder, hub = causal
    model = load(folder)
    optimum = ORTModelForCausalLM.from_pretrained(hub, use_cache=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.spec.vocab_size, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as batched generation pads
    got = optimum(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        want = forward(model.spec, model.materialize(torch.float32), input_ids=ids, attention_mask=mask)["logits"]
    keep = mask.bool()
    assert (got[keep] - want[keep]).abs().max().item() <= ATOL


def test_optimum_feature_extraction_matches_ours(tmp_path):
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    spec = micro_spec("hf-bert").replace(head="none")
    folder, hub = build(tmp_path / "bert", spec, init_weights(spec, seed=1), "hf-bert")
    optimum = ORTModelForFeatureExtraction.from_pretrained(hub)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, spec.vocab_size, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    types = torch.zeros_like(ids)
    got = optimum(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    model = load(folder)
    with torch.no_grad():
        want = forward(spec, model.materialize(torch.float32), input_ids=ids, attention_mask=mask,
                       token_type_ids=types)["hidden"]
    keep = mask.bool()
    assert got.shape == want.shape
    assert (got[keep] - want[keep]).abs().max().item() <= ATOL


def test_optimum_image_classification_matches_ours(tmp_path):
    from optimum.onnxruntime import ORTModelForImageClassification

    spec = micro_spec("hf-vit")
    folder, hub = build(tmp_path / "vit", spec, init_weights(spec, seed=2), "hf-vit")
    optimum = ORTModelForImageClassification.from_pretrained(hub)
    pixels = torch.randn(3, spec.num_channels, spec.image_size, spec.image_size,
                         generator=torch.Generator().manual_seed(5))
    got = optimum(pixel_values=pixels).logits
    with torch.no_grad():
        want = forward(spec, load(folder).materialize(torch.float32), pixel_values=pixels)["logits"]
    assert got.shape == (3, spec.num_classes)
    assert (got - want).abs().max().item() <= ATOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_onnxruntime_genai_generates_our_tokens(causal):
    """onnxruntime-genai reads genai_config.json and runs our cache graph as it is (no graph of its own builder)."""
    import onnxruntime_genai as og

    folder, hub = causal
    if load(folder).family != "llama":  # only descriptors that name a genai model type get the file
        assert not (hub / "genai_config.json").exists()
        return
    model = og.Model(str(hub))
    for prompt in PROMPTS:
        mine = ours(hub, prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(mine.prompt_tokens) + NEW_TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens([mine.prompt_tokens])
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        assert tokens == mine.tokens, prompt
