"""The CLI and the zoo: `zoo`, `inspect`, `convert` print what the library finds and write what it writes; the help
examples really run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ligo_convert import LigoError, Spec, forward, from_tensors, load, save
from ligo_convert.cli import main
from ligo_convert.descriptors import load_descriptors
from ligo_convert.composite import composite_of
from ligo_convert.zoo import _entry, entries, find_entry, target_sizes
from helpers import assert_same_files, loading_problems, max_diff, read_all

CONFIG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(**CONFIG)).eval().save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(99)) + "\n")  # a tokenizer file to carry
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# --- zoo ---------------------------------------------------------------------------------------------------------------

# The brief's zoo facts (docs/families.md): layers, width, heads, kv_heads, mlp, head_dim.
FACTS = {
    "vit-tiny": (12, 192, 3, 3, 768, 64), "vit-small": (12, 384, 6, 6, 1536, 64),
    "vit-base": (12, 768, 12, 12, 3072, 64), "vit-large": (24, 1024, 16, 16, 4096, 64),
    "deit-tiny": (12, 192, 3, 3, 768, 64), "deit-small": (12, 384, 6, 6, 1536, 64),
    "deit-base": (12, 768, 12, 12, 3072, 64),
    "timm-vit-small": (12, 384, 6, 6, 1536, 64), "timm-vit-base": (12, 768, 12, 12, 3072, 64),
    "bert-tiny": (2, 128, 2, 2, 512, 64), "bert-mini": (4, 256, 4, 4, 1024, 64), "bert-small": (4, 512, 8, 8, 2048, 64),
    "bert-medium": (8, 512, 8, 8, 2048, 64), "bert-base": (12, 768, 12, 12, 3072, 64),
    "bert-large": (24, 1024, 16, 16, 4096, 64),
    "roberta-base": (12, 768, 12, 12, 3072, 64), "roberta-large": (24, 1024, 16, 16, 4096, 64),
    "gpt2": (12, 768, 12, 12, 3072, 64), "gpt2-medium": (24, 1024, 16, 16, 4096, 64),
    "gpt2-large": (36, 1280, 20, 20, 5120, 64),
    "smollm2-135m": (30, 576, 9, 3, 1536, 64), "smollm2-360m": (32, 960, 15, 5, 2560, 64),
    "minilm-l6": (6, 384, 12, 12, 1536, 32),
}


def test_zoo_entries():
    names = [e["name"] for e in entries()]
    assert len(names) == len(set(names))
    for name, sizes in FACTS.items():
        assert tuple(target_sizes(name).values()) == sizes, name
        assert list(target_sizes(name)) == ["layers", "width", "heads", "kv_heads", "mlp", "head_dim"]
    families = set(load_descriptors())
    for e in entries():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", e["hub"]), e
        if "towers" in e:  # a composite (CLIPModel): every tower read by its family's descriptor
            comp = composite_of({}, e["family"])
            assert list(e["towers"]) == comp.tower_names
            assert all(t.family in families for t in comp.towers)
            continue
        assert e["family"] in families, e  # every entry can be read by a descriptor
        assert e["heads"] % e["kv_heads"] == 0 and e["layers"] > 0 and e["mlp"] > 0
    assert find_entry("gpt2")["hub"] == "openai-community/gpt2"
    assert find_entry("openai-community/gpt2") is None and find_entry("nope") is None
    find_entry("gpt2")["hub"] = "changed"  # callers get copies
    assert find_entry("gpt2")["hub"] == "openai-community/gpt2"
    with pytest.raises(LigoError, match="not a zoo name"):
        target_sizes("gpt5")


def test_zoo_entry_checks():
    good = dict(family="hf-bert", hub="a/b", layers=2, width=64, heads=4, mlp=128)
    assert _entry("x", good, "f")["head_dim"] == 16
    for bad in (dict(good, width=63), dict(good, kv_heads=3), dict(good, layers=0), dict(good, hub="nohub"),
                dict(good, colour="red"), {k: v for k, v in good.items() if k != "mlp"}):
        with pytest.raises(ValueError):
            _entry("x", bad, "f")


def test_zoo_command():
    table = ok("zoo").stdout.splitlines()
    assert table[0].split()[:2] == ["name", "family"]
    rows = {line.split()[0]: line for line in table[1:]}
    for e in entries():
        assert e["hub"] in rows[e["name"]] and e["family"] in rows[e["name"]]
    assert "9 (kv 3)" in rows["smollm2-135m"]
    assert json.loads(ok("zoo", "--json").stdout) == entries()


# --- inspect -----------------------------------------------------------------------------------------------------------


def test_inspect(tiny_bert):
    info = json.loads(ok("inspect", tiny_bert, "--json").stdout)
    assert info["family"] == "hf-bert"
    spec = info["spec"]
    assert (spec["layers"], spec["width"], spec["heads"], spec["mlp"], spec["head"]) == (2, 32, 4, 37, "mlm")
    on_disk = read_all(tiny_bert)
    report = info["mapping"]
    assert sorted(r["key"] for r in report["tensors"]) == sorted(on_disk)  # every tensor is reported
    fed = {r["key"]: r["canonical"] for r in report["tensors"]}
    assert fed["bert.encoder.layer.1.attention.self.query.weight"] == ["layers.1.q.weight"]
    assert info["parameters"] == sum(t.numel() for k, t in on_disk.items() if fed[k])
    assert info["dtype"] == "float32"
    assert report["unmapped"] == report["missing"] == report["unsupported"] == []

    text = ok("inspect", tiny_bert).stdout
    for key in on_disk:
        assert key in text
    assert "bert.encoder.layer.1.attention.self.query.weight" in text and "-> layers.1.q.weight" in text
    assert "family      hf-bert" in text and f"parameters  {info['parameters']:,}" in text


def test_inspect_lists_problems(tiny_bert, tmp_path):
    """Unmapped and missing tensors are listed by name (convert would refuse them)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((tiny_bert / "config.json").read_text())
    tensors = load_file(tiny_bert / "model.safetensors")
    tensors["bert.encoder.layer.0.attention.self.rotary.inv_freq"] = torch.ones(4)
    del tensors["bert.embeddings.word_embeddings.weight"]
    save_file(tensors, src / "model.safetensors")
    result = ok("inspect", src)
    assert re.search(r"bert\.encoder\.layer\.0\.attention\.self\.rotary\.inv_freq\s.*UNMAPPED", result.stdout)
    assert "unmapped    1: bert.encoder.layer.0.attention.self.rotary.inv_freq" in result.stdout
    assert "missing     1: embed.tokens" in result.stdout
    assert "convert would refuse" in result.stderr
    report = json.loads(ok("inspect", src, "--json").stdout)["mapping"]
    assert report["unmapped"] == ["bert.encoder.layer.0.attention.self.rotary.inv_freq"]
    assert report["missing"] == ["embed.tokens"]


