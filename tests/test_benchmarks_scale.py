"""The scale benchmarks run end to end at tiny sizes: fit_scale.py measures every case and prints its ratios against
the targets; gpu_check.py runs every section (on the CPU here) and writes each section's figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_fit_scale_quick_measures_every_case(tmp_path):
    md = tmp_path / "fit_scale.md"
    out = run(str(ROOT / "benchmarks" / "fit_scale.py"), "--quick", "--modes", "layers", "--markdown", str(md),
              cwd=tmp_path).stdout
    assert out.count("peak") >= 4 and "fitting step / plain step: streamed" in out
    text = md.read_text()
    assert "python benchmarks/fit_scale.py --quick" in text
    for variant in ("per-layer", "shared"):
        assert f"| {variant} | layers |" in text
    assert "(peak24 - peak12 - (floor24 - floor12)) / peak12" in text


def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    md = tmp_path / "gpu_check.md"
    run(str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(md), cwd=tmp_path)
    text = md.read_text()
    assert "failed" not in text
    rows = [line for line in text.splitlines() if line.startswith("| vit") or line.startswith("| gpt2")
            or line.startswith("| llama")]
    assert len(rows) == 6 and sum("shared" in r for r in rows) == 1
    assert "ONNX export validated with onnxruntime" in text and ": valid" in text
