"""ONNX export: every family exports through the one canonical forward, the file matches transformers' own model at
shapes never used at export, and validation fails loudly (exit 1, file renamed) when the file drifts."""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from click.testing import CliRunner
from onnx import numpy_helper

from ligo_convert import LigoError, Spec, from_tensors, init_weights, load, save
from ligo_convert import export as ex
from ligo_convert.evaluate import evaluate
from ligo_convert.cli import main
from ligo_convert.descriptors import load_descriptors

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
              patch_size=4, num_labels=5)

# case -> (family, transformers class, config, family to convert into before export or None)
CASES = {
    "vit": ("hf-vit", "ViTForImageClassification", transformers.ViTConfig(**VISION), None),
    "deit": ("hf-deit", "DeiTForImageClassificationWithTeacher", transformers.DeiTConfig(**VISION), None),
    "timm-vit": ("timm-vit", "ViTForImageClassification", transformers.ViTConfig(**VISION, layer_norm_eps=1e-6),
                 "timm-vit"),
    "bert": ("hf-bert", "BertModel", transformers.BertConfig(**TEXT, max_position_embeddings=64), None),
    "roberta": ("hf-roberta", "RobertaForMaskedLM", transformers.RobertaConfig(**TEXT, max_position_embeddings=66),
                None),
    "xlm-roberta": ("xlm-roberta", "XLMRobertaForMaskedLM",
                    transformers.XLMRobertaConfig(**TEXT, max_position_embeddings=66), None),
    "camembert": ("camembert", "CamembertModel", transformers.CamembertConfig(**TEXT, max_position_embeddings=66),
                  None),
    "distilbert": ("distilbert", "DistilBertForMaskedLM",
                   transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                                 max_position_embeddings=64), None),
    "gpt2": ("hf-gpt2", "GPT2LMHeadModel", transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                                                   n_positions=64), None),
    "llama": ("llama", "LlamaForCausalLM", transformers.LlamaConfig(**TEXT, num_key_value_heads=2,
                                                                    max_position_embeddings=64), None),
    # per-head q/k norms, head_dim 16 on a width of 32, a window of 3 keys on layer 1
    "qwen3": ("qwen3", "Qwen3ForCausalLM", transformers.Qwen3Config(
        **TEXT, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, use_sliding_window=True,
        sliding_window=3, max_window_layers=1), None),
    # fused q|k|v (unequal parts) and gate|up, rotary on half of each head, every layer windowed
    "phi3": ("phi3", "Phi3ForCausalLM", transformers.Phi3Config(
        **TEXT, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, partial_rotary_factor=0.5,
        sliding_window=3), None),
    # DINOv2: LayerScale, classifier on [cls; mean of patches] (the ONNX file takes the configured image size only);
    # CLIP: pre-norm on the embeddings, quick_gelu, post-norm on the pooled token, causal text pooled at the highest id
    # (eos_token_id 2).  The projection classes and headless SigLIP (no pooler_output): tests/test_family_clip.py
    "dinov2": ("dinov2", "Dinov2ForImageClassification", transformers.Dinov2Config(**VISION), None),
    "clip-vision": ("clip-vision", "CLIPVisionModel", transformers.CLIPVisionConfig(**VISION), None),
    "clip-text": ("clip-text", "CLIPTextModel", transformers.CLIPTextConfig(**TEXT, max_position_embeddings=32,
                                                                             eos_token_id=2), None),
    # Gemma: (1 + w) norms, sqrt(width) embedding scale, multi-query; Gemma 2/3: sandwich norms, windows (5) shorter
    # than the checked sequences, soft caps, q/k norms, a local rotary base (eager: transformers' SDPA lacks caps)
    "gemma": ("gemma", "GemmaForCausalLM", transformers.GemmaConfig(**TEXT, num_key_value_heads=1, head_dim=16,
                                                                    max_position_embeddings=64), None),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", transformers.Gemma2Config(
        **TEXT, num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=12,
        attn_logit_softcapping=5.0, final_logit_softcapping=8.0, max_position_embeddings=64,
        attn_implementation="eager"), None),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", transformers.Gemma3TextConfig(
        **TEXT, num_key_value_heads=2, head_dim=16, sliding_window=5,
        sliding_window_pattern=2, rope_local_base_freq=100.0, final_logit_softcapping=8.0,
        max_position_embeddings=64, attn_implementation="eager"), None),
    # OLMo 2: output norms, q/k norms over the projection, GQA; GPT-NeoX: per-head fused qkv, partial rotary,
    # parallel residual; OPT: learned positions counted from the attention mask (offset 2)
    "olmo2": ("olmo2", "Olmo2ForCausalLM", transformers.Olmo2Config(**TEXT, num_key_value_heads=2,
                                                                    max_position_embeddings=64), None),
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", transformers.GPTNeoXConfig(**TEXT, max_position_embeddings=64,
                                                                              rotary_pct=0.25), None),
    "opt": ("opt", "OPTForCausalLM", transformers.OPTConfig(
        **{k: v for k, v in TEXT.items() if k != "intermediate_size"}, ffn_dim=37, max_position_embeddings=64),
        None),
    # ELECTRA: tables of embedding_size 16 projected into the width of 32; the discriminator's one logit per token
    # (batch x sequence), the generator's MLM head in the embedding space (gelu, tied decoder)
    "electra": ("electra", "ElectraForPreTraining", transformers.ElectraConfig(**TEXT, embedding_size=16,
                                                                               max_position_embeddings=64), None),
    "electra-generator": ("electra", "ElectraForMaskedLM", transformers.ElectraConfig(
        **TEXT, embedding_size=16, max_position_embeddings=64), None),
}


