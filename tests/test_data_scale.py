"""Data at scale, with no downloads: image files decoded in DataLoader workers (the same batches as in-process, worker
errors as one-line LigoErrors, no worker left behind), text tokenised once into a memory-mapped token cache (the same
batches as tokenising on the fly; a damaged or stale cache is rebuilt; a read-only data folder falls back to the user
cache), and tables — JSON lines, parquet, datasets.save_to_disk folders — as data."""

from __future__ import annotations

import gc
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ligo_convert import LigoError
from ligo_convert import data as data_mod
from ligo_convert import token_cache

from test_growth_data import BERT, GPT, VIT

GREY_VIT = VIT.replace(num_channels=1)


def take(stream, n):
    return list(itertools.islice(stream, n))


def assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own user cache dir (for the embedded corpus and read-only data folders)."""
    monkeypatch.setenv("LIGO_CACHE", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache" / "tokens"


# --- images in DataLoader workers -----------------------------------------------------------------------------------


def write_image_folder(folder: Path, per_class: int = 11) -> Path:
    """Three classes of PNGs of various sizes, RGB and grey (some grey images in an RGB model and vice versa)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("ant", "bee", "cow")):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = 6 + (3 * i + c) % 17, 5 + (5 * i) % 13
            mode = "L" if (i + c) % 3 == 0 else "RGB"
            px = torch.randint(0, 256, (h, w, 1 if mode == "L" else 3), generator=g, dtype=torch.uint8)
            image = Image.fromarray(px.squeeze(-1).numpy() if mode == "L" else px.numpy(), mode)
            image.save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images") / "data")


def worker_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


@pytest.mark.parametrize("split, n", [("train", 12), ("val", 10)])
@pytest.mark.parametrize("spec", [VIT, GREY_VIT], ids=["rgb", "grey"])
def test_workers_feed_the_same_batches(image_folder, spec, split, n):
    inproc = take(data_mod.batches(spec, image_folder, split=split, batch_size=4, seed=3, workers=0), n)
    workers = take(data_mod.batches(spec, image_folder, split=split, batch_size=4, seed=3, workers=2), n)
    assert_same(inproc, workers)  # bit for bit, over more than one epoch of train
    if split == "train":
        seen = sum(len(b["labels"]) for b in workers)
        assert len(workers) == n and seen > len(data_mod.image_source(image_folder).train)  # past one epoch
    else:
        assert sum(len(b["labels"]) for b in workers) == 6  # one pass: every 5th image of each class


def test_default_workers():
    assert 1 <= data_mod.default_workers() <= data_mod.MAX_DEFAULT_WORKERS
    before = worker_pids()
    stream = data_mod.batches(VIT, batch_size=4)  # the in-memory digits: nothing to decode, no workers
    next(stream)
    assert worker_pids() == before
    stream.close()
    with pytest.raises(LigoError, match="0 or more"):
        data_mod.batches(VIT, batch_size=4, workers=-1)


def test_no_worker_remains_after_the_stream_is_closed(image_folder):
    before = worker_pids()
    stream = data_mod.batches(VIT, image_folder, batch_size=4, workers=2)  # endless train stream
    take(stream, 3)
    started = worker_pids() - before
    assert len(started) == 2
    stream.close()
    assert not (worker_pids() & started)
    stream = data_mod.batches(VIT, image_folder, batch_size=4, workers=2)
    next(stream)
    started = worker_pids() - before
    del stream  # dropped without being closed
    gc.collect()
    assert started and not (worker_pids() & started)


