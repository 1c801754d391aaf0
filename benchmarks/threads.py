"""Default threads against one thread, idle and with the cores busy (issue 14, point 5).

    PYTHONPATH=. python benchmarks/threads.py [--repeats 3] [--loads 0,1,3] [--skip-demo] [--out FILE.md]

Times the demo (``python -m ligo_convert.demo``) and a 20-step ``ligo-convert grow micro-vit`` with default settings
and with ``OMP_NUM_THREADS=1``, alternating the two, and prints median(default) / median(one thread) per load: no
background work, then 1 and 3 background processes each running multi-threaded torch matrix products (as other jobs
on a shared node do), started before and stopped after each load's runs.  Target: <= 1.0 idle, <= 1.2 busy.
The load average seen is recorded with each row, since other work on the machine counts too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOG = "import torch\na = torch.randn(384, 384)\nprint('ready', flush=True)\nwhile True:\n    a = torch.tanh(a @ a)\n"


def _env(one_thread: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _timed(cmd: list[str], one_thread: bool, cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=_env(one_thread), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode:
        sys.exit(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def _start_hogs(n: int) -> list[subprocess.Popen]:
    # each hog uses torch's own default (every core): the contention a shared node sees
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    hogs = [subprocess.Popen([sys.executable, "-c", HOG], env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(n)]
    for h in hogs:  # past their torch import (seconds on a loaded machine), into the matrix products
        h.stdout.readline()
    time.sleep(1.0)
    return hogs


def _stop(hogs: list[subprocess.Popen]) -> None:
    for h in hogs:
        h.kill()
    for h in hogs:
        h.wait()


def _compare(cmd: list[str], repeats: int, cwd: Path) -> tuple[float, float, list[float]]:
    times = {False: [], True: []}
    loads = []
    for i in range(repeats):  # alternate, and swap which goes first each round
        for one in ((False, True) if i % 2 == 0 else (True, False)):
            times[one].append(_timed(cmd, one, cwd))
            loads.append(os.getloadavg()[0])
    return statistics.median(times[False]), statistics.median(times[True]), loads


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loads", default="0,1,3", help="background processes per case, comma separated")
    p.add_argument("--skip-demo", action="store_true", help="time only the grow")
    p.add_argument("--demo-args", default="", help="extra demo arguments, e.g. '--pretrain-steps 50'")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    cli = str(Path(sys.executable).with_name("ligo-convert"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([cli, "pretrain", str(tmp / "micro-vit"), "--steps", "20"], env=_env(False), check=True,
                       stdout=subprocess.DEVNULL)
        commands = {"grow micro-vit --steps 20": [cli, "grow", str(tmp / "micro-vit"), "--layers", "4", "--width",
                                                  "128", "--steps", "20", "--out", str(tmp / "grown"), "--overwrite"]}
        if not args.skip_demo:
            commands["demo " + args.demo_args] = [sys.executable, "-m", "ligo_convert.demo", *shlex.split(args.demo_args)]
        rows = []
        for n in (int(x) for x in args.loads.split(",")):
            hogs = _start_hogs(n)
            try:
                for name, cmd in commands.items():
                    default, one, loads = _compare(cmd, args.repeats, tmp)
                    rows.append(f"| {name.strip():<28} | {n} | {default:8.1f} | {one:8.1f} | {default / one:6.2f} | "
                                f"{min(loads):.1f}-{max(loads):.1f} |")
                    print(rows[-1], flush=True)
            finally:
                _stop(hogs)
    head = ["| command | background procs | default s | 1 thread s | ratio | load avg (1 min) |",
            "|---|---|---|---|---|---|"]
    table = "\n".join(head + rows)
    print(f"\n{os.cpu_count()} CPUs, {args.repeats} alternating repeats, medians\n{table}")
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
