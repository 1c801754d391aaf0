"""The hub ONNX layout (ligo_convert.layout): the folder transformers.js / optimum load, genai_config.json for
LLaMA-style decoders, atomic staging, refusals before work, and the export / grow CLI."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from click.testing import CliRunner
from onnx import numpy_helper

from ligo_convert import export as ex
from ligo_convert import export_hub, load
from ligo_convert.cli import main
from ligo_convert.descriptors import get_descriptor
from ligo_convert.layout import FP16, FP32, GENAI_CONFIG, INT8, genai_config

# one layer: tracing time grows with depth, and one layer already has every input and output kind
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def tamper(path):
    """Change one number of the largest weight matrix in place (a stand-in for numeric drift)."""
    proto = onnx.load(str(path))
    target = max((t for t in proto.graph.initializer if len(t.dims) == 2), key=lambda t: t.dims[0] * t.dims[1])
    array = numpy_helper.to_array(target).copy()
    array[0, 0] += 0.5
    target.CopyFrom(numpy_helper.from_array(array, target.name))
    onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def llama_hub(tmp_path_factory):
    """A micro LLaMA with grouped-query attention (4 heads, 2 kv heads), a tokenizer file to carry, exported to the
    hub layout with an int8 file (one trace)."""
    tmp = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(**TEXT, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "src")
    (tmp / "src" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    report = export_hub(tmp / "src", tmp / "hub", int8=True)
    return tmp / "src", tmp / "hub", report


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    transformers.BertModel(transformers.BertConfig(**TEXT, max_position_embeddings=64)).save_pretrained(tmp / "src")
    return tmp / "src"


def test_causal_lm_hub_layout(llama_hub):
    src, out, report = llama_hub
    assert report.ok, report.failure()
    names = {"config.json", "generation_config.json", "tokenizer_config.json", GENAI_CONFIG, FP32, INT8}
    assert set(report.files) == names
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == names
    assert [r.dtype for r in report.reports] == ["float32", "int8"]
    assert report.reports[1].task[-1]["passed"] and report.reports[1].task[-1]["metric"] == "perplexity"
    assert not list(out.parent.glob(".*partial"))  # the staging folder is gone
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.num_key_value_heads == 2 and config.model_type == "llama"
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    cached = ex.input_names(load(src).spec, cache=True)
    for name in (FP32, INT8):
        s = session(out / name)
        assert [i.name for i in s.get_inputs()] == cached
        assert [o.name for o in s.get_outputs()] == ["logits"] + ex.cache_names(load(src).spec, "present")
    assert ex.read_metadata(out / INT8)["dtype"] == "int8"


def test_genai_config_agrees_with_the_graph(llama_hub):
    _, out, _ = llama_hub
    genai = json.loads((out / GENAI_CONFIG).read_text())
    model, decoder = genai["model"], genai["model"]["decoder"]
    assert model["type"] == "llama" and decoder["filename"] == FP32 and (out / decoder["filename"]).is_file()
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 2, 0)
    assert model["vocab_size"] == 99 and model["context_length"] == 64
    graph = onnx.load(str(out / FP32), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = {o.name for o in graph.output}
    layers = decoder["num_hidden_layers"]
    assert layers == sum(n.startswith("past_key_values.") and n.endswith(".key") for n in inputs) == 1
    for i in range(layers):
        for key in ("past_key_names", "past_value_names"):
            shape = inputs[decoder["inputs"][key] % i]
            assert shape[1] == decoder["num_key_value_heads"] == 2 and shape[3] == decoder["head_size"] == 8
        for key in ("present_key_names", "present_value_names"):
            assert decoder["outputs"][key] % i in outputs
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert decoder["inputs"][key] in inputs
    assert decoder["outputs"]["logits"] in outputs
    assert decoder["num_attention_heads"] * decoder["head_size"] == decoder["hidden_size"] == 32
    assert genai["search"]["past_present_share_buffer"] is False  # present = past + new: no shared buffer


def test_genai_type_is_descriptor_knowledge(tmp_path):
    """The genai model type comes from the family's descriptor (per model type where one serves several); a family
    without one gets no genai_config.json."""
    llama = get_descriptor("llama")
    assert [llama.genai_type({"model_type": t}) for t in ("llama", "qwen2", "mistral")] == ["llama", "qwen2",
                                                                                            "mistral"]
    assert get_descriptor("hf-gpt2").genai_type({"model_type": "gpt2"}) is None
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                                         n_positions=64)).save_pretrained(tmp_path / "gpt2")
    gpt2 = load(tmp_path / "gpt2")
    assert genai_config(gpt2, gpt2.config) is None


@pytest.fixture(scope="module")
def bert_hub(tmp_path_factory, bert):
    """The CLI end to end: an encoder without a head, with an fp16 file (two traces)."""
    out = tmp_path_factory.mktemp("bert-hub") / "hub"
    result = CliRunner().invoke(main, ["export", str(bert), "--out", str(out), "--layout", "hub", "--dtype",
                                       "float16", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_cli_export_hub_encoder_with_fp16(bert_hub):
    out, report = bert_hub
    assert report["ok"] and set(report["files"]) == {"config.json", FP32, FP16}
    assert [r["dtype"] for r in report["reports"]] == ["float32", "float16"]
    assert all(r["ok"] and r["max_diff"] <= r["atol"] for r in report["reports"])
    assert not (out / GENAI_CONFIG).exists() and not (out / "generation_config.json").exists()
    assert transformers.AutoConfig.from_pretrained(out).model_type == "bert"
    for name, dtype in ((FP32, np.float32), (FP16, np.float16)):
        s = session(out / name)
        assert [i.name for i in s.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
        assert [o.name for o in s.get_outputs()] == ["last_hidden_state", "pooler_output"]
        ids = np.array([[5, 6, 7]], dtype=np.int64)
        hidden = s.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                               "token_type_ids": np.zeros_like(ids)})[0]
        assert hidden.shape == (1, 3, 32) and hidden.dtype == dtype


def test_failed_validation_leaves_no_finished_looking_folder(tmp_path, bert, bert_hub, monkeypatch):
    """An exporter whose file drifts from PyTorch (the stand-in: the good fp32 file with one weight changed, written
    in place of a trace): validation is real and fails; the older export being replaced goes, nothing looks done."""
    import shutil

    def drifting(plan, reference, path, meta, large_data_name, temporary, log=None, shown=None):
        temporary.append(path)
        shutil.copy(bert_hub[0] / FP32, path)
        tamper(path)
        return None, 0.0

    monkeypatch.setattr(ex, "trace_and_write", drifting)
    out = tmp_path / "hub"
    out.mkdir()
    (out / "old.txt").write_text("an older export")
    report = export_hub(bert, out, fp16=True, overwrite=True)
    assert not report.ok and "differs from PyTorch" in report.failure()
    invalid = tmp_path / "hub.invalid"
    assert not out.exists() and report.out == str(invalid)  # the older export is gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub.invalid"]  # no staging folder left
    assert (invalid / "onnx" / "model.invalid.onnx").is_file() and report.reports[0].path.endswith(
        "hub.invalid/onnx/model.invalid.onnx")
    assert not (invalid / FP32).exists() and not (invalid / FP16).exists()  # stopped at the first failure
    result = CliRunner().invoke(main, ["export", str(bert), "--out", str(out), "--layout", "hub"])
    assert result.exit_code == 1 and f"renamed {invalid}" in result.stderr


def test_existing_folder_is_refused_before_work(tmp_path, bert, monkeypatch):
    out = tmp_path / "hub"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(ex, "trace", lambda *a, **k: pytest.fail("traced before refusing"))
    for extra in ([], ["--validate-only"]):
        result = CliRunner().invoke(main, ["export", str(bert), "--out", str(out), "--layout", "hub", *extra])
        assert result.exit_code == 2, result.output
    assert "already exists" in CliRunner().invoke(main, ["export", str(bert), "--out", str(out), "--layout",
                                                         "hub"]).output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["hub"]


def test_grow_onnx_hub_in_the_grown_folder(tmp_path):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4, num_labels=5)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "src")
    out = tmp_path / "big"
    result = CliRunner().invoke(main, ["grow", str(tmp_path / "src"), "--layers", "2", "--steps", "0", "--out",
                                       str(out), "--onnx", "--layout", "hub", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["onnx"]
    assert report["ok"] and report["files"] == [FP32] and report["out"] == str(out)
    assert not (out / "model.onnx").exists() and not (out / GENAI_CONFIG).exists()
    assert not list(out.glob(".*partial"))
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == 2 and config.num_labels == 5
    s = session(out / FP32)
    assert [i.name for i in s.get_inputs()] == ["pixel_values"] and [o.name for o in s.get_outputs()] == ["logits"]
    logits = s.run(None, {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 16, 16), np.float32)})[0]
    assert logits.shape == (2, 5)
    with torch.no_grad():
        ref = transformers.ViTForImageClassification.from_pretrained(out).eval()
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 16, 16), np.float32))
        assert np.abs(ref(pixel_values=x).logits.numpy() - logits).max() < 1e-4


def test_batch_jobs_take_the_layout(tmp_path):
    """`layout` is a job option like the others: from [defaults], a job or --set; another value is refused by name
    before any job runs (the hub export itself is export_hub's, tested above)."""
    from ligo_convert.batch import load_manifest
    from ligo_convert.errors import LigoError

    path = tmp_path / "m.toml"
    path.write_text('[defaults]\ndevice = "cpu"\nlayout = "hub"\n\n[[job]]\nname = "micro"\nkind = "pretrain"\n'
                    'family = "hf-vit"\nlayers = 1\nwidth = 16\nheads = 2\nmlp = 32\nsteps = 1\n')
    assert load_manifest(path, root=tmp_path).jobs["micro"].options["layout"] == "hub"
    assert load_manifest(path, root=tmp_path, overrides=["layout=flat"]).jobs["micro"].options["layout"] == "flat"
    with pytest.raises(LigoError, match="layout 'tree' is not one of flat, hub"):
        load_manifest(path, root=tmp_path, overrides=["layout=tree"])
