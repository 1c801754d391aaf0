"""Bad input through the CLI: one line on stderr naming the file/tensor and the fix, exit 2, no traceback, nothing
written (no output folder, no temporary folder, no parent folders), and the source folder left exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ligo_convert.cli import main

CONFIG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64)
WEIGHTS = "model.safetensors"
Q0 = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A real BertForMaskedLM checkpoint (prefix bert., MLM head) written by transformers."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(**CONFIG)).save_pretrained(folder)
    return folder


def copy_tree(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: content hash, size and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.stat()
        out[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
                                              else "dir", st.st_size, st.st_mtime_ns)
    return out


def _set(key, value):
    def change(t):
        t[key] = value
    return change


def _del(*keys):
    def change(t):
        for k in keys:
            del t[k]
    return change


def _scale(key, factor):
    def change(t):
        t[key] = t[key].clone()
        t[key][0, 0] = factor
    return change


def _cfg(**values):
    def change(c):
        c.update(values)
    return change


def _garbage(folder: Path):
    (folder / WEIGHTS).write_bytes(b"this is not a safetensors file, it is plain text" * 10)


def _bad_header(folder: Path):
    raw = b"{not json" + b" " * 7
    (folder / WEIGHTS).write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)


def _truncate(folder: Path):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 1000])


def _drop_layer0(t):
    for k in [k for k in t if ".layer.0." in k]:
        del t[k]


# (id, how to break the source, extra CLI args, words the message must contain -- SRC stands for the source
# folder --, does `inspect` refuse it too)
CASES = [
    ("unknown-family-option", None, ["--family", "nope"], ["unknown family 'nope'", "known families"], True),
    ("unknown-target-family", None, ["--to", "nope"], ["unknown family 'nope'"], False),
    ("unknown-model-type", ("config", lambda c: (c.update(model_type="foo"), c.pop("architectures"))), [],
     ["SRC", "unknown family", "'foo'", "--family"], True),
    ("unmapped-tensor", ("tensors", _set("bert.encoder.extra_gate.weight", torch.ones(3))), [],
     ["SRC", "bert.encoder.extra_gate.weight", "inspect"], False),
    ("missing-tensor", ("tensors", _del("bert.encoder.layer.1.attention.self.key.bias")), [],
     ["SRC", "bert.encoder.layer.1.attention.self.key.bias", "missing"], False),
    ("missing-layer", ("tensors", _drop_layer0), [], ["SRC", "layers [0]", "incomplete"], False),
    ("config-disagrees-mlp", ("config", _cfg(intermediate_size=40)), [],
     ["SRC", "intermediate.dense", "mlp=37", "config says 40"], True),
    ("config-disagrees-heads", ("config", _cfg(num_attention_heads=5)), [],
     ["SRC", "query.weight", "num_attention_heads"], True),
    ("tensor-shape-disagrees", ("tensors", _set("bert.encoder.layer.1.intermediate.dense.weight", torch.ones(40, 32))),
     [], ["SRC", "bert.encoder.layer.1.intermediate.dense.weight", "(40, 32)", "37"], True),
    ("quant-weight_scale_inv", ("tensors", _set(Q0 + "_scale_inv", torch.ones(1))), [],
     ["SRC", Q0 + "_scale_inv", "quantisation", "dequantise"], True),
    ("quant-SCB", ("tensors", _set("bert.encoder.layer.0.attention.self.query.SCB", torch.ones(32))), [],
     ["SRC", "bert.encoder.layer.0.attention.self.query.SCB", "quantisation"], True),
    ("quant-_scale", ("tensors", _set("bert.encoder.layer.0.attention.self.query.input_scale", torch.ones(1))), [],
     ["SRC", "query.input_scale", "quantisation"], True),
    ("int8-weight", ("tensors", _set(Q0, torch.ones(32, 32, dtype=torch.int8))), [],
     ["SRC", Q0, "int8", "dequantise"], True),
    ("nan-weight", ("tensors", _scale(Q0, float("nan"))), [], ["SRC", Q0, "NaN", WEIGHTS], False),
    ("inf-weight", ("tensors", _scale("bert.embeddings.word_embeddings.weight", float("inf"))), [],
     ["SRC", "bert.embeddings.word_embeddings.weight", "infinite"], False),
    ("float16-overflow", ("tensors", _scale(Q0, 1e6)), ["--dtype", "float16"], [Q0, "too large for float16"],
     False),
    ("not-safetensors", ("file", _garbage), [], ["SRC", WEIGHTS, "not a safetensors file"], True),
    ("bad-header", ("file", _bad_header), [], ["SRC", WEIGHTS, "unreadable header"], True),
    ("truncated", ("file", _truncate), [], ["SRC", WEIGHTS, "truncated"], True),
    ("bad-config-json", ("file", lambda f: (f / "config.json").write_text("{broken")), [],
     ["SRC", "config.json", "not valid JSON"], True),
    ("no-weights", ("file", lambda f: (f / WEIGHTS).unlink()), [], ["SRC", "no *.safetensors"], True),
    ("bad-shard-size", None, ["--shard-size", "lots"], ["shard size 'lots'"], False),
]


def break_source(tiny_bert: Path, tmp_path: Path, how) -> Path:
    src = copy_tree(tiny_bert, tmp_path / "src")
    if how is not None:
        kind, change = how
        if kind == "tensors":
            edit_tensors(src, change)
        elif kind == "config":
            edit_config(src, change)
        else:
            change(src)
    return src


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, words, stdout: str = "") -> str:
    """Exit 2 with exactly one line on stderr that holds ``words``; no traceback, nothing on stdout (or, for
    ``inspect`` of an unknown family, the closest-family report that starts with ``stdout``)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout.startswith(stdout) if stdout else result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_convert_refuses_and_writes_nothing(tiny_bert, tmp_path, case):
    _, how, args, words, _ = case
    src = break_source(tiny_bert, tmp_path, how)
    words = [str(src) if w == "SRC" else w for w in words]
    outs = tmp_path / "outs"
    outs.mkdir()
    before = snapshot(src)
    result = invoke("convert", src, "--out", outs / "deep" / "new" / "model", *args)
    assert_refused(result, words)
    assert list(outs.iterdir()) == []  # no output, no .partial folder, no parent folders made for it
    assert snapshot(src) == before


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]])
def test_inspect_refuses(tiny_bert, tmp_path, case):
    _, how, args, words, _ = case
    src = break_source(tiny_bert, tmp_path, how)
    words = [str(src) if w == "SRC" else w for w in words]
    before = snapshot(src)
    # a checkpoint no descriptor claims: inspect first says which family comes closest (here: the BERT it is)
    report = "family      unknown; closest: hf-bert" if case[0] == "unknown-model-type" else ""
    assert_refused(invoke("inspect", src, *[a for a in args if a != "--dtype"]), words, report)
    assert snapshot(src) == before


