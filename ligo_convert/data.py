"""Training and evaluation data, with no downloads: batches ready for the canonical forward.

``batches(spec, data, ...)`` yields dicts holding the forward's inputs (``pixel_values`` or ``input_ids`` +
``attention_mask`` [+ ``token_type_ids``]) and the targets (``labels``).  What it reads is decided by the spec alone:
image models (``spec.input == "patches"``) read images, token models read text.

Sources (``data``):
- ``None``: the embedded defaults — scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes) for image
  models; the Python standard library's own source files for text models.
- a folder of class subfolders holding images (image models);
- a text file, or a folder of ``.txt`` files (text models);
- a table: a ``.jsonl``/``.json`` file, a ``.parquet`` file or folder of them, or a ``datasets.save_to_disk`` folder
  (``ligo_convert.datasets_io`` says which columns and splits are read).

Text is tokenised with the checkpoint's own ``tokenizer.json`` (``tokenizer_dir``) when it has one, else with a
byte-level fallback whose ids stay below ``spec.vocab_size``.  Every stream is deterministic for a seed, and split
``"val"`` never shares an example with ``"train"``.  For masked-LM heads the batch is already masked (15 %, BERT's
80/10/10 rule, from a generator seeded by ``seed``) and ``labels`` holds the original ids at masked places, -100
elsewhere; for causal LM heads ``labels`` is ``input_ids`` (the loss shifts it); image batches carry class ``labels``.

At scale: image files are decoded and resized in DataLoader worker processes (``workers``) while the main process
draws the order, so the batches are the same whatever the number of workers; text is tokenised once into a
memory-mapped token cache beside the data (``ligo_convert.token_cache``) and streamed from it, giving the same batches
as tokenising on the fly.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import datasets_io, files, token_cache
from .errors import LigoError
from .spec import Spec

IGNORE_INDEX = -100
MASK_PROBABILITY = 0.15
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORWARD_KEYS = ("input_ids", "pixel_values", "attention_mask", "token_type_ids")
_SPLIT_SEED = 1234  # fixes the digits train/val split independently of the batch seed
MAX_DEFAULT_WORKERS = 8  # image decoding scales little past this, and each worker holds a copy of the process
TEXT_SPLIT_RULE = "text files: the last 10 % of each document's lines (>= 1 line of a 2+ line file) held out; v1"


def model_inputs(batch: dict) -> dict:
    """The part of a batch that ``forward(spec, w, **inputs)`` takes."""
    return {k: v for k, v in batch.items() if k in FORWARD_KEYS}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every tensor (a data-parallel rank's share of a global batch)."""
    return {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# The unit of every validation read: grow's validation, `eval` and the batch table read the first ``chunks`` x
# VAL_CHUNK held-out examples, drawn (and, for masked LM, masked) in pieces of this size, so --batch-size changes only
# how many are scored at once, never which examples nor their masks.
VAL_CHUNK = 16
# how many pieces grow's validation and `eval` read by default: 128 examples, cheap next to a fitting step at every
# size (eval --max-batches 0 reads the whole split)
VAL_PIECES = 8
VAL_SEED = 0  # the held-out split has no shuffling; this seed fixes its MLM masks whatever a command's --seed


def val_batches(spec: Spec, data=None, tokenizer_dir=None, batch_size: int = 16, seq_len: int = 64,
                chunks: int | None = None, **options) -> Iterator[dict]:
    """The validation examples, in batches of ``batch_size`` (the last smaller): the first ``chunks`` x
    :data:`VAL_CHUNK` examples of the ``val`` split (None or 0: all of it), the same whatever ``batch_size``.
    ``options`` are those of :func:`batches`."""
    pieces = batches(spec, data, tokenizer_dir, "val", VAL_CHUNK, seq_len, VAL_SEED, repeat=False, **options)
    if chunks:
        pieces = itertools.islice(pieces, chunks)
    pending: list[dict] = []
    held = 0
    for piece in pieces:
        pending.append(piece)
        held += batch_rows(piece)
        while held >= batch_size:
            merged = _concat(pending)
            yield slice_batch(merged, 0, batch_size)
            pending, held = [slice_batch(merged, batch_size, held)], held - batch_size
    if held:
        yield _concat(pending)


def batch_rows(batch: dict) -> int:
    """The number of examples in a batch."""
    return len(next(v for k, v in batch.items() if k in FORWARD_KEYS))


def _concat(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) else v for k, v in parts[0].items()}