def need(family: str) -> None:
    if family not in load_descriptors():
        pytest.skip(f"descriptor {family} not written yet")


def build(tmp_path, case: str):
    """A tiny transformers model saved in its family's files (timm: converted from HF), with random norms and
    biases so that a dropped or swapped tensor shows."""
    family, cls, config, convert_to = CASES[case]
    need(family)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.1)
    model.save_pretrained(tmp_path / "hf")
    src = tmp_path / "hf"
    if convert_to:
        src = save(load(src), tmp_path / convert_to, family=convert_to)
    return model, src


def hf_inputs(spec: Spec, batch: int, seq: int) -> dict:
    if spec.input == "patches":
        return {"pixel_values": torch.randn(batch, spec.num_channels, spec.image_size, spec.image_size)}
    x = ex.example_inputs(spec, batch, seq, seed=7)
    x["input_ids"] = torch.where(x["attention_mask"].bool(), x["input_ids"].clamp(min=3),
                                 x["input_ids"])  # no special ids among real tokens
    return x


def hf_outputs(model, x: dict) -> dict:
    with torch.no_grad():
        out = model(**x)
    if getattr(out, "logits", None) is not None:
        return {"logits": out.logits}
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers_at_unseen_shapes(tmp_path, case):
    model, src = build(tmp_path, case)
    ours = load(src)
    assert ours.family == CASES[case][0]
    report = ex.export_onnx(src, tmp_path / "m.onnx")
    assert report.ok, report.failure()
    assert report.path == str(tmp_path / "m.onnx") and report.external_data is None
    spec = ours.spec

    # validation ran at >= 3 shapes, batch 1 among them, and sequence lengths the export never saw
    assert len(report.checks) >= 3
    first = ex.input_names(spec)[0]
    shaped = [c for c in report.checks if first in c.shapes]  # (a cache graph's generation check has its own)
    assert any(c.shapes[first][0] == 1 for c in shaped)
    if spec.input == "tokens":
        assert {c.shapes[first][1] for c in shaped} - {ex.EXPORT_SEQ}
    assert report.max_diff <= 1e-4

    # inputs, outputs and dynamic axes follow from the spec
    proto = onnx.load(str(tmp_path / "m.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    if spec.input == "patches":
        assert list(dims) == ["pixel_values"]
        # the image size is fixed, except where the model resamples its positions (DINOv2): any height and width
        size = ["height", "width"] if spec.interpolate_positions else [16, 16]
        assert isinstance(dims["pixel_values"][0], str) and dims["pixel_values"][1:] == [3, *size]
    elif ex.has_cache(spec):  # causal LMs: one graph with a key/value cache, in optimum's names and axes
        want = ["input_ids", "attention_mask", "position_ids"] + [
            f"past_key_values.{i}.{kv}" for i in range(spec.layers) for kv in ("key", "value")]
        assert list(dims) == want and report.kv_cache
        assert dims["attention_mask"] == ["batch", "past_sequence + sequence"]
        assert dims["past_key_values.0.key"] == ["batch", spec.kv_heads, "past_sequence", spec.head_dim]
    else:
        want = ["input_ids", "attention_mask"] + (["token_type_ids"] if spec.type_vocab_size else [])
        assert list(dims) == want
        assert all(isinstance(d, str) for v in dims.values() for d in v)
    assert [o.name for o in proto.graph.output] == report.outputs
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ligo_convert.family"] == CASES[case][0]
    assert meta["ligo_convert.source"] == str(src)
    assert Spec.from_dict(json.loads(meta["ligo_convert.spec"])) == spec

    # the file against transformers' own model, at a shape used neither at export nor in validation
    x = hf_inputs(spec, 4, 17)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in x.items()}
    if report.kv_cache:  # the prefill: an empty past, positions counted from 0
        feed["position_ids"] = np.broadcast_to(np.arange(17), (4, 17)).copy()
        feed.update({f"past_key_values.{i}.{kv}": np.zeros((4, spec.kv_heads, 0, spec.head_dim), np.float32)
                     for i in range(spec.layers) for kv in ("key", "value")})
    got = dict(zip(report.outputs, session.run(None, feed)))
    for name, expected in hf_outputs(model, x).items():
        value = torch.from_numpy(got[name])
        if "attention_mask" in x and value.dim() == 3:  # padded places are not part of the answer
            keep = x["attention_mask"].bool()
            value, expected = value[keep], expected[keep]
        assert (value - expected).abs().max().item() <= 1e-4, name

    # `eval` on both engines: the exported file alone (spec from its metadata) gives the torch run's numbers
    if spec.head in ("mlm", "lm") or spec.head == "classifier" and spec.input == "patches":
        # a head with fewer classes than the digits reads an image folder of as many digit classes
        few = spec.head == "classifier" and spec.num_classes < DIGIT_CLASSES
        data = digit_folder(tmp_path / "digits", spec.num_classes) if few else None
        torch_run = evaluate(src, data, engine="torch", max_batches=1, batch_size=4, seq_len=16)
        onnx_run = evaluate(tmp_path / "m.onnx", data, engine="onnx", max_batches=1, batch_size=4, seq_len=16)
        assert torch_run["count"] == onnx_run["count"] > 0
        assert abs(torch_run["loss"] - onnx_run["loss"]) <= 1e-4 * max(1.0, abs(torch_run["loss"]))


    # a causal LM's cache graph decodes greedily what transformers' `generate` decodes, for a left-padded batch at a
    # batch size and prompt length the export never saw
    if report.kv_cache:
        prompts = hf_inputs(spec, 3, 6)
        prompts["attention_mask"] = prompts["attention_mask"].flip(-1)  # left padding, as generate pads
        prompts["input_ids"] = prompts["input_ids"].flip(-1)
        assert onnx_greedy(session, spec, prompts, 16) == hf_greedy(model, prompts, 16)


def onnx_greedy(session, spec, prompts: dict, new: int) -> list[list[int]]:
    """Greedy decoding through the graph's cache: the prompt once, then one token a step (written out here rather
    than with the library's loop, so the test does not grade the code it tests)."""
    ids, mask = prompts["input_ids"].numpy(), prompts["attention_mask"].numpy()
    batch = ids.shape[0]
    past = {f"past_key_values.{i}.{kv}": np.zeros((batch, spec.kv_heads, 0, spec.head_dim), np.float32)
            for i in range(spec.layers) for kv in ("key", "value")}
    out, feed_ids = [], ids
    for _ in range(new):
        positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)[:, -feed_ids.shape[1]:]
        got = session.run(None, {"input_ids": feed_ids, "attention_mask": mask, "position_ids": positions, **past})
        token = got[0][:, -1].argmax(-1)
        out.append(token)
        past = dict(zip(past, got[1:]))
        feed_ids, mask = token[:, None], np.concatenate([mask, np.ones((batch, 1), mask.dtype)], 1)
    return np.stack(out, 1).tolist()


