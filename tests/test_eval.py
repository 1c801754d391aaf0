"""`eval`: task metrics with PyTorch equal transformers' own loss, and onnxruntime gives the same numbers."""

import json
import math
import sys

import pytest
import torch
import transformers
from click.testing import CliRunner

from ligo_convert import data
from ligo_convert.cli import main
from ligo_convert.descriptors import load_descriptors
from ligo_convert.evaluate import evaluate
from ligo_convert.export import export_onnx

VIT = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=16, patch_size=4, num_labels=10)
GPT2 = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
BERT = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, max_position_embeddings=64)
# case -> (family, model class, config, the data it reads by default)
CASES = {
    "vit": ("hf-vit", "ViTForImageClassification", VIT, "digits"),
    "gpt2": ("hf-gpt2", "GPT2LMHeadModel", GPT2, "python standard library"),
    "bert": ("hf-bert", "BertForMaskedLM", BERT, "python standard library"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    family, cls, config, _ = CASES[request.param]
    if family not in load_descriptors():
        pytest.skip(f"descriptor {family} not written yet")
    model = getattr(transformers, cls)(config).eval()
    folder = tmp_path_factory.mktemp(request.param) / "src"
    model.save_pretrained(folder)
    return request.param, model, folder


def agree(a: dict, b: dict) -> None:
    assert a["count"] == b["count"] and a["batches"] == b["batches"]
    assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"]))
    assert abs(a["accuracy"] - b["accuracy"]) <= 1 / a["count"]  # an argmax tie may flip at most one
    if "perplexity" in a:
        assert abs(a["perplexity"] - b["perplexity"]) <= 1e-4 * a["perplexity"]


def test_torch_loss_is_transformers_loss(case):
    name, model, folder = case
    got = evaluate(folder, max_batches=1, batch_size=8, seq_len=32)  # one piece of 16 examples, in two batches
    batch = next(data.val_batches(load_spec(folder), None, folder, batch_size=data.VAL_CHUNK, seq_len=32))
    with torch.no_grad():
        ref = model(**data.model_inputs(batch), labels=batch["labels"]).loss.item()
    assert got["loss"] == pytest.approx(ref, rel=1e-5)
    assert CASES[name][3] in got["data"] and got["split"] == "val"
    if "perplexity" in got:
        assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))


def load_spec(folder):
    from ligo_convert import load

    return load(folder).spec


def test_engines_agree(case, tmp_path):
    name, _, folder = case
    torch_run = evaluate(folder, engine="torch", max_batches=4)
    onnx_run = evaluate(folder, engine="onnx", max_batches=4)
    agree(torch_run, onnx_run)
    assert torch_run["engine"] == "torch" and onnx_run["engine"] == "onnx"
    if name == "vit":
        assert torch_run["count"] == 64 and torch_run["counted"] == "examples"  # 4 batches of 16 digits
    # an exported file evaluates alone: its spec and tokenizer come from its metadata
    assert export_onnx(folder, tmp_path / "m.onnx").ok
    agree(torch_run, evaluate(tmp_path / "m.onnx", engine="onnx", max_batches=4))


