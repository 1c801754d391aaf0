"""A corpus of malformed inputs across every command, as an adversarial user would try them.  Each one is refused
with exit 2 and at most three lines on stderr (the first `error: ...`), no traceback, nothing written anywhere (no
file, folder or partial), and the source's bytes unchanged.  Then a convert killed with SIGKILL mid-write: the
next run on that output removes the leftover, says so, and writes a complete model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
import transformers
from click.testing import CliRunner
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file

from ligo_convert import load
from ligo_convert.cli import main

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
LLAMA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, max_position_embeddings=64)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=8,
           patch_size=2, num_labels=10)
WEIGHTS = "model.safetensors"
GROW = ["--layers", "3", "--width", "48", "--heads", "6", "--mlp", "64", "--steps", "0"]
LONG = "n" * 300  # longer than any common file system's 255-byte name limit


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A micro BERT (MLM head) and a micro LLaMA with grouped-query attention, saved by transformers."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(**BERT)).save_pretrained(root / "bert")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(root / "llama")
    transformers.ViTForImageClassification(transformers.ViTConfig(**VIT)).save_pretrained(root / "vit")
    transformers.BertForMaskedLM(transformers.BertConfig(**BERT)).save_pretrained(root / "bert-tok")
    _word_tokenizer().save(str(root / "bert-tok" / "tokenizer.json"))
    (root / "bert-tok" / "tokenizer_config.json").write_text(json.dumps({"mask_token": "[MASK]"}))
    return {"bert": root / "bert", "llama": root / "llama", "vit": root / "vit", "bert-tok": root / "bert-tok"}


def _word_tokenizer():
    """A word-level tokenizer.json over a few Python words, below BERT's 99 ids, with [CLS] ... [SEP] around."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "return", "import", "self", "if", "for", "in"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    return tok


class Env:
    """What a case builds in: ``tmp`` (everything a case makes lives here), ``src()`` a fresh copy of a model,
    ``out`` an output path that does not exist yet."""

    def __init__(self, tmp: Path, models: dict[str, Path]):
        self.tmp, self.models = tmp, models
        self.out = tmp / "outs" / "model"

    def src(self, kind: str = "bert", name: str = "src") -> Path:
        dst = self.tmp / name
        dst.mkdir(parents=True)
        for f in self.models[kind].iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        return dst

    def file(self, name: str, text: str = "x") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


# --- ways to break a checkpoint ---------------------------------------------------------------------------------------


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path: Path, header, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(change):
    """Rewrite model.safetensors' JSON header with ``change(header)`` (returning a replacement, or editing in place)
    and keep its data bytes."""
    def apply(folder: Path) -> None:
        header, data = header_of(folder / WEIGHTS)
        write_header(folder / WEIGHTS, change(header) or header, data)
    return apply


def entry(key_part: str, **values):
    """Set fields of the first tensor entry whose key contains ``key_part``."""
    def change(header):
        key = next(k for k in header if key_part in k)
        header[key].update(values)
    return change


def replace_entry(key_part: str, value):
    def change(header):
        key = next(k for k in header if key_part in k)
        header[key] = value
    return change


def drop_field(key_part: str, field: str):
    def change(header):
        key = next(k for k in header if key_part in k)
        del header[key][field]
    return change


def share_bytes(header):
    """Point the k weight of layer 0 at the bytes of its q weight (same dtype and size)."""
    q = header["bert.encoder.layer.0.attention.self.query.weight"]
    header["bert.encoder.layer.0.attention.self.key.weight"]["data_offsets"] = list(q["data_offsets"])


def overlap_half(header):
    """Shift layer 0's k weight half-way into the bytes of the tensor before it."""
    k = header["bert.encoder.layer.0.attention.self.key.weight"]
    begin, end = k["data_offsets"]
    k["data_offsets"] = [begin - 64, end - 64]