def batches(spec: Spec, data=None, tokenizer_dir=None, split: str = "train", batch_size: int = 16,
            seq_len: int = 64, seed: int = 0, repeat: bool | None = None, *, workers: int | None = None,
            text_column: str | None = None, cache: bool = True, pin_memory: bool = False) -> Iterator[dict]:
    """Batches for ``spec`` from ``data`` (see the module docstring).

    ``repeat`` (default: True for ``"train"``, False for ``"val"``) makes the stream endless, reshuffled each epoch;
    a finite stream ends with a last, possibly smaller batch.  ``seq_len`` is clamped to the positions the model has.

    ``workers``: DataLoader worker processes that decode and resize image files (default: the cores this process may
    use, at most 8; 0 for the in-memory digits and for text; 0 decodes in this process).  The batches do not depend
    on it.  ``text_column``: the column of a table that holds the text.  ``cache``: tokenise text once into a token
    cache (``ligo_convert.token_cache``) instead of as it streams; the batches are the same.  ``pin_memory``: page-lock
    the batches' tensors when CUDA is available, for faster, asynchronous copies to the GPU.  Close the stream (or
    drop it) to stop its workers.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if batch_size < 1:
        raise LigoError(f"batch size must be at least 1, not {batch_size}")
    if workers is not None and workers < 0:
        raise LigoError(f"the number of data workers must be 0 or more, not {workers}")
    repeat = (split == "train") if repeat is None else repeat
    pin = bool(pin_memory) and torch.cuda.is_available()
    if spec.input == "patches":
        source = image_source(data)
        n = 0 if source.images is not None else default_workers() if workers is None else workers
        if n:
            return _loader_batches(spec, source, tokenizer_dir, split, batch_size, seed, repeat, n, pin)
        stream = _image_batches(spec, source, tokenizer_dir, split, batch_size, seed, repeat)
    else:
        corpus = text_corpus(data, text_column)
        stream = _text_batches(spec, corpus, tokenizer_dir, split, batch_size, seq_len, seed, repeat, cache)
    return _pinned(stream) if pin else stream


def default_workers() -> int:
    """The cores this process may use (its CPU affinity where the OS has one), at most ``MAX_DEFAULT_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def _pinned(stream: Iterator[dict]) -> Iterator[dict]:
    for batch in stream:
        yield {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def describe(spec: Spec, data=None, text_column: str | None = None) -> str:
    """A short name for the data ``batches`` would read (for reports)."""
    images = spec.input == "patches"
    if data is None:
        return "digits (scikit-learn, embedded)" if images else "python standard library source (embedded)"
    path = Path(data)
    kind = source_kind(path, images)
    if kind in ("plain", None):
        return f"images in {data}" if images else f"text in {data}"
    what = {"jsonl": "JSON lines", "parquet": "parquet", "dataset": "datasets.save_to_disk",
            "datasetdict": "datasets.save_to_disk DatasetDict"}[kind]
    if images:
        return f"images in {what} {data} (columns 'image', 'label')"
    try:
        column = datasets_io.text_column_of(datasets_io.open_tables(path), text_column)
    except LigoError:
        return f"text in {what} {data}"
    return f"text in {what} {data} (column {column!r})"


# --- images -----------------------------------------------------------------------------------------------------------


@dataclass
class ImageSource:
    """The digits arrays (``images`` in [0, 1], (N, H, W)), image files, or a table's image column; ``labels`` per
    example."""

    name: str
    labels: list[int]
    images: torch.Tensor | None = None
    files: list[Path] | None = None
    classes: list[str] | None = None
    train: list[int] | None = None
    val: list[int] | None = None
    table: datasets_io.ImageColumn | None = None
    held_out: str = "every 5th image of each class is held out for validation"


def image_source(data=None) -> ImageSource:
    if data is None:
        return _digits()
    path = Path(data)
    return _image_table(path) if source_kind(path, images=True) not in ("plain", None) else _image_folder(path)


def source_kind(path: Path, images: bool) -> str | None:
    """How ``path`` is read: ``"plain"`` (an image folder, text files), a ``datasets_io.table_kind``, or None (not
    found: the plain reader's errors say what is expected).  A folder with class images or .txt files is plain."""
    if path.is_dir() and datasets_io.saved_kind(path) is None:
        if images and _has_class_images(path) or not images and any(p.is_file() for p in path.rglob("*.txt")):
            return "plain"
    kind = datasets_io.table_kind(path)
    return kind if kind is not None or not path.exists() else "plain"


def _has_class_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
               for sub in folder.iterdir() if sub.is_dir() for p in sub.rglob("*"))