def test_cli_json(case):
    name, _, folder = case
    result = CliRunner().invoke(main, ["eval", str(folder), "--max-batches", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["batches"] == 2 and out["engine"] == "torch"
    assert ("perplexity" in out) == (name != "vit")
    result = CliRunner().invoke(main, ["eval", str(folder), "--max-batches", "2"])
    assert result.exit_code == 0 and result.stdout.startswith("torch: loss ")


def one_line_error(result, text: str):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_errors(tmp_path, monkeypatch):
    transformers.GPT2LMHeadModel(GPT2).save_pretrained(tmp_path / "lm")
    transformers.GPT2Model(GPT2).save_pretrained(tmp_path / "headless")
    runner = CliRunner()
    one_line_error(runner.invoke(main, ["eval", str(tmp_path / "lm"), "--engine", "tensorflow"]),
                   "unknown engine 'tensorflow'; choose one of torch, onnx")
    headless = runner.invoke(main, ["eval", str(tmp_path / "headless"), "--max-batches", "1", "--seq-len", "16"])
    assert headless.exit_code == 0 and "span retrieval" in headless.output  # a tower without a head is probed
    (tmp_path / "m.onnx").write_bytes(b"not onnx")
    one_line_error(runner.invoke(main, ["eval", str(tmp_path / "m.onnx")]), "is an ONNX file; evaluate it with "
                                                                             "--engine onnx")
    one_line_error(runner.invoke(main, ["eval", str(tmp_path / "m.onnx"), "--engine", "onnx"]),
                   "not a readable ONNX file")
    one_line_error(runner.invoke(main, ["eval", str(tmp_path / "lm"), "--split", "test"]), "unknown split")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    one_line_error(runner.invoke(main, ["eval", str(tmp_path / "lm"), "--engine", "onnx"]),
                   "onnxruntime is not installed")


def given_data(name: str, folder):
    """A small data set of the user's own: an image folder with a subfolder per class, or a text file."""
    if name == "vit":
        from PIL import Image

        g = torch.Generator().manual_seed(0)
        for label in ("cats", "dogs", "owls"):
            (folder / label).mkdir(parents=True)
            for k in range(10):
                pixels = (torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / label / f"{k}.png")
        return folder, 6  # every 5th image of a class is held out: 2 per class
    path = folder / "notes.txt"
    folder.mkdir()
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    return path, None


def test_engines_agree_on_given_data(case, tmp_path):
    name, _, folder = case
    path, expected = given_data(name, tmp_path / "data")
    runs = []
    for engine in ("torch", "onnx"):
        result = CliRunner().invoke(main, ["eval", str(folder), "--data", str(path), "--engine", engine, "--json",
                                           "--max-batches", "0"])
        assert result.exit_code == 0, result.output
        runs.append(json.loads(result.stdout))
    agree(*runs)
    assert str(path) in runs[0]["data"]
    if expected is not None:
        assert runs[0]["count"] == expected


def test_cli_text_column(tmp_path):
    """--text-column picks a table's text column: the same documents under the default column score the same."""
    lm = tmp_path / "lm"
    transformers.GPT2LMHeadModel(GPT2).save_pretrained(lm)
    docs = [f"document {r}: the quick brown fox jumps over the lazy dog\n" * (1 + r % 3) for r in range(40)]
    body = tmp_path / "body.jsonl"
    body.write_text("".join(json.dumps({"title": f"t{r}", "body": d}) + "\n" for r, d in enumerate(docs)))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(main, ["eval", str(lm), "--json", "--max-batches", "0", "--workers", "0", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    got = run("--data", str(body), "--text-column", "body")
    ref = run("--data", str(plain))
    assert got["count"] > 0
    assert [got[k] for k in ("batches", "count", "loss", "accuracy")] == \
        [ref[k] for k in ("batches", "count", "loss", "accuracy")]
    assert "column 'body'" in got["data"] and "column 'text'" in ref["data"]
    one_line_error(runner.invoke(main, ["eval", str(lm), "--data", str(body), "--text-column", "nope"]),
                   "no column 'nope'")
    one_line_error(runner.invoke(main, ["eval", str(lm), "--workers", "-1"]), "must be 0 or more")
    # pretrain reads the same column
    result = runner.invoke(main, ["pretrain", str(tmp_path / "micro"), "--family", "hf-gpt2", "--data", str(body),
                                  "--text-column", "body", "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    one_line_error(runner.invoke(main, ["pretrain", str(tmp_path / "micro2"), "--family", "hf-gpt2", "--data",
                                        str(body), "--text-column", "nope", "--steps", "2", "--device", "cpu"]),
                   "no column 'nope'")