def config(**values):
    def apply(folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        data.update(values)
        (folder / "config.json").write_text(json.dumps(data))
    return apply


def write(name: str, content):
    def apply(folder: Path) -> None:
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return apply


def dangling(name: str):
    def apply(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).symlink_to(folder / "gone" / name)
    return apply


def split_in_two(index=None, duplicate: bool = False):
    """model.safetensors as two shards (embeddings, the rest); ``duplicate`` puts one tensor in both;
    ``index(weight_map)`` returns the index to write (None: no index)."""
    def apply(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        (folder / WEIGHTS).unlink()
        first = {k: v for k, v in tensors.items() if "embeddings" in k}
        rest = {k: v for k, v in tensors.items() if k not in first}
        if duplicate:
            key = next(iter(rest))
            first[key] = rest[key].clone()
        names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
        for name, part in zip(names, (first, rest)):
            save_file(part, folder / name, metadata={"format": "pt"})
        if index is not None:
            weight_map = {k: names[0] if k in first else names[1] for k in tensors}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index(weight_map)))
    return apply


def wrong_shard(weight_map):
    key = next(k for k in weight_map if "embeddings" in k)
    weight_map[key] = "model-00002-of-00002.safetensors"
    return {"weight_map": weight_map}


# --- sources broken for convert and inspect: (id, model, how, words the message must hold) --------------------------