def _image_table(path: Path) -> ImageSource:
    tables = datasets_io.open_tables(path)
    column, labels, classes, train, val = datasets_io.image_rows(tables)
    if not labels:
        raise LigoError(f"{path}: the table has no rows; add images")
    rule = "the validation split is held out" if tables.val is not None else \
        "every 5th row of each class is held out for validation"
    return ImageSource(str(path), labels, classes=classes, train=train, val=val, table=column, held_out=rule)


def _digits() -> ImageSource:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LigoError("the embedded digits need scikit-learn (pip install scikit-learn), or pass --data with an "
                        "image folder") from None
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0
    labels = [int(t) for t in d.target]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED)).tolist()
    val = sorted(order[i] for i in range(0, len(order), 5))  # a fixed 20 % held out
    held = set(val)
    train = [i for i in range(len(labels)) if i not in held]
    return ImageSource("digits", labels, images=images, classes=[str(i) for i in range(10)], train=train, val=val)


def _image_folder(folder: Path) -> ImageSource:
    if not folder.exists():
        raise LigoError(f"{folder}: no such data folder; pass an image folder with one subfolder per class")
    if not folder.is_dir():
        raise LigoError(f"{folder}: image models need a folder with one subfolder of images per class (or a .jsonl, "
                        f".parquet or datasets folder), got a file")
    classes, files, labels, train, val = [], [], [], [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            continue
        label = len(classes)
        classes.append(sub.name)
        for k, path in enumerate(images):
            (val if k % 5 == 4 else train).append(len(files))  # every 5th image of a class is held out
            files.append(path)
            labels.append(label)
    if not files:
        raise LigoError(f"{folder}: no images found (expected class subfolders with {', '.join(IMAGE_SUFFIXES)} "
                        f"files)")
    return ImageSource(str(folder), labels, files=files, classes=classes, train=train, val=val)


def _normalisation(tokenizer_dir, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per channel: the checkpoint's preprocessor_config.json if it has one, else 0.5 / 0.5."""
    mean, std = [0.5] * channels, [0.5] * channels
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir) / "preprocessor_config.json"
        if path.is_file() or path.is_symlink():
            mean, std = files.read_image_normalisation(path, channels) or (mean, std)
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def _open_image(source: ImageSource, i: int):
    """(an open PIL image, the name errors give it) for example ``i`` of a file or table source."""
    from PIL import Image, UnidentifiedImageError

    if source.table is not None:
        return source.table.open(i)
    path = source.files[i]
    try:
        return Image.open(path), str(path)
    except (UnidentifiedImageError, OSError) as e:
        raise LigoError(f"{path}: not a readable image ({type(e).__name__}); remove it from the data folder") \
            from None


def _load_images(spec: Spec, source: ImageSource, idx: list[int], shared: bool = False) -> torch.Tensor:
    """(B, C, S, S) in [0, 1] for examples ``idx``, resized to the model's image size.  ``shared``: allocate the
    batch in shared memory, so a DataLoader worker hands it over without a copy."""
    size, channels = spec.image_size, spec.num_channels
    if source.images is not None:
        x = source.images[idx][:, None]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if x.shape[-1] != size else x
        return x.expand(-1, channels, -1, -1).contiguous()
    from PIL import Image, UnidentifiedImageError

    raw = torch.empty(len(idx), size, size, channels, dtype=torch.uint8)
    for j, i in enumerate(idx):
        image, where = _open_image(source, i)
        try:
            with image as im:
                im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
                pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError) as e:
            fix = "remove it from the data folder" if source.table is None else "fix or remove the row"
            raise LigoError(f"{where}: not a readable image ({type(e).__name__}); {fix}") from None
        if len(pixels) != size * size * channels:
            raise LigoError(f"{where}: the model takes {channels} channels; images must be grey (1) or RGB (3)")
        raw[j] = pixels.view(size, size, channels)
    out = torch.empty(len(idx), channels, size, size)
    if shared:
        out.share_memory_()
    out.copy_(raw.permute(0, 3, 1, 2))
    return out.div_(255.0)  # the same float32 division per element as (image.float() / 255.0)