def hf_greedy(model, prompts: dict, new: int) -> list[list[int]]:
    model.generation_config.eos_token_id = None  # exactly `new` tokens, no early stop
    out = model.generate(**prompts, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, prompts["input_ids"].shape[1]:].tolist()


# `eval` needs a task head the data fits: an LM or MLM head on the embedded text, an image classifier on the digits
# (or an image folder of its first classes); a bare encoder or tower has no metric, ELECTRA's discriminator needs a
# generator's tokens
DIGIT_CLASSES = 10


def digit_folder(folder, classes: int):
    """An image folder of the embedded digits' first ``classes`` classes, 5 images each (one is held out)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        (folder / f"digit{c}").mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(digits.target == c)[:5]):
            pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(folder / f"digit{c}" / f"{k}.png")
    return folder


def test_grown_model_exports(tmp_path):
    from ligo_convert.grow import grow

    _, src = build(tmp_path, "gpt2")
    result = grow(src, layers=3, width=48, heads=6, mlp=192, out=tmp_path / "grown", steps=0)
    grown = load(result.out)
    assert (grown.spec.layers, grown.spec.width, grown.spec.heads) == (3, 48, 6)
    report = ex.export_onnx(grown, tmp_path / "grown.onnx")
    assert report.ok, report.failure()
    # in memory too, straight from the growth result, with its own source note
    in_memory = from_tensors(result.spec, result.weights, result.family)
    report = ex.export_onnx(in_memory, tmp_path / "mem.onnx", source="grown from test")
    assert report.ok, report.failure()
    assert ex.read_metadata(tmp_path / "mem.onnx")["source"] == "grown from test"


# --- validation fails loudly ---------------------------------------------------------------------------------------


def tamper(path, out=None) -> str:
    """Change ONE number of the largest weight matrix in an ONNX file; returns the initializer's name."""
    proto = onnx.load(str(path))
    target = max((t for t in proto.graph.initializer if len(t.dims) == 2), key=lambda t: t.dims[0] * t.dims[1])
    array = numpy_helper.to_array(target).copy()
    array[0, 0] += 0.5
    target.CopyFrom(numpy_helper.from_array(array, target.name))
    onnx.save(proto, str(out or path))
    return target.name


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    transformers.BertForMaskedLM(transformers.BertConfig(**TEXT, max_position_embeddings=64)).save_pretrained(
        tmp / "src")
    return tmp / "src"


