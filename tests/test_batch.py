"""`ligo-convert batch`: manifests checked up front, ladders run end to end, runs resume after a kill, changed jobs
(and only their dependents) are redone, shards split the work exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from ligo_convert import forward, load
from ligo_convert.batch import find_manifest, load_manifest, select, shards
from ligo_convert.cli import main
from ligo_convert.export import check_onnx
from helpers import loading_problems, max_diff

REPO = Path(__file__).resolve().parents[1]

# A tiny ladder: micro (pretrained from scratch on the digits) -> mini -> small; head_dim 8 throughout.
TINY = """
[defaults]
device = "cpu"
batch_size = 4
steps = 2
onnx = {onnx}

[[job]]
name = "micro"
kind = "pretrain"
family = "hf-vit"
layers = 1
width = 16
heads = 2
mlp = 32
steps = 3

[[job]]
name = "mini"
source = "@micro"
layers = 2
width = 24
heads = 3
mlp = 48
steps = {mini_steps}

[[job]]
name = "small"
source = "@mini"
width = 32
heads = 4
mlp = 64
"""

SIDE = """
[[job]]
name = "side"
source = "@micro"
layers = 2
"""

OTHER_CHAIN = """
[[job]]
name = "micro2"
kind = "pretrain"
family = "hf-vit"
layers = 1
width = 16
heads = 2
mlp = 32
steps = 2
seed = 1

[[job]]
name = "mini2"
source = "@micro2"
width = 24
heads = 3
mlp = 48
"""



def manifest(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny(onnx: bool = False, mini_steps: int = 2, extra: str = "") -> str:
    return TINY.format(onnx=str(onnx).lower(), mini_steps=mini_steps) + extra


def batch(*args):
    return CliRunner().invoke(main, ["batch", *map(str, args)])


def statuses(report: Path) -> dict[str, str]:
    return {j["name"]: j["status"] for j in json.loads(report.read_text())["jobs"]}


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


# --- the shipped offline ladder, end to end ---------------------------------------------------------------------------


def test_offline_ladder_end_to_end(tmp_path):
    """The bundled ladder-offline manifest (pretrain micro -> grow mini -> grow small) runs offline; every output
    loads with ligo_convert and transformers, computes what the canonical forward computes, and its ONNX file
    validates with onnxruntime.  A second run skips everything."""
    root = tmp_path / "runs"
    r = batch("ladder-offline", "--root", root, "--set", "steps=3", "--set", "batch_size=8")
    assert r.exit_code == 0, r.output
    report = json.loads((root / "batch-report.json").read_text())
    assert [(j["name"], j["status"]) for j in report["jobs"]] == [("micro", "done"), ("mini", "done"),
                                                                   ("small", "done")]
    assert report["finished"] and report["counts"] == {"done": 3}
    table = r.stdout.splitlines()
    assert table[0].split()[:3] == ["job", "status", "loss"] and "onnx max diff" in table[0]
    sizes = {"micro": (2, 32, 2), "mini": (3, 48, 3), "small": (4, 64, 4)}
    pixels = torch.randn(2, 3, 8, 8)
    for name, (layers, width, heads) in sizes.items():
        out = root / "ladder-offline" / name
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["config.json", "model.safetensors", "model.onnx", "pretrain.json" if name == "micro" else "growth.json"])
        model = load(out)
        assert (model.spec.layers, model.spec.width, model.spec.heads) == (layers, width, heads)
        assert model.spec.head_dim == 16
        config = json.loads((out / "config.json").read_text())
        hf, info = getattr(transformers, config["architectures"][0]).from_pretrained(out, output_loading_info=True)
        assert not loading_problems(info), info
        with torch.no_grad():
            ours = forward(model.spec, model.materialize(torch.float32), pixel_values=pixels)["logits"]
            theirs = hf.eval()(pixel_values=pixels).logits
        assert max_diff(ours, theirs) <= 1e-5
        check = check_onnx(out / "model.onnx", model)
        assert check.ok and check.max_diff <= 1e-4, check.failure()
        row = next(j for j in report["jobs"] if j["name"] == name)
        assert row["onnx_max_diff"] == pytest.approx(check.max_diff, abs=1e-6)
        assert row["loss_before"] is not None and row["loss_after"] is not None
    growth = json.loads((root / "ladder-offline" / "small" / "growth.json").read_text())
    assert growth["source_spec"]["width"] == 48 and growth["target_spec"]["width"] == 64  # grown from mini
    assert growth["batch"]["spec"]["source"] == "@mini" and growth["batch"]["key"]
    assert hidden(root / "ladder-offline") == []

    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    again = batch("ladder-offline", "--root", root, "--set", "steps=3", "--set", "batch_size=8", "--json")
    assert again.exit_code == 0, again.output
    assert {j["name"]: j["status"] for j in json.loads(again.stdout)["jobs"]} == dict.fromkeys(sizes, "up-to-date")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")} == mtimes


# --- resuming ---------------------------------------------------------------------------------------------------------


def _start(path: Path, root: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ligo_convert", "batch", str(path), "--root", str(root)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_during(proc: subprocess.Popen, root: Path, job: str, sig: int) -> None:
    """Wait until ``job`` is being built, checking all the while that every visible output is complete, then
    send ``sig``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for name in visible(root):
            if name.endswith(".json"):
                continue
            record = root / name / ("pretrain.json" if name == "micro" else "growth.json")
            assert "batch" in json.loads(record.read_text()), f"{name} is visible but incomplete"
        if any(p.startswith(f".{job}.batch-") for p in hidden(root)):
            time.sleep(0.3)
            proc.send_signal(sig)
            proc.wait(60)
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"job {job} never started: {proc.communicate()[1][-2000:]}")