def _image_orders(source: ImageSource, split, batch_size, seed, repeat) -> Iterator[list[int]]:
    """The examples of each batch, in order: drawn in the main process, whoever decodes them."""
    indices = source.train if split == "train" else source.val
    if not indices:
        raise LigoError(f"{source.name}: no {split} images ({source.held_out}; add images)")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()] if split == "train" \
            else list(indices)
        stop = len(order) - len(order) % batch_size if repeat and len(order) >= batch_size else len(order)
        for start in range(0, stop, batch_size):
            yield order[start:start + batch_size]
        if not repeat:
            return


def _image_batch(spec: Spec, source: ImageSource, idx: list[int], mean, std, shared: bool = False) -> dict:
    pixels = _load_images(spec, source, idx, shared)
    pixels = pixels.sub_(mean).div_(std) if source.images is None else (pixels - mean) / std  # files: in place
    return {"pixel_values": pixels, "labels": torch.tensor([source.labels[i] for i in idx])}


def _image_batches(spec, source: ImageSource, tokenizer_dir, split, batch_size, seed, repeat) -> Iterator[dict]:
    orders = _image_orders(source, split, batch_size, seed, repeat)
    first = next(orders, None)  # the "no images" error comes before the preprocessor config is read, as it did
    mean, std = _normalisation(tokenizer_dir, spec.num_channels)
    if first is not None:
        yield _image_batch(spec, source, first, mean, std)
    for idx in orders:
        yield _image_batch(spec, source, idx, mean, std)


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose keys are whole batches (lists of examples): run in DataLoader worker processes.  A
    user error comes back as ``{"error": message}`` and is raised in the main process as the same LigoError."""

    def __init__(self, spec: Spec, source: ImageSource, mean, std):
        self.spec, self.source, self.mean, self.std = spec, source, mean, std

    def __getitem__(self, idx: list[int]) -> dict:
        try:
            return _image_batch(self.spec, self.source, idx, self.mean, self.std, shared=True)
        except LigoError as e:
            return {"error": str(e)}


class _Orders:
    """The batch orders as a DataLoader sampler: iterated in the main process, where the generator draws."""

    def __init__(self, orders: Iterator[list[int]]):
        self.orders = orders

    def __iter__(self):
        return self.orders


def _as_is(batch):
    return batch


def _loader_batches(spec, source: ImageSource, tokenizer_dir, split, batch_size, seed, repeat, workers: int,
                    pin: bool) -> Iterator[dict]:
    """``_image_batches`` with the decoding in ``workers`` processes of one DataLoader for the whole stream; they
    stop when the stream is closed, dropped or ends."""
    orders = _image_orders(source, split, batch_size, seed, repeat)
    first = next(orders, None)
    mean, std = _normalisation(tokenizer_dir, spec.num_channels)
    if first is None:
        return

    def chained():
        yield first
        yield from orders

    loader = torch.utils.data.DataLoader(_BatchDataset(spec, source, mean, std), sampler=_Orders(chained()),
                                         batch_size=None, collate_fn=_as_is, num_workers=workers, pin_memory=pin)
    it = iter(loader)
    try:
        for batch in it:
            if "error" in batch:
                raise LigoError(batch["error"])
            yield batch
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # what the iterator's __del__ calls; now, not at GC
        if shutdown is not None:
            shutdown()
        del it, loader


# --- text -------------------------------------------------------------------------------------------------------------


def text_source(data=None) -> list[Path]:
    """The documents of a text corpus, in a fixed order."""
    if data is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
        if not files:
            raise LigoError(f"{stdlib}: the standard library's sources are missing; pass --data with text files")
        return files
    path = Path(data)
    if not path.exists():
        raise LigoError(f"{path}: no such data file or folder; pass a text file or a folder of .txt files")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise LigoError(f"{path}: no .txt files found; pass a text file, a folder of .txt files or a table (.jsonl, "
                        f".parquet, a datasets folder)")
    return files


class FileCorpus:
    """Text files, each one document whose last lines are held out for val (``_split_text``).  ``home``: the folder
    beside which the token cache goes (None for the embedded standard library: the user cache)."""

    rule = TEXT_SPLIT_RULE

    def __init__(self, files: list[Path], home: Path | None):
        self.files, self.home = files, home
        self.name = str(files[0].parent if len(files) > 1 else files[0])

    def _read(self, k: int) -> str:
        try:
            return self.files[k].read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise LigoError(f"{self.files[k]}: cannot be read ({e.strerror})") from None

    def count(self, split: str) -> int:
        return len(self.files)

    def text(self, split: str, k: int) -> str:
        return _split_text(self._read(k), split)

    def documents(self) -> Iterator[tuple[str, str]]:
        for k in range(len(self.files)):
            text = self._read(k)
            yield "train", _split_text(text, "train")
            yield "val", _split_text(text, "val")

    def key(self) -> dict:
        return {"kind": "text files", "rule": self.rule, "files": [_entry(f) for f in self.files]}


class TableCorpus:
    """One text column of a table, each row one document (see ``datasets_io`` for the split)."""

    rule = datasets_io.TEXT_ROW_RULE

    def __init__(self, tables: datasets_io.TableSet, text_column: str | None = None):
        self.tables, self.home, self.name = tables, tables.home, str(tables.path)
        self.column = datasets_io.text_column_of(tables, text_column)
        self._texts: dict[str, list[str]] | None = None

    def documents(self) -> Iterator[tuple[str, str]]:
        t, col = self.tables, self.column
        if t.val is None:
            for split, i, value in datasets_io.held_out_rows(t.train.stream(col)):
                yield split, datasets_io.checked_text(t.train, col, i, value)
            return
        for split, table in (("train", t.train), ("val", t.val)):
            for i, value in enumerate(table.stream(col) if table is not None else ()):
                yield split, datasets_io.checked_text(table, col, i, value)

    def _all(self) -> dict[str, list[str]]:
        if self._texts is None:
            self._texts = {"train": [], "val": []}
            for split, text in self.documents():
                self._texts[split].append(text)
        return self._texts

    def count(self, split: str) -> int:
        return len(self._all()[split])

    def text(self, split: str, k: int) -> str:
        return self._all()[split][k]

    def key(self) -> dict:
        return {"kind": self.tables.kind, "rule": self.rule, "column": self.column,
                "files": [_entry(f) for f in self.tables.files]}


def _entry(path: Path) -> list:
    try:
        return token_cache.file_entry(path)
    except OSError as e:
        raise LigoError(f"{path}: cannot be read ({e.strerror})") from None


def text_corpus(data=None, text_column: str | None = None) -> FileCorpus | TableCorpus:
    """The documents ``batches`` reads for a token model: text files or a table's text column."""
    if data is None:
        return FileCorpus(text_source(None), None)
    path = Path(data)
    if source_kind(path, images=False) not in ("plain", None):
        return TableCorpus(datasets_io.open_tables(path), text_column)
    return FileCorpus(text_source(path), path if path.is_dir() else path.parent)


