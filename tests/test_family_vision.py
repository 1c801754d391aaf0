"""HF ViT, HF DeiT and timm ViT: our canonical forward equals transformers', files round-trip byte for byte, and the
timm layout (fused q|k|v rows) holds exactly the tensors of the HF layout.

timm cannot be installed here, so its files are built in `write_timm` from the documented layout rules, by hand and
independently of the descriptor, then compared with what the descriptor reads and writes.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from ligo_convert import forward, load, save
from ligo_convert.descriptors import get_descriptor
from ligo_convert.errors import LigoError
from helpers import assert_same_files, max_diff, read_all

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
              patch_size=4, num_labels=5)

# class -> (config class, {HF output attribute: canonical output})
CLASSES = {
    "ViTModel": ("ViTConfig", {"last_hidden_state": "hidden", "pooler_output": "pooled"}),
    "ViTForImageClassification": ("ViTConfig", {"logits": "logits"}),
    "DeiTModel": ("DeiTConfig", {"last_hidden_state": "hidden", "pooler_output": "pooled"}),
    "DeiTForImageClassification": ("DeiTConfig", {"logits": "logits"}),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", {"logits": "logits"}),
}


def pixels():
    return torch.randn(2, 3, 16, 16)


def build(cls: str, model_kwargs=None, **config):
    config_cls, _ = CLASSES[cls]
    hf_config = getattr(transformers, config_cls)(**{**CONFIG, **config})
    return getattr(transformers, cls)(hf_config, **(model_kwargs or {})).eval()


def hf_outputs(model, x, wanted) -> dict:
    with torch.no_grad():
        out = model(pixel_values=x)
    return {ours: getattr(out, theirs) for theirs, ours in wanted.items()}


def reload_hf(cls: str, folder, **kwargs):
    """from_pretrained, insisting that every key of the file is used and every weight of the model is in it."""
    model, info = getattr(transformers, cls).from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("cls", list(CLASSES))
def test_hf_forward_and_round_trip(tmp_path, cls):
    model = build(cls)
    model.save_pretrained(tmp_path / "src")
    ours = load(tmp_path / "src")
    assert ours.family == ("hf-vit" if cls.startswith("ViT") else "hf-deit")
    x = pixels()
    ref = hf_outputs(model, x, CLASSES[cls][1])
    with torch.no_grad():
        out = forward(ours.spec, ours.materialize(), pixel_values=x)
    for name, value in ref.items():
        assert max_diff(value, out[name]) <= 1e-5, name

    save(ours, tmp_path / "out")
    assert_same_files(tmp_path / "src", tmp_path / "out")
    again = reload_hf(cls, tmp_path / "out")
    for name, value in hf_outputs(again, x, CLASSES[cls][1]).items():
        assert torch.equal(value, ref[name]), name


# --- timm ------------------------------------------------------------------------------------------------------------


def write_timm(hf_folder, out, arch: str, prefix: str, model_args: bool = True, extra=None) -> dict:
    """A timm hub folder (model.safetensors + config.json) holding the weights of an HF ViT/DeiT checkpoint, by
    timm's documented layout: q, k, v stacked by rows into attn.qkv, tokens and positions as in HF."""
    hf = read_all(hf_folder)
    hf_config = json.loads((hf_folder / "config.json").read_text())
    p = prefix
    state = {"cls_token": hf[p + "embeddings.cls_token"], "pos_embed": hf[p + "embeddings.position_embeddings"],
             "patch_embed.proj.weight": hf[p + "embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": hf[p + "embeddings.patch_embeddings.projection.bias"],
             "norm.weight": hf[p + "layernorm.weight"], "norm.bias": hf[p + "layernorm.bias"]}
    if p + "embeddings.distillation_token" in hf:
        state["dist_token"] = hf[p + "embeddings.distillation_token"]
    for i in range(hf_config["num_hidden_layers"]):
        h, b = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention.attention."
        for t in ("weight", "bias"):
            state[b + "norm1." + t] = hf[h + "layernorm_before." + t]
            state[b + "attn.qkv." + t] = torch.cat([hf[att + "query." + t], hf[att + "key." + t],
                                                     hf[att + "value." + t]], dim=0)
            state[b + "attn.proj." + t] = hf[h + "attention.output.dense." + t]
            state[b + "norm2." + t] = hf[h + "layernorm_after." + t]
            state[b + "mlp.fc1." + t] = hf[h + "intermediate.dense." + t]
            state[b + "mlp.fc2." + t] = hf[h + "output.dense." + t]
    heads = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
    for hf_name, timm_name in heads.items():
        for t in ("weight", "bias"):
            if f"{hf_name}.{t}" in hf:
                state[f"{timm_name}.{t}"] = hf[f"{hf_name}.{t}"]
    state.update(extra or {})
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    width, size = hf_config["hidden_size"], hf_config["image_size"]
    config = {"architecture": arch, "num_classes": num_classes, "num_features": width, "global_pool": "token",
              "pretrained_cfg": {"tag": "test", "custom_load": False, "input_size": [3, size, size],
                                 "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.9,
                                 "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                 "num_classes": num_classes, "first_conv": "patch_embed.proj",
                                 "classifier": ["head", "head_dist"] if "head_dist.weight" in state else "head"}}
    if model_args:
        config["model_args"] = {"embed_dim": width, "depth": hf_config["num_hidden_layers"],
                                "num_heads": hf_config["num_attention_heads"],
                                "mlp_ratio": hf_config["intermediate_size"] / width, "img_size": size,
                                "patch_size": hf_config["patch_size"], "in_chans": 3, "qkv_bias": True,
                                "class_token": True}
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return config


# HF class, HF prefix, timm model name, constructor arguments
TIMM_CASES = {
    "vit": ("ViTForImageClassification", "vit.", "vit_small_patch16_224", {}),
    "vit-headless": ("ViTModel", "", "vit_small_patch16_224", {"add_pooling_layer": False}),
    "deit-distilled": ("DeiTForImageClassificationWithTeacher", "deit.", "deit_small_distilled_patch16_224", {}),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_reads_as_hf_and_converts_both_ways(tmp_path, case):
    cls, prefix, arch, kwargs = TIMM_CASES[case]
    model = build(cls, kwargs, layer_norm_eps=1e-6)  # timm's LayerNorm eps
    model.save_pretrained(tmp_path / "hf")
    write_timm(tmp_path / "hf", tmp_path / "timm", arch, prefix)
    wanted = {"last_hidden_state": "hidden"} if cls == "ViTModel" else {"logits": "logits"}
    x = pixels()
    ref = hf_outputs(model, x, wanted)

    # timm folder -> canonical: same outputs as the HF model
    timm = load(tmp_path / "timm")
    assert timm.family == "timm-vit"
    assert (timm.spec.heads, timm.spec.head_dim, timm.spec.norm_eps) == (4, 8, 1e-6)
    with torch.no_grad():
        out = forward(timm.spec, timm.materialize(), pixel_values=x)
    for name, value in ref.items():
        assert max_diff(value, out[name]) <= 1e-5, name

    # timm -> timm: byte-identical, and the config keeps its own model name
    save(timm, tmp_path / "timm2")
    assert_same_files(tmp_path / "timm", tmp_path / "timm2")
    assert json.loads((tmp_path / "timm2" / "config.json").read_text())["architecture"] == arch

    # HF -> timm equals the hand-built timm file; its config lets timm's create_model rebuild the model
    hf_family = "hf-vit" if cls.startswith("ViT") else "hf-deit"
    save(load(tmp_path / "hf"), tmp_path / "as_timm", family="timm-vit")
    assert_same_files(tmp_path / "timm", tmp_path / "as_timm")
    config = json.loads((tmp_path / "as_timm" / "config.json").read_text())
    assert "architectures" not in config and "model_type" not in config
    distilled = case == "deit-distilled"
    assert config["architecture"].startswith("deit_" if distilled else "vit_")
    assert ("distilled" in config["architecture"]) == distilled
    num_classes = 5 if cls != "ViTModel" else 0
    assert (config["num_classes"], config["num_features"], config["global_pool"]) == (num_classes, 32, "token")
    assert config["pretrained_cfg"]["num_classes"] == num_classes
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert config["model_args"] == {"embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "img_size": 16,
                                    "patch_size": 4, "in_chans": 3, "qkv_bias": True, "class_token": True}

    # ... and timm -> HF gives back the original HF file, which transformers loads whole, with the same outputs
    back = load(tmp_path / "as_timm")
    save(back, tmp_path / "back", family=hf_family)
    assert_same_files(tmp_path / "hf", tmp_path / "back")
    again = reload_hf(cls, tmp_path / "back", **kwargs)
    for name, value in hf_outputs(again, x, wanted).items():
        assert torch.equal(value, ref[name]), name


def test_timm_heads_default_to_head_dim_64(tmp_path):
    """Without model_args the head count is width // 64 (the head size of every named timm ViT)."""
    model = build("ViTForImageClassification", hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=256, layer_norm_eps=1e-6)
    model.save_pretrained(tmp_path / "hf")
    write_timm(tmp_path / "hf", tmp_path / "timm", "vit_small_patch16_224", "vit.", model_args=False)
    timm = load(tmp_path / "timm")
    assert (timm.spec.heads, timm.spec.head_dim) == (2, 64)
    x = pixels()
    with torch.no_grad():
        assert max_diff(model(pixel_values=x).logits, forward(timm.spec, timm.materialize(), pixel_values=x)
                        ["logits"]) <= 1e-5


def test_grown_configs_follow_the_spec(tmp_path):
    """A wider model written over its source's config updates every size key (pooler size, timm model_args) and
    keeps the source's own timm model name."""
    model = build("ViTModel")
    model.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    wide = ours.spec.replace(width=64, heads=8, mlp=256)
    config = get_descriptor("hf-vit").write_config(wide, ours.config)
    assert (config["hidden_size"], config["pooler_output_size"], config["num_attention_heads"],
            config["intermediate_size"]) == (64, 64, 8, 256)

    build("ViTForImageClassification", layer_norm_eps=1e-6).save_pretrained(tmp_path / "hf2")
    write_timm(tmp_path / "hf2", tmp_path / "timm", "vit_small_patch16_224", "vit.")
    timm = load(tmp_path / "timm")
    config = get_descriptor("timm-vit").write_config(timm.spec.replace(width=64, heads=8, mlp=256, layers=3),
                                                     timm.config)
    assert config["architecture"] == "vit_small_patch16_224"
    assert config["num_features"] == 64
    assert {k: config["model_args"][k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")} == \
        {"embed_dim": 64, "depth": 3, "num_heads": 8, "mlp_ratio": 4.0}


# --- refusals --------------------------------------------------------------------------------------------------------


@pytest.fixture
def hf_vit(tmp_path):
    build("ViTForImageClassification", layer_norm_eps=1e-6).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_timm_layerscale_is_refused(tmp_path, hf_vit):
    write_timm(hf_vit, tmp_path / "timm", "vit_small_patch16_224", "vit.",
               extra={"blocks.0.ls1.gamma": torch.ones(32)})
    with pytest.raises(LigoError, match=r"blocks\.0\.ls1\.gamma.*LayerScale"):
        load(tmp_path / "timm")


def test_timm_average_pooling_is_refused(tmp_path, hf_vit):
    write_timm(hf_vit, tmp_path / "timm", "vit_small_patch16_224", "vit.")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    config["global_pool"] = "avg"
    (tmp_path / "timm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LigoError, match="global_pool='avg'"):
        load(tmp_path / "timm")


def test_positions_without_class_row_are_refused(tmp_path, hf_vit):
    """timm's no_embed_class layout (no position row for the class token) must not be read as a smaller image."""
    write_timm(hf_vit, tmp_path / "timm", "vit_small_patch16_224", "vit.")
    state = read_all(tmp_path / "timm")
    state["pos_embed"] = state["pos_embed"][:, 1:].contiguous()
    save_file(state, str(tmp_path / "timm" / "model.safetensors"))
    with pytest.raises(LigoError, match="pos_embed has 16 positions"):
        load(tmp_path / "timm")


@pytest.mark.parametrize("cls, family, reason", [
    ("ViTModel", "timm-vit", "pooler"),  # timm has no pooler
    ("DeiTForImageClassification", "timm-vit", "no model class"),  # timm's distilled model has two heads
    ("DeiTForImageClassification", "hf-vit", "embed.dist"),
    ("ViTForImageClassification", "hf-deit", "dist_token"),
])
def test_unwritable_conversions_are_refused(tmp_path, cls, family, reason):
    build(cls, layer_norm_eps=1e-6).save_pretrained(tmp_path / "src")
    with pytest.raises(LigoError, match=reason):
        save(load(tmp_path / "src"), tmp_path / "out", family=family)
    assert not (tmp_path / "out").exists()


def test_timm_needs_its_layernorm_eps(tmp_path):
    build("ViTForImageClassification").save_pretrained(tmp_path / "src")  # HF's default eps 1e-12
    with pytest.raises(LigoError, match="norm_eps"):
        save(load(tmp_path / "src"), tmp_path / "out", family="timm-vit")
