"""HF DINOv2 (Dinov2Model, Dinov2ForImageClassification): our canonical forward equals transformers' at the configured
image size and at others (the position table resampled bicubically), with LayerScale, the plain and the SwiGLU MLP, and
the classifier on [class token; mean of the patch tokens]; files round-trip byte for byte (the mask token included),
transformers loads what we write, every growth baseline writes a model transformers loads, and MLP sizes DINOv2's
config cannot state are refused before anything is written."""

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from ligo_convert import forward, from_tensors, init_weights, load, save
from ligo_convert.cli import main
from ligo_convert.descriptors import get_descriptor
from ligo_convert.grow import grow
from ligo_convert.growth import baselines as B
from family_checks import (assert_one_line_error, check_round_trip, from_template_same_files, hf_load, read_whole,
                           save_randomised, transformers_loss)
from helpers import max_diff, read_all

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)

# id -> (model class, config)
CASES = {
    "Dinov2Model": ("Dinov2Model", dict(BASE)),
    "Dinov2ForImageClassification": ("Dinov2ForImageClassification", dict(BASE, num_labels=5)),
    # SwiGLU: 2/3 of int(32 * 4) rounded up to 8 = 88 hidden units, silu gate although hidden_act is gelu
    "swiglu-classifier": ("Dinov2ForImageClassification", dict(BASE, num_labels=3, use_swiglu_ffn=True)),
    # no mask token, no q/k/v biases, 3 heads of 12, a ratio of 2, another activation and epsilon
    "odd": ("Dinov2Model", dict(BASE, hidden_size=36, num_attention_heads=3, mlp_ratio=2, use_mask_token=False,
                                qkv_bias=False, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5)),
    "swiglu-model-patch2": ("Dinov2Model", dict(BASE, patch_size=2, image_size=8, use_swiglu_ffn=True)),
}

# Config values transformers must read back the same from what we write.
COMPARED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "image_size",
            "patch_size", "num_channels", "qkv_bias", "use_swiglu_ffn", "use_mask_token", "layer_norm_eps",
            "hidden_act", "architectures", "id2label")


def build(tmp_path, case: str, folder: str = "src"):
    cls, config = CASES[case]
    # transformers leaves LayerScale at layerscale_value: randomised too (and the mask token)
    return save_randomised(cls, transformers.Dinov2Config(**config), tmp_path / folder, also=("lambda1", "mask_token"))


def pixels(size=None, batch=2, seed=0):
    h, w = size or (16, 16)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference(model, x) -> dict:
    with torch.no_grad():
        out = model(pixel_values=x)
    if hasattr(out, "logits"):
        return {"logits": out.logits}
    return {"hidden": out.last_hidden_state, "pooled": out.pooler_output}


def image_size(case):
    return CASES[case][1]["image_size"]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers_at_every_image_size(tmp_path, case):
    """The configured size uses the position table as it is; the others resample its patch rows (bicubic, float32),
    square or not, larger or smaller (16 x 17 keeps the 4 x 4 grid: transformers still resamples, to the same size)."""
    model = build(tmp_path, case)
    ours = read_whole(tmp_path / "src", "dinov2")
    spec, w = ours.spec, ours.materialize()
    assert spec.layer_scale and spec.interpolate_positions and spec.pool == "first"
    s = image_size(case)
    for size in [(s, s), (s + 8, s + 8), (s, s + 8), (s + 4, s - 4), (s, s + 1)]:
        x = pixels(size)
        ref = reference(model, x)
        with torch.no_grad():
            out = forward(spec, w, pixel_values=x)
        for k, v in ref.items():
            assert max_diff(v, out[k]) <= 1e-5, (size, k, max_diff(v, out[k]))


def test_spec_of_each_variant(tmp_path):
    build(tmp_path, "swiglu-classifier")
    spec = load(tmp_path / "src").spec
    assert (spec.gated_mlp, spec.mlp, spec.gate_activation, spec.activation) == (True, 88, "silu", "gelu")
    assert (spec.head, spec.head_mean, spec.num_classes, spec.mask_token, spec.cls_token) == \
        ("classifier", True, 3, True, True)
    assert spec.num_positions == 17 and spec.norm_eps == 1e-6
    build(tmp_path, "odd", "odd")
    spec = load(tmp_path / "odd").spec
    assert (spec.heads, spec.head_dim, spec.mlp, spec.mask_token, spec.qkv_bias, spec.gated_mlp) == \
        (3, 12, 72, False, False, False)
    assert spec.activation == "gelu_tanh" and spec.norm_eps == 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_and_explicit_attention_agree(tmp_path, case):
    build(tmp_path, case)
    ours = load(tmp_path / "src")
    w = ours.materialize()
    for size in [(image_size(case),) * 2, (image_size(case) + 4,) * 2]:
        x = pixels(size)
        with torch.no_grad():
            fused = forward(ours.spec, w, pixel_values=x, attention="sdpa")
            explicit = forward(ours.spec, w, pixel_values=x, attention="explicit")
        for k in explicit:
            assert max_diff(fused[k], explicit[k]) <= 1e-5, k


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    model = build(tmp_path, case)
    check_round_trip(tmp_path, model, getattr(transformers, CASES[case][0]), lambda: pixels((image_size(case),) * 2),
                     reference, COMPARED, every_key=True)
    if CASES[case][1].get("use_mask_token", True):
        assert any(k.endswith("embeddings.mask_token") for k in read_all(tmp_path / "out"))


