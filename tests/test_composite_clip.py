"""A whole CLIPModel (both towers in one file, as the hub's CLIP checkpoints are saved) through the composite
descriptor architectures/clip.toml: each tower read alone equals transformers' CLIPModel (embeddings and
logits_per_image), convert rewrites the file byte for byte, grow grows both towers with LiGO and every baseline into
a CLIPModel transformers loads whole, export and eval take one tower, inspect lists them, the zoo names CLIP
targets, and every misuse is one line with nothing written."""

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ligo_convert import LigoError, forward, load
from ligo_convert.cli import main
from ligo_convert.composite import composite_of, target_towers
from ligo_convert.grow import grow
from ligo_convert.growth import baselines as B
from family_checks import assert_one_line_error, hf_load, randomise_norms
from helpers import assert_same_files, max_diff

EOS = 299


def clip_config(width: int, layers: int, heads: int) -> transformers.CLIPConfig:
    tower = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * width)
    return transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=300, max_position_embeddings=32, eos_token_id=EOS, bos_token_id=298,
                         pad_token_id=1),
        vision_config=dict(tower, image_size=16, patch_size=4), projection_dim=24)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny CLIPModel (norms and biases randomised) saved to a folder; a larger CLIP config as a growth target."""
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = transformers.CLIPModel(clip_config(32, 2, 4)).eval()
    randomise_norms(model)
    model.save_pretrained(root / "src")
    clip_config(48, 3, 6).save_pretrained(root / "target")
    return root / "src", root / "target"


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 290, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[:, 7] = EOS
    ids[1, 5], mask[1, 6:], ids[1, 6:] = EOS, 0, 1  # a shorter, right-padded row
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "input_ids": ids, "attention_mask": mask}


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def towers_agree(folder, model: transformers.CLIPModel, tol: float = 1e-5) -> None:
    """Our two towers, read from ``folder``, give ``model``'s normalised embeddings and its logits."""
    x = inputs()
    vision, text = load(folder, tower="vision"), load(folder, tower="text")
    with torch.no_grad():
        ref = model(**x)
        image = forward(vision.spec, vision.materialize(torch.float32), pixel_values=x["pixel_values"])["embeds"]
        words = forward(text.spec, text.materialize(torch.float32), input_ids=x["input_ids"],
                        attention_mask=x["attention_mask"])["embeds"]
        logits = model.logit_scale.exp() * unit(image) @ unit(words).T
    assert max_diff(unit(image), ref.image_embeds) <= tol
    assert max_diff(unit(words), ref.text_embeds) <= tol
    assert max_diff(logits, ref.logits_per_image) <= tol * 10  # logit_scale ~14 multiplies the error


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_each_tower_read_alone_computes_clipmodels_embeddings_and_logits(clip):
    src, _ = clip
    towers_agree(src, hf_load(transformers.CLIPModel, src))
    vision, text = load(src, tower="vision"), load(src, tower="text")
    assert (vision.family, text.family) == ("clip-vision", "clip-text")
    # the model's projection size, not the nested tables' class default (512)
    assert vision.spec.projection_dim == text.spec.projection_dim == 24
    assert json.loads((src / "config.json").read_text())["text_config"]["projection_dim"] == 512
    assert composite_of(json.loads((src / "config.json").read_text())).tower_names == ["vision", "text"]


