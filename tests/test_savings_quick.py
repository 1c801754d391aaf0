"""`benchmarks/savings.py --quick` runs end to end and writes a well-formed table, PNG and JSON.  A pipeline smoke
test: it checks the structure of what the benchmark reports, never the savings themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("scratch", "ligo", "stack", "interpolate", "net2net", "aki", "lemon", "mslt", "ki")
PROXIES = ("vit-digit-pairs", "gpt2-stdlib", "bert-stdlib")  # the default proxies


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("savings")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "savings.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_table_has_every_proxy_method_and_both_conventions(quick):
    md = (quick / "savings.md").read_text()
    assert "Command: `python benchmarks/savings.py --quick --out" in md and "Seeds: [0, 1]" in md
    header = ("| method | FLOPs saved % | wall saved % | train steps to goal | reached | final val loss | final val acc "
              "|")
    assert md.count(header) == 2 * len(PROXIES)
    for proxy in PROXIES:
        section = md.split(f"## {proxy}:")[1].split("\n## ")[0]
        assert "pretraining not counted" in section and "pretraining counted" in section
        for method in METHODS:
            rows = [line for line in section.splitlines() if line.startswith(f"| {method} ")]
            # the savings table without and with pretraining (7 columns); the losses at matched FLOPs (6) unless
            # the method refused the proxy
            widths = sorted(len(row.split("|")) for row in rows)
            assert widths in ([8, 9, 9], [9, 9]) and (widths == [9, 9]) == ("refused" in rows[0]), (proxy, method)
        for knob in ("fit_lr", "frozen_fraction", "distill_fraction"):
            assert f"{knob} = **" in section


def test_png_is_an_image(quick):
    import matplotlib.image

    path = quick / "savings.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_json_holds_every_run_and_its_accounting(quick):
    results = json.loads((quick / "savings.json").read_text())
    assert results["settings"]["seeds"] == [0, 1] and results["versions"]["torch"]
    runs = results["runs"]
    assert sorted({(r["proxy"], r["seed"], r["method"]) for r in runs}) == sorted(
        (p, s, m) for p in PROXIES for s in (0, 1) for m in METHODS)
    for r in runs:
        if "refused" in r:
            assert r["method"] == "lemon" and r["proxy"] == "bert-stdlib"  # post-LN depth growth
            continue
        flops = [point[1] for point in r["curve"]]
        assert flops == sorted(flops) and flops[-1] > flops[0], (r["proxy"], r["method"])
        proxy = next(p for p in results["proxies"] if p["name"] == r["proxy"])
        assert r["curve"][-1][0] == proxy["settings"]["steps"] == round(results["settings"]["steps"]
                                                                         * proxy["steps_scale"])
        assert set(r["savings"]) >= {"final_loss", "final_acc", "reached"}
        if r["method"] == "scratch" and r["savings"]["reached"]:  # the reference saves nothing, by definition
            assert r["savings"]["flops_saved"] == r["savings"]["wall_saved"] == 0.0
    ligo = [r for r in runs if r["method"] == "ligo"]
    assert all(r["curve"][0][1] == r["extra_flops"] > 0 for r in ligo)  # the fitting steps are counted
    mslt = [r for r in runs if r["method"] == "mslt"]
    assert all(r["step_flops"]["frozen"] < r["step_flops"]["full"] for r in mslt)  # frozen layers skip backward
    assert {len(c["candidates"]) for k in results["knobs"].values() for c in k.values()} == {3}
    assert len(results["pretrain"]) == len(PROXIES) * 3  # two seeds and the tuning seed


def test_render_rewrites_the_report_from_json(quick, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "savings.py"), "--render",
                           str(quick / "savings.json"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "savings.md").read_text() == (quick / "savings.md").read_text()
    assert (tmp_path / "savings.png").read_bytes()[:4] == b"\x89PNG"


def test_ligo_variants_change_the_recipe_and_count_their_fitting():
    """The variants benchmarks/savings_ligo_variants.py compares: more fitting steps cost more FLOPs, distillation
    counts the teacher's forwards, and each variant yields a trained curve."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import savings as sv

    p = sv.quick_proxy(sv.PROXIES["gpt2-stdlib"])
    s = sv.QUICK
    small = sv.pretrain_job(dict(proxy=p, settings=s, seed=0))["weights"]
    base = dict(proxy=p, settings=s, seed=0, small_weights=small, steps=s.steps, method="ligo", knob=0.01)
    runs = {name: sv.method_job({**base, "ligo_variant": variant}) for name, variant in {
        "recipe": {}, "longer": {"fit_steps": 2 * s.fit_steps}, "distill": {"objective": "distill"},
        "shared": {"shared_width": True, "depth_init": "interleave", "width_init": "select"}}.items()}
    assert runs["longer"]["extra_flops"] == 2 * runs["recipe"]["extra_flops"] > 0
    assert runs["distill"]["fit_step_flops"] > runs["recipe"]["fit_step_flops"]  # + the small model's forward
    assert runs["shared"]["loss_init"] != runs["recipe"]["loss_init"]
    for run in runs.values():
        assert len(run["curve"]) > 1 and all(point[3] == point[3] for point in run["curve"])  # finite, no NaN