class TextEncoder:
    """Turns text into ids below ``spec.vocab_size``: the checkpoint's tokenizer.json, or bytes.

    ``prefix``/``suffix`` are the special ids the tokenizer puts around one sequence ([CLS] ... [SEP]); ``mask_id`` is
    the id masked-LM inputs use; ``pad_id`` is never produced for real text.
    """

    def __init__(self, spec: Spec, tokenizer_dir=None):
        self.vocab_size = spec.vocab_size
        self.tokenizer = None
        path = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir is not None else None
        if path is not None and path.is_file():
            from tokenizers import Tokenizer

            try:
                self.tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
                raise LigoError(f"{path}: cannot be read by the tokenizers library ({e}); restore the file") \
                    from None
            self.tokenizer.no_truncation()
            self.tokenizer.no_padding()
            self.fingerprint = "tokenizer.json sha256 " + hashlib.sha256(path.read_bytes()).hexdigest()
            self.name = f"tokenizer.json ({path.parent})"
            self.prefix, self.suffix = self._specials()
            self.mask_id = self._mask_id(Path(tokenizer_dir))
            self.pad_id = spec.pad_token_id
        else:
            self.name = "bytes"
            self.prefix, self.suffix = [], []
            self.pad_id = spec.pad_token_id
            reserved = {spec.pad_token_id} if spec.pad_token_id is not None else set()
            self.mask_id = spec.vocab_size - 1
            reserved.add(self.mask_id)
            if spec.pool == "eos":  # a tower pooled at its end-of-text token (CLIP text): every sequence ends with
                # it, as the tower's own tokenizer ends every text, and no byte maps to it (-1: the highest id)
                end = spec.pool_token_id if spec.pool_token_id >= 0 else spec.vocab_size - 1
                reserved.add(end)
                self.suffix = [end]
            usable = [i for i in range(spec.vocab_size) if i not in reserved]
            if not usable:
                raise LigoError(f"vocabulary of {spec.vocab_size} ids is too small for text")
            self._byte_ids = torch.tensor([usable[b % len(usable)] for b in range(256)])
            self.fingerprint = "bytes " + ",".join(map(str, self._byte_ids.tolist())) + \
                (f" end {self.suffix[0]}" if self.suffix else "")

    def _specials(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor adds around one sequence, found by encoding a probe with and without them."""
        bare = self.tokenizer.encode("hello", add_special_tokens=False).ids
        full = self.tokenizer.encode("hello", add_special_tokens=True).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return full[:start], full[start + len(bare):]
        return [], []

    def _mask_id(self, folder: Path) -> int | None:
        names = []
        cfg = folder / "tokenizer_config.json"
        token = files.read_mask_token(cfg) if cfg.is_file() or cfg.is_symlink() else None
        if token is not None:
            names.append(token)
        names += ["[MASK]", "<mask>"]
        for name in names:
            i = self.tokenizer.token_to_id(name)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            return self._byte_ids[torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()] \
                if text else torch.empty(0, dtype=torch.long)
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``: the tokenizer's decoding without special tokens, or the bytes back (an id several bytes
        share reads as the first of them; ids no byte maps to are left out)."""
        if self.tokenizer is not None:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        first = {}
        for byte, i in enumerate(self._byte_ids.tolist()):
            first.setdefault(i, byte)
        return bytes(first[i] for i in ids if i in first).decode("utf-8", errors="replace")

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """``encode`` of each text (the same ids), as uint32 arrays; the tokenizer encodes them as one batch."""
        if self.tokenizer is None:
            lut = self._byte_ids.numpy().astype(np.uint32)
            return [lut[np.frombuffer(t.encode("utf-8"), dtype=np.uint8)] for t in texts]
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encoded]


