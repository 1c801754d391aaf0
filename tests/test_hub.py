"""Hub ids and zoo names resolve offline from a Hugging Face cache folder (HF_HUB_CACHE layout); a model that is not
there is one clear line, exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import transformers
from click.testing import CliRunner

from ligo_convert import LigoError, load
from ligo_convert.checkpoint import resolve_source
from ligo_convert.cli import main
from ligo_convert.zoo import find_entry, target_sizes
from helpers import assert_same_files

SHA = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str, files_from: Path) -> Path:
    """Lay out ``files_from`` as huggingface_hub does: blobs by content hash, snapshots/<sha>/ of relative links,
    refs/main naming the snapshot.  Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    for f in sorted(files_from.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def tiny_bert(folder: Path, **sizes) -> Path:
    config = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64) | sizes
    transformers.BertModel(transformers.BertConfig(**config)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(config["vocab_size"])) + "\n")
    return folder


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, used by huggingface_hub from now on (it reads constants.HF_HUB_CACHE at call time; the
    HF_HUB_CACHE variable itself is read once, at import)."""
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.is_symlink(), p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_hub_id_from_cache(cache, tmp_path):
    snapshot = cache_model(cache, "some-org/tiny-bert", tiny_bert(tmp_path / "made"))
    assert resolve_source("some-org/tiny-bert").resolve() == snapshot.resolve()
    model = load("some-org/tiny-bert")
    assert model.family == "hf-bert" and model.spec.width == 32

    result = invoke("inspect", "some-org/tiny-bert", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"] == str(snapshot)

    before = listing(cache)
    out = tmp_path / "out"
    result = invoke("convert", "some-org/tiny-bert", "--out", out)
    assert result.exit_code == 0, result.output
    assert_same_files(snapshot, out)
    assert not (out / "vocab.txt").is_symlink() and (out / "vocab.txt").read_text().startswith("tok0\n")
    assert listing(cache) == before  # the cache is only read


def test_zoo_name_from_cache(cache, tmp_path):
    entry = find_entry("bert-tiny")
    sizes = target_sizes("bert-tiny")
    made = tiny_bert(tmp_path / "made", hidden_size=sizes["width"], num_hidden_layers=sizes["layers"],
                     num_attention_heads=sizes["heads"], intermediate_size=sizes["mlp"])
    snapshot = cache_model(cache, entry["hub"], made)
    result = invoke("inspect", "bert-tiny", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["source"] == str(snapshot) and info["family"] == entry["family"]
    assert {k: info["spec"][k] for k in sizes} == sizes


@pytest.mark.parametrize("name", ["some-org/not-cached", "bert-base"])
def test_missing_model(cache, tmp_path, name):
    hub_id = find_entry(name)["hub"] if find_entry(name) else name
    with pytest.raises(LigoError, match="not in the local Hugging Face cache"):
        load(name)
    result = invoke("convert", name, "--out", tmp_path / "out")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {hub_id}: not in the local Hugging Face cache"), line
    # the hub CLI this huggingface-hub installs, and why nothing was downloaded
    assert f"`hf download {hub_id}`" in line and "HF_HUB_OFFLINE=1 keeps downloads off" in line
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]
    assert list(cache.iterdir()) == []  # nothing was fetched or half-made


def test_not_a_name(cache):
    for source in ("no-such-thing", "a/b/c", "./missing-folder"):
        with pytest.raises(LigoError, match="no such folder, zoo name or hub id"):
            resolve_source(source)


def test_hf_hub_cache_variable(tmp_path):
    """A user's own process: the HF_HUB_CACHE environment variable points the CLI at the cache."""
    cache = tmp_path / "hub"
    snapshot = cache_model(cache, "some-org/tiny-bert", tiny_bert(tmp_path / "made"))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ligo_convert", "inspect", "some-org/tiny-bert", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["source"] == str(snapshot)
    proc = subprocess.run([sys.executable, "-m", "ligo_convert", "inspect", "other-org/tiny-bert"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "other-org/tiny-bert" in proc.stderr