BROKEN = [
    ("header-a-list", "bert", edit_header(lambda h: [1, 2]), ["not an object"]),
    ("header-a-number", "bert", edit_header(lambda h: 7), ["not an object"]),
    ("entry-null", "bert", edit_header(replace_entry("query.weight", None)), ["query.weight", "not an object"]),
    ("entry-a-number", "bert", edit_header(replace_entry("query.weight", 3)), ["query.weight"]),
    ("entry-without-offsets", "bert", edit_header(drop_field("query.weight", "data_offsets")), ["data_offsets"]),
    ("entry-without-shape", "bert", edit_header(drop_field("query.weight", "shape")), ["shape"]),
    ("entry-without-dtype", "bert", edit_header(drop_field("query.weight", "dtype")), ["dtype"]),
    ("dtype-a-number", "bert", edit_header(entry("query.weight", dtype=4)), ["dtype"]),
    ("dtype-unknown", "bert", edit_header(entry("query.weight", dtype="F8_E4M3")), ["unsupported dtype"]),
    ("shape-a-string", "bert", edit_header(entry("query.weight", shape="32x32")), ["shape"]),
    ("shape-negative", "bert", edit_header(entry("query.weight", shape=[-32, -32])), ["shape"]),
    ("shape-floats", "bert", edit_header(entry("query.weight", shape=[32.0, 32.0])), ["shape"]),
    ("offsets-reversed", "bert", edit_header(lambda h: h[next(k for k in h if "query.weight" in k)].update(
        data_offsets=h[next(k for k in h if "query.weight" in k)]["data_offsets"][::-1])), ["backwards"]),
    ("offsets-wrong-span", "bert", edit_header(lambda h: h[next(k for k in h if "query.weight" in k)].update(
        shape=[16, 32])), ["bytes", "needs"]),
    ("offsets-three", "bert", edit_header(entry("query.weight", data_offsets=[0, 4, 8])), ["data_offsets"]),
    ("offsets-strings", "bert", edit_header(entry("query.weight", data_offsets=["0", "4096"])), ["data_offsets"]),
    ("offsets-past-the-end", "bert", edit_header(entry("query.weight", data_offsets=[10**9, 10**9 + 4096])),
     ["truncated"]),
    ("shared-bytes", "bert", edit_header(share_bytes), ["share bytes"]),
    ("overlapping-bytes", "bert", edit_header(overlap_half), ["share bytes"]),
    ("metadata-not-an-object", "bert", edit_header(lambda h: h.update(__metadata__=[1])), ["__metadata__"]),
    ("header-length-too-big", "bert", write(WEIGHTS, struct.pack("<Q", 10**12) + b"{}"), ["bad header length"]),
    ("file-too-short", "bert", write(WEIGHTS, b"abc"), ["too short"]),
    ("weights-a-folder", "bert", lambda f: ((f / WEIGHTS).unlink(), (f / WEIGHTS).mkdir()), ["cannot be read"]),
    ("weights-dangling-link", "bert", dangling(WEIGHTS), ["does not exist"]),
    ("config-dangling-link", "bert", dangling("config.json"), ["config.json", "does not exist"]),
    ("config-a-folder", "bert", lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()),
     ["config.json", "cannot be read"]),
    ("config-a-list", "bert", write("config.json", "[1, 2]"), ["config.json", "JSON object"]),
    ("config-a-string", "bert", write("config.json", '"hello"'), ["config.json", "JSON object"]),
    ("config-not-utf8", "bert", write("config.json", b"\xff\xfe{}"), ["config.json", "not valid JSON"]),
    ("heads-a-string", "bert", config(num_attention_heads="4"), ["num_attention_heads", "'4'", "whole number"]),
    ("width-a-float", "bert", config(hidden_size=32.5), ["hidden_size", "whole number"]),
    ("layers-a-bool", "bert", config(num_hidden_layers=True), ["num_hidden_layers", "whole number"]),
    ("heads-zero", "bert", config(num_attention_heads=0), ["num_attention_heads", "at least 1"]),
    ("mlp-negative", "bert", config(intermediate_size=-37), ["intermediate_size", "at least 1"]),
    ("vocab-a-list", "bert", config(vocab_size=[99]), ["vocab_size"]),
    ("eps-a-string", "bert", config(layer_norm_eps="1e-12"), ["layer_norm_eps", "finite number"]),
    ("activation-a-list", "bert", config(hidden_act=["gelu"]), ["hidden_act", "not supported"]),
    ("model-type-a-number", "bert", config(model_type=5), ["model_type", "string"]),
    ("architectures-a-string", "bert", config(architectures="BertForMaskedLM"), ["architectures", "list"]),
    ("id2label-not-integers", "bert", config(id2label={"a": "x", "b": "y"}), ["id2label", "integer"]),
    ("id2label-gap", "bert", config(id2label={"0": "x", "5": "y"}), ["id2label", "0..1"]),
    ("id2label-not-strings", "bert", config(id2label={"0": 1, "1": 2}), ["id2label", "string"]),
    ("id2label-a-list", "bert", config(id2label=["x", "y"]), ["id2label"]),
    ("positions-disagree", "bert", config(max_position_embeddings=128), ["64 positions", "128"]),
    ("kv-heads-disagree", "llama", config(num_key_value_heads=4), ["num_key_value_heads=4", "2 key/value heads"]),
    ("kv-heads-a-string", "llama", config(num_key_value_heads="2"), ["num_key_value_heads", "whole number"]),
    ("head-dim-a-string", "llama", config(head_dim="8"), ["head_dim", "whole number"]),
    ("rope-theta-inf", "llama", config(rope_parameters={"rope_theta": float("inf"), "rope_type": "default"}),
     ["rope_parameters.rope_theta", "finite number"]),
    ("two-shards-same-key", "bert", split_in_two(duplicate=True), ["is also in", "model-0000"]),
    ("index-a-list", "bert", split_in_two(index=lambda m: [m]), ["weight_map"]),
    ("index-map-a-list", "bert", split_in_two(index=lambda m: {"weight_map": list(m)}), ["weight_map"]),
    ("index-map-values-numbers", "bert", split_in_two(index=lambda m: {"weight_map": {k: 1 for k in m}}),
     ["weight_map", "shard file name"]),
    ("index-outside-folder", "bert", split_in_two(index=lambda m: {"weight_map": {k: "../x.safetensors" for k in m}}),
     ["shard file name"]),
    ("index-missing-shard", "bert", split_in_two(index=lambda m: {"weight_map": {**m, "extra": "model-3.safetensors"}}),
     ["model-3.safetensors", "missing"]),
    ("index-wrong-shard", "bert", split_in_two(index=wrong_shard), ["index.json", "puts tensor"]),
    ("index-not-json", "bert", split_in_two(index=lambda m: "{"), ["weight_map"]),
]
# the reader is the same for inspect: a sample of the classes
INSPECTED = ("header-a-list", "entry-null", "offsets-wrong-span", "shared-bytes", "weights-dangling-link",
             "config-a-list", "heads-a-string", "id2label-not-integers", "kv-heads-disagree", "two-shards-same-key",
             "index-map-a-list", "index-wrong-shard")


def _converting(how, model="bert", extra=()):
    def build(env: Env) -> list:
        src = env.src(model)
        how(src)
        return ["convert", src, "--out", env.out, *extra]
    return build


def _inspecting(how, model="bert"):
    def build(env: Env) -> list:
        src = env.src(model)
        how(src)
        return ["inspect", src]
    return build


