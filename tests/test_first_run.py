"""First-run items of issue 14: a norm-eps change across families is allowed only when asked for, and measured;
`--objective auto` falls back to distillation when the data does not fit the head; a baseline needs no data."""

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from ligo_convert import LigoError, grow, load, save
from ligo_convert.cli import main
from ligo_convert.export import example_inputs
from ligo_convert.model import forward
from ligo_convert.objectives import choose_objective, head_misfit

VIT3 = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=8, patch_size=2, num_labels=3, layer_norm_eps=1e-12)


@pytest.fixture(scope="module")
def vit3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit3") / "src"
    transformers.ViTForImageClassification(VIT3).save_pretrained(folder)
    return folder


def test_eps_change_is_refused_naming_the_flag(vit3, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(vit3), "--to", "timm-vit", "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "--allow-eps-change" in result.output and "1e-12" in result.output
    assert not (tmp_path / "t").exists()
    with pytest.raises(LigoError, match="--allow-eps-change"):
        save(load(vit3), tmp_path / "t", family="timm-vit")


def test_eps_change_is_measured_and_recorded(vit3, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(vit3), "--to", "timm-vit", "--out", str(tmp_path / "t"),
                                       "--allow-eps-change"])
    assert result.exit_code == 0, result.output
    assert "norm_eps 1e-12 -> 1e-06" in result.output
    report = json.loads((tmp_path / "t" / "conversion.json").read_text())
    converted, source = load(tmp_path / "t"), load(vit3)
    assert converted.spec.norm_eps == 1e-6 and report["norm_eps"] == {"from": 1e-12, "to": 1e-6}
    inputs = example_inputs(source.spec, 4)
    with torch.no_grad():  # the recorded difference is what the two models' logits really differ by
        a = forward(source.spec, source.materialize(torch.float32), **inputs)["logits"]
        b = forward(converted.spec, converted.materialize(torch.float32), **inputs)["logits"]
    assert report["measured_on"] == "logits" and 0 < report["max_abs_diff"]
    assert report["max_abs_diff"] == pytest.approx(float((a - b).abs().max()), rel=1e-4, abs=1e-7)


def test_grow_into_a_family_with_another_eps_needs_the_flag(vit3, tmp_path):
    args = ["grow", str(vit3), "--to", "timm-vit", "--layers", "3", "--width", "64", "--steps", "1",
            "--out", str(tmp_path / "g")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "--allow-eps-change" in refused.output and "1e-12" in refused.output
    assert not (tmp_path / "g").exists()
    result = CliRunner().invoke(main, args + ["--allow-eps-change"])
    assert result.exit_code == 0, result.output
    grown = load(tmp_path / "g")
    assert grown.family == "timm-vit" and grown.spec.norm_eps == 1e-6 and grown.spec.layers == 3
    written = json.loads((tmp_path / "g" / "growth.json").read_text())["norm_eps_written"]
    assert written == {"from": 1e-12, "to": 1e-6, "effect": "conversion.json"}
    change = json.loads((tmp_path / "g" / "conversion.json").read_text())
    assert change["norm_eps"] == {"from": 1e-12, "to": 1e-6} and change["max_abs_diff"] > 0


def test_auto_distills_when_the_classes_do_not_fit(vit3):
    spec = load(vit3).spec
    misfit = head_misfit(spec, None)  # the embedded digits: 10 classes
    assert "10 classes" in misfit and "3" in misfit
    assert choose_objective(spec, "auto", misfit)[0] == "distill"
    assert choose_objective(spec, "auto", None)[0] == "task"
    with pytest.raises(LigoError, match="--objective distill"):
        choose_objective(spec, "task", misfit)
    result = grow(vit3, layers=3, width=64, steps=1, eval_batches=1, write=False)
    assert result.report["objective"] == "distill" and "10 classes" in result.report["objective_reason"]


def test_a_baseline_grows_without_data_it_cannot_use(vit3, tmp_path):
    result = grow(vit3, layers=3, width=64, method="net2net", data=tmp_path / "missing", eval_batches=1,
                  out=tmp_path / "g")
    assert (tmp_path / "g" / "config.json").exists()
    assert result.report["loss_init"] is None and "missing" in result.report["evaluation_skipped"]
    fits = grow(vit3, layers=3, width=64, method="net2net", eval_batches=1, write=False)
    assert fits.report["objective"] == "distill" and fits.report["loss_init"] is not None


@pytest.mark.parametrize("family", ["hf-gpt2", "phi3", "olmo2", "llama"])
def test_models_made_from_scratch_name_special_ids_inside_their_vocabulary(family, tmp_path):
    """A pretrained micro model's config names no bos/eos/pad id beyond its vocabulary (the config classes' own
    defaults, e.g. GPT-2's 50256, would: transformers warns and generate could never stop); a real checkpoint's
    ids stay as they are."""
    result = CliRunner().invoke(main, ["pretrain", str(tmp_path / "m"), "--family", family, "--steps", "1",
                                       "--layers", "1", "--width", "32", "--heads", "2"])
    assert result.exit_code == 0, result.output
    config = transformers.AutoConfig.from_pretrained(tmp_path / "m")
    ids = [getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    assert all(i is None or 0 <= i < config.vocab_size for i in ids), ids
    if family == "hf-gpt2":  # written from the vocabulary where the config lacks them, kept where it has them
        assert config.eos_token_id == config.vocab_size - 1
        saved = json.loads((tmp_path / "m" / "config.json").read_text())
        (tmp_path / "m" / "config.json").write_text(json.dumps({**saved, "eos_token_id": 7}))
        save(load(tmp_path / "m"), tmp_path / "again")
        assert json.loads((tmp_path / "again" / "config.json").read_text())["eos_token_id"] == 7