def _split_text(text: str, split: str) -> str:
    """Train: the first 90 % of a document's lines; val: the last 10 % (at least one line of a 2+ line file)."""
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, len(lines) // 10) if len(lines) >= 2 else len(lines)
    return "".join(lines[:cut] if split == "train" else lines[cut:])


def usable_seq_len(spec: Spec, seq_len: int) -> int:
    if spec.positions == "learned" and spec.max_positions:
        limit = spec.max_positions - spec.position_offset
        if spec.pad_token_id is not None and spec.position_offset:
            limit = spec.max_positions - spec.pad_token_id - 1
        seq_len = min(seq_len, limit)
    return seq_len


class _LiveDocs:
    """The documents of a corpus tokenised as they are read (no cache)."""

    def __init__(self, corpus, encoder: TextEncoder):
        self.corpus, self.encoder = corpus, encoder

    def count(self, split: str) -> int:
        return self.corpus.count(split)

    def doc(self, split: str, k: int) -> torch.Tensor:
        return self.encoder.encode(self.corpus.text(split, k))


def _documents(corpus, encoder: TextEncoder, cache: bool):
    """The token ids of each document: from the token cache (built on first use), or tokenised as read."""
    if cache:
        key = {"format": token_cache.FORMAT, "source": corpus.key(), "tokenizer": encoder.fingerprint}
        found = token_cache.cached_tokens(key, corpus.home, corpus.documents, encoder.encode_many)
        if found is not None:
            return found
    return _LiveDocs(corpus, encoder)