# --- outputs that cannot be written, for every command that writes --------------------------------------------------


def _existing(env: Env) -> Path:
    env.out.mkdir(parents=True)
    (env.out / "keep.txt").write_text("mine")
    return env.out


def _under_file(env: Env) -> Path:
    return env.file("outs/a-file") / "model"


def _too_long(env: Env) -> Path:
    return env.tmp / "outs" / LONG


def out_cases(command: str, make_args) -> list:
    """The output-path cases for one command: ``make_args(env, out)`` gives the argument list."""
    return [
        (f"{command}-out-exists", lambda env: make_args(env, _existing(env)), ["already exists", "--overwrite"]),
        (f"{command}-out-under-a-file", lambda env: make_args(env, _under_file(env)), ["is a file, not a folder"]),
        (f"{command}-out-name-too-long", lambda env: make_args(env, _too_long(env)), ["too long"]),
    ]


def _grow_args(env: Env, out: Path, *extra) -> list:
    return ["grow", env.src(), *GROW, "--out", out, *extra]


def _operator_file(env: Env, meta, tensors=None) -> Path:
    path = env.tmp / "op.safetensors"
    save_file(tensors or {"width.B_emb": torch.zeros(48, 32)}, path,
              metadata={"ligo_convert": meta if isinstance(meta, str) else json.dumps(meta)})
    return path


def _grow_with_operator(meta_of):
    """grow --operator FILE whose metadata ``meta_of(source_spec, target_spec)`` makes."""
    def build(env: Env) -> list:
        src = env.src()
        source = load(src).spec.to_dict()
        target = dict(source, layers=3, width=48, heads=6, mlp=64, kv_heads=6)
        return ["grow", src, *GROW[:-2], "--operator", _operator_file(env, meta_of(source, target)),
                "--out", env.out]
    return build


def _grow_src_inside(env: Env) -> list:
    src = env.src()
    return ["grow", src, *GROW, "--out", src / "grown"]


def _grow_over_source(env: Env) -> list:
    src = env.src(name="outs/src")
    return ["grow", src, *GROW, "--out", env.tmp / "outs", "--overwrite"]


def _grow_broken_source(env: Env) -> list:
    args = _grow_args(env, env.out)
    edit_header(lambda h: [1])(env.tmp / "src")
    return args


def _save_operator(make_path, *extra):
    def build(env: Env) -> list:
        return ["grow", env.src(), *GROW[:-2], "--steps", "1", "--out", env.out, "--save-operator",
                make_path(env), *extra]
    return build


def _dst_folder(change):
    def build(env: Env) -> list:
        dst = env.src(name="dst")
        change(dst)
        return ["grow", env.src(), dst, "--steps", "0", "--out", env.out]
    return build