def test_convert_rewrites_the_whole_model_byte_for_byte_or_one_tower_as_its_own_model(clip, tmp_path):
    src, _ = clip
    result = invoke("convert", src, "--out", tmp_path / "copy", "--json")
    assert result.exit_code == 0, result.output
    assert_same_files(src, tmp_path / "copy")  # logit_scale included
    assert json.loads((tmp_path / "copy" / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    result = invoke("convert", src, "--tower", "vision", "--out", tmp_path / "vision")
    assert result.exit_code == 0, result.output
    alone = hf_load(transformers.CLIPVisionModelWithProjection, tmp_path / "vision")
    whole = hf_load(transformers.CLIPModel, src)
    x = inputs()
    with torch.no_grad():
        assert max_diff(unit(alone(pixel_values=x["pixel_values"]).image_embeds), whole(**x).image_embeds) <= 1e-5


@pytest.mark.parametrize("method", ["ligo", *B.METHODS])
def test_grow_grows_both_towers_into_a_clipmodel_transformers_loads(clip, tmp_path, method):
    src, target = clip
    out = tmp_path / "grown"
    try:
        result = grow(src, str(target), out=out, method=method, steps=2, batch_size=4, seq_len=16, eval_batches=1)
    except LigoError as e:  # LEMON refuses a width that is no multiple of the source's (one line, nothing written)
        assert method == "lemon" and "not a multiple" in str(e), (method, str(e))
        assert "\n" not in str(e) and not out.exists(), str(e)
        return
    grown = hf_load(transformers.CLIPModel, out, method)
    towers_agree(out, grown)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["hidden_size"] == config["text_config"]["hidden_size"] == 48
    assert config["vision_config"]["num_hidden_layers"] == 3 and config["projection_dim"] == 24
    assert torch.equal(load_file(out / "model.safetensors")["logit_scale"],
                       load_file(src / "model.safetensors")["logit_scale"])
    report = json.loads((out / "growth.json").read_text())
    assert list(report["towers"]) == ["vision", "text"] and report["method"] == method
    assert result.out == out
    source = hf_load(transformers.CLIPModel, src)
    for name, tower in report["towers"].items():
        assert tower["target_spec"]["width"] == 48
        if method == "ligo":
            assert tower["loss_final"] < tower["loss_init"], name  # each tower fitted on its own modality
        if tower.get("function_preserving"):  # the claim holds: the grown CLIP computes the source's embeddings
            x = inputs()
            with torch.no_grad():
                a, b = grown(**x), source(**x)
            key = "image_embeds" if name == "vision" else "text_embeds"
            assert max_diff(getattr(a, key), getattr(b, key)) <= 1e-5, (method, name)


def test_lemon_grows_clip_without_changing_what_it_computes(clip, tmp_path):
    """LEMON claims a lossless growth of both towers (width x2, depth x2): the grown CLIPModel's embeddings and
    logits are the source's."""
    src, _ = clip
    clip_config(64, 4, 8).save_pretrained(tmp_path / "wide")
    grow(src, str(tmp_path / "wide"), out=tmp_path / "grown", method="lemon", eval_batches=0)
    report = json.loads((tmp_path / "grown" / "growth.json").read_text())
    assert all(t["function_preserving"] for t in report["towers"].values())
    x = inputs()
    with torch.no_grad():
        a = hf_load(transformers.CLIPModel, tmp_path / "grown")(**x)
        b = hf_load(transformers.CLIPModel, src)(**x)
    for key in ("image_embeds", "text_embeds", "logits_per_image"):
        tol = 1e-4 if key == "logits_per_image" else 1e-5  # logit_scale ~14 multiplies the error
        assert max_diff(getattr(a, key), getattr(b, key)) <= tol, key


def test_grow_on_the_command_line_fits_each_tower_on_its_data_and_exports_both(clip, tmp_path):
    src, target = clip
    (tmp_path / "notes.txt").write_text("a photo of a cat sitting on a mat, looking at the camera.\n" * 200)
    result = invoke("grow", src, target, "--out", tmp_path / "grown", "--steps", 2, "--batch-size", 4,
                    "--seq-len", 16, "--data", f"text={tmp_path / 'notes.txt'}", "--onnx")
    assert result.exit_code == 0, result.output
    assert "grew 2x32 (4 heads) -> 3x48 (6 heads) as clip vision tower" in result.output
    assert "as clip text tower" in result.output
    report = json.loads((tmp_path / "grown" / "growth.json").read_text())
    assert "notes.txt" in report["towers"]["text"]["data"] and "digits" in report["towers"]["vision"]["data"]
    assert {"vision_model.onnx", "text_model.onnx"} <= {p.name for p in (tmp_path / "grown").iterdir()}


def test_export_and_eval_take_one_tower(clip, tmp_path):
    src, _ = clip
    result = invoke("export", src, "--tower", "vision", "--out", tmp_path / "vision_model.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and "image_embeds" in report["outputs"]
    scores = {}
    for engine in ("torch", "onnx"):
        result = invoke("eval", src, "--tower", "text", "--engine", engine, "--max-batches", 1, "--json")
        assert result.exit_code == 0, result.output
        scores[engine] = json.loads(result.stdout)
    assert scores["torch"]["count"] == scores["onnx"]["count"] > 0
    assert abs(scores["torch"]["accuracy"] - scores["onnx"]["accuracy"]) <= 2 / scores["torch"]["count"]


def test_inspect_lists_the_towers_and_reads_one(clip):
    src, _ = clip
    result = invoke("inspect", src)
    assert result.exit_code == 0, result.output
    assert "clip (CLIP (vision and text towers)): 2 towers" in result.output
    assert "vision    clip-vision: 2 layers, width 32" in result.output and "shared      1: logit_scale" in result.output
    info = json.loads(invoke("inspect", src, "--json").stdout)
    assert info["towers"]["text"]["family"] == "clip-text" and info["unmapped"] == []
    result = invoke("inspect", src, "--tower", "text")
    assert result.exit_code == 0 and "family      clip-text" in result.output


def test_the_zoo_names_clip_models_as_targets():
    comp = composite_of({"model_type": "clip"})
    sizes = target_towers(comp, "clip-vit-large-patch14")
    assert sizes["vision"]["layers"] == 24 and sizes["vision"]["width"] == 1024
    assert sizes["text"]["width"] == 768 and sizes["text"]["head_dim"] == 64
    with pytest.raises(LigoError, match="a hf-vit model, not a clip model"):
        target_towers(comp, "vit-base")
    from ligo_convert.zoo import target_sizes

    with pytest.raises(LigoError, match="only a clip model grows into it"):
        target_sizes("clip-vit-base-patch32")


@pytest.mark.parametrize("args, text", [
    (["grow", "{src}", "--layers", "4"], "--layers sizes one model"),
    (["grow", "{src}", "vit-base"], "a hf-vit model, not a clip model"),
    (["grow", "{src}", "{target}", "--data", "images/"], "give each tower's data as vision=PATH,text=PATH"),
    (["grow", "{src}", "{target}", "--data", "audio=x"], "no tower 'audio'"),
    (["grow", "{src}", "{target}", "--save-operator", "{tmp}/op.pt"], "grow without them"),
    (["grow", "{src}", "{target}", "--onnx", "--layout", "hub"], "use --onnx with --layout flat"),
    (["export", "{src}", "--out", "{tmp}/out.onnx"], "pass --tower vision|text"),
    (["eval", "{src}"], "pass --tower vision|text"),
    (["inspect", "{src}", "--tower", "audio"], "no tower 'audio'"),
    (["convert", "{src}", "--out", "{tmp}/out", "--to", "hf-vit"], "--to hf-vit"),
    (["convert", "{other}", "--out", "{tmp}/out", "--tower", "vision"], "not a composite of towers"),
])
def test_misuse_is_one_line_and_writes_nothing(clip, tmp_path, args, text):
    src, target = clip
    other = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=16, image_size=8, patch_size=4)).save_pretrained(other)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(src=src, target=target, tmp=tmp_path, other=other) for a in args]
    assert_one_line_error(invoke(*args, *(["--out", tmp_path / "grown"] if args[0] == "grow" else [])), text)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_tensor_of_no_tower_is_refused_by_name(clip, tmp_path):
    src, _ = clip
    bad = tmp_path / "src"
    bad.mkdir()
    tensors = load_file(src / "model.safetensors")
    save_file({**tensors, "audio_model.proj.weight": torch.zeros(2, 2)}, bad / "model.safetensors")
    (bad / "config.json").write_text((src / "config.json").read_text())
    assert_one_line_error(invoke("convert", bad, "--out", tmp_path / "out"), "audio_model.proj.weight",
                          "belongs to no tower")
    assert not (tmp_path / "out").exists()