def _text_batch(spec: Spec, encoder: TextEncoder, rows: list[torch.Tensor], g_mask: torch.Generator) -> dict:
    """One batch of ``rows`` (each ``body`` ids), wrapped in the tokenizer's specials and masked for masked LM."""
    prefix, suffix = torch.tensor(encoder.prefix, dtype=torch.long), torch.tensor(encoder.suffix, dtype=torch.long)
    ids = torch.stack([torch.cat([prefix, r, suffix]) for r in rows])
    if int(ids.max()) >= spec.vocab_size:
        raise LigoError(f"{encoder.name} produces id {int(ids.max())}, beyond the model's vocabulary of "
                        f"{spec.vocab_size}; the tokenizer does not belong to this model")
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, :len(encoder.prefix)] = True
    if encoder.suffix:
        special[:, -len(encoder.suffix):] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.type_vocab_size:
        batch["token_type_ids"] = torch.zeros_like(ids)
    if spec.head == "mlm":
        batch["input_ids"], batch["labels"] = mask_tokens(ids, special, encoder.mask_id, spec.vocab_size, g_mask)
    elif spec.head == "lm":
        batch["labels"] = ids.clone()
    return batch


def _text_batches(spec, corpus, tokenizer_dir, split, batch_size, seq_len, seed, repeat,
                  cache: bool = True) -> Iterator[dict]:
    if isinstance(corpus, list):  # a list of text files, as text_source gives
        corpus = FileCorpus(corpus, None)
    encoder = TextEncoder(spec, tokenizer_dir)
    seq_len = usable_seq_len(spec, seq_len)
    body = seq_len - len(encoder.prefix) - len(encoder.suffix)
    if body < 1:
        raise LigoError(f"a sequence length of {seq_len} leaves no room for text; use a longer --seq-len")
    if spec.head == "mlm" and encoder.mask_id is None:
        raise LigoError(f"{tokenizer_dir}: the tokenizer has no mask token, which masked-LM training needs")
    g_order = torch.Generator().manual_seed(seed)
    g_mask = torch.Generator().manual_seed(seed + 1)
    pool_size = max(8 * batch_size, 256)
    produced = False

    def make(rows: list[torch.Tensor]) -> dict:
        return _text_batch(spec, encoder, rows, g_mask)

    docs = _documents(corpus, encoder, cache)
    count = docs.count(split)
    while True:
        order = torch.randperm(count, generator=g_order).tolist() if split == "train" else list(range(count))
        pool: list[torch.Tensor] = []
        carry = torch.empty(0, dtype=torch.long)
        for k in order:
            ids = torch.cat([carry, docs.doc(split, k)])
            n = len(ids) // body
            pool += list(ids[:n * body].view(n, body)) if n else []
            carry = ids[n * body:]
            while len(pool) >= pool_size:
                if split == "train":
                    pool = [pool[i] for i in torch.randperm(len(pool), generator=g_order).tolist()]
                while len(pool) >= batch_size and len(pool) > pool_size // 2:
                    produced = True
                    yield make(pool[:batch_size])
                    pool = pool[batch_size:]
        if split == "train":
            pool = [pool[i] for i in torch.randperm(len(pool), generator=g_order).tolist()]
        while len(pool) >= batch_size or (pool and not repeat):
            produced = True
            yield make(pool[:batch_size])
            pool = pool[batch_size:]
        if not produced:
            raise LigoError(f"{corpus.name}: too little {split} text for one sequence of {seq_len} tokens; add text "
                            f"or use a shorter --seq-len")
        if not repeat:
            return


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: 15 % of the non-special places are predicted; of those 80 % become the mask id, 10 % a random
    id, 10 % stay.  Returns (inputs, labels) with labels -100 where nothing is predicted.  At least one place per
    batch is always predicted."""
    chosen = (torch.rand(ids.shape, generator=generator) < MASK_PROBABILITY) & ~special
    if not chosen.any():
        candidates = (~special).nonzero()
        if len(candidates):
            r, c = candidates[torch.randint(len(candidates), (1,), generator=generator)][0]
            chosen[r, c] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, labels
