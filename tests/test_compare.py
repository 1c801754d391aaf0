"""`ligo-convert compare`: does growth pay for my model and data?  It writes the table, JSON and PNG; an interrupted
compare resumes without training its finished runs again; the library trainer reproduces the savings benchmark's
figures from before it moved into the library; bad input is refused with one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from ligo_convert import from_tensors, save
from ligo_convert.cli import main
from ligo_convert.compare import compare
from ligo_convert.compare import run as compare_run
from ligo_convert.compare.methods import PRETRAIN, DataBatches, run_method
from ligo_convert.compare.train import Recipe, train
from ligo_convert.growth.pretrain import micro_spec, pretrain
from ligo_convert.model import init_weights

REFERENCE = Path(__file__).parent / "data" / "savings_quick_reference.json"
TARGET = ("--layers", "2", "--width", "32")  # from a 1x16 source
METHODS = ("scratch", "ligo", "stack", "net2net", "lemon")  # scratch first: the reference


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _micro(folder: Path, family: str) -> Path:
    spec = micro_spec(family, layers=1, width=16, heads=2, mlp=32)
    weights, _ = pretrain(spec, steps=20, batch_size=8, seq_len=16, device="cpu")
    return save(from_tensors(spec, weights, family=family), folder)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _micro(tmp_path_factory.mktemp("src") / "micro-gpt2", "hf-gpt2")


@pytest.fixture(scope="module")
def quick(gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "quick"
    result = invoke("compare", gpt2, *TARGET, "--quick", "--seeds", "0,1", "--seq-len", "16", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_quick_writes_the_table_json_and_png(quick):
    import matplotlib.image

    out, printed = quick
    md = (out / "compare.md").read_text()
    header = ("| method | FLOPs saved % | wall saved % | train steps to goal | reached | final val loss | "
              "final val acc |")
    assert md.count(header) == 1 and header in printed  # the table is printed too
    for method in METHODS:
        assert re.search(rf"^\| {method}[ |(]", md, re.M), method
    results = json.loads((out / "compare.json").read_text())
    assert results["methods"] == list(METHODS) and results["seeds"] == [0, 1]
    assert sorted((r["method"], r["seed"]) for r in results["runs"]) == sorted((m, s) for m in METHODS for s in (0, 1))
    for r in results["runs"]:
        flops = [p[1] for p in r["curve"]]
        assert flops == sorted(flops) and flops[-1] > flops[0] and r["curve"][-1][0] == 8  # --quick: 8 steps
        assert set(r["savings"]) >= {"final_loss", "reached"}
    ligo = [r for r in results["runs"] if r["method"] == "ligo"]
    assert all(r["curve"][0][1] == r["extra_flops"] > 0 for r in ligo)  # its fitting steps are counted
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        ["settings.json"] + [f"{m}-seed{s}.json" for m in METHODS for s in (0, 1)])
    png = out / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).shape[1] >= 600


def test_json_prints_compare_json_and_a_finished_compare_is_not_trained_again(quick, gpt2):
    out, _ = quick
    before = (out / "compare.md").read_text()
    result = invoke("compare", gpt2, *TARGET, "--quick", "--seeds", "0,1", "--seq-len", "16", "--out", out, "--json")
    assert result.exit_code == 0
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").read_text() == before  # every run reused: the same figures, walls included


def _without_wall(md: str) -> list[str]:
    """The savings table with its wall column blanked: wall time is measured afresh by a run trained again."""
    rows = [line.split("|") for line in md.splitlines() if line.startswith("| ")]
    return ["|".join(cells[:3] + cells[4:]) if len(cells) == 9 else "|".join(cells) for cells in rows]


def test_an_interrupted_compare_resumes_without_training_finished_runs(gpt2, tmp_path, monkeypatch):
    trained = []
    real = compare_run.run_method

    def counting(method, *args, **kwargs):
        trained.append((method, kwargs.get("seed", args[3] if len(args) > 3 else None)))
        return real(method, *args, **kwargs)

    monkeypatch.setattr(compare_run, "run_method", counting)
    options = dict(layers=2, width=32, quick=True, seeds="0,1", seq_len=16, methods="ligo,stack,scratch")
    whole = compare(gpt2, out=tmp_path / "whole", **options)
    assert len(trained) == 6

    class Stop(Exception):
        pass

    def stop_after_two(record):
        if len(list((tmp_path / "cut" / "runs").glob("*-seed*.json"))) == 2:
            raise Stop

    trained.clear()
    with pytest.raises(Stop):
        compare(gpt2, out=tmp_path / "cut", on_run=stop_after_two, **options)
    assert len(trained) == 2 and not (tmp_path / "cut" / "compare.md").exists()
    trained.clear()
    resumed = compare(gpt2, out=tmp_path / "cut", **options)
    assert len(trained) == 4 and len(resumed.resumed) == 2 and sorted(resumed.trained) == sorted(trained)
    assert _without_wall(resumed.markdown) == _without_wall(whole.markdown)
    # one run's file deleted: only that run trains again
    (tmp_path / "cut" / "runs" / "stack-seed1.json").unlink()
    trained.clear()
    again = compare(gpt2, out=tmp_path / "cut", **options)
    assert trained == [("stack", 1)] and _without_wall(again.markdown) == _without_wall(whole.markdown)


def test_the_library_trainer_reproduces_the_savings_benchmark_from_before_the_move():
    """tests/data/savings_quick_reference.json: runs of `benchmarks/savings.py --quick` (seed 0) as the benchmark
    computed them with its own trainer; the library must give the same FLOPs and the same losses."""
    ref = json.loads(REFERENCE.read_text())
    s = ref["settings"]
    for name, p in ref["proxies"].items():
        small = micro_spec(p["family"], **p["small"], **p["micro"])
        target = small.replace(**p["target"], kv_heads=p["target"]["heads"])
        data = DataBatches(batch_size=p["batch_size"], seq_len=p["seq_len"], val_batches=s["val_batches"])
        pre = next(r for r in ref["pretrain"] if r["proxy"] == name)
        steps = round(p["pretrain_fraction"] * s["steps"])
        small_run = train(small, init_weights(small, 0), data.train(small, 0, PRETRAIN),
                          Recipe(p["small_lr"] or p["lr"], steps, s["warmup"], s["eval_every"]), data.val(small))
        assert small_run.curve[-1][1] == pre["flops"]
        assert small_run.curve[-1][3] == pytest.approx(pre["val_loss"], abs=1e-6)
        for expected in (r for r in ref["runs"] if r["proxy"] == name):
            got = run_method(expected["method"], small, small_run.weights, target, 0, data=data,
                             recipe=Recipe(p["lr"], s["steps"], s["warmup"], s["eval_every"]), knob=expected["knob"],
                             fit_steps=s["fit_steps"])
            where = (name, expected["method"])
            assert [(c[0], c[1]) for c in got["curve"]] == [(c[0], c[1]) for c in expected["curve"]], where
            assert [c[3] for c in got["curve"]] == pytest.approx([c[3] for c in expected["curve"]], abs=1e-6), where
            assert got["step_flops"] == expected["step_flops"] and got["extra_flops"] == expected["extra_flops"]


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return _micro(tmp_path_factory.mktemp("src") / "micro-vit", "hf-vit")


@pytest.mark.parametrize("args, message", [
    (("--methods", "ligo,grow-big"), "unknown method 'grow-big'"),
    (("--layers", "1", "--width", "8"), "smaller than the source"),
    (("--steps", "0"), "--steps must be"),
    (("--steps", "-3"), "--steps must be"),
    (("--seeds", "0,one"), "--seeds must be"),
    (("--seeds", "0,,1"), "--seeds must be"),
    (("--seeds", "1,1"), "repeats a seed"),
    (("--data", "TEXT"), "image models need a folder"),  # text for an image model
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(vit, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("a line of text\n" * 50)
    args = [str(tmp_path / "notes.txt") if a == "TEXT" else a for a in args]
    target = () if "--layers" in args else TARGET
    result = invoke("compare", vit, *target, "--quick", *args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_an_existing_out_that_is_not_this_compare_is_refused(gpt2, quick, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    result = invoke("compare", gpt2, *TARGET, "--quick", "--out", tmp_path / "taken")
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
    out, _ = quick  # a compare folder with other settings (here: 9 steps) is not resumed either
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    result = invoke("compare", gpt2, *TARGET, "--quick", "--seq-len", "16", "--steps", "9", "--out", out)
    assert result.exit_code == 2 and "holds a compare with other settings" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before


TUNED = (*TARGET, "--quick", "--steps", "16", "--warmup", "0.25", "--seq-len", "16", "--methods", "ligo,stack,scratch",
         "--tune-schedule", "--tune-lr-factors", "0.5,2")  # warmups of 4, 1 and 1 steps; 6 schedules


@pytest.fixture(scope="module")
def tuned(gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "tuned"
    result = invoke("compare", gpt2, *TUNED, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_tuning_the_schedule_writes_both_tables_and_the_grid(tuned):
    out, printed = tuned
    md = (out / "compare.md").read_text()
    header = "| method | FLOPs saved % | wall saved % |"
    # scratch's schedule, each method's tuned one, the tuned ones against the stronger scratch of each seed
    assert md.count(header) == 3 and printed.count(header) == 3
    assert (md.index("## Scratch's schedule") < md.index("## Each method's tuned schedule")
            < md.index("## Tuned schedules against the stronger scratch") < md.index("Tuning on seed"))
    results = json.loads((out / "compare.json").read_text())
    tuning = results["tuning"]
    grid = {(p["lr"], p["warmup"]) for p in tuning["grid"]}
    assert len(grid) == len(tuning["grid"]) == 6 and tuning["seed"] not in results["seeds"]
    for m in results["methods"]:  # the same grid, point for point, for every method (scratch included)
        mine = [(r["lr"], r["warmup"]) for r in tuning["runs"] if r["method"] == m and r["seed"] == tuning["seed"]]
        assert sorted(mine) == sorted(grid), m
        assert tuning["knobs"][m]["tuned"] == ["warmup", "lr"]
        assert re.search(rf"^\| {m} \| warmup, lr \|", md, re.M)  # the tuning table says what each method got
    assert tuning["knobs"]["ligo"]["fixed"] == {"fit_lr": results["settings"]["fit_lr"],
                                                "fit_steps": results["settings"]["fit_steps"]}


def test_each_tuned_choice_is_the_best_of_its_grid_on_the_tuning_seed(tuned):
    from ligo_convert.compare.accounting import savings

    results = json.loads((tuned[0] / "compare.json").read_text())
    tuning = results["tuning"]
    runs = {m: [r for r in tuning["runs"] if r["method"] == m] for m in results["methods"]}
    scratch = min(runs["scratch"], key=lambda r: r["curve"][-1][3])  # scratch: its lowest final loss
    assert (tuning["chosen"]["scratch"]["lr"], tuning["chosen"]["scratch"]["warmup"]) == (scratch["lr"],
                                                                                          scratch["warmup"])
    for m in ("ligo", "stack"):  # the others: the most FLOPs saved against that run (ties: the lowest final loss)
        def score(r):
            sv = savings(r, scratch)
            return sv.get("flops_saved", -1e9), -sv["final_loss"]
        best = max(score(r) for r in runs[m])
        chosen = tuning["chosen"][m]
        assert score(next(r for r in runs[m] if (r["lr"], r["warmup"]) == (chosen["lr"], chosen["warmup"]))) == best
        measured = [r for r in results["tuned"]["runs"] if r["method"] == m]
        assert measured and all((r["lr"], r["warmup"]) == (chosen["lr"], chosen["warmup"]) for r in measured)
        assert all(r["seed"] in results["seeds"] for r in measured)
    lr_values = {p["lr"] for p in tuning["grid"]}
    assert lr_values == {0.5 * results["settings"]["recipe"]["lr"], 2 * results["settings"]["recipe"]["lr"]}


def test_the_stronger_scratch_of_each_seed_is_the_goal_of_the_last_table(tuned):
    from ligo_convert.compare.accounting import savings

    results = json.loads((tuned[0] / "compare.json").read_text())
    for seed in results["seeds"]:
        ours = [r for r in results["runs"] + results["tuned"]["runs"] if r["method"] == "scratch" and r["seed"] == seed]
        stronger = {r["method"]: r for r in results["stronger"]["runs"] if r["seed"] == seed}
        assert stronger["scratch"]["curve"][-1][3] == min(r["curve"][-1][3] for r in ours)
        tuned_ligo = next(r for r in results["tuned"]["runs"] if r["method"] == "ligo" and r["seed"] == seed)
        assert stronger["ligo"]["curve"] == tuned_ligo["curve"]  # the same tuned run, measured against that goal
        assert stronger["ligo"]["savings"]["final_loss"] == tuned_ligo["curve"][-1][3]
        goal = min(ours, key=lambda r: r["curve"][-1][3])  # its savings are measured against that run
        assert stronger["ligo"]["savings"] == json.loads(json.dumps(savings(tuned_ligo, goal)))


def test_a_tuned_compare_resumes_without_redoing_its_tuning_runs(tuned, gpt2, monkeypatch):
    out, _ = tuned
    before = json.loads((out / "compare.json").read_text())
    trained = []
    real = compare_run.run_method
    monkeypatch.setattr(compare_run, "run_method",
                        lambda method, *a, **k: trained.append(method) or real(method, *a, **k))
    options = dict(layers=2, width=32, quick=True, steps=16, warmup=0.25, seq_len=16, methods="ligo,stack,scratch",
                   tune_schedule=True, tune_lr_factors="0.5,2", out=out)
    again = compare(gpt2, **options)
    assert trained == [] and again.trained == []
    assert again.results["tuning"]["chosen"] == before["tuning"]["chosen"]
    point = before["tuning"]["grid"][0]  # one tuning run's file deleted: only that run trains again
    (out / "runs" / f"stack-seed{before['tuning']['seed']}-lr{point['lr']:g}-warmup{point['warmup']:g}.json").unlink()
    compare(gpt2, **options)
    assert trained == ["stack"]


def test_torchrun_two_processes_train_the_same_curves_as_one(tmp_path):
    """Data parallelism: 2 gloo processes, each on half of every batch, give one process's curves.  BERT's masked
    tokens fall unevenly between the halves, so only the global-count loss (not a mean of means) matches; KI blends
    in the distillation loss, LiGO fits under DDP first."""
    import os
    import subprocess
    import sys

    bert = _micro(tmp_path / "src", "hf-bert")
    args = ["compare", str(bert), *TARGET, "--quick", "--seq-len", "16", "--methods", "ligo,stack,ki,scratch",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ligo_convert", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("| method | FLOPs saved %") == 1  # only the first process prints
    one = compare(bert, layers=2, width=32, quick=True, seq_len=16, methods="ligo,stack,ki,scratch", device="cpu",
                  out=tmp_path / "one")
    runs_two = json.loads((tmp_path / "two" / "compare.json").read_text())
    assert runs_two["processes"] == 2 and one.results["processes"] == 1
    for a, b in zip(one.results["runs"], runs_two["runs"]):
        assert a["method"] == b["method"] and a["step_flops"] == b["step_flops"]  # FLOPs of the whole batch
        assert [row[1] for row in a["curve"]] == [row[1] for row in b["curve"]]
        losses_a, losses_b = [row[3] for row in a["curve"]], [row[3] for row in b["curve"]]
        assert losses_a[-1] < losses_a[0] - 1e-3  # training moved, so agreement is not trivial
        assert max(abs(x - y) for x, y in zip(losses_a, losses_b)) <= 1e-5, (a["method"], losses_a, losses_b)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["compare.json", "compare.md", "compare.png",
                                                                      "runs"]


def test_torchrun_batch_that_does_not_split_is_refused_before_work(tmp_path, monkeypatch):
    from ligo_convert.compare import run as run_mod

    monkeypatch.setattr(run_mod, "world", lambda: (0, 3))
    result = invoke("compare", _micro(tmp_path / "src", "hf-gpt2"), *TARGET, "--quick", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--batch-size 8 does not split evenly over 3 torchrun processes" in result.output
    assert not (tmp_path / "out").exists()