GROW_CASES = out_cases("grow", lambda env, out: _grow_args(env, out)) + [
    ("grow-out-inside-source", _grow_src_inside, ["would overwrite the source"]),
    ("grow-out-holds-source", _grow_over_source, ["holding the source"]),
    ("grow-source-header-broken", _grow_broken_source, ["not an object"]),
    ("grow-save-operator-exists", _save_operator(lambda env: env.file("op.safetensors")), ["already exists",
                                                                                        "--save-operator"]),
    ("grow-save-operator-under-a-file", _save_operator(lambda env: env.file("a-file") / "op.safetensors"),
     ["is a file, not a folder", "--save-operator"]),
    ("grow-save-operator-too-long", _save_operator(lambda env: env.tmp / (LONG + ".safetensors")), ["too long"]),
    ("grow-save-operator-inside-out", _save_operator(lambda env: env.out / "op.safetensors"), ["inside --out"]),
    ("grow-save-operator-dangling-link", _save_operator(lambda env: (env.tmp / "op.safetensors").symlink_to(
        env.tmp / "gone") or env.tmp / "op.safetensors"), ["already exists", "--save-operator"]),
    ("grow-save-operator-in-source", _save_operator(lambda env: env.tmp / "src" / "op.safetensors"),
     ["would overwrite the source"]),
    ("grow-operator-missing", lambda env: ["grow", env.src(), *GROW[:-2], "--operator", env.tmp / "nope",
                                            "--out", env.out], ["no such operator file"]),
    ("grow-operator-not-safetensors", lambda env: ["grow", env.src(), *GROW[:-2], "--operator",
                                                    env.file("op.safetensors", "garbage" * 10), "--out", env.out],
     ["not an operator file"]),
    ("grow-operator-meta-not-json", lambda env: ["grow", env.src(), *GROW[:-2], "--operator",
                                                  _operator_file(env, "{nope"), "--out", env.out],
     ["not an operator file"]),
    ("grow-operator-spec-a-string", _grow_with_operator(lambda s, t: {"source_spec": "bert", "target_spec": t}),
     ["source_spec", "object"]),
    ("grow-operator-spec-heads-a-string", _grow_with_operator(
        lambda s, t: {"source_spec": {**s, "heads": "4"}, "target_spec": t}), ["source_spec.heads", "'4'"]),
    ("grow-operator-spec-lacks-width", _grow_with_operator(
        lambda s, t: {"source_spec": s, "target_spec": {k: v for k, v in t.items() if k != "width"}}),
     ["target_spec", "lacks width"]),
    ("grow-operator-shared-width-a-string", _grow_with_operator(
        lambda s, t: {"source_spec": s, "target_spec": t, "shared_width": "no"}), ["shared_width"]),
    ("grow-dst-config-a-list", _dst_folder(write("config.json", "[]")), ["config.json", "JSON object"]),
    ("grow-dst-heads-a-string", _dst_folder(config(num_attention_heads="6")), ["num_attention_heads", "whole number"]),
    ("grow-unknown-family", lambda env: _grow_args(env, env.out, "--to", "nope"), ["unknown family"]),
]


def _pretrain_args(env: Env, out: Path, *extra) -> list:
    return ["pretrain", out, "--family", "hf-bert", "--steps", "1", *extra]


PRETRAIN_CASES = out_cases("pretrain", _pretrain_args) + [
    ("pretrain-unknown-family", lambda env: ["pretrain", env.out, "--family", "nope"], ["unknown family"]),
    ("pretrain-width-zero", lambda env: _pretrain_args(env, env.out, "--width", "0"), ["--width", "must be"]),
    ("pretrain-lr-inf", lambda env: _pretrain_args(env, env.out, "--lr", "inf"), ["--lr", "must be"]),
    ("pretrain-seq-len-zero", lambda env: _pretrain_args(env, env.out, "--seq-len", "0"), ["--seq-len"]),
]


def _onnx_file(env: Env, props: dict, name: str = "model.onnx") -> Path:
    """A valid ONNX model (one Identity node) carrying ``props`` as metadata."""
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                                                [x], [y]))
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    path = env.tmp / name
    onnx.save(model, path)
    return path


def _eval_onnx(props_of):
    def build(env: Env) -> list:
        spec = load(env.models["bert"]).spec.to_dict()
        return ["eval", _onnx_file(env, props_of(spec)), "--engine", "onnx"]
    return build


EVAL_CASES = [
    ("eval-onnx-spec-not-json", _eval_onnx(lambda s: {"ligo_convert.spec": "{nope"}), ["not valid JSON"]),
    ("eval-onnx-spec-a-list", _eval_onnx(lambda s: {"ligo_convert.spec": "[1]"}), ["object"]),
    ("eval-onnx-spec-lacks-layers", _eval_onnx(
        lambda s: {"ligo_convert.spec": json.dumps({k: v for k, v in s.items() if k != "layers"})}), ["lacks layers"]),
    ("eval-onnx-spec-heads-a-string", _eval_onnx(lambda s: {"ligo_convert.spec": json.dumps({**s, "heads": "4"})}),
     ["heads", "'4'"]),
    ("eval-onnx-spec-bad-activation", _eval_onnx(
        lambda s: {"ligo_convert.spec": json.dumps({**s, "activation": "swish9"})}), ["not a valid spec"]),
    ("eval-onnx-no-metadata", _eval_onnx(lambda s: {}), ["no ligo-convert spec"]),
    ("eval-onnx-not-onnx", lambda env: ["eval", env.file("model.onnx", "garbage"), "--engine", "onnx"],
     ["not a readable ONNX file"]),
    ("eval-onnx-dangling-link", lambda env: (env.tmp.joinpath("m.onnx").symlink_to(env.tmp / "gone.onnx"),
                                             ["eval", env.tmp / "m.onnx", "--engine", "onnx"])[1], ["no such ONNX"]),
    ("eval-source-heads-a-string", lambda env: (config(num_attention_heads="4")(env.src()),
                                                ["eval", env.tmp / "src"])[1], ["num_attention_heads"]),
]


