"""ELECTRA (electra.toml): ElectraModel, ElectraForPreTraining (the discriminator: one logit per token) and
ElectraForMaskedLM (the generator: an MLM head in the embedding space).  The tables are embedding_size wide and,
where that is not the hidden size, projected into the stream (embed.proj); growth keeps the embedding size.

Our canonical forward equals transformers' on the same weights (padded batch, randomised norms and biases), SDPA
equals explicit attention, files round-trip byte for byte, transformers loads what we write (also after growth by
LiGO and every baseline) and reads back the same config; function-preservation claims hold where growth.json makes
them; unsupported variants are refused by their config key."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from ligo_convert import LigoError, Spec, forward, init_weights, load, save
from ligo_convert.cli import main
from ligo_convert.evaluate import evaluate
from ligo_convert.grow import grow
from ligo_convert.growth import baselines as B
from ligo_convert.growth.operator import LigoOperator, check_growable
from helpers import assert_same_files, loading_problems, max_diff, read_all

BASE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
CONFIGS = {
    "emb16": dict(BASE, embedding_size=16),  # electra-small style: tables of 16 projected to 32
    "emb32": dict(BASE, embedding_size=32),  # electra-base style: tables as wide as the stream, no projection
    # odd heads (3 x 10), tables wider than the stream, gelu_new in the blocks while the generator's head keeps
    # gelu, three token types, another eps and pad id
    "odd": dict(BASE, hidden_size=30, num_attention_heads=3, embedding_size=40, hidden_act="gelu_new",
                layer_norm_eps=1e-7, type_vocab_size=3, pad_token_id=1),
}
CLASSES = ("ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM")
CASES = [(cls, config) for config in CONFIGS for cls in CLASSES]
IDS = [f"{cls}-{config}" for cls, config in CASES]
COMPARED = ("model_type", "hidden_size", "embedding_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "vocab_size", "type_vocab_size", "layer_norm_eps",
            "hidden_act", "pad_token_id", "tie_word_embeddings", "is_decoder", "architectures")


def build(folder, cls: str, config: str | dict):
    """A transformers model with random norm weights and biases (so a dropped or swapped one shows), saved."""
    values = CONFIGS[config] if isinstance(config, str) else config
    model = getattr(transformers, cls)(transformers.ElectraConfig(**values)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.1)
    model.save_pretrained(folder)
    return model


def text_inputs(types: int = 2, pad: int = 0) -> dict:
    ids = torch.randint(3, 99, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = pad
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.randint(0, types, (2, 7)))


def hf_out(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def ours_out(spec: Spec, weights, x: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = forward(spec, weights, **x, **kw)
    return out["logits"] if "logits" in out else out["hidden"]


def inputs_for(model) -> dict:
    return text_inputs(model.config.type_vocab_size, model.config.pad_token_id)


# --- forward, attention, files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,config", CASES, ids=IDS)
def test_forward_matches_transformers(tmp_path, cls, config):
    model = build(tmp_path / "src", cls, config)
    ours = load(tmp_path / "src")
    assert ours.family == "electra"
    assert ours.mapping.unmapped == [] and ours.mapping.dropped == []
    spec, emb = ours.spec, CONFIGS[config]["embedding_size"]
    assert spec.embed_width == emb and spec.embed_proj == (emb != spec.width)
    assert spec.embedding_size == (0 if emb == spec.width else emb)  # equal to the width: stored as 0
    assert ("embed.proj.weight" in spec.tensor_names()) == spec.embed_proj
    assert spec.head == {"ElectraModel": "none", "ElectraForPreTraining": "token_binary",
                         "ElectraForMaskedLM": "mlm"}[cls]
    assert spec.shape_of("embed.tokens") == (99, emb)
    x = inputs_for(model)
    weights = ours.materialize()
    ref, out = hf_out(model, x), ours_out(spec, weights, x)
    assert ref.shape == out.shape  # the discriminator's logits are (batch, tokens)
    assert max_diff(ref, out) <= 1e-5
    # SDPA and the explicit form compute the same thing
    assert max_diff(ours_out(spec, weights, x, attention="explicit"), ours_out(spec, weights, x, attention="sdpa")) \
        <= 1e-5


@pytest.mark.parametrize("cls,config", CASES, ids=IDS)
def test_round_trip(tmp_path, cls, config):
    model = build(tmp_path / "src", cls, config)
    ours = load(tmp_path / "src")
    save(ours, tmp_path / "out")
    assert_same_files(tmp_path / "src", tmp_path / "out")
    again, info = getattr(transformers, cls).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert loading_problems(info) == {}
    x = inputs_for(model)
    # against transformers' own reload of the source (a reloaded model may differ from the one built in memory in the
    # last bit: gelu_new's kernels on other memory layouts)
    first = getattr(transformers, cls).from_pretrained(tmp_path / "src").eval()
    assert torch.equal(hf_out(first, x), hf_out(again.eval(), x))
    src = transformers.AutoConfig.from_pretrained(tmp_path / "src")
    out = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert type(out) is type(src) is transformers.ElectraConfig
    for key in COMPARED:
        assert getattr(out, key) == getattr(src, key), key
    assert load(tmp_path / "out").spec == ours.spec


def test_untied_generator_decoder(tmp_path):
    """tie_word_embeddings false: generator_lm_head.weight is the generator's own decoder (embedding space wide),
    read, used by the forward and written back under its name."""
    model = build(tmp_path / "src", "ElectraForMaskedLM", dict(CONFIGS["emb16"], tie_word_embeddings=False))
    ours = load(tmp_path / "src")
    assert not ours.spec.tie_embeddings and ours.mapping.dropped == []
    assert ours.spec.shape_of("lm_head.weight") == (99, 16)
    x = inputs_for(model)
    assert max_diff(hf_out(model, x), ours_out(ours.spec, ours.materialize(), x)) <= 1e-5
    save(ours, tmp_path / "out")
    assert_same_files(tmp_path / "src", tmp_path / "out")
    again = transformers.ElectraForMaskedLM.from_pretrained(tmp_path / "out").eval()
    assert not again.config.tie_word_embeddings and torch.equal(hf_out(model, x), hf_out(again, x))


def test_tied_decoder_copy_is_dropped(tmp_path):
    """Older files store the generator's tied decoder as generator_lm_head.weight: it is the word embeddings."""
    from safetensors.torch import save_file

    model = build(tmp_path / "src", "ElectraForMaskedLM", "emb16")
    tensors = read_all(tmp_path / "src")
    tensors["generator_lm_head.weight"] = tensors["electra.embeddings.word_embeddings.weight"].clone()
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    ours = load(tmp_path / "src")
    assert ours.mapping.dropped == ["generator_lm_head.weight"] and ours.spec.tie_embeddings
    x = inputs_for(model)
    assert max_diff(hf_out(model, x), ours_out(ours.spec, ours.materialize(), x)) <= 1e-5


