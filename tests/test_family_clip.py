"""CLIP's towers (CLIPVisionModel[WithProjection], CLIPTextModel[WithProjection]) and SigLIP's vision tower without
its attention-pooling head: our canonical forward equals transformers' (last hidden state, pooled token, projected
embeddings), files round-trip byte for byte in both the transformers-5 and the transformers-4 ("vision_model." /
"text_model." prefixed) layouts, transformers loads what we write, every growth baseline writes a model transformers
loads (the projection space never grows), the projection classes export to ONNX, and SigLIP's pooling head is refused
by name."""

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file

from ligo_convert import LigoError, forward, load, save
from ligo_convert import export as ex
from ligo_convert.cli import main
from ligo_convert.grow import grow
from ligo_convert.growth import baselines as B
from family_checks import (assert_one_line_error, check_round_trip, edit_config, from_template_same_files, hf_load,
                           read_whole, save_randomised)
from helpers import assert_same_files, max_diff, read_all

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16,
              patch_size=4, projection_dim=24)
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=20, projection_dim=24)
EOS = 97  # a configured end-of-text id (eos_token_id 2: the legacy "highest id in the row")

# id -> (model class, config class, config, family)
CASES = {
    "CLIPVisionModel": ("CLIPVisionModel", "CLIPVisionConfig", VISION, "clip-vision"),
    "CLIPVisionModelWithProjection": ("CLIPVisionModelWithProjection", "CLIPVisionConfig", VISION, "clip-vision"),
    # 3 heads of 12, gelu instead of quick_gelu, another epsilon
    "vision-odd": ("CLIPVisionModelWithProjection", "CLIPVisionConfig",
                   dict(VISION, hidden_size=36, num_attention_heads=3, hidden_act="gelu", layer_norm_eps=1e-6,
                        projection_dim=20), "clip-vision"),
    "CLIPTextModel": ("CLIPTextModel", "CLIPTextConfig", dict(TEXT, eos_token_id=2), "clip-text"),
    "CLIPTextModelWithProjection": ("CLIPTextModelWithProjection", "CLIPTextConfig", dict(TEXT, eos_token_id=2),
                                    "clip-text"),
    "text-eos": ("CLIPTextModelWithProjection", "CLIPTextConfig", dict(TEXT, eos_token_id=EOS), "clip-text"),
    "text-odd": ("CLIPTextModel", "CLIPTextConfig", dict(TEXT, hidden_size=36, num_attention_heads=3,
                                                         eos_token_id=EOS, pad_token_id=0), "clip-text"),
    "SiglipVisionModel": ("SiglipVisionModel", "SiglipVisionConfig",
                          {k: v for k, v in VISION.items() if k != "projection_dim"} | {"vision_use_head": False},
                          "siglip-vision"),
}
VISION_CASES = [c for c, (_, cfg, _, _) in CASES.items() if "Vision" in cfg]

# Config values transformers must read back the same from what we write (where the class has them).
COMPARED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "image_size", "patch_size", "num_channels", "projection_dim", "vocab_size", "max_position_embeddings",
            "eos_token_id", "pad_token_id", "bos_token_id", "layer_norm_eps", "hidden_act", "vision_use_head",
            "architectures")


def build(tmp_path, case: str, folder: str = "src"):
    cls, config_cls, config, _ = CASES[case]
    return save_randomised(cls, getattr(transformers, config_cls)(**config), tmp_path / folder)