def _reading(command: str, model: str, how):
    """``command`` (eval, or a 1-step grow: both read the data with the source's tokenizer/preprocessor files) on a
    fresh ``model`` broken by ``how``."""
    def build(env: Env) -> list:
        src = env.src(model)
        how(src)
        if command == "eval":
            return ["eval", src, "--max-batches", "1"]
        return ["grow", src, "--out", env.out, "--layers", "3", "--width", "48", "--heads", "6", "--mlp", "64",
                "--steps", "1", "--batch-size", "4"]
    return build


PREPROCESSOR = "preprocessor_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# files a model's data is read with: (id, command, model, how, words)
READ_WITH = [
    ("preprocessor-a-list", "eval", "vit", write(PREPROCESSOR, "[1]"), [PREPROCESSOR, "JSON object"]),
    ("preprocessor-not-json", "eval", "vit", write(PREPROCESSOR, "{"), [PREPROCESSOR, "not valid JSON"]),
    ("preprocessor-mean-a-string", "eval", "vit", write(PREPROCESSOR, json.dumps(
        {"image_mean": "0.5", "image_std": [0.5] * 3})), [PREPROCESSOR, "image_mean", "3 finite numbers"]),
    ("preprocessor-mean-two-channels", "eval", "vit", write(PREPROCESSOR, json.dumps(
        {"image_mean": [0.5, 0.5], "image_std": [0.5] * 3})), ["image_mean", "one per channel"]),
    ("preprocessor-std-missing", "eval", "vit", write(PREPROCESSOR, json.dumps({"image_mean": [0.5] * 3})),
     ["image_std", "None"]),
    ("preprocessor-std-zero", "eval", "vit", write(PREPROCESSOR, json.dumps(
        {"image_mean": [0.5] * 3, "image_std": [0.5, 0, 0.5]})), ["image_std", "positive"]),
    ("preprocessor-std-nan", "eval", "vit", write(PREPROCESSOR, '{"image_mean": [0.5, 0.5, 0.5], '
                                                                '"image_std": [NaN, 0.5, 0.5]}'), ["image_std"]),
    ("preprocessor-dangling-link", "eval", "vit", lambda f: f.joinpath(PREPROCESSOR).symlink_to(f / "gone.json"),
     [PREPROCESSOR, "does not exist"]),
    ("preprocessor-a-list", "grow", "vit", write(PREPROCESSOR, "[1]"), [PREPROCESSOR, "JSON object"]),
    ("tokenizer-config-a-list", "eval", "bert-tok", write(TOKENIZER_CONFIG, "[1]"), [TOKENIZER_CONFIG, "JSON object"]),
    ("tokenizer-config-not-json", "eval", "bert-tok", write(TOKENIZER_CONFIG, "{"),
     [TOKENIZER_CONFIG, "not valid JSON"]),
    ("mask-token-a-number", "eval", "bert-tok", write(TOKENIZER_CONFIG, '{"mask_token": 4}'),
     [TOKENIZER_CONFIG, "mask_token"]),
    ("mask-token-content-a-list", "eval", "bert-tok", write(TOKENIZER_CONFIG, '{"mask_token": {"content": [4]}}'),
     ["mask_token"]),
    ("tokenizer-config-dangling-link", "eval", "bert-tok", dangling(TOKENIZER_CONFIG),
     [TOKENIZER_CONFIG, "does not exist"]),
    ("tokenizer-config-a-list", "grow", "bert-tok", write(TOKENIZER_CONFIG, "[1]"), [TOKENIZER_CONFIG, "object"]),
]
EVAL_CASES += [(f"{command}-{name}", _reading(command, model, how), words)
               for name, command, model, how, words in READ_WITH]


def _generating(how):
    def build(env: Env) -> list:
        src = env.src("llama")
        how(src)
        return ["generate", src, "--prompt", "def", "--max-new-tokens", "2"]
    return build


