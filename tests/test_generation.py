"""Generation with a key/value cache: a causal LM pretrained on the embedded text (so its greedy path is not one
repeated token) exports one cache graph whose greedy tokens are transformers' `generate`'s; `ligo-convert generate`
prints the same text on both engines; a graph whose cache is wrong fails validation though its prefill is right."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import transformers
from click.testing import CliRunner

from ligo_convert import export as ex
from ligo_convert import load
from ligo_convert.cli import main
from ligo_convert.data import TextEncoder
from ligo_convert.generate import generate

PROMPT = "import os\ndef "


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def micro_llama(tmp_path_factory):
    """A 2-layer LLaMA (rotary, SwiGLU, RMSNorm) trained for 300 steps on the standard library's source, and its
    cache graph (grouped-query attention and every other causal family: tests/test_export.py)."""
    folder = tmp_path_factory.mktemp("gen") / "micro-llama"
    result = invoke("pretrain", folder, "--family", "llama", "--steps", 300)
    assert result.exit_code == 0, result.output
    report = ex.export_onnx(folder, folder.parent / "model.onnx")
    assert report.ok, report.failure()
    return folder, report


def test_pretrained_model_decodes_what_transformers_generates(micro_llama):
    folder, report = micro_llama
    assert report.kv_cache
    generation = [c for c in report.checks if "new_tokens" in c.shapes]
    assert generation and generation[0].shapes["new_tokens"] == [ex.GENERATION_TOKENS]
    assert generation[0].mismatch is None and generation[0].diffs["logits"] <= 1e-4

    # the prompt as text, through the cache graph, against transformers' own model on the same files
    spec = load(folder).spec
    ids = [TextEncoder(spec, folder).encode(PROMPT).tolist()]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None
    expected = model.generate(torch.tensor(ids), attention_mask=torch.ones(1, len(ids[0]), dtype=torch.long),
                              max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(ids[0]):].tolist()
    ours = generate(report.path, PROMPT, 24, engine="onnx", stop_at_eos=False)
    assert ours.tokens == expected
    assert len(set(expected)) >= 5, expected  # a real continuation, not one token repeated


def test_generate_prints_the_same_text_on_both_engines(micro_llama):
    folder, report = micro_llama
    runs = {}
    for engine, model in (("torch", folder), ("onnx", folder), ("onnx-file", report.path)):
        result = invoke("generate", model, "--prompt", PROMPT, "--max-new-tokens", 20, "--engine",
                        engine.removesuffix("-file"), "--json")
        assert result.exit_code == 0, result.output
        runs[engine] = json.loads(result.stdout)
    assert runs["torch"]["tokens"] == runs["onnx"]["tokens"] == runs["onnx-file"]["tokens"]
    assert runs["torch"]["text"] == runs["onnx"]["text"] and len(runs["torch"]["tokens"]) == 20
    assert runs["torch"]["tokenizer"] == "bytes" and runs["torch"]["text"].strip()

    plain = invoke("generate", folder, "--prompt", PROMPT, "--max-new-tokens", 20)
    assert plain.exit_code == 0 and plain.stdout == PROMPT + runs["torch"]["text"] + "\n"


def test_a_graph_without_a_cache_generates_the_same(micro_llama, tmp_path):
    folder, _ = micro_llama
    out = tmp_path / "plain.onnx"
    result = invoke("export", folder, "--out", out, "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inputs"] == ["input_ids", "attention_mask"] and report["kv_cache"] is False
    assert generate(out, PROMPT, 12, engine="onnx").tokens == generate(folder, PROMPT, 12).tokens


def _swap_first_cache_concat(path):
    """Tamper the file so layer 0 appends its new keys BEFORE the past: the prefill (an empty past) is unchanged,
    every decoding step is wrong."""
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.op_type == "Concat" and "present.0.key" in n.output)
    node.input[0], node.input[1] = node.input[1], node.input[0]
    onnx.save(proto, str(path))


def test_a_wrong_cache_fails_validation_though_the_prefill_is_right(micro_llama, tmp_path, monkeypatch):
    folder, report = micro_llama
    tampered = tmp_path / "tampered.onnx"
    tampered.write_bytes(open(report.path, "rb").read())
    _swap_first_cache_concat(tampered)
    checked = ex.check_onnx(tampered, folder)
    assert not checked.ok
    prefill = [c for c in checked.checks if c.shapes.get("past") == [0]]
    decoding = [c for c in checked.checks if c not in prefill]
    assert prefill and all(c.passed(1e-4) for c in prefill)
    assert decoding and not any(c.passed(1e-4) for c in decoding)

    # the same fault at export: exit 1, the file renamed, the reason printed
    write = ex._write

    def faulty_write(program, out, meta, data_name):
        write(program, out, meta, data_name)
        _swap_first_cache_concat(out)

    monkeypatch.setattr(ex, "_write", faulty_write)
    out = tmp_path / "model.onnx"
    result = invoke("export", folder, "--out", out)
    assert result.exit_code == 1
    assert not out.exists() and (tmp_path / "model.invalid.onnx").exists()
    assert "renamed" in result.stderr and "past=" in result.output


def test_float16_cache_graph_is_validated(micro_llama, tmp_path):
    folder, _ = micro_llama
    report = ex.export_onnx(folder, tmp_path / "half.onnx", dtype="float16")
    assert report.ok, report.failure()
    assert report.kv_cache and report.max_diff <= ex.DEFAULT_ATOL["float16"]


@pytest.mark.parametrize("args, text", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be a whole number"),
    (["--engine", "tensorrt"], "unknown engine 'tensorrt'"),
    (["--max-new-tokens", "500"], "--max-new-tokens"),
    (["--prompt", ""], "the prompt is empty"),
])
def test_bad_generate_options(tmp_path, args, text):
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2,
                                                         n_positions=64)).save_pretrained(folder)
    argv = ["generate", folder, "--prompt", "x", *args] if "--prompt" not in args else ["generate", folder, *args]
    result = invoke(*argv)
    assert result.exit_code == 2, result.output
    assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_generate_needs_a_causal_lm(tmp_path):
    folder = tmp_path / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=37)
                                 ).save_pretrained(folder)
    result = invoke("generate", folder, "--prompt", "hello")
    assert result.exit_code == 2 and "needs a causal LM" in result.stderr