@pytest.mark.parametrize("case", ["Dinov2ForImageClassification", "swiglu-classifier", "odd"])
def test_written_from_tensors_without_source_config(tmp_path, case):
    """A model made in memory (no source config) is written from the descriptor's template: transformers builds
    the same architecture from it (mlp_ratio, use_swiglu_ffn, use_mask_token...) and computes our outputs."""
    build(tmp_path, case)
    cls = getattr(transformers, CASES[case][0])
    ours, weights, again = from_template_same_files(tmp_path, cls, "dinov2")
    x = pixels((image_size(case),) * 2)
    with torch.no_grad():
        out = forward(ours.spec, weights, pixel_values=x)
    for k, v in reference(again, x).items():
        assert max_diff(v, out[k]) <= 1e-5, k


def test_classifier_halves_are_the_fused_columns(tmp_path):
    """classifier.weight (classes, 2D) = [head.weight | head_mean.weight]: the class-token half first."""
    model = build(tmp_path, "Dinov2ForImageClassification")
    ours = load(tmp_path / "src")
    w = ours.materialize()
    assert w["head.weight"].shape == w["head_mean.weight"].shape == (5, 32)
    assert torch.equal(torch.cat([w["head.weight"], w["head_mean.weight"]], 1), model.classifier.weight.detach())
    assert ours.mapping.locations["head_mean.weight"].key == "classifier.weight"


# --- growth ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, mlp", [("Dinov2ForImageClassification", 256), ("swiglu-classifier", 176)])
@pytest.mark.parametrize("method", B.METHODS)
def test_every_baseline_grows_a_model_transformers_loads(tmp_path, case, mlp, method):
    """Width x2 (plain MLP 128 -> 256 = 64 x 4; SwiGLU 88 -> 176 = ceil8(2/3 x 256)), depth 2 -> 3 where the method
    grows depth; every method's output loads whole, computes our outputs, and (where growth.json claims it) the
    source's logits; the mask token grows with the residual stream."""
    model = build(tmp_path, case)
    deeper = method not in ("net2net", "lemon")
    layers = 3 if deeper else 2
    result = grow(tmp_path / "src", layers=layers, width=64, heads=8, mlp=mlp, method=method,
                  out=tmp_path / "big", steps=0, eval_batches=1, objective="distill")
    grown = load(tmp_path / "big")
    assert (grown.spec.layers, grown.spec.width, grown.spec.mlp) == (layers, 64, mlp)
    weights = grown.materialize()
    assert weights["embed.mask"].shape == (64,) and weights["head_mean.weight"].shape == (3 if "swiglu" in case
                                                                                            else 5, 64)
    again = hf_load(getattr(transformers, CASES[case][0]), tmp_path / "big")
    x = pixels()
    with torch.no_grad():
        ours = forward(grown.spec, weights, pixel_values=x)["logits"]
        theirs = again(pixel_values=x).logits
        source = model(pixel_values=x).logits
    assert max_diff(theirs, ours) <= 1e-5
    report = json.loads((tmp_path / "big" / "growth.json").read_text())
    assert report["function_preserving"] == result.report["function_preserving"]
    # LayerScale, the mean head and the mask token are copied channel for channel: width x2 is exact
    assert report["function_preserving"] == (method in ("net2net", "lemon")), report["function_preserving_reason"]
    if report["function_preserving"]:
        assert max_diff(theirs, source) <= 1e-4, report["function_preserving_reason"]


def test_ligo_growth_keeps_layerscale_and_the_mean_head(tmp_path):
    build(tmp_path, "swiglu-classifier")
    grow(tmp_path / "src", layers=3, width=48, heads=6, mlp=96, out=tmp_path / "big", steps=1, batch_size=4,
         objective="distill", eval_batches=1)
    grown = load(tmp_path / "big")
    assert grown.spec.layer_scale and grown.spec.head_mean and grown.spec.mask_token and grown.spec.gated_mlp
    config = json.loads((tmp_path / "big" / "config.json").read_text())
    assert config["mlp_ratio"] == 3 and config["use_swiglu_ffn"] is True  # ceil8(2/3 x 48 x 3) = 96
    again = hf_load(transformers.Dinov2ForImageClassification, tmp_path / "big")
    x = pixels((20, 20))  # another size: both resample the grown position table
    with torch.no_grad():
        assert max_diff(again(pixel_values=x).logits,
                        forward(grown.spec, grown.materialize(), pixel_values=x)["logits"]) <= 1e-5


# --- refusals ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, mlp, why", [("Dinov2ForImageClassification", 150, "mlp=128"),
                                            ("swiglu-classifier", 100, "mlp=88")])