GENERATION_CONFIG = "generation_config.json"
EVAL_CASES += [
    ("generate-generation-config-a-list", _generating(write(GENERATION_CONFIG, "[1]")),
     [GENERATION_CONFIG, "JSON object"]),
    ("generate-eos-a-string", _generating(write(GENERATION_CONFIG, '{"eos_token_id": "2"}')),
     [GENERATION_CONFIG, "eos_token_id"]),
    ("generate-eos-negative", _generating(write(GENERATION_CONFIG, '{"eos_token_id": [2, -1]}')),
     [GENERATION_CONFIG, "eos_token_id"]),
]


EXPORT_CASES = [
    ("export-out-exists", lambda env: ["export", env.src(), "--out", env.file("outs/m.onnx")], ["exists",
                                                                                             "--overwrite"]),
    ("export-out-under-a-file", lambda env: ["export", env.src(), "--out", env.file("outs/a-file") / "m.onnx"],
     ["is a file, not a folder"]),
    ("export-out-not-onnx", lambda env: ["export", env.src(), "--out", env.tmp / "m.txt"], ["must end in .onnx"]),
    ("export-source-shared-bytes", lambda env: (edit_header(share_bytes)(env.src()),
                                                ["export", env.tmp / "src", "--out", env.tmp / "m.onnx"])[1],
     ["share bytes"]),
    ("export-atol-zero", lambda env: ["export", env.src(), "--out", env.tmp / "m.onnx", "--atol", "0"], ["--atol"]),
    ("export-validate-missing", lambda env: ["export", env.src(), "--out", env.tmp / "m.onnx", "--validate-only"],
     ["no such ONNX file"]),
]