def test_a_broken_image_in_a_worker_is_a_one_line_error(image_folder, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(image_folder, folder)
    (folder / "bee" / "0.png").write_bytes(b"not a png at all")  # a train image
    before = worker_pids()
    with pytest.raises(LigoError) as caught:
        take(data_mod.batches(VIT, folder, batch_size=4, workers=2), 20)
    message = str(caught.value)
    assert str(folder / "bee" / "0.png") in message and "not a readable image" in message and "\n" not in message
    with pytest.raises(LigoError) as inproc:
        take(data_mod.batches(VIT, folder, batch_size=4, workers=0), 20)
    assert str(inproc.value) == message
    assert worker_pids() <= before


# --- the token cache ------------------------------------------------------------------------------------------------


def write_text_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for d in range(6):
        lines = [" ".join(words[(d + i + j) % len(words)] for j in range(1 + (i * 7 + d) % 9)) + f" {d}.{i}\n"
                 for i in range(30 + 7 * d)]
        (folder / f"doc{d}.txt").write_text("".join(lines))
    return folder


@pytest.fixture
def text_folder(tmp_path) -> Path:
    return write_text_folder(tmp_path / "corpus")


class CountingEncoder:
    """Counts tokenisations (building a cache); ``forbid`` makes any tokenisation fail."""

    def __init__(self, monkeypatch):
        self.builds, self.forbid = 0, False
        real = data_mod.TextEncoder.encode_many

        def encode_many(encoder, texts):
            assert not self.forbid, "tokenised again: the cache was not used"
            self.builds += 1
            return real(encoder, texts)

        def encode(encoder, text):
            assert not self.forbid, "tokenised again: the cache was not used"
            return real_encode(encoder, text)

        real_encode = data_mod.TextEncoder.encode
        monkeypatch.setattr(data_mod.TextEncoder, "encode_many", encode_many)
        monkeypatch.setattr(data_mod.TextEncoder, "encode", encode)


def stream(spec, data, split="train", n=14, cache=True, tokenizer_dir=None, **kw):
    return take(data_mod.batches(spec, data, tokenizer_dir, split, batch_size=3, seq_len=16, seed=7, cache=cache, **kw),
                n)


@pytest.mark.parametrize("spec", [GPT, BERT], ids=["causal-lm", "masked-lm"])
def test_the_cache_is_built_once_and_gives_the_same_batches(text_folder, spec, monkeypatch):
    reference = {s: stream(spec, text_folder, s, cache=False) for s in ("train", "val")}
    counter = CountingEncoder(monkeypatch)
    assert_same(stream(spec, text_folder), reference["train"])
    assert counter.builds == 1
    cache = text_folder / ".ligo-cache"
    assert len(list(cache.glob("*.tokens"))) == 1 and len(list(cache.glob("*.json"))) == 1
    counter.forbid = True
    assert_same(stream(spec, text_folder), reference["train"])  # read back, not tokenised
    assert_same(stream(spec, text_folder, "val"), reference["val"])  # one cache serves both splits
    counter.forbid = False
    val = list(data_mod.batches(spec, text_folder, split="val", batch_size=3, seq_len=16, seed=7))
    assert_same(val, list(data_mod.batches(spec, text_folder, split="val", batch_size=3, seq_len=16, seed=7,
                                           cache=False)))


def test_the_embedded_corpus_is_cached_in_the_user_cache(user_cache):
    assert_same(stream(GPT, None, n=4), stream(GPT, None, n=4, cache=False))
    assert len(list(user_cache.glob("*.tokens"))) == 1


def test_too_little_text_is_still_refused(tmp_path):
    (tmp_path / "short.txt").write_text("tiny\n")
    for cache in (True, False):
        with pytest.raises(LigoError, match="short.txt: too little train text"):
            stream(GPT, tmp_path / "short.txt", cache=cache)


def only_cache(folder: Path) -> tuple[Path, Path]:
    (tokens,), (meta,) = folder.glob("*.tokens"), folder.glob("*.json")
    return tokens, meta


@pytest.mark.parametrize("damage", ["truncated", "garbage-json", "wrong-key", "flipped-bytes", "no-tokens-file"])
def test_a_damaged_cache_is_rebuilt(text_folder, damage, monkeypatch):
    reference = stream(BERT, text_folder, cache=False)
    stream(BERT, text_folder)
    tokens, meta = only_cache(text_folder / ".ligo-cache")
    if damage == "truncated":
        tokens.write_bytes(tokens.read_bytes()[:-12])
    elif damage == "garbage-json":
        meta.write_text("{ not json")
    elif damage == "wrong-key":
        m = json.loads(meta.read_text())
        m["key"]["tokenizer"] = "something else"
        meta.write_text(json.dumps(m))
    elif damage == "flipped-bytes":
        raw = bytearray(tokens.read_bytes())
        raw[5] ^= 0xFF
        tokens.write_bytes(bytes(raw))
    else:
        tokens.unlink()
    counter = CountingEncoder(monkeypatch)
    assert_same(stream(BERT, text_folder), reference)
    assert counter.builds == 1
    counter.forbid = True
    assert_same(stream(BERT, text_folder), reference)  # and the rebuilt cache is good


def test_a_changed_source_file_with_the_same_size_and_mtime_is_rebuilt(text_folder, monkeypatch):
    before = stream(GPT, text_folder, n=200)  # more than an epoch
    doc = text_folder / "doc2.txt"
    st = doc.stat()
    text = doc.read_text()
    doc.write_text(text.replace("alpha", "ALPHA"))  # same size
    os.utime(doc, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert doc.stat().st_size == st.st_size and doc.stat().st_mtime_ns == st.st_mtime_ns
    counter = CountingEncoder(monkeypatch)
    got = stream(GPT, text_folder, n=200)
    assert counter.builds == 1
    counter.forbid = False
    assert_same(got, stream(GPT, text_folder, n=200, cache=False))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(before, got))


def write_tokenizer(folder: Path, vocab: int, text_folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]", "[MASK]"])
    tok.train([str(p) for p in sorted(text_folder.glob("*.txt"))], trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_a_different_tokenizer_gets_its_own_cache(text_folder, tmp_path, monkeypatch):
    small = write_tokenizer(tmp_path / "tok-small", 12, text_folder)
    large = write_tokenizer(tmp_path / "tok-large", 40, text_folder)
    spec = BERT.replace(vocab_size=64)
    counter = CountingEncoder(monkeypatch)
    first = stream(spec, text_folder, tokenizer_dir=small)
    second = stream(spec, text_folder, tokenizer_dir=large)
    assert counter.builds == 2 and len(list((text_folder / ".ligo-cache").glob("*.tokens"))) == 2
    counter.forbid = True
    assert_same(stream(spec, text_folder, tokenizer_dir=small), first)
    assert_same(stream(spec, text_folder, tokenizer_dir=large), second)
    counter.forbid = False
    assert_same(first, stream(spec, text_folder, tokenizer_dir=small, cache=False))
    assert_same(second, stream(spec, text_folder, tokenizer_dir=large, cache=False))
    # the byte fallback of another vocabulary is another tokenizer too
    stream(GPT.replace(vocab_size=200), text_folder)
    stream(GPT, text_folder)
    assert counter.builds == 4


def test_a_read_only_data_folder_falls_back_to_the_user_cache(text_folder, user_cache, monkeypatch):
    reference = stream(GPT, text_folder, cache=False)
    os.chmod(text_folder, 0o555)
    if os.geteuid() == 0:  # root writes through mode bits: make access() answer as it does for everyone else
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == text_folder and mode & os.W_OK
                            else real(p, mode, **kw))
    try:
        counter = CountingEncoder(monkeypatch)
        assert_same(stream(GPT, text_folder), reference)
        assert not (text_folder / ".ligo-cache").exists()
        assert len(list(user_cache.glob("*.tokens"))) == 1 and counter.builds == 1
        counter.forbid = True
        assert_same(stream(GPT, text_folder), reference)
    finally:
        os.chmod(text_folder, 0o755)


def test_user_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGO_CACHE", str(tmp_path / "mine"))
    assert token_cache.user_cache_dir() == tmp_path / "mine" / "tokens"
    monkeypatch.delenv("LIGO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert token_cache.user_cache_dir() == tmp_path / "xdg" / "ligo-convert" / "tokens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert token_cache.user_cache_dir() == Path.home() / ".cache" / "ligo-convert" / "tokens"


# --- tables: JSON lines, parquet, datasets.save_to_disk -------------------------------------------------------------


def documents() -> list[str]:
    words = "one two three four five six seven eight nine ten".split()
    return [" ".join(words[(r + j) % 10] for j in range(8 + r % 5)) + f" row{r}\n" + "more text here\n" * (r % 3)
            for r in range(23)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows() -> list[dict]:
    return [{"id": r, "text": t, "title": f"title {r}"} for r, t in enumerate(documents())]


def test_text_tables_of_every_format_feed_the_same_batches(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = text_rows()
    jsonl = write_jsonl(tmp_path / "docs.jsonl", rows)
    (tmp_path / "docs.json").write_text(json.dumps(rows))  # a JSON array is a table too
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "docs.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    held = [r for r in range(len(rows)) if r % 10 == 9]  # the documented row split
    datasets.DatasetDict({"train": ds.select([r for r in range(len(rows)) if r not in held]),
                          "validation": ds.select(held)}).save_to_disk(str(tmp_path / "saved-dict"))
    for spec in (GPT, BERT):
        for split in ("train", "val"):
            ref = stream(spec, jsonl, split, n=30, cache=False)
            for source in ("docs.jsonl", "docs.json", "docs.parquet", "saved", "saved-dict"):
                assert_same(stream(spec, tmp_path / source, split, n=30), ref)
    # the split: rows 9 and 19 are val, each row one whole document
    corpus = data_mod.text_corpus(jsonl)
    assert [corpus.text("val", k) for k in range(corpus.count("val"))] == [rows[9]["text"], rows[19]["text"]]
    assert [corpus.text("train", k) for k in range(corpus.count("train"))] == \
        [r["text"] for i, r in enumerate(rows) if i not in (9, 19)]
    assert (tmp_path / ".ligo-cache").is_dir() and (tmp_path / "saved" / ".ligo-cache").is_dir()
    # a folder of parquet files named by split splits by name, as a DatasetDict does
    parts = tmp_path / "parts"
    parts.mkdir()
    ds.select(range(0, 20)).to_parquet(str(parts / "train-00000-of-00001.parquet"))
    ds.select(range(20, 23)).to_parquet(str(parts / "validation-00000-of-00001.parquet"))
    datasets.DatasetDict({"train": ds.select(range(0, 20)), "validation": ds.select(range(20, 23))}).save_to_disk(
        str(tmp_path / "same-dict"))
    for split in ("train", "val"):
        assert_same(stream(GPT, parts, split, n=30), stream(GPT, tmp_path / "same-dict", split, n=30))


def test_a_jsonl_of_documents_reads_each_row_as_one_document(tmp_path, text_folder):
    """With a DatasetDict holding the same documents as a text folder's split, the batches are the folder's."""
    datasets = pytest.importorskip("datasets")
    files = sorted(text_folder.rglob("*.txt"))
    texts = [f.read_text() for f in files]
    train = [data_mod._split_text(t, "train") for t in texts]
    val = [data_mod._split_text(t, "val") for t in texts]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": val})}).save_to_disk(str(tmp_path / "dd"))
    for split in ("train", "val"):
        assert_same(stream(BERT, tmp_path / "dd", split), stream(BERT, text_folder, split))


def test_the_text_column(tmp_path):
    rows = [{"body": t, "title": f"t{r}", "n": r} for r, t in enumerate(documents())]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    with pytest.raises(LigoError, match="several string columns.*body \\(string\\).*--text-column") as e:
        data_mod.batches(GPT, path)
    assert "\n" not in str(e.value) and "docs.jsonl" in str(e.value)
    got = stream(GPT, path, text_column="body")
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": r["body"]} for r in rows])
    assert_same(got, stream(GPT, plain))  # the same documents under the default column name
    with pytest.raises(LigoError, match="docs.jsonl: no column 'nope'.*--text-column"):
        data_mod.batches(GPT, path, text_column="nope")
    with pytest.raises(LigoError, match="column 'n' holds int, not text"):
        data_mod.batches(GPT, path, text_column="n")
    only = write_jsonl(tmp_path / "only.jsonl", [{"words": r["body"], "n": r["n"]} for r in rows])
    assert_same(stream(GPT, only), got)  # the only string column
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}] * 3 + [{"text": 5}])
    with pytest.raises(LigoError, match="bad.jsonl: row 3 of column 'text' holds int, not text"):
        stream(GPT, bad)
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(LigoError, match="broken.jsonl:2: not valid JSON"):
        stream(GPT, tmp_path / "broken.jsonl")


def test_parquet_column_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"count": list(range(30))}).to_parquet(str(tmp_path / "numbers.parquet"))
    with pytest.raises(LigoError, match="numbers.parquet: no string column.*count \\(int\\).*--text-column"):
        data_mod.batches(GPT, tmp_path / "numbers.parquet")
    with pytest.raises(LigoError, match="numbers.parquet: no 'image' column.*'label'"):
        data_mod.batches(VIT, tmp_path / "numbers.parquet")