def inputs(case: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if case in VISION_CASES:
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)}
    pad = CASES[case][2].get("pad_token_id", 1)
    ids = torch.randint(3, 90, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    ids[1, 6:] = pad
    ids[0, 7], ids[1, 4], ids[2, 2], ids[2, 5] = EOS, EOS, EOS, EOS  # row 2: the first of two end-of-text tokens
    ids[0, 3] = 98  # the highest id in row 0 is not its end-of-text token
    return {"input_ids": ids, "attention_mask": mask}


def reference(model, x: dict) -> dict:
    with torch.no_grad():
        out = model(**x)
    ref = {"hidden": out.last_hidden_state}
    if getattr(out, "pooler_output", None) is not None:
        ref["pooled"] = out.pooler_output
    for name in ("image_embeds", "text_embeds"):
        if getattr(out, name, None) is not None:
            ref["embeds"] = getattr(out, name)
    return ref


def compare(ref: dict, out: dict, x: dict, exact: bool = False):
    keep = x["attention_mask"].bool() if "attention_mask" in x else None
    for k, v in ref.items():
        a, b = v, out[k]
        if keep is not None and a.dim() == 3:  # padded places of a causal model are not part of the answer
            a, b = a[keep], b[keep]
        if exact:
            assert torch.equal(a, b), k
        else:
            assert max_diff(a, b) <= 1e-5, (k, max_diff(a, b))


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers(tmp_path, case):
    model = build(tmp_path, case)
    ours = read_whole(tmp_path / "src", CASES[case][3])
    x = inputs(case)
    ref = reference(model, x)
    assert ("embeds" in ref) == CASES[case][0].endswith("WithProjection")
    with torch.no_grad():
        out = forward(ours.spec, ours.materialize(), **x)
    compare(ref, out, x)


def test_specs(tmp_path):
    build(tmp_path, "CLIPVisionModelWithProjection", "v")
    spec = load(tmp_path / "v").spec
    assert (spec.embed_norm, spec.final_norm, spec.pool, spec.pool_norm, spec.patch_bias, spec.cls_token) == \
        (True, False, "first", True, False, True)
    assert (spec.projection, spec.projection_dim, spec.activation, spec.norm_eps, spec.num_positions) == \
        (True, 24, "quick_gelu", 1e-5, 17)
    build(tmp_path, "CLIPVisionModel", "v0")
    assert (load(tmp_path / "v0").spec.projection, load(tmp_path / "v0").spec.projection_dim) == (False, 24)
    for case, token in (("CLIPTextModel", -1), ("text-eos", EOS)):
        build(tmp_path, case, case)
        spec = load(tmp_path / case).spec
        assert (spec.causal, spec.final_norm, spec.pool, spec.pool_token_id, spec.max_positions) == \
            (True, True, "eos", token, 20)
    build(tmp_path, "SiglipVisionModel", "s")
    spec = load(tmp_path / "s").spec
    assert (spec.cls_token, spec.patch_bias, spec.final_norm, spec.pool, spec.num_positions, spec.activation) == \
        (False, True, True, "none", 16, "gelu_tanh")


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_and_explicit_attention_agree(tmp_path, case):
    build(tmp_path, case)
    ours = load(tmp_path / "src")
    w = ours.materialize()
    for variant in ("padded", "unpadded"):
        x = inputs(case, seed=1)
        if variant == "unpadded":
            x.pop("attention_mask", None)
        with torch.no_grad():
            fused = forward(ours.spec, w, **x, attention="sdpa")
            explicit = forward(ours.spec, w, **x, attention="explicit")
        for k in explicit:
            assert max_diff(fused[k], explicit[k]) <= 1e-5, (variant, k)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    model = build(tmp_path, case)
    check_round_trip(tmp_path, model, getattr(transformers, CASES[case][0]), lambda: inputs(case), reference, COMPARED,
                     same_outputs=lambda first, second, x: compare(first, second, x, exact=True))


@pytest.mark.parametrize("case", ["CLIPVisionModelWithProjection", "vision-odd", "text-eos", "CLIPTextModel",
                                  "SiglipVisionModel"])
def test_written_from_tensors_without_source_config(tmp_path, case):
    """Written from the descriptor's template (no source config): transformers builds the same model, with the
    end-of-text rule (eos_token_id) and the projection size written from the spec."""
    build(tmp_path, case)
    ours, weights, again = from_template_same_files(tmp_path, getattr(transformers, CASES[case][0]))
    x = inputs(case)
    with torch.no_grad():
        out = forward(ours.spec, weights, **x)
    compare(reference(again, x), out, x)
    assert load(tmp_path / "fresh").spec == ours.spec


@pytest.mark.parametrize("case, prefix", [("CLIPVisionModel", "vision_model."), ("CLIPTextModel", "text_model."),
                                          ("SiglipVisionModel", "vision_model.")])
def test_transformers_4_layout_with_position_ids(tmp_path, case, prefix):
    """transformers 4 saved the bare towers under their tower prefix, some with the position_ids buffer: read as the
    same model, and written back byte for byte (buffer included)."""
    model = build(tmp_path, case)
    tensors = {prefix + k: v for k, v in read_all(tmp_path / "src").items()}
    rows = 17 if case == "CLIPVisionModel" else 16 if case.startswith("Siglip") else 20
    tensors[prefix + "embeddings.position_ids"] = torch.arange(rows)[None]
    (tmp_path / "v4").mkdir()
    save_file(tensors, tmp_path / "v4" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "v4" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    ours = load(tmp_path / "v4")
    assert ours.mapping.prefix == prefix and ours.mapping.dropped == [prefix + "embeddings.position_ids"]
    x = inputs(case)
    with torch.no_grad():
        compare(reference(model, x), forward(ours.spec, ours.materialize(), **x), x)
    save(ours, tmp_path / "out")
    assert_same_files(tmp_path / "v4", tmp_path / "out")
    again, info = getattr(transformers, CASES[case][0]).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_end_of_text_rule_follows_eos_token_id(tmp_path):
    """eos_token_id 2 pools at the row's highest id, any other at its first end-of-text token; the two differ on
    these rows, and each equals transformers'."""
    x = inputs("text-eos")
    pooled = {}
    for case in ("CLIPTextModelWithProjection", "text-eos"):
        model = build(tmp_path, case, case)
        ours = load(tmp_path / case)
        with torch.no_grad():
            out = forward(ours.spec, ours.materialize(), **x)
        compare(reference(model, x), out, x)
        hidden = out["hidden"]
        pooled[case] = [int((hidden[r] - out["pooled"][r]).abs().sum(-1).argmin()) for r in range(3)]
    assert pooled["text-eos"] == [7, 4, 2]  # the first end-of-text token of each row
    assert pooled["CLIPTextModelWithProjection"] == [3, 4, 2]  # the highest id: 98 in row 0


# --- growth ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["CLIPVisionModelWithProjection", "text-eos", "SiglipVisionModel"])
@pytest.mark.parametrize("method", B.METHODS)
def test_every_baseline_grows_a_model_transformers_loads(tmp_path, case, method):
    """Width x2 (and a layer more where the method grows depth): the grown model loads whole, computes our outputs,
    keeps the projection size, and where growth.json claims it computes the source's embeddings."""
    model = build(tmp_path, case)
    deeper = method not in ("net2net", "lemon")
    layers = 3 if deeper else 2
    result = grow(tmp_path / "src", layers=layers, width=64, heads=8, mlp=74, method=method, out=tmp_path / "big",
                  steps=0, eval_batches=1, seq_len=16)
    grown = load(tmp_path / "big")
    assert (grown.spec.layers, grown.spec.width, grown.spec.mlp) == (layers, 64, 74)
    assert grown.spec.projection_dim == load(tmp_path / "src").spec.projection_dim
    again = hf_load(getattr(transformers, CASES[case][0]), tmp_path / "big")
    x = inputs(case)
    weights = grown.materialize()
    with torch.no_grad():
        out = forward(grown.spec, weights, **x)
    theirs = reference(again, x)
    compare(theirs, out, x)
    report = json.loads((tmp_path / "big" / "growth.json").read_text())
    assert report["function_preserving"] == result.report["function_preserving"]
    if case != "SiglipVisionModel":  # the embeddings are comparable across widths (the projection space is fixed)
        assert report["function_preserving"] == (method in ("net2net", "lemon")), report
        if report["function_preserving"]:
            assert max_diff(theirs["embeds"], reference(model, x)["embeds"]) <= 1e-4, method


@pytest.mark.parametrize("case", ["CLIPVisionModelWithProjection", "text-eos"])
def test_ligo_growth(tmp_path, case):
    build(tmp_path, case)
    grow(tmp_path / "src", layers=3, width=48, heads=6, mlp=64, out=tmp_path / "big", steps=2, batch_size=4,
         seq_len=16, eval_batches=1)
    grown = load(tmp_path / "big")
    assert grown.spec.projection and grown.spec.projection_dim == 24
    config = json.loads((tmp_path / "big" / "config.json").read_text())
    assert (config["hidden_size"], config["projection_dim"]) == (48, 24)
    again = hf_load(getattr(transformers, CASES[case][0]), tmp_path / "big")
    x = inputs(case)
    with torch.no_grad():
        compare(reference(again, x), forward(grown.spec, grown.materialize(), **x), x)


# --- export ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["CLIPVisionModelWithProjection", "text-eos", "SiglipVisionModel"])
def test_export_matches_transformers(tmp_path, case):
    """The projection classes export image_embeds / text_embeds beside the hidden states (and the pooled token);
    headless SigLIP only its hidden states.  The file equals transformers at a batch never used at export."""
    model = build(tmp_path, case)
    report = ex.export_onnx(tmp_path / "src", tmp_path / "m.onnx")
    assert report.ok, report.failure()
    want = {"CLIPVisionModelWithProjection": ["last_hidden_state", "pooler_output", "image_embeds"],
            "text-eos": ["last_hidden_state", "pooler_output", "text_embeds"],
            "SiglipVisionModel": ["last_hidden_state"]}[case]
    assert report.outputs == want
    import onnxruntime as ort

    x = inputs(case, seed=3)
    x = {k: torch.cat([v, v[:1]]) for k, v in x.items()}  # batch 4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(report.outputs, session.run(None, {k: v.numpy() for k, v in x.items()})))
    names = {"hidden": "last_hidden_state", "pooled": "pooler_output", "embeds": want[-1]}
    ref = reference(model, x)
    assert {names[k] for k in ref} == set(want) - {"pooler_output"}  # the projection classes return no pooled token
    compare({k: v for k, v in ref.items()}, {k: torch.from_numpy(got[names[k]]) for k in ref}, x)


# --- SigLIP's attention-pooling head is refused -----------------------------------------------------------------------


def test_siglip_pooling_head_is_refused_by_name(tmp_path):
    """Every released SigLIP vision tower has the attention-pooling head (a probe cross-attending over the patches):
    refused, naming its tensor, the feature and its config switch; one line, exit 2, nothing written."""
    config = {k: v for k, v in VISION.items() if k != "projection_dim"}
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**config)).save_pretrained(tmp_path / "src")
    with pytest.raises(LigoError, match=r"tensor head\.\S+ belongs to SigLIP's attention-pooling head"):
        load(tmp_path / "src")
    for args in (["convert", tmp_path / "src", "--out", tmp_path / "out"],
                 ["grow", tmp_path / "src", "--width", "64", "--heads", "8", "--out", tmp_path / "out"]):
        assert_one_line_error(CliRunner().invoke(main, [str(a) for a in args]), "attention-pooling head",
                              "vision_use_head")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_siglip_head_switch_alone_is_refused(tmp_path):
    """A config that asks for the head (vision_use_head) whose file lacks it: refused by the config key."""
    build(tmp_path, "SiglipVisionModel")
    edit_config(tmp_path / "src", vision_use_head=True)
    with pytest.raises(LigoError, match="vision_use_head=True is not supported"):
        load(tmp_path / "src")
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "config key vision_use_head=True")
    assert not (tmp_path / "out").exists()


