"""The scale benchmarks run end to end at tiny sizes: fit_scale.py measures every case (a fresh grow process each) and
prints its ratios against the targets; gpu_check.py runs every section (on the CPU here) and writes each section's
figures to its markdown."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_fit_scale_quick_measures_every_case(tmp_path):
    md, raw = tmp_path / "fit_scale.md", tmp_path / "fit_scale.json"
    out = run(str(ROOT / "benchmarks" / "fit_scale.py"), "--quick", "--markdown", str(md), "--json", str(raw),
              cwd=tmp_path).stdout
    # every target printed with its verdict, and the step ratio
    # (streamed, and streamed keeping the products)
    assert out.count("peak / floor = ") == 4 and out.count("peak / target fp32 = ") == 4
    assert out.count("(peak8 - peak4 - (floor8 - floor4)) / peak4 = ") == 4
    assert "fitting step / plain step" in out and "streamed" in out and "full" in out and "selective" in out
    data = json.loads(raw.read_text())
    rows = data["rows"]
    assert {(r["layers"], r["variant"], r["mode"]) for r in rows} == {
        (layers, variant, mode) for layers in (4, 8) for variant in ("per-layer", "shared")
        for mode in ("layers", "selective", "full")}
    for r in rows:
        # a grow process holds at least torch and the package, and every phase was seen
        assert r["peak_mb"] > data["baseline_mb"]["import"] > 50
        assert {"initialise", "validate #1", "fit", "validate #2", "write"} <= set(r["phases"])
        assert max(r["phases"].values()) <= r["peak_mb"] + 1
        assert r["operator"] > 0 and r["floor_mb"] > 0 and r["written_mb"] > 0
    shared = {r["layers"]: r["operator"] for r in rows if r["variant"] == "shared"}
    per_layer = {r["layers"]: r["operator"] for r in rows if r["variant"] == "per-layer"}
    assert per_layer[8] > per_layer[4] > shared[4]
    steps = data["steps"][0]
    assert all(math.isfinite(steps[k]) and steps[k] > 0 for k in ("streamed_ratio", "selective_ratio", "full_ratio",
                                                                      "plain_s"))
    text = md.read_text()
    assert text.startswith("# Fitting at scale") and "python benchmarks/fit_scale.py --quick" in text
    for variant in ("per-layer", "shared"):
        for mode in ("layers", "selective", "full"):
            assert f"| {variant} | {mode} |" in text
    assert "(peak24 - peak12 - (floor24 - floor12)) / peak12" in text and "| 8-shared-full |" in text
    assert "streamed (`stream=True`, checkpointed)" in text


def test_fit_scale_cases_pick_a_subset(tmp_path):
    names = run(str(ROOT / "benchmarks" / "fit_scale.py"), "--quick", "--list", cwd=tmp_path).stdout.split()
    assert "24-shared-layers" not in names and "8-shared-layers" in names and "step-ratio" in names
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_scale.py"), "--quick", "--cases", "nope"],
                          env=ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0 and "match no case" in done.stderr


def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    md = tmp_path / "gpu_check.md"
    out = run(str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(md),
              cwd=tmp_path).stdout
    text = md.read_text()
    assert "failed" not in text
    assert "python benchmarks/gpu_check.py --device cpu --quick" in text and "torch " in text
    assert "onnxruntime " in text and "pip uninstall -y onnxruntime" in text
    rows = [line for line in text.splitlines() if line.startswith(("| vit", "| gpt2", "| llama"))]
    assert len(rows) == 6 and sum("| shared" in r for r in rows) == 1
    assert sum("| layers |" in r for r in rows) == 4  # vit and gpt2 streamed, both llama variants
    for r in rows[:4]:  # fitting wall time and the step ratio were measured
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[6]) > 0 and float(cells[8].split()[0]) > 0
    assert "ONNX export validated with onnxruntime" in text and ": valid" in text
    assert "Whole check:" in text and "valid" in out


def test_fit_memory_quick_accounts_for_the_operator_and_its_optimizer(tmp_path):
    """fit_memory.py's breakdown of the live tensors at a streamed step's peak: the operator is there as
    PARAMETER, AdamW's two moments as twice its bytes, the frozen source as INPUT."""
    raw = tmp_path / "fit_memory.json"
    out = run(str(ROOT / "benchmarks" / "fit_memory.py"), "--quick", "--json", str(raw), cwd=tmp_path).stdout
    assert "| import torch |" in out and "| + torch._dynamo |" in out and "| OPTIMIZER_STATE |" in out
    data = json.loads(raw.read_text())
    cats, mb = data["by_category_mb"], 2**20
    assert math.isclose(sum(cats.values()), data["peak_tensors_mb"], rel_tol=1e-6)
    operator_mb = data["operator_parameters"] * 4 / mb
    assert math.isclose(cats["PARAMETER"], operator_mb, rel_tol=0.02)
    assert math.isclose(cats["OPTIMIZER_STATE"], 2 * operator_mb, rel_tol=0.02)
    assert cats["INPUT"] >= data["source_parameters"] * 4 / mb * 0.98
    assert data["runtime_mb"]["+ torch._dynamo"] > data["runtime_mb"]["import torch"] > 50