def test_killed_run_resumes(tmp_path):
    """SIGTERM (a scheduler's stop) and SIGKILL in the middle of a job: only complete outputs are ever visible;
    the next run skips the finished job, redoes the interrupted one and runs the rest."""
    root = tmp_path / "out"
    path = manifest(tmp_path, tiny(mini_steps=400))

    proc = _start(path, root)
    _kill_during(proc, root, "mini", signal.SIGTERM)
    assert proc.returncode != 0
    assert visible(root) == ["batch-report.json", "micro"] and hidden(root) == []  # cleaned up on the way out
    assert statuses(root / "batch-report.json") == {"micro": "done", "mini": "interrupted"}

    proc = _start(path, root)
    _kill_during(proc, root, "mini", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert visible(root) == ["batch-report.json", "micro"]
    assert any(h.startswith(".mini.batch-") for h in hidden(root))  # a hard kill leaves only a hidden folder

    path.write_text(tiny(mini_steps=400).replace("steps = 400", "steps = 2"))  # finish quickly this time
    r = batch(path, "--root", root)
    assert r.exit_code == 0, r.output
    assert statuses(root / "batch-report.json") == {"micro": "up-to-date", "mini": "done", "small": "done"}
    assert visible(root) == ["batch-report.json", "micro", "mini", "small"] and hidden(root) == []
    load(root / "small")


def test_changed_job_reruns_it_and_its_dependents_only(tmp_path):
    root = tmp_path / "out"
    path = manifest(tmp_path, tiny(extra=SIDE))
    r = batch(path, "--root", root)
    assert r.exit_code == 0, r.output
    assert set(statuses(root / "batch-report.json").values()) == {"done"}
    files = {n: (root / n / "model.safetensors").stat().st_mtime_ns for n in ("micro", "mini", "small", "side")}

    path.write_text(tiny(mini_steps=3, extra=SIDE))
    plan = batch(path, "--root", root, "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    rows = {j["name"]: (j["status"], j["note"]) for j in json.loads(plan.stdout)["jobs"]}
    assert rows == {"micro": ("up-to-date", "output holds the same job key"), "mini": ("run", "changed"),
                    "small": ("run", "after mini"), "side": ("up-to-date", "output holds the same job key")}
    only = batch(path, "--root", root, "--dry-run", "--json", "--only", "small")
    assert [j["name"] for j in json.loads(only.stdout)["jobs"]] == ["micro", "mini", "small"]  # with its sources

    r = batch(path, "--root", root)
    assert r.exit_code == 0, r.output
    assert statuses(root / "batch-report.json") == {"micro": "up-to-date", "mini": "done", "small": "done",
                                                    "side": "up-to-date"}
    now = {n: (root / n / "model.safetensors").stat().st_mtime_ns for n in files}
    assert [n for n in files if now[n] != files[n]] == ["mini", "small"]
    assert json.loads((root / "mini" / "growth.json").read_text())["steps"] == 3


def test_failed_job_blocks_only_its_dependents(tmp_path):
    """A job that fails at run time (here: 5 heads cannot keep head_dim 8 on width 24) is reported; the jobs that
    do not depend on it still run, the ones that do are blocked; exit status 1."""
    root = tmp_path / "out"
    text = tiny().replace("heads = 3", "heads = 5") + SIDE
    r = batch(manifest(tmp_path, text), "--root", root)
    assert r.exit_code == 1, r.output
    assert statuses(root / "batch-report.json") == {"micro": "done", "mini": "failed", "small": "blocked",
                                                    "side": "done"}
    assert visible(root) == ["batch-report.json", "micro", "side"] and hidden(root) == []
    assert "mini: " in r.stdout and "head" in r.stdout  # the table is followed by the error of each failed job
    assert "2 of 4 jobs did not finish: mini (failed), small (blocked)" in r.stderr


# --- sharding ---------------------------------------------------------------------------------------------------------


def test_shards_run_every_job_exactly_once(tmp_path):
    root = tmp_path / "out"
    path = manifest(tmp_path, tiny(extra=OTHER_CHAIN))
    ran = []
    for i in (1, 2):
        r = batch(path, "--root", root, "--shard", f"{i}/2")
        assert r.exit_code == 0, r.output
        report = statuses(root / f"batch-report-shard-{i}-of-2.json")
        assert set(report.values()) == {"done"}
        ran += list(report)
    assert sorted(ran) == ["micro", "micro2", "mini", "mini2", "small"]
    r = batch(path, "--root", root, "--json")
    assert set(statuses(root / "batch-report.json").values()) == {"up-to-date"}


def test_shards_are_disjoint_and_keep_chains_whole(tmp_path):
    """Many chains and trees of different sizes, split 1..6 ways: every job in exactly one slice, each job with
    the jobs it depends on, slices balanced by whole chains."""
    jobs = []
    for c, size in enumerate((4, 1, 3, 2, 1, 5, 2)):
        for k in range(size):
            src = f'"@c{c}j{k - 1}"' if k else '"google/bert_uncased_L-2_H-128_A-2"'
            if k == 3:  # a tree: two jobs grown from the same parent
                src = f'"@c{c}j1"'
            jobs.append(f'[[job]]\nname = "c{c}j{k}"\nsource = {src}\ntarget = "bert-mini"\n')
    m = load_manifest(manifest(tmp_path, "\n".join(jobs)), root=tmp_path / "out")
    for n in range(1, 7):
        parts = shards(m, n)
        flat = [x for p in parts for x in p]
        assert sorted(flat) == sorted(m.jobs) and len(flat) == len(set(flat))
        for part in parts:
            assert [j.name for j in select(m, shard=(parts.index(part) + 1, n))] == part
            for name in part:
                up = m.jobs[name].upstream
                assert up is None or (up in part and part.index(up) < part.index(name))
        sizes = sorted(len(p) for p in parts)
        assert sizes[-1] <= max(5, sizes[0] + 5)  # no slice holds more than the biggest chain over the least
    assert [len(p) for p in shards(m, 7)].count(0) == 0 and shards(m, 9)[-1] == []


def test_torchrun_per_job(tmp_path):
    """nproc = 2: the job's fitting runs data-parallel under torchrun (gloo on CPU), the batch only waits."""
    root = tmp_path / "out"
    text = tiny().split("[[job]]\nname = \"small\"")[0].replace('source = "@micro"', 'source = "@micro"\nnproc = 2')
    r = batch(manifest(tmp_path, text), "--root", root)
    assert r.exit_code == 0, r.output
    growth = json.loads((root / "mini" / "growth.json").read_text())
    assert growth["world_size"] == 2 and growth["batch"]["key"]
    assert "nproc" not in growth["batch"]["spec"]  # where a job runs does not change what it makes
    load(root / "mini")


# --- manifest errors: exit 2, one line, nothing written ---------------------------------------------------------------

GOOD_JOB = '[[job]]\nname = "a"\nsource = "google/bert_uncased_L-2_H-128_A-2"\ntarget = "bert-mini"\n'
ERRORS = {
    "unknown top-level key": ('rot = "x"\n' + GOOD_JOB, "unknown key 'rot' (did you mean 'root'?)"),
    "unknown job key": (GOOD_JOB + "stpes = 3\n", "[[job]] #1 ('a'): unknown key 'stpes' (did you mean 'steps'?)"),
    "unknown default key": ("[defaults]\nlearning_rate = 1.0\n" + GOOD_JOB, "[defaults]: unknown key"),
    "job key in defaults": ('[defaults]\nsource = "x"\n' + GOOD_JOB, "key 'source' cannot be a default"),
    "key of another kind": ('[[job]]\nname = "a"\nkind = "pretrain"\nfamily = "hf-vit"\nobjective = "task"\n',
                            "'objective' does not apply to a pretrain job"),
    "source of a pretrain job": ('[[job]]\nname = "a"\nkind = "pretrain"\nfamily = "hf-vit"\nsource = "bert-tiny"\n',
                                 "a pretrain job has no source"),
    "missing name": ('[[job]]\nsource = "bert-tiny"\ntarget = "bert-mini"\n', "missing 'name'"),
    "missing source": ('[[job]]\nname = "a"\ntarget = "bert-mini"\n', "missing 'source'"),
    "missing target": ('[[job]]\nname = "a"\nsource = "bert-tiny"\n', "missing 'target'"),
    "missing family": ('[[job]]\nname = "a"\nkind = "pretrain"\n', "missing 'family'"),
    "no jobs": ("[defaults]\nsteps = 1\n", "no jobs"),
    "job as a table": ('[job]\nname = "a"\n', "write [[job]], not [job]"),
    "bad type": (GOOD_JOB + 'steps = "ten"\n', "steps must be an integer, not 'ten'"),
    "bad choice": (GOOD_JOB + 'dtype = "float8"\n', "dtype 'float8' is not one of float32, float16, bfloat16"),
    "unknown source": (GOOD_JOB + '[[job]]\nname = "b"\nsource = "no-such-model"\nlayers = 4\n',
                       "source 'no-such-model' is no folder, zoo name"),
    "unknown job reference": (GOOD_JOB + '[[job]]\nname = "b"\nsource = "@aa"\nlayers = 4\n',
                              "source '@aa' names no job in this manifest (did you mean '@a'?)"),
    "cycle": ('[[job]]\nname = "a"\nsource = "@c"\nlayers = 4\n[[job]]\nname = "b"\nsource = "@a"\nlayers = 4\n'
              '[[job]]\nname = "c"\nsource = "@b"\nlayers = 4\n', "cycle: a -> c -> b -> a"),
    "self reference": ('[[job]]\nname = "a"\nsource = "@a"\nlayers = 4\n', "cycle: a -> a"),
    "duplicate name": (GOOD_JOB + GOOD_JOB.replace("\ntarget", '\nout = "b"\ntarget'), "name 'a' is already used"),
    "same output": (GOOD_JOB + GOOD_JOB.replace('"a"', '"b"').replace("\ntarget", '\nout = "a"\ntarget'),
                    "jobs 'a' and 'b' both write"),
    "nested outputs": (GOOD_JOB + GOOD_JOB.replace('"a"', '"b"').replace("\ntarget", '\nout = "a/b"\ntarget'),
                       "inside the output of job 'a'"),
    "out escapes with ..": (GOOD_JOB.replace("\ntarget", '\nout = "../elsewhere"\ntarget'),
                            "out '../elsewhere' is outside the output root"),
    "absolute out elsewhere": (GOOD_JOB.replace("\ntarget", '\nout = "/tmp/elsewhere"\ntarget'),
                               "out '/tmp/elsewhere' is outside the output root"),
    "invalid toml": ("[[job]\nname = ", "not valid TOML"),
    "not utf-8": (b"name = '\xff\xfe'\n", "not UTF-8"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_manifest_errors(tmp_path, case):
    text, message = ERRORS[case]
    path = tmp_path / "m.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    root = tmp_path / "out"
    r = batch(path, "--root", root)
    assert r.exit_code == 2, (case, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0], lines[0]
    assert r.stdout == "" and not root.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.toml"]


@pytest.mark.parametrize("args, message", [
    (["missing.toml"], "no such manifest file"),
    (["."], "is a folder, not a manifest file"),
    (["{m}", "--shard", "3/2"], "--shard '3/2': write I/N with 1 <= I <= N"),
    (["{m}", "--shard", "two"], "--shard 'two'"),
    (["{m}", "--only", "b"], "--only b: no such job"),
    (["{m}", "--set", "stepz=3"], "unknown key 'stepz' (did you mean 'steps'?)"),
    (["{m}", "--set", "steps=-1"], "steps must be at least 0"),
])
def test_command_line_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    path = manifest(tmp_path, GOOD_JOB)
    r = batch(*[a.format(m=path) for a in args], "--root", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_foreign_output_is_never_replaced(tmp_path):
    """An out folder that this tool did not write (no batch record) stops the run before anything is done."""
    root = tmp_path / "out"
    (root / "a").mkdir(parents=True)
    (root / "a" / "weights.bin").write_bytes(b"precious")
    r = batch(manifest(tmp_path, GOOD_JOB), "--root", root)
    assert r.exit_code == 2 and "was not written by `ligo-convert batch`" in r.stderr
    assert visible(root) == ["a"] and (root / "a" / "weights.bin").read_bytes() == b"precious"


def test_bundled_manifests_are_valid(tmp_path, monkeypatch):
    """The shipped ladders parse and plan; a dry run touches neither the hub nor the disk."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ladder-offline").mkdir()  # where its outputs go by default: not taken for the manifest
    # the bundled file (from the installed package, or this checkout when run from source)
    found = find_manifest("ladder-offline")
    assert found.read_text() == (REPO / "zoo" / "ladders" / "ladder-offline.toml").read_text()
    for name, count in (("ladder-offline", 3), ("ladder-vit", 2), ("ladder-bert", 3)):
        m = load_manifest(name, root="/nonexistent/root")
        assert len(select(m)) == count and len(m.components()) == 1, name
        assert m.path.read_text() == (REPO / "zoo" / "ladders" / f"{name}.toml").read_text()
    r = batch("ladder-bert", "--root", "/nonexistent/root", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert [j["status"] for j in json.loads(r.stdout)["jobs"]] == ["run"] * 3
    assert not Path("/nonexistent/root").exists()


def test_changed_source_content_redoes_the_job(tmp_path, monkeypatch):
    """A folder source is named relative to the manifest and identified by its content: rewriting its weights
    redoes the job, touching nothing does not."""
    from ligo_convert import from_tensors, init_weights, save
    from ligo_convert.growth.pretrain import micro_spec

    spec = micro_spec("hf-vit", layers=1, width=16, heads=2, mlp=32)
    save(from_tensors(spec, init_weights(spec, 0), family="hf-vit"), tmp_path / "models" / "src")
    path = manifest(tmp_path / "models", '[defaults]\ndevice = "cpu"\nbatch_size = 4\nsteps = 1\nonnx = false\n'
                    '[[job]]\nname = "g"\nsource = "src"\nlayers = 2\n')
    monkeypatch.chdir(tmp_path)  # the output root: the current directory; the source: beside the manifest
    assert batch(path).exit_code == 0 and statuses(tmp_path / "batch-report.json") == {"g": "done"}
    assert json.loads((tmp_path / "g" / "growth.json").read_text())["source"] == str(tmp_path / "models" / "src")
    os.utime(tmp_path / "models" / "src" / "model.safetensors")
    assert batch(path).exit_code == 0 and statuses(tmp_path / "batch-report.json") == {"g": "up-to-date"}
    save(from_tensors(spec, init_weights(spec, 1), family="hf-vit"), tmp_path / "models" / "src", overwrite=True)
    assert batch(path).exit_code == 0 and statuses(tmp_path / "batch-report.json") == {"g": "done"}