def test_existing_output_is_kept(tiny_bert, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before_src, before_out = snapshot(tiny_bert), snapshot(out)
    assert_refused(invoke("convert", tiny_bert, "--out", out), [str(out), "already exists", "--overwrite"])
    assert snapshot(out) == before_out and snapshot(tiny_bert) == before_src
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # --overwrite replaces it...
    assert invoke("convert", tiny_bert, "--out", out, "--overwrite").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / WEIGHTS).exists()


def test_failed_overwrite_keeps_the_old_output(tiny_bert, tmp_path):
    """With --overwrite, a conversion that fails half-way leaves the previous output exactly as it was."""
    out = tmp_path / "out"
    assert invoke("convert", tiny_bert, "--out", out).exit_code == 0
    # a late tensor (in sort order) is damaged, and small shards: several files are written before it fails
    src = break_source(tiny_bert, tmp_path, ("tensors", _scale("cls.predictions.transform.dense.weight",
                                                               float("nan"))))
    before_out, before_src = snapshot(out), snapshot(src)
    assert_refused(invoke("convert", src, "--out", out, "--overwrite", "--shard-size", "4KB"),
                   ["cls.predictions.transform.dense.weight", "NaN"])
    assert snapshot(out) == before_out and snapshot(src) == before_src
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_onto_the_source(tiny_bert, tmp_path, where):
    src = copy_tree(tiny_bert, tmp_path / "src")
    before = snapshot(src)
    out = src if where == "same" else src / "sub"
    assert_refused(invoke("convert", src, "--out", out, "--overwrite"), ["would overwrite the source"])
    assert snapshot(src) == before