def test_mlp_sizes_the_config_cannot_state_are_refused(tmp_path, case, mlp, why):
    """transformers 5 reads an integer mlp_ratio: a target MLP it cannot give is refused at once, one line, exit 2,
    nothing written."""
    build(tmp_path, case)
    result = CliRunner().invoke(main, ["grow", str(tmp_path / "src"), "--layers", "2", "--width", "32", "--heads",
                                       "4", "--mlp", str(mlp), "--out", str(tmp_path / "big"), "--steps", "0"])
    assert_one_line_error(result, "family dinov2 needs", why)
    assert not (tmp_path / "big").exists()
    spec = load(tmp_path / "src").spec
    assert get_descriptor("dinov2").supports(spec.replace(mlp=mlp)) is not None
    with pytest.raises(Exception, match="family dinov2 needs"):
        save(from_tensors(spec.replace(mlp=mlp), init_weights(spec.replace(mlp=mlp)), "dinov2"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- eval ----------------------------------------------------------------------------------------------------------


def test_eval_equals_transformers_loss_on_both_engines(tmp_path):
    """The classifier's loss on the digits equals transformers' own, and onnxruntime gives the same metrics."""
    from ligo_convert.evaluate import evaluate

    model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**BASE, num_labels=10)).eval()
    model.save_pretrained(tmp_path / "src")
    got = evaluate(tmp_path / "src", max_batches=1, batch_size=8)
    ref = transformers_loss(model, tmp_path / "src", batch_size=8)
    assert got["loss"] == pytest.approx(ref, rel=1e-5) and "digits" in got["data"]
    torch_run = evaluate(tmp_path / "src", engine="torch", max_batches=2)
    onnx_run = evaluate(tmp_path / "src", engine="onnx", max_batches=2)
    assert torch_run["count"] == onnx_run["count"] == 32
    assert abs(torch_run["loss"] - onnx_run["loss"]) <= 1e-4 * max(1.0, abs(torch_run["loss"]))
    assert abs(torch_run["accuracy"] - onnx_run["accuracy"]) <= 1 / torch_run["count"]


def test_eval_of_the_bare_backbone_is_a_knn_probe_on_both_engines(tmp_path):
    """Dinov2Model has no head: eval classifies each held-out digit by its 5 nearest training digits' labels in the
    pooled features, far above the chance of 0.1 on both engines, and both engines hand the probe the same
    features.  Not the same accuracy: at random weights the pooled features of all digits are nearly alike (pairwise
    cosine above 0.9999), so which neighbours win a near tie is decided by fp32 rounding, and 3 to 5 of the 64
    predictions flip between the engines depending on the CPU."""
    import onnxruntime as ort

    from ligo_convert import export as ex
    from ligo_convert import probes
    from ligo_convert.data import model_inputs, val_batches
    from ligo_convert.evaluate import evaluate

    build(tmp_path, "Dinov2Model")
    got = evaluate(tmp_path / "src", max_batches=4)
    onnx_run = evaluate(tmp_path / "src", engine="onnx", max_batches=4)
    assert got["memory"] == onnx_run["memory"] == 1024 and got["count"] == onnx_run["count"] == 64
    assert got["accuracy"] > 0.3 and onnx_run["accuracy"] > 0.3, (got, onnx_run)
    model = load(tmp_path / "src")
    assert ex.export_onnx(model, tmp_path / "model.onnx").ok
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    weights, spec = model.materialize(torch.float32), model.spec
    for batch in val_batches(spec, None, None, 16, 64, 4):  # the held-out digits the probe classified
        with torch.no_grad():
            ours = forward(spec, weights, **model_inputs(batch))
        feed = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
        theirs = {k: torch.from_numpy(v) for k, v in zip(ex.output_keys(spec),
                                                         session.run(ex.output_names(spec), feed))}
        a, b = probes.features(spec, ours, batch), probes.features(spec, theirs, batch)
        assert (a - b).abs().max() <= 1e-6 and (a * b).sum(-1).min() >= 1 - 1e-6


def test_onnx_takes_any_image_size_as_transformers_does(tmp_path):
    """The exported graph has dynamic height and width (the position table resampled in the graph, as DINOv2's
    interpolate_pos_encoding): validated at three sizes, and onnxruntime equals transformers at sizes never used."""
    import onnxruntime as ort

    from ligo_convert import export as ex

    model = build(tmp_path, "Dinov2ForImageClassification")
    report = ex.export_onnx(tmp_path / "src", tmp_path / "model.onnx")
    assert report.ok, report.failure()
    sizes = {tuple(c.shapes["pixel_values"][2:]) for c in report.checks}
    assert {(16, 16), (12, 24), (32, 32)} <= sizes
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [type(d) for d in session.get_inputs()[0].shape[2:]] == [str, str]  # symbolic height and width
    for size in ((20, 8), (28, 28)):
        x = pixels(size, batch=3, seed=5)
        got = session.run(["logits"], {"pixel_values": x.numpy()})[0]
        assert max_diff(torch.from_numpy(got), reference(model, x)["logits"]) <= 1e-4, size