# --- eval: the towers have no head, so eval probes their features ------------------------------------------------------


@pytest.mark.parametrize("case", ["CLIPVisionModelWithProjection", "text-eos"])
def test_eval_probes_the_tower_on_both_engines(tmp_path, case):
    """A vision tower: a k-NN probe on the digits (well above chance even at random weights: digits are easy to tell
    apart by their pixels); a text tower: span retrieval.  Both engines give the same accuracy; a tower whose
    features carry nothing (the projection zeroed: every image the same vector) scores chance."""
    from ligo_convert.evaluate import evaluate

    cls, config_cls, config, _ = CASES[case]
    if case not in VISION_CASES:  # sequences of 64 tokens: 16 bytes of indented source are mostly spaces
        config = dict(config, max_position_embeddings=64)
    model = save_randomised(cls, getattr(transformers, config_cls)(**config), tmp_path / "src")
    got = evaluate(tmp_path / "src", max_batches=4, seq_len=64)
    onnx_run = evaluate(tmp_path / "src", engine="onnx", max_batches=4, seq_len=64)
    assert (got["probe"].split()[0], got["counted"]) == (("5-NN", "images") if case in VISION_CASES else
                                                        ("span", "sequences"))
    assert got["loss"] is None and got["count"] == onnx_run["count"] == 64
    assert abs(got["accuracy"] - onnx_run["accuracy"]) <= 1 / 64
    chance = 0.1 if case in VISION_CASES else 1 / 64
    assert got["accuracy"] > 2 * chance, got  # random weights; test_minilm shows trained text features do better
    with torch.no_grad():
        (model.visual_projection if case in VISION_CASES else model.text_projection).weight.zero_()
    model.save_pretrained(tmp_path / "zeroed")
    flat = evaluate(tmp_path / "zeroed", max_batches=4, seq_len=64)
    assert flat["accuracy"] <= 2 * chance, flat