def test_missing_and_truncated_shards(tiny_bert, tmp_path):
    sharded = tmp_path / "sharded"
    assert invoke("convert", tiny_bert, "--out", sharded, "--shard-size", "8KB").exit_code == 0
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2

    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-16])
    before = snapshot(sharded)
    assert_refused(invoke("convert", sharded, "--out", tmp_path / "o1"), [shards[1].name, "truncated"])
    shards[1].unlink()
    before = snapshot(sharded)
    assert_refused(invoke("convert", sharded, "--out", tmp_path / "o2"),
                   ["model.safetensors.index.json", shards[1].name, "missing"])
    assert snapshot(sharded) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]


def test_no_such_source(tmp_path):
    assert_refused(invoke("convert", tmp_path / "nothing-here", "--out", tmp_path / "o"),
                   ["nothing-here", "no such folder, zoo name or hub id"])
    assert_refused(invoke("inspect", tmp_path / "a-file.txt"), ["no such folder"])
    (tmp_path / "a-file.txt").write_text("x")
    assert_refused(invoke("inspect", tmp_path / "a-file.txt"), ["expected a checkpoint folder"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file.txt"]


def test_real_process_prints_one_line(tiny_bert, tmp_path):
    """The installed entry point, as a user runs it: stderr is one line, exit code 2, no traceback."""
    src = break_source(tiny_bert, tmp_path, ("tensors", _scale(Q0, float("nan"))))
    before = snapshot(src)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ligo_convert", "convert", str(src), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and Q0 in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert snapshot(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# Numeric options on every command: each refused in one line naming the flag, before anything is read or written.
BAD_NUMBERS = [
    ("grow", ["--layers", "4", "--width", "64", "--heads", "8", "--mlp", "64", "--lr", "nan"], "--lr"),
    ("grow", ["--layers", "4", "--width", "64", "--heads", "8", "--mlp", "64", "--lr", "-1"], "--lr"),
    ("grow", ["--layers", "4", "--width", "64", "--heads", "8", "--mlp", "64", "--noise", "inf"], "--noise"),
    ("grow", ["--layers", "-1", "--width", "64", "--heads", "8", "--mlp", "64"], "--layers"),
    ("grow", ["--layers", "4", "--width", "64", "--heads", "0", "--mlp", "64"], "--heads"),
    ("grow", ["--layers", "4", "--width", "64", "--heads", "8", "--mlp", "64", "--batch-size", "0"], "--batch-size"),
    ("grow", ["--layers", "4", "--width", "64", "--heads", "8", "--mlp", "64", "--steps", "-3"], "--steps"),
    ("pretrain", ["--family", "hf-bert", "--steps", "-3"], "--steps"),
    ("pretrain", ["--family", "hf-bert", "--layers", "-1"], "--layers"),
    ("pretrain", ["--family", "hf-bert", "--heads", "0"], "--heads"),
    ("pretrain", ["--family", "hf-bert", "--mlp", "0"], "--mlp"),
    ("pretrain", ["--family", "hf-bert", "--lr", "nan"], "--lr"),
    ("export", ["--atol", "nan"], "--atol"),
    ("export", ["--atol", "-1e-3"], "--atol"),
]


@pytest.mark.parametrize("command, args, flag", BAD_NUMBERS, ids=[f"{c}{' '.join(a[-2:])}" for c, a, _ in BAD_NUMBERS])
def test_numeric_options_are_checked_first(tiny_bert, tmp_path, command, args, flag):
    src = copy_tree(tiny_bert, tmp_path / "src")
    before = snapshot(src)
    out = tmp_path / ("out.onnx" if command == "export" else "out")
    if command == "pretrain":
        result = invoke("pretrain", out, *args)
    else:
        result = invoke(command, src, *args, "--out", out)
    line = assert_refused(result, [flag])
    assert "must be" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert snapshot(src) == before