def _manifest(env: Env, jobs: list[dict], top: str = "") -> Path:
    lines = [top]
    for job in jobs:
        lines.append("[[job]]")
        lines += [f"{k} = {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in job.items()]
    return env.file("zoo/zoo.toml", "\n".join(lines) + "\n")


def _pretrain_job(**values) -> dict:
    return {"name": "micro", "kind": "pretrain", "family": "hf-bert", "steps": 1, "layers": 1, "width": 32,
            "heads": 4, "mlp": 32, **values}


def _batch(jobs_of, *extra, top: str = ""):
    def build(env: Env) -> list:
        manifest = _manifest(env, jobs_of(env), top)
        return ["batch", manifest, "--root", env.tmp / "runs", *[e(env) if callable(e) else e for e in extra]]
    return build


def _grow_job(env: Env, **values) -> dict:
    src = env.tmp / "src"
    if not src.exists():
        env.src()
    return {"name": "big", "source": str(src), "layers": 3, "width": 48, "heads": 6, "mlp": 64, "steps": 0, **values}


BATCH_CASES = [
    ("batch-lr-nan", _batch(lambda env: [_pretrain_job(lr="nan")]), ["lr"]),
    ("batch-noise-inf", _batch(lambda env: [_grow_job(env, noise="inf")]), ["noise"]),
    ("batch-steps-negative", _batch(lambda env: [_pretrain_job(steps=-1)]), ["steps"]),
    ("batch-set-lr-nan", _batch(lambda env: [_pretrain_job()], "--set", "lr=nan"), ["lr"]),
    ("batch-out-in-own-source", _batch(lambda env: [
        {**_grow_job(env), "source": str(env.src(name="runs/src")), "out": "src/x"}]), ["its own source"]),
    ("batch-out-in-other-source", _batch(lambda env: [
        {**_grow_job(env), "source": str(env.src(name="runs/shared"))},
        {**_grow_job(env), "name": "other", "out": "shared/sub"}]), ["'big'", "source"]),
    ("batch-out-holds-a-source", _batch(lambda env: [
        {**_grow_job(env), "source": str(env.src(name="runs/area/src")), "out": "area"}]), ["source"]),
    ("batch-report-under-a-file", _batch(lambda env: [_pretrain_job()], "--report",
                                         lambda env: env.file("a-file") / "r.json"), ["is a file, not a folder"]),
    ("batch-report-in-a-source", _batch(lambda env: [_grow_job(env)], "--report",
                                        lambda env: env.tmp / "src" / "r.json"), ["would overwrite the source"]),
    ("batch-report-in-a-job", _batch(lambda env: [_pretrain_job()], "--report",
                                     lambda env: env.tmp / "runs" / "micro" / "r.json"), ["inside the output"]),
    ("batch-report-dry-run-under-a-file", _batch(lambda env: [_pretrain_job()], "--dry-run", "--report",
                                                 lambda env: env.file("a-file") / "r.json"), ["is a file"]),
    ("batch-root-under-a-file", lambda env: ["batch", _manifest(env, [_pretrain_job()]), "--root",
                                             env.file("a-file") / "runs"], ["is a file, not a folder"]),
    ("batch-out-name-too-long", _batch(lambda env: [_pretrain_job(out=LONG)]), ["too long"]),
    ("batch-unknown-key", _batch(lambda env: [_pretrain_job(stepz=3)]), ["unknown key 'stepz'"]),
]


CASES = ([(f"convert-{name}", _converting(how, model), words) for name, model, how, words in BROKEN]
         + [(f"inspect-{name}", _inspecting(how, model), words) for name, model, how, words in BROKEN
            if name in INSPECTED]
         + out_cases("convert", lambda env, out: ["convert", env.src(), "--out", out])
         + [("convert-out-inside-source", lambda env: ["convert", env.src(), "--out", env.tmp / "src" / "x"],
             ["would overwrite the source"]),
            ("convert-out-holds-source", lambda env: ["convert", env.src(name="outs/src"), "--out", env.tmp / "outs",
                                                       "--overwrite"], ["holding the source"]),
            ("convert-shard-size-zero", lambda env: ["convert", env.src(), "--out", env.out, "--shard-size", "0"],
             ["shard size"])]
         + GROW_CASES + PRETRAIN_CASES + EXPORT_CASES + EVAL_CASES + BATCH_CASES)


def tree(folder: Path) -> dict:
    """Every path under ``folder`` (links as links): content hash of files, link targets, folders."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        else:
            out[rel] = ("dir",)
    return out


def test_corpus_is_large_and_covers_every_command():
    commands = {build_id.split("-")[0] for build_id, _, _ in CASES}
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert commands == {"convert", "inspect", "grow", "pretrain", "export", "eval", "batch", "generate"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_refused(models, tmp_path, case, monkeypatch):
    name, build, words = case
    env = Env(tmp_path, models)
    args = [str(a) for a in build(env)]
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would show up in the tree
    before = tree(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # no exception escaped: no traceback
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert 1 <= len(lines) <= 3 and len(errors) == 1, result.stderr  # batch first says what it read
    assert "Traceback" not in result.output
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert tree(tmp_path) == before  # nothing written (no file, folder or partial), every source byte the same


# --- killed mid-write, then rerun ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with a 300k-token vocabulary (~40 MB): written in 1 MB shards, its conversion takes long
    enough to be killed half-way."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("big") / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(**{**BERT, "vocab_size": 300_000})).save_pretrained(folder)
    return folder


def _convert(src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ligo_convert", "convert", str(src), "--out", str(out),
                             "--shard-size", "1MB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[1])


def test_convert_killed_mid_write_then_rerun(big_bert, tmp_path):
    out = tmp_path / "out"
    proc = _convert(big_bert, out)
    deadline = time.monotonic() + 120
    partial = None
    # kill once shards are on disk and more are to come: the file has 3 shards (the 38 MB vocabulary is one tensor),
    # so at 2 the last is still to be written (waiting for all 3 left only the rename, a window a loaded machine
    # could miss)
    while time.monotonic() < deadline and proc.poll() is None:
        partials = list(tmp_path.glob(".out.*.partial"))
        if partials and len(list(partials[0].glob("*.safetensors"))) >= 2:
            partial = partials[0]
            break
        time.sleep(0.002)
    assert partial is not None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partial.is_dir()  # the kill left only the hidden partial folder

    rerun = _convert(big_bert, out)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "removed 1 unfinished output" in stderr and partial.name in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial left
    a, b = load(big_bert), load(out)
    assert a.spec == b.spec
    for name in a.spec.tensor_names():
        assert torch.equal(a.tensors[name], b.tensors[name]), name