def image_rows(folder: Path, as_path: bool) -> tuple[list, list[int], list[str]]:
    """The image folder as rows, in its own order: (images as bytes or paths relative to the folder's parent, labels,
    class names)."""
    source = data_mod.image_source(folder)
    images = [str(f.relative_to(folder.parent)) if as_path else f.read_bytes() for f in source.files]
    return images, source.labels, source.classes


def test_image_tables_feed_the_image_folders_batches(image_folder, tmp_path):
    datasets = pytest.importorskip("datasets")
    images, labels, classes = image_rows(image_folder, as_path=False)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "label": labels},
                                    features=features)
    ds.to_parquet(str(tmp_path / "images.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    paths, _, _ = image_rows(image_folder, as_path=True)
    jsonl = write_jsonl(image_folder.parent / "images.jsonl", [{"image": p, "label": c} for p, c in zip(paths, labels)])
    try:
        for split in ("train", "val"):
            ref = take(data_mod.batches(VIT, image_folder, split=split, batch_size=4, seed=2, workers=0), 9)
            for source, workers in (("images.parquet", 0), ("images.parquet", 2), ("saved", 2)):
                assert_same(take(data_mod.batches(VIT, tmp_path / source, split=split, batch_size=4, seed=2,
                                                  workers=workers), 9), ref)
            assert_same(take(data_mod.batches(VIT, jsonl, split=split, batch_size=4, seed=2, workers=0), 9), ref)
        assert data_mod.image_source(tmp_path / "saved").classes == classes
    finally:
        jsonl.unlink()
    # a DatasetDict: its train and validation splits as they are
    datasets.DatasetDict({"train": ds.select(range(20)), "validation": ds.select(range(20, 33))}).save_to_disk(
        str(tmp_path / "dd"))
    source = data_mod.image_source(tmp_path / "dd")
    assert source.train == list(range(20)) and source.val == list(range(20, 33))
    val = list(data_mod.batches(VIT, tmp_path / "dd", split="val", batch_size=8, workers=0))
    assert [x for b in val for x in b["labels"].tolist()] == labels[20:33]


def test_image_table_errors(tmp_path, image_folder):
    datasets = pytest.importorskip("datasets")
    images, labels, _ = image_rows(image_folder, as_path=False)
    datasets.Dataset.from_dict({"image": images, "label": [float(x) for x in labels]}).to_parquet(
        str(tmp_path / "float-labels.parquet"))
    with pytest.raises(LigoError, match="float-labels.parquet: column 'label' holds double, not integer class ids"):
        data_mod.batches(VIT, tmp_path / "float-labels.parquet")
    datasets.Dataset.from_dict({"image": list(range(len(labels))), "label": labels}).to_parquet(
        str(tmp_path / "int-images.parquet"))
    with pytest.raises(LigoError, match="int-images.parquet: column 'image' holds int, not images"):
        data_mod.batches(VIT, tmp_path / "int-images.parquet")
    broken = list(images)
    broken[7] = b"not an image"
    datasets.Dataset.from_dict({"image": broken, "label": labels}).to_parquet(str(tmp_path / "broken.parquet"))
    for workers in (0, 2):
        with pytest.raises(LigoError, match=r"broken.parquet \(row 7\): not a readable image") as e:
            take(data_mod.batches(VIT, tmp_path / "broken.parquet", batch_size=33, workers=workers), 1)
        assert "\n" not in str(e.value)


def test_without_pyarrow_or_datasets_the_error_says_what_to_install(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": documents()}).to_parquet(str(tmp_path / "docs.parquet"))
    datasets.Dataset.from_dict({"text": documents()}).save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in documents()])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(LigoError, match='pip install "ligo-convert\\[datasets\\]"'):
        data_mod.batches(GPT, tmp_path / "docs.parquet")
    with pytest.raises(LigoError, match='saved: .*pip install "ligo-convert\\[datasets\\]"'):
        data_mod.batches(GPT, tmp_path / "saved")
    assert stream(GPT, tmp_path / "docs.jsonl", n=2)  # JSON lines need neither


def test_describe_names_the_source(tmp_path, image_folder, text_folder):
    write_jsonl(tmp_path / "docs.jsonl", [{"body": t} for t in documents()])
    assert data_mod.describe(GPT, tmp_path / "docs.jsonl") == f"text in JSON lines {tmp_path / 'docs.jsonl'} " \
                                                              f"(column 'body')"
    assert data_mod.describe(GPT, text_folder) == f"text in {text_folder}"
    assert data_mod.describe(VIT, image_folder) == f"images in {image_folder}"
    assert data_mod.describe(GPT) == "python standard library source (embedded)"


def test_worker_datasets_pickle(image_folder, tmp_path):
    """What the workers get pickles (a spawn or forkserver start method sends it to them), tables included."""
    import pickle

    datasets = pytest.importorskip("datasets")
    images, labels, _ = image_rows(image_folder, as_path=False)
    datasets.Dataset.from_dict({"image": images, "label": labels}).to_parquet(str(tmp_path / "images.parquet"))
    mean, std = data_mod._normalisation(None, 3)
    for data in (image_folder, tmp_path / "images.parquet"):
        dataset = data_mod._BatchDataset(VIT, data_mod.image_source(data), mean, std)
        again = pickle.loads(pickle.dumps(dataset))
        assert_same([again[[0, 5, 17]]], [dataset[[0, 5, 17]]])


def test_pin_memory_keeps_the_batches(image_folder, text_folder):
    """Pinning only page-locks the tensors (where CUDA is there; elsewhere it is a no-op): the values stay."""
    for workers in (0, 2):
        pinned = take(data_mod.batches(VIT, image_folder, batch_size=4, workers=workers, pin_memory=True), 3)
        assert_same(pinned, take(data_mod.batches(VIT, image_folder, batch_size=4, workers=0), 3))
        assert all(b["pixel_values"].is_pinned() == torch.cuda.is_available() for b in pinned)
    pinned = stream(GPT, text_folder, n=3, pin_memory=True)
    assert_same(pinned, stream(GPT, text_folder, n=3))