def test_tampered_file_is_caught(tmp_path, bert):
    runner = CliRunner()
    good = tmp_path / "good.onnx"
    result = runner.invoke(main, ["export", str(bert), "--out", str(good)])
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output and result.output.count(" ok\n") >= 3
    result = runner.invoke(main, ["export", str(bert), "--out", str(good), "--validate-only"])
    assert result.exit_code == 0, result.output

    bad = tmp_path / "bad.onnx"
    tamper(good, bad)
    result = runner.invoke(main, ["export", str(bert), "--out", str(bad), "--validate-only"])
    assert result.exit_code == 1
    assert "validation failed: logits differs from PyTorch" in result.stderr
    assert bad.exists()  # a file the user owns is reported, not moved


def test_drift_during_export_exits_1_and_renames(tmp_path, bert, monkeypatch):
    """An exporter that writes a file differing from PyTorch: the command says so, exits 1, and no file looks
    valid (the stand-in for numeric drift is one tampered weight)."""
    write = ex._write

    def drifting_write(program, out, meta, data_name):
        write(program, out, meta, data_name)
        tamper(out)

    monkeypatch.setattr(ex, "_write", drifting_write)
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", str(bert), "--out", str(out)])
    assert result.exit_code == 1
    invalid = tmp_path / "model.invalid.onnx"
    assert not out.exists() and invalid.exists()
    assert f"renamed {invalid}" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["model.invalid.onnx"]  # no temporary file left


def test_float16_export_is_validated_against_float32(tmp_path):
    need("hf-gpt2")
    _, src = build(tmp_path, "gpt2")
    report = ex.export_onnx(src, tmp_path / "half.onnx", dtype="float16")
    assert report.ok, report.failure()
    assert report.atol == ex.DEFAULT_ATOL["float16"] > ex.DEFAULT_ATOL["float32"]
    assert 1e-6 < report.max_diff <= report.atol  # really rounded: not compared with itself
    proto = onnx.load(str(tmp_path / "half.onnx"))
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert ex.read_metadata(tmp_path / "half.onnx")["dtype"] == "float16"


def test_large_models_write_one_external_data_file(tmp_path, bert, monkeypatch):
    monkeypatch.setattr(ex, "EXTERNAL_DATA_THRESHOLD", 0)  # as if the weights were over 2 GB
    report = ex.export_onnx(bert, tmp_path / "big.onnx")
    assert report.ok and report.external_data == "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    graph = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False).graph
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    # the weight matrices live in the data file; only tiny tensors (below onnx's size threshold) stay inline
    assert external and all(len(t.raw_data) < 1024 for t in inline)