def test_ligo_levers_train_with_the_tuned_schedules_and_change_one_thing_each(tmp_path):
    """savings_ligo_variants.py --schedules: scratch and LiGO train with the schedules a tuned savings run chose; a
    third of the fitting steps costs a third (rounded) of the fitting FLOPs, a shorter horizon stops where its cosine
    ends, and the tuning seed is run and reported beside the measured ones."""
    tuned = ROOT / "benchmarks" / "results" / "savings-tuned" / "savings.json"
    chosen = json.loads(tuned.read_text())["schedules"]["gpt2-stdlib"]["chosen"]
    md = tmp_path / "levers.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "savings_ligo_variants.py"), "--quick",
                           "--proxy", "gpt2-stdlib", "--seeds", "0", "--jobs", "1", "--schedules", str(tuned),
                           "--markdown", str(md)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = md.read_text()
    assert "| lever | seed 100 (tuning): FLOPs saved % | seeds 0: FLOPs saved % |" in text
    for lever in ("scratch", "recipe", "fit x1/3", "horizon 0.85", "horizon 0.7", "horizon 0.5", "shared width",
                  "interleave depth", "select width"):
        assert sum(line.startswith(f"| {lever} |") for line in text.splitlines()) == 1, lever
    assert text.count("**") == 2  # one choice of the tuning seed, in bold
    runs = json.loads(md.with_suffix(".json").read_text())["runs"]
    assert {r["seed"] for r in runs} == {0, 100}
    run = {(r["variant"], r["seed"]): r for r in runs}
    assert (run["scratch", 0]["lr"], run["scratch", 0]["warmup"]) == (chosen["scratch"]["lr"],
                                                                      chosen["scratch"]["warmup"])
    assert run["recipe", 0]["lr"] == run["horizon 0.5", 0]["lr"] == chosen["ligo"]["lr"]
    steps = run["recipe", 0]["steps"]
    assert run["horizon 0.5", 0]["curve"][-1][0] == run["horizon 0.5", 0]["steps"] == round(0.5 * steps) < steps
    assert run["fit x1/3", 0]["extra_flops"] * 2 == run["recipe", 0]["extra_flops"] > 0  # 1 fitting step of 2


def test_ligo_levers_refuse_a_proxy_the_tuned_run_did_not_tune(tmp_path):
    untuned = tmp_path / "savings.json"
    untuned.write_text(json.dumps({"schedules": {}, "knobs": {}, "settings": {"tune_seed": 100}}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "savings_ligo_variants.py"), "--quick",
                           "--proxy", "gpt2-stdlib", "--schedules", str(untuned), "--markdown",
                           str(tmp_path / "x.md")], capture_output=True, text=True)
    assert proc.returncode == 2 and "has no tuned schedules for gpt2-stdlib" in proc.stderr
    assert not (tmp_path / "x.md").exists()


def _savings_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import savings as sv

    return sv


def _curve(losses, flops_per_step=10):
    """A validation curve [(step, flops, wall, loss, acc)] with one evaluation per step."""
    return [(i, i * flops_per_step, float(i), loss, 0.0) for i, loss in enumerate(losses)]


