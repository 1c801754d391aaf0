"""The ONNX latency benchmark runs end to end at tiny sizes: every model kind it times (a causal LM's export is a
key/value cache graph, fed an empty past) gets its row, ratio and GEMM floor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_onnx_latency_quick_times_every_model(tmp_path):
    md = tmp_path / "onnx_latency.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "onnx_latency.py"), "--quick", "--repeats", "1",
                           "--threads", "1", "--markdown", str(md)], env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = [line.split(" | ") for line in md.read_text().splitlines() if line.startswith("| ") and "sized" in line]
    timed = [r for r in rows if len(r) == 9]
    assert [r[0].lstrip("| ") for r in timed] == ["ViT-Small-sized (22M)", "ViT-Small-sized (22M)",
                                                  "GPT-2-small-sized (124M)", "BERT-base-sized (110M)",
                                                  "ViT-B-sized (86M)"]
    for r in timed:
        torch_ms, ort_ms, ratio, floor = float(r[3]), float(r[4]), float(r[5]), float(r[8].rstrip(" |"))
        assert torch_ms > 0 and ort_ms > 0 and ratio == round(ratio, 2) and 0 < floor
    assert "--quick" in md.read_text() and "| ViT-Base-sized (86M) |" in md.read_text()