def test_detected_without_model_type(tmp_path):
    """An unprefixed ElectraModel has BERT's block names: the embedding projection tells them apart."""
    build(tmp_path / "src", "ElectraModel", "emb16")
    path = tmp_path / "src" / "config.json"
    config = json.loads(path.read_text())
    del config["model_type"], config["architectures"]
    path.write_text(json.dumps(config))
    assert load(tmp_path / "src").family == "electra"


# --- refusals ------------------------------------------------------------------------------------------------------


def assert_refused(tmp_path, text: str, inspect: bool = True) -> None:
    with pytest.raises(LigoError, match=text):
        load(tmp_path / "src")
    commands = [["convert", tmp_path / "src", "--out", tmp_path / "out"]] + ([["inspect", tmp_path / "src"]]
                                                                             if inspect else [])
    for args in commands:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 2, (result.output, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("change, key", [
    ({"is_decoder": True}, "is_decoder"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
])
def test_refuses_by_config_key(tmp_path, change, key):
    build(tmp_path / "src", "ElectraForMaskedLM", "emb16")
    path = tmp_path / "src" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    assert_refused(tmp_path, key)


def test_refuses_other_task_heads(tmp_path):
    transformers.ElectraForSequenceClassification(transformers.ElectraConfig(**CONFIGS["emb16"])) \
        .save_pretrained(tmp_path / "src")
    assert_refused(tmp_path, "ELECTRA task head", inspect=False)  # inspect reports them (exit 0)


def test_spec_checks_the_embedding_space():
    spec = Spec(layers=1, width=32, heads=4, head_dim=8, mlp=16, vocab_size=99, embedding_size=32)
    assert spec.embedding_size == 0 and spec.space_size("embedding") == 32 and not spec.embed_proj
    for bad in (dict(head="lm"), dict(head="mlm", mlm_transform=False), dict(input="patches")):
        with pytest.raises(ValueError):
            Spec(layers=1, width=32, heads=4, head_dim=8, mlp=16, vocab_size=99, embedding_size=16, **bad).check()


# --- growth -------------------------------------------------------------------------------------------------------


def spec_of(embedding_size: int, head: str = "token_binary") -> Spec:
    return Spec(layers=2, width=32, heads=4, head_dim=8, mlp=37, vocab_size=99, type_vocab_size=2, max_positions=64,
                embedding_size=embedding_size, embed_norm=True, final_norm=False, norm_placement="post", head=head,
                tie_embeddings=head == "mlm", mlm_activation="gelu")


def test_operator_keeps_the_embedding_size():
    """With its own embedding size only embed.proj's output axis grows; where it is the width the embedding space
    is the residual stream (one matrix, B_emb)."""
    small, wide = spec_of(16), spec_of(0, head="mlm")
    target = small.replace(layers=3, width=48, heads=6, kv_heads=6, mlp=64)
    op = LigoOperator(small, target, init_weights(small, seed=1))
    assert op.width("embedding") is None and "width.embedding" not in op.named_operator_tensors()
    grown = op()
    assert torch.equal(grown["embed.tokens"], op.source_weights()["embed.tokens"])
    assert grown["embed.proj.weight"].shape == (48, 16) and grown["embed.norm.weight"].shape == (16,)
    op = LigoOperator(wide, wide.replace(width=48, heads=6, kv_heads=6, mlp=64), init_weights(wide, seed=1))
    assert op.width("embedding") is op.width("residual") and "width.embedding" not in op.named_operator_tensors()
    assert op()["embed.tokens"].shape == (99, 48) and op()["mlm.norm.weight"].shape == (48,)
    # the projection cannot vanish: a target as wide as the source's (wider) tables is refused
    with pytest.raises(LigoError, match="embedding_size"):
        check_growable(spec_of(64), spec_of(64).replace(width=64, heads=8, kv_heads=8))


def grown_embedding(folder) -> int:
    return json.loads((folder / "config.json").read_text())["embedding_size"]


@pytest.mark.parametrize("cls,config", [("ElectraForPreTraining", "emb16"), ("ElectraForMaskedLM", "emb32")])
def test_ligo_growth_loads_in_transformers(tmp_path, cls, config):
    build(tmp_path / "src", cls, config)
    result = grow(tmp_path / "src", out=tmp_path / "big", layers=3, width=48, heads=6, mlp=64, steps=2,
                  batch_size=2, seq_len=16, eval_batches=1)
    report = json.loads((tmp_path / "big" / "growth.json").read_text())
    # the discriminator's replaced-token labels need a generator: it fits by distillation
    assert report["objective"] == ("distill" if cls == "ElectraForPreTraining" else "task")
    grown = load(tmp_path / "big")
    assert grown.spec == result.spec and grown.spec.width == 48
    assert grown_embedding(tmp_path / "big") == (16 if config == "emb16" else 48)  # kept / grown with the width
    again, info = getattr(transformers, cls).from_pretrained(tmp_path / "big", output_loading_info=True)
    assert loading_problems(info) == {}
    x = text_inputs()
    assert max_diff(hf_out(again.eval(), x), ours_out(grown.spec, grown.materialize(), x)) <= 1e-5


def test_task_objective_refused_for_the_discriminator(tmp_path):
    build(tmp_path / "src", "ElectraForPreTraining", "emb16")
    with pytest.raises(LigoError, match="per-token binary head"):
        grow(tmp_path / "src", out=tmp_path / "big", layers=3, objective="task", steps=1, batch_size=2, seq_len=16)
    result = CliRunner().invoke(main, ["grow", str(tmp_path / "src"), "--layers", "3", "--objective", "task",
                                       "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--out",
                                       str(tmp_path / "big")])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--objective distill" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # eval scores it by replaced-token detection with random replacements instead (the test below)
    assert evaluate(tmp_path / "src", max_batches=1, batch_size=2, seq_len=16)["probe"].startswith("replaced")


# post-LN: LEMON cannot add layers losslessly, so the width grows alone (by a factor of 2: net2net is exact too);
# stack/interpolate/aki/scratch also add a layer
WIDER = dict(layers=2, width=64, heads=8, mlp=80)
DEEPER = dict(layers=3, width=64, heads=8, mlp=80)


@pytest.mark.parametrize("cls,config", [("ElectraForPreTraining", "emb16"), ("ElectraForMaskedLM", "emb16"),
                                        ("ElectraForMaskedLM", "emb32"), ("ElectraModel", "odd")])
def test_every_baseline_loads_in_transformers(tmp_path, cls, config):
    model = build(tmp_path / "src", cls, config)
    source = load(tmp_path / "src").spec
    x = inputs_for(model)
    before = hf_out(model, x)
    sizes_of = {"net2net": WIDER, "lemon": WIDER, "stack": DEEPER, "interpolate": WIDER, "aki": DEEPER,
                "scratch": WIDER}
    if config == "odd":  # 3 heads of 10: 30 -> 60 wide, 6 heads
        sizes_of = {m: dict(s, width=60, heads=6) for m, s in sizes_of.items()}
    for method, sizes in sizes_of.items():
        result = grow(tmp_path / "src", out=tmp_path / method, method=method, eval_batches=0, **sizes)
        grown = load(tmp_path / method)
        assert grown.spec.width == sizes["width"] and grown.spec.layers == sizes["layers"]
        assert grown.spec.embed_width == (source.embed_width if source.embed_proj else sizes["width"])
        assert grown_embedding(tmp_path / method) == grown.spec.embed_width
        again, info = getattr(transformers, cls).from_pretrained(tmp_path / method, output_loading_info=True)
        assert loading_problems(info) == {}, (method, info)
        after = hf_out(again.eval(), x)
        assert max_diff(after, ours_out(grown.spec, grown.materialize(), x)) <= 1e-5, method
        exact, why = B.preservation(method, source, result.spec)
        report = json.loads((tmp_path / method / "growth.json").read_text())
        assert report["method"] == method and report["function_preserving"] == exact
        if exact:  # the grown model computes the source's function (the source's channels of the hidden states)
            assert max_diff(after[..., :before.shape[-1]] if cls == "ElectraModel" else after, before) <= 1e-4, \
                (method, why)
        if method in ("net2net", "lemon"):
            assert exact, (method, why)  # width x2 on a post-LN model: both claim exactness, and it holds


def test_lemon_refuses_depth_on_post_ln(tmp_path):
    build(tmp_path / "src", "ElectraForPreTraining", "emb16")
    with pytest.raises(LigoError, match="post-LN"):
        grow(tmp_path / "src", out=tmp_path / "lemon", method="lemon", **DEEPER)
    assert not (tmp_path / "lemon").exists()


# --- eval --------------------------------------------------------------------------------------------------------


def test_eval_generator_both_engines(tmp_path):
    from ligo_convert import data

    model = build(tmp_path / "src", "ElectraForMaskedLM", "emb16")
    folder = tmp_path / "src"
    got = evaluate(folder, max_batches=1, batch_size=4, seq_len=16)
    spec = load(folder).spec
    batch = next(data.val_batches(spec, None, folder, batch_size=data.VAL_CHUNK, seq_len=16))  # max_batches=1
    with torch.no_grad():
        ref = model(**data.model_inputs(batch), labels=batch["labels"]).loss.item()
    assert got["loss"] == pytest.approx(ref, rel=1e-5)
    onnx_run = evaluate(folder, engine="onnx", max_batches=1, batch_size=4, seq_len=16)
    assert onnx_run["count"] == got["count"]
    assert abs(onnx_run["loss"] - got["loss"]) <= 1e-4 * max(1.0, abs(got["loss"]))


def test_eval_discriminator_detects_random_replacements_on_both_engines(tmp_path):
    """The discriminator has no data of its own (a generator makes its replacements), so eval scores replaced-token
    detection with random replacements: the same tokens, loss and accuracy on both engines; a head that always says
    "replaced" scores the replacement rate, one that never does its complement."""
    from ligo_convert.probes import REPLACED

    model = build(tmp_path / "src", "ElectraForPreTraining", "emb16")
    got = evaluate(tmp_path / "src", max_batches=2, seq_len=16)
    onnx_run = evaluate(tmp_path / "src", engine="onnx", max_batches=2, seq_len=16)
    assert got["probe"].startswith("replaced-token detection") and got["counted"] == "text tokens"
    assert onnx_run["count"] == got["count"] and abs(onnx_run["accuracy"] - got["accuracy"]) <= 1 / got["count"]
    assert abs(onnx_run["loss"] - got["loss"]) <= 1e-4 * max(1.0, got["loss"])
    for bias, expected in ((30.0, REPLACED), (-30.0, 1 - REPLACED)):
        with torch.no_grad():
            model.discriminator_predictions.dense_prediction.bias.fill_(bias)
        model.save_pretrained(tmp_path / f"bias{bias:g}")
        run = evaluate(tmp_path / f"bias{bias:g}", max_batches=2, seq_len=16)
        assert run["count"] == got["count"] and abs(run["accuracy"] - expected) < 0.06, (bias, run)