def test_a_seed_that_misses_the_goal_counts_at_its_bound_not_dropped():
    """Dropping the seeds a method never reached would keep only its easy seeds; the aggregate keeps them at the
    saving the whole run would give (an upper bound) and marks the mean ≤."""
    sv = _savings_module()
    scratch = {"method": "scratch", "curve": _curve([5, 4, 3, 2, 1])}  # goal 1.0, reached at step 4 (40 FLOPs)
    fast = {"method": "ligo", "curve": _curve([2, 1, 1, 1, 1])}  # reaches 1.0 at step 1: 75 % saved
    slow = {"method": "stack", "curve": _curve([5, 4, 3, 2, 1.5])}  # never: at most 1 - 40/40 = 0 %
    costly = {"method": "stack", "curve": [(0, 20, 0.0, 5, 0.0)] + [(i, 20 + 10 * i, float(i), 5 - i * 0.5, 0.0)
                                                                   for i in range(1, 5)]}  # ends at 60 FLOPs: -50 %
    s_fast, s_slow, s_costly = (sv.savings(r, scratch, None) for r in (fast, slow, costly))
    assert s_fast["reached"] and s_fast["flops_saved"] == 75.0 and s_fast["steps_to_goal"] == 1.0
    assert not s_slow["reached"] and s_slow["flops_saved_max"] == 0.0 and s_slow["steps_to_goal_min"] == 4.0
    assert s_costly["flops_saved_max"] == -50.0
    assert sv.aggregate([s_fast, s_fast], "flops_saved") == "75.0 ± 0.0"
    assert sv.aggregate([s_fast, s_slow], "flops_saved") == "≤ 37.5 ± 53.0"
    assert sv.aggregate([s_fast, s_slow], "flops_saved", sd=False) == "≤ 37.5"
    assert sv.steps_to_goal([s_fast, s_slow]) == "≥ 2 ± 2"


def test_tuned_runs_are_also_measured_against_the_stronger_scratch_of_each_seed():
    """A schedule tuned on one seed can be the worse one elsewhere: the stronger-scratch view takes, seed by seed,
    whichever scratch run ends lower as the goal (and as scratch's row)."""
    sv = _savings_module()

    def run(method, seed, losses):
        return {"proxy": "p", "seed": seed, "method": method, "curve": _curve(losses)}

    default = [run("scratch", 0, [5, 4, 3, 2, 1]), run("scratch", 1, [5, 4, 3, 2, 2])]
    tuned = [run("scratch", 0, [5, 4, 3, 2.5, 2]),  # seed 0: the tuned schedule is the weaker one
             run("scratch", 1, [5, 3, 2, 1.5, 1]),  # seed 1: the stronger one
             run("ligo", 0, [2, 1.5, 1, 1, 1]), run("ligo", 1, [2, 1.5, 1, 1, 1])]
    results = {"runs": default, "tuned_runs": tuned, "pretrain": [{"proxy": "p", "seed": s, "flops": 0.0,
                                                                   "wall": 0.0} for s in (0, 1)]}
    stronger = {(r["method"], r["seed"]): r for r in sv.with_stronger_scratch(results)["stronger_runs"]}
    assert stronger[("scratch", 0)]["curve"] == default[0]["curve"]
    assert stronger[("scratch", 1)]["curve"] == tuned[1]["curve"]
    assert stronger[("ligo", 0)]["savings"]["flops_saved"] == 50.0  # goal 1.0 reached by scratch at step 4
    assert stronger[("ligo", 1)]["savings"]["flops_saved"] == 50.0  # goal 1.0, scratch at step 4
    assert "stronger_runs" not in results  # the results themselves are left as they are


def test_ligo_against_a_method_counts_seeds_and_a_sign_test():
    sv = _savings_module()

    def reached(v):
        return {"reached": True, "flops_saved": v}

    def missed(bound):
        return {"reached": False, "flops_saved_max": bound}

    c = sv.paired([reached(50)] * 8, [reached(40)] * 8)
    assert (c["ahead"], c["behind"], c["undecided"]) == (8, 0, 0)
    assert c["p"] == 2 / 2 ** 8 and c["mean_diff"] == 10
    c = sv.paired([reached(50), reached(30), missed(0), missed(0)], [missed(-2), reached(40), reached(20), missed(1)])
    # ahead where the other missed; behind on a plain loss and where LiGO missed below the other's saving;
    # undecided where both missed
    assert (c["ahead"], c["behind"], c["undecided"]) == (1, 2, 1)
    assert c["p"] == 1.0
    c = sv.paired([missed(30)], [reached(20)])  # LiGO's bound is above the other's saving: nothing is known
    assert (c["ahead"], c["behind"], c["undecided"]) == (0, 0, 1)