def test_json_report(tmp_path, bert):
    result = CliRunner().invoke(main, ["export", str(bert), "--out", str(tmp_path / "m.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["outputs"] == ["logits"] and len(report["checks"]) == 3
    assert report["checks"][0]["provider"] == "CPUExecutionProvider"


# --- errors: one line, exit 2, nothing written -------------------------------------------------------------------


def one_line_error(result, text: str):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr


@pytest.mark.parametrize("args, text", [
    (["--dtype", "bfloat16"], "cannot export as bfloat16"),
    (["--opset", "13"], "opset 13 is not supported"),
])
def test_bad_options(tmp_path, bert, args, text):
    result = CliRunner().invoke(main, ["export", str(bert), "--out", str(tmp_path / "m.onnx"), *args])
    one_line_error(result, text)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime(tmp_path, bert, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    result = CliRunner().invoke(main, ["export", str(bert), "--out", str(tmp_path / "m.onnx")])
    one_line_error(result, "onnxruntime is not installed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept(tmp_path, bert):
    (tmp_path / "m.onnx").write_text("mine")
    result = CliRunner().invoke(main, ["export", str(bert), "--out", str(tmp_path / "m.onnx")])
    one_line_error(result, "exists; pass --overwrite to replace it")
    assert (tmp_path / "m.onnx").read_text() == "mine"


def test_models_the_exporter_cannot_take(tmp_path, bert, monkeypatch):
    # an ONNX file is not a model to export
    (tmp_path / "x.onnx").write_bytes(b"")
    one_line_error(CliRunner().invoke(main, ["export", str(tmp_path / "x.onnx"), "--out", str(tmp_path / "y.onnx")]),
                   "expected a checkpoint folder")
    spec = Spec(layers=1, width=16, heads=2, head_dim=8, mlp=32, vocab_size=50, max_positions=32, causal=True,
                head="lm")
    # tensors that disagree with the spec (e.g. a half-finished growth)
    weights = init_weights(spec)
    weights["layers.0.fc1.weight"] = torch.zeros(31, 16)
    with pytest.raises(LigoError, match=r"tensor layers.0.fc1.weight has shape \(31, 16\)"):
        ex.export_onnx(from_tensors(spec, weights, "hf-gpt2"), tmp_path / "a.onnx")
    # a position table too short for a dynamic sequence axis
    short = spec.replace(max_positions=1)
    with pytest.raises(LigoError, match="allows only 1 token"):
        ex.export_onnx(from_tensors(short, init_weights(short), "hf-gpt2"), tmp_path / "b.onnx")

    # whatever torch.export itself refuses comes back as one line
    def refuse(*args, **kwargs):
        raise RuntimeError("Could not guard on data-dependent expression\nlong trace...")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(LigoError, match="^the ONNX exporter cannot take this model") as info:
        ex.export_onnx(from_tensors(spec, init_weights(spec), "hf-gpt2"), tmp_path / "c.onnx")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


def test_check_onnx_refuses_a_file_of_another_model(tmp_path, bert):
    spec = Spec(layers=1, width=16, heads=2, head_dim=8, mlp=32, input="patches", image_size=8, patch_size=4,
                num_channels=3, cls_token=True, head="classifier", num_classes=3)
    vit = from_tensors(spec, init_weights(spec), "hf-vit")
    assert ex.export_onnx(vit, tmp_path / "vit.onnx").ok
    with pytest.raises(LigoError, match="do not match this model"):
        ex.check_onnx(tmp_path / "vit.onnx", bert)
    assert np.isfinite(ex.check_onnx(tmp_path / "vit.onnx", vit).max_diff)


# --- the graph onnxruntime runs fast --------------------------------------------------------------------------------


def test_linears_are_gemm_with_bias_and_gelu_is_one_op(tmp_path):
    """Every biased linear is ONE Gemm (bias fused), not a 3-D MatMul plus an Add; at the default opset GELU is one
    Gelu node, not Div/Erf/Add/Mul/Mul; opset 18 (no Gelu op) still exports and validates."""
    need("hf-vit")
    spec = Spec(width=32, heads=4, head_dim=8, mlp=64, layers=2, input="patches", image_size=16, patch_size=4,
                num_channels=3, cls_token=True, head="classifier", num_classes=5)
    weights = init_weights(spec, seed=1)
    g = torch.Generator().manual_seed(2)
    for name in weights:  # non-zero biases: the exporter drops an all-zero one, which would hide a missing fusion
        if name.endswith("bias"):
            weights[name] = torch.randn(weights[name].shape, generator=g) * 0.1
    model = from_tensors(spec, weights, "hf-vit")
    for opset in (ex.DEFAULT_OPSET, 18):
        report = ex.export_onnx(model, tmp_path / f"vit{opset}.onnx", opset=opset)
        assert report.ok and report.opset == opset, report.failure()
        ops = [n.op_type for n in onnx.load(report.path).graph.node]
        assert ops.count("Gemm") == 6 * spec.layers + 1  # q, k, v, o, fc1, fc2 per layer, and the classifier
        assert all(len(n.input) == 3 for n in onnx.load(report.path).graph.node if n.op_type == "Gemm")
        assert ops.count("MatMul") == 2 * spec.layers  # only the attention's scores and mix remain MatMuls
        if opset >= 20:
            assert ops.count("Gelu") == spec.layers and "Erf" not in ops
        else:
            assert ops.count("Erf") == spec.layers
    assert ex.DEFAULT_OPSET >= 20  # the default has the Gelu op


def test_single_threaded_cpu_sessions_leave_out_the_slow_fusion(tmp_path):
    # SkipLayerNormFusion is slower than the ops it fuses on one CPU thread, faster on more (results/onnx_vs_optimum.md)
    assert ex.session_kwargs("CUDAExecutionProvider", 1) == {}
    # a residual add + LayerNorm: onnxruntime fuses it unless the name we pass really switches the fusion off
    shape = [1, 4, 8]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "skip"], ["sum"]),
         onnx.helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)], "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in ("x", "skip")],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.ones(8, np.float32), "gamma"), numpy_helper.from_array(np.zeros(8, np.float32),
                                                                                          "beta")])
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))

    def ops_after_optimisation(threads):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(tmp_path / f"opt{threads}.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                             **ex.session_kwargs("CPUExecutionProvider", threads))
        return [n.op_type for n in onnx.load(str(tmp_path / f"opt{threads}.onnx")).graph.node]

    assert "SkipLayerNormalization" not in ops_after_optimisation(1)
    assert "SkipLayerNormalization" in ops_after_optimisation(2)


# --- deep models from one traced block ------------------------------------------------------------------------------

@pytest.mark.parametrize("case, cache, traces", [
    ("gpt2", True, 3),     # start, one block for both layers, finish
    ("qwen3", True, 4),    # layer 0 full attention, layer 1 windowed: one block of each kind
    ("dinov2", False, 3),  # images of any size: the patch grid's axes follow height and width
    ("clip-text", False, 3),  # pooled at the end-of-text token: the finish reads input_ids
])
def test_stitched_graph_is_the_single_trace(tmp_path, monkeypatch, case, cache, traces):
    """The exporter traces one block per kind of layer and copies it per layer: the graph computes what one trace
    of the whole forward computes (the same ops, the same outputs at shapes not used at export)."""
    from ligo_convert import stitch

    _, src = build(tmp_path, case)
    model = load(src)
    weights = model.materialize(torch.float32)
    calls = []
    export_piece = stitch._export
    monkeypatch.setattr(stitch, "_export", lambda *a, **k: calls.append(1) or export_piece(*a, **k))
    stitched = ex.trace(model.spec, weights, ex.DEFAULT_OPSET, cache)
    assert len(calls) == traces
    single = ex.trace(model.spec, weights, ex.DEFAULT_OPSET, cache, stitched=False)
    assert [(v.name, str(v.shape)) for v in stitched.graph.inputs] == \
        [(v.name, str(v.shape)) for v in single.graph.inputs]
    assert [(v.name, str(v.shape)) for v in stitched.graph.outputs] == \
        [(v.name, str(v.shape)) for v in single.graph.outputs]

    def compute_ops(m):  # each traced piece reads its input's shape again: a few more integer ops when stitched
        return sorted(n.op_type for n in m.graph if any(o.dtype and o.dtype.is_floating_point() for o in n.outputs))

    assert len(compute_ops(single)) > 10 * model.spec.layers and compute_ops(stitched) == compute_ops(single)
    import onnx_ir as ir

    sessions = []
    for name, m in (("stitched", stitched), ("single", single)):
        ir.save(m, tmp_path / f"{name}.onnx")
        sessions.append(ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]))
    spec = model.spec
    for batch, seq in [(1, 5), (3, 11)]:
        if cache:
            feed = ex.cache_inputs(spec, batch, seq, past=4, pad_left=2)
        elif spec.input == "patches":
            feed = ex.example_inputs(spec, batch, (spec.image_size + spec.patch_size, spec.image_size))
        else:
            feed = ex.example_inputs(spec, batch, seq)
        feed = {k: v.numpy() for k, v in feed.items()}
        for a, b in zip(*(s.run(None, feed) for s in sessions)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