# --- convert -----------------------------------------------------------------------------------------------------------


def test_convert_round_trip(tiny_bert, tmp_path):
    out = tmp_path / "out"
    written = json.loads(ok("convert", tiny_bert, "--out", out, "--json").stdout)
    assert written["out"] == str(out.absolute()) and written["family"] == "hf-bert"
    assert written["files"] == sorted(p.name for p in out.iterdir())
    assert written["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(written["files"])
    assert_same_files(tiny_bert, out)
    assert (out / "vocab.txt").read_bytes() == (tiny_bert / "vocab.txt").read_bytes()
    model, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not loading_problems(info)

    text = ok("convert", tiny_bert, "--out", out, "--overwrite").stdout
    assert text.startswith(f"wrote {out.absolute()} (hf-bert, float32") and "model.safetensors" in text


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_dtype_and_shards(tiny_bert, tmp_path, dtype):
    out = tmp_path / "out"
    ok("convert", tiny_bert, "--out", out, "--dtype", dtype, "--shard-size", "8KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    src, got = read_all(tiny_bert), read_all(out)
    assert sorted(got) == sorted(src) == sorted(index["weight_map"])
    for key, t in got.items():
        want = src[key].to(getattr(torch, dtype)) if src[key].is_floating_point() else src[key]
        assert t.dtype == want.dtype and torch.equal(t, want), key
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype
    model = transformers.BertForMaskedLM.from_pretrained(out, dtype=getattr(torch, dtype))
    assert model.bert.embeddings.word_embeddings.weight.dtype == getattr(torch, dtype)


def test_save_reports_progress(tiny_bert, tmp_path):
    """The progress callbacks the CLI's bar uses: a total first, then one step per tensor written."""
    calls = []
    save(load(tiny_bert), tmp_path / "out", shard_size="8KB", progress=lambda n: calls.append(n),
         progress_total=lambda n: calls.append(("total", n)))
    n_files = len(read_all(tmp_path / "out"))
    assert calls[0] == ("total", n_files) and calls[1:] == [1] * n_files


def _random_vit_spec() -> Spec:
    return Spec(layers=2, width=32, heads=4, head_dim=8, mlp=64, input="patches", image_size=32, patch_size=8,
                num_channels=3, cls_token=True, norm_eps=1e-6, norm_placement="pre", final_norm=True,
                head="classifier", num_classes=5, activation="gelu", norm="layernorm")


def test_convert_timm_to_hf_vit(tmp_path):
    """timm ViT -> HF ViT: transformers' ViTForImageClassification on the converted folder gives our outputs."""
    spec = _random_vit_spec()
    weights = {name: torch.randn(spec.shape_of(name)) * 0.2 for name in spec.tensor_names()}
    save(from_tensors(spec, weights, "timm-vit"), tmp_path / "timm", family="timm-vit")
    with safe_open(tmp_path / "timm" / "model.safetensors", "pt") as f:
        assert "blocks.0.attn.qkv.weight" in f.keys()  # really the timm layout
    assert json.loads(ok("inspect", tmp_path / "timm", "--json").stdout)["family"] == "timm-vit"

    ok("convert", tmp_path / "timm", "--to", "hf-vit", "--out", tmp_path / "hf")
    model, info = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not loading_problems(info)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(pixel_values=x).logits
        ours = forward(spec, weights, pixel_values=x)["logits"]
    assert max_diff(ref, ours) <= 1e-5

    # a timm feature the canonical graph lacks is listed by inspect and refused by convert
    tensors = load_file(tmp_path / "timm" / "model.safetensors")
    tensors["blocks.0.ls1.gamma"] = torch.ones(32)
    save_file(tensors, tmp_path / "timm" / "model.safetensors")
    text = ok("inspect", tmp_path / "timm").stdout
    assert re.search(r"blocks\.0\.ls1\.gamma\s.*UNSUPPORTED \(LayerScale", text)
    result = invoke("convert", tmp_path / "timm", "--to", "hf-vit", "--out", tmp_path / "hf2")
    assert result.exit_code == 2 and "blocks.0.ls1.gamma" in result.stderr and "LayerScale" in result.stderr
    assert not (tmp_path / "hf2").exists()


# --- help --------------------------------------------------------------------------------------------------------------


def test_help_lists_commands():
    text = ok("--help").stdout
    for command in ("zoo", "inspect", "convert"):
        assert re.search(rf"^\s+{command}\s", text, re.M), command
    assert ok("--version").stdout.strip().endswith("0.1.0")


def test_help_examples_run(tmp_path):
    """Every `ligo-convert ...` example in the help of zoo, inspect and convert runs as printed, in a shell."""
    examples = []
    for command in ("zoo", "inspect", "convert"):
        help_text = ok(command, "--help").stdout
        found = [line.strip() for line in help_text.splitlines() if line.strip().startswith("ligo-convert ")]
        assert found, command
        examples += found
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "HF_HUB_OFFLINE": "1"}
    script = "set -e\n" + "\n".join(f"echo '>>> {i}'; {line}" for i, line in enumerate(examples)) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.stdout.count(">>> ") == len(examples)
    assert (tmp_path / "minilm-fp16" / "model.safetensors.index.json").exists()