def test_loss_at_a_fraction_of_the_budget_interpolates_the_curve(quick):
    sv = _savings_module()
    curve = _curve([5, 4, 2, 1])  # FLOPs 0, 10, 20, 30
    assert sv.loss_at(curve, 0) == 5 and sv.loss_at(curve, 15) == 3.0 and sv.loss_at(curve, 30) == 1
    assert sv.loss_at(curve, 99) == 1  # past the end: the last evaluation
    md = (quick / "savings.md").read_text()
    assert md.count("| method | 10% | 25% | 50% | 75% | 100% |") == len(PROXIES)


def test_lr_check_trains_both_models_over_the_grid_and_marks_the_rates_each_proxy_uses(tmp_path):
    sv = _savings_module()
    import savings_lr_check as check

    out = tmp_path / "lr.md"
    assert check.main(["--quick", "--markdown", str(out)]) == 0
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| proxy")}
    assert set(rows) == {(p, m) for p in PROXIES for m in check.MODELS.values()}
    for (name, model), row in rows.items():
        cells = [c.strip() for c in row.split("|")[3:-1]]
        assert len(cells) == len(check.GRID) + 2
        p = sv.PROXIES[name]
        used = p.lr if model == check.MODELS["target"] else (p.small_lr or p.lr)
        assert [lr for lr, c in zip(check.GRID, cells) if c.startswith("**")] == [used]
        assert cells[-1].startswith(f"{used:g}")
        losses = [float(x.strip("*")) for c in cells[:-2] for x in c.split(" / ")]
        assert len(losses) == 2 * len(check.GRID) and all(0 < v < 10 for v in losses)
        tuning_seed = losses[0::2]  # each cell: tuning seed / seed 0
        assert tuning_seed[check.GRID.index(float(cells[-2]))] == min(tuning_seed)  # the best has the least loss


def test_merging_runs_adds_their_seeds_and_refuses_different_settings(quick, tmp_path):
    sv = _savings_module()
    a = json.loads((quick / "savings.json").read_text())
    b = json.loads((quick / "savings.json").read_text())
    b["settings"]["seeds"] = [2, 3]
    for r in b["runs"] + b["pretrain"]:
        if r["seed"] in (0, 1):
            r["seed"] += 2
    merged = sv.merge(a, b)
    assert merged["settings"]["seeds"] == [0, 1, 2, 3] and len(merged["runs"]) == 2 * len(a["runs"])
    assert len(merged["pretrain"]) == len(a["pretrain"]) + 2 * len(PROXIES)  # the tuning seed's once
    sv.attach_savings(merged["runs"], {(r["proxy"], r["seed"]): r for r in merged["pretrain"]})
    assert "Seeds: [0, 1, 2, 3]" in sv.markdown(merged, merged["command"])
    with pytest.raises(SystemExit, match="repeats seeds"):
        sv.merge(a, a)
    b["settings"]["steps"] += 1
    with pytest.raises(SystemExit, match="settings differ"):
        sv.merge(a, b)
    (tmp_path / "b.json").write_text(json.dumps({**b, "settings": a["settings"] | {"seeds": [2, 3]}}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "savings.py"), "--render",
                           str(quick / "savings.json"), "--merge", str(tmp_path / "b.json"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Seeds: [0, 1, 2, 3]" in (tmp_path / "savings.md").read_text()


def test_a_rerun_reads_every_finished_run_back(quick):
    before = json.loads((quick / "savings.json").read_text())
    assert len(list((quick / "runs").glob("*.json"))) > 0 and not list((quick / "runs").glob("*.partial"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "savings.py"), "--quick", "--out", str(quick)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no run trained again: every stage found all its runs, and the table is the same
    reads = [line for line in proc.stdout.splitlines() if "runs read from" in line]
    assert reads and all(line.split()[0] == line.split()[2] for line in reads)
    after = json.loads((quick / "savings.json").read_text())
    # the small models pretrain again (not cached), so only wall-clock savings that count pretraining may move
    def fixed(runs):
        return [{**r, "savings": {k: v for k, v in r.get("savings", {}).items()
                                  if not k.startswith("wall_saved_pre")}} for r in runs]

    assert fixed(after["runs"]) == fixed(before["runs"]) and after["knobs"] == before["knobs"]
