"""`ligo-convert grow` and `pretrain` from the command line: every refusal exits 2 with one line and writes nothing;
the same seed gives byte-identical files; a saved operator re-applied gives the same model; pretrain writes a model
transformers loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner

from ligo_convert import load
from ligo_convert.cli import main
from helpers import assert_same_files

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
           patch_size=4, num_labels=10)
FAST = ["--steps", "2", "--batch-size", "4", "--seq-len", "16"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def bert(tmp_path) -> Path:
    transformers.BertForMaskedLM(transformers.BertConfig(**BERT)).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.fixture
def vit(tmp_path) -> Path:
    transformers.ViTForImageClassification(transformers.ViTConfig(**VIT)).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


def config_folder(tmp_path, name: str, config) -> Path:
    """A target given by a folder holding only a config.json."""
    folder = tmp_path / name
    folder.mkdir()
    config.to_json_file(folder / "config.json")
    return folder


def refused(tmp_path, source: Path, *args, match: str):
    """Run grow; check exit 2, exactly one line on stderr naming the problem, no output, source untouched."""
    before_src, before_dir = snapshot(source), sorted(p.name for p in tmp_path.iterdir())
    result = invoke("grow", source, *args, "--out", tmp_path / "out", *FAST)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before_dir  # no partial folders either
    assert snapshot(source) == before_src


def test_refuses_smaller_target(tmp_path, bert):
    refused(tmp_path, bert, "--layers", "3", "--width", "16", "--heads", "2", match="smaller than the source")


def test_refuses_head_dim_change_from_target_config(tmp_path, bert):
    # 4 heads on a width of 64: head_dim 16, the source has 8
    target = config_folder(tmp_path, "target", transformers.BertConfig(**{**BERT, "hidden_size": 64}))
    refused(tmp_path, bert, target, match="head_dim")


def test_refuses_head_dim_change_from_explicit_sizes(tmp_path, bert):
    refused(tmp_path, bert, "--width", "64", "--heads", "4", match="head_dim")


def test_refuses_family_the_source_cannot_be_mapped_to(tmp_path, bert):
    target = config_folder(tmp_path, "gpt2", transformers.GPT2Config(vocab_size=99, n_embd=64, n_layer=3, n_head=8))
    refused(tmp_path, bert, target, match="cannot be mapped to family hf-gpt2")


def test_refuses_missing_data(tmp_path, vit):
    refused(tmp_path, vit, "--layers", "3", "--data", tmp_path / "nowhere", match="no such data folder")


def test_refuses_empty_data(tmp_path, bert):
    (tmp_path / "empty").mkdir()
    refused(tmp_path, bert, "--layers", "3", "--data", tmp_path / "empty", match="no .txt files")


def test_refuses_diverging_fit(tmp_path, vit):
    refused(tmp_path, vit, "--layers", "3", "--width", "48", "--lr", "1e30", match="lower --lr")


def test_refuses_missing_target(tmp_path, bert):
    refused(tmp_path, bert, match="no growth target")


def test_same_seed_same_bytes_and_operator_reapplied(tmp_path, vit):
    args = ["--layers", "3", "--width", "48", "--mlp", "96", *FAST]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = invoke("grow", vit, *args, "--seed", seed, "--out", tmp_path / name,
                        "--save-operator", tmp_path / f"{name}.safetensors")
        assert result.exit_code == 0, result.output
    a, b, c = ((tmp_path / n / "model.safetensors").read_bytes() for n in "abc")
    assert a == b
    assert a != c  # the seed matters, so the equality above means something
    report = json.loads((tmp_path / "a" / "growth.json").read_text())
    assert report["seed"] == 0 and report["steps"] == 2 and report["variant"] == "per-layer"
    assert report["loss_init"] > 0 and report["loss_final"] > 0 and report["objective"] == "task"

    again = invoke("grow", vit, "--layers", "3", "--width", "48", "--mlp", "96", "--operator",
                   tmp_path / "a.safetensors", "--out", tmp_path / "d")
    assert again.exit_code == 0, again.output
    assert_same_files(tmp_path / "a", tmp_path / "d")
    model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "d")
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 48


def test_operator_for_another_target_is_refused(tmp_path, vit):
    assert invoke("grow", vit, "--layers", "3", *FAST, "--out", tmp_path / "a",
                  "--save-operator", tmp_path / "op.safetensors").exit_code == 0
    refused(tmp_path, vit, "--layers", "4", "--operator", tmp_path / "op.safetensors", match="another target")


def test_zoo_name_target_gives_sizes(tmp_path, bert):
    # a zoo name is a target without a download; the source's head_dim (8) does not fit bert-base's (64)
    refused(tmp_path, bert, "bert-base", match="head_dim")


def test_pretrain_then_grow(tmp_path):
    result = invoke("pretrain", tmp_path / "micro", "--family", "hf-gpt2", "--steps", "3", "--layers", "1",
                    "--width", "32", "--heads", "2", "--mlp", "64", "--batch-size", "4", "--seq-len", "16")
    assert result.exit_code == 0, result.output
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "micro")
    assert model.config.n_layer == 1
    info = json.loads((tmp_path / "micro" / "pretrain.json").read_text())
    assert info["steps"] == 3 and info["loss_first"] > 0
    result = invoke("grow", tmp_path / "micro", "--layers", "2", "--width", "64", *FAST, "--out", tmp_path / "big")
    assert result.exit_code == 0, result.output
    assert "grew 1x32 (2 heads) -> 2x64 (4 heads)" in result.output
    assert load(tmp_path / "big").spec.heads == 4
    assert invoke("pretrain", tmp_path / "micro").exit_code == 2  # exists: refused before training


def test_distill_objective_on_a_classifier(tmp_path, vit):
    result = invoke("grow", vit, "--layers", "3", "--objective", "distill", *FAST, "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["objective"] == "distill" and report["family"] == "hf-vit"


def test_options_shared_width_select_interleave_width_only(tmp_path, vit):
    result = invoke("grow", vit, "--layers", "4", "--width", "48", "--shared-width", "--width-init", "select",
                    "--depth-init", "interleave", "--learn", "width", *FAST, "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["variant"] == "shared" and report["learn"] == "width"
    assert report["init"] == {"depth": "interleave", "width": "select", "noise": 0.03}
    per_layer = invoke("grow", vit, "--layers", "4", "--width", "48", "--steps", "0", "--out", tmp_path / "p",
                       "--json")
    assert json.loads(per_layer.stdout)["operator_parameters"] > report["operator_parameters"]


def test_demo_runs_end_to_end(tmp_path):
    from ligo_convert.demo import run

    lines = []
    rows = run(pretrain_steps=30, fit_steps=5, out=tmp_path, echo=lines.append)
    assert len(rows) == 4 and all(0 <= m["accuracy"] <= 1 and m["loss"] > 0 for m in rows.values())
    assert any("grown, after 5 fitting steps" in line for line in lines)
    assert transformers.ViTForImageClassification.from_pretrained(tmp_path / "grown").config.num_hidden_layers == 4


def test_grow_onnx_exports_and_validates(tmp_path, vit):
    """`grow --onnx` writes OUT/model.onnx right after growing, proven with onnxruntime."""
    result = invoke("grow", vit, "--layers", "3", "--width", "48", "--mlp", "96", *FAST, "--onnx", "--json",
                    "--out", tmp_path / "grown")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["onnx"]["ok"] and report["onnx"]["max_diff"] <= report["onnx"]["atol"]
    assert (tmp_path / "grown" / "model.onnx").is_file()
    from ligo_convert.export import read_metadata

    assert read_metadata(tmp_path / "grown" / "model.onnx")["family"] == "hf-vit"


@pytest.mark.parametrize("method", ["stack", "interpolate", "net2net", "aki", "lemon", "scratch"])
def test_every_method_writes_a_model_transformers_loads(tmp_path, vit, method):
    """`grow --method M`: the baseline's model in the family's layout, and growth.json says how it grew."""
    result = invoke("grow", vit, "--layers", "4", "--width", "64", "--heads", "8", "--mlp", "128", "--method", method,
                    "--batch-size", "4", "--json", "--out", tmp_path / "grown")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == method and report["steps"] == 0 and "method_note" in report
    assert isinstance(report["function_preserving"], bool) and report["function_preserving_reason"]
    model, info = transformers.ViTForImageClassification.from_pretrained(tmp_path / "grown", output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 64
    growth = json.loads((tmp_path / "grown" / "growth.json").read_text())
    assert growth["method"] == method


def test_ligo_starts_from_another_method(tmp_path, vit):
    result = invoke("grow", vit, "--layers", "4", "--init", "stack", *FAST, "--json", "--out", tmp_path / "grown")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "ligo" and report["init"]["method"] == "stack" and report["init"]["note"]


def test_lemon_refuses_post_ln_depth_growth(tmp_path, bert):
    refused(tmp_path, bert, "--layers", "4", "--method", "lemon", match="lemon")


def test_baselines_take_no_operator_options(tmp_path, vit):
    refused(tmp_path, vit, "--layers", "4", "--method", "stack", "--init", "net2net", match="--init")
