"""Training and evaluation data, with no downloads: batches ready for the canonical forward.

``batches(spec, data, ...)`` yields dicts holding the forward's inputs (``pixel_values`` or ``input_ids`` +
``attention_mask`` [+ ``token_type_ids``]) and the targets (``labels``).  What it reads is decided by the spec alone:
image models (``spec.input == "patches"``) read images, token models read text.

Sources (``data``):
- ``None``: the embedded defaults — scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes) for image
  models; the Python standard library's own source files for text models.
- a folder of class subfolders holding images (image models);
- a text file, or a folder of ``.txt`` files (text models).

Text is tokenised with the checkpoint's own ``tokenizer.json`` (``tokenizer_dir``) when it has one, else with a
byte-level fallback whose ids stay below ``spec.vocab_size``.  Every stream is deterministic for a seed, and split
``"val"`` never shares an example with ``"train"``.  For masked-LM heads the batch is already masked (15 %, BERT's
80/10/10 rule, from a generator seeded by ``seed``) and ``labels`` holds the original ids at masked places, -100
elsewhere; for causal LM heads ``labels`` is ``input_ids`` (the loss shifts it); image batches carry class ``labels``.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from .errors import LigoError
from .spec import Spec

IGNORE_INDEX = -100
MASK_PROBABILITY = 0.15
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORWARD_KEYS = ("input_ids", "pixel_values", "attention_mask", "token_type_ids")
_SPLIT_SEED = 1234  # fixes the digits train/val split independently of the batch seed


def model_inputs(batch: dict) -> dict:
    """The part of a batch that ``forward(spec, w, **inputs)`` takes."""
    return {k: v for k, v in batch.items() if k in FORWARD_KEYS}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every tensor (a data-parallel rank's share of a global batch)."""
    return {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batches(spec: Spec, data=None, tokenizer_dir=None, split: str = "train", batch_size: int = 16,
            seq_len: int = 64, seed: int = 0, repeat: bool | None = None) -> Iterator[dict]:
    """Batches for ``spec`` from ``data`` (see the module docstring).

    ``repeat`` (default: True for ``"train"``, False for ``"val"``) makes the stream endless, reshuffled each epoch;
    a finite stream ends with a last, possibly smaller batch.  ``seq_len`` is clamped to the positions the model has.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if batch_size < 1:
        raise LigoError(f"batch size must be at least 1, not {batch_size}")
    repeat = (split == "train") if repeat is None else repeat
    if spec.input == "patches":
        source = image_source(data)
        return _image_batches(spec, source, tokenizer_dir, split, batch_size, seed, repeat)
    corpus = text_source(data)
    return _text_batches(spec, corpus, tokenizer_dir, split, batch_size, seq_len, seed, repeat)


def describe(spec: Spec, data=None) -> str:
    """A short name for the data ``batches`` would read (for reports)."""
    if spec.input == "patches":
        return "digits (scikit-learn, embedded)" if data is None else f"images in {data}"
    return "python standard library source (embedded)" if data is None else f"text in {data}"


# --- images -----------------------------------------------------------------------------------------------------------


@dataclass
class ImageSource:
    """Either the digits arrays (``images`` in [0, 1], (N, H, W)) or image files; ``labels`` per example."""

    name: str
    labels: list[int]
    images: torch.Tensor | None = None
    files: list[Path] | None = None
    classes: list[str] | None = None
    train: list[int] | None = None
    val: list[int] | None = None


def image_source(data=None) -> ImageSource:
    if data is None:
        return _digits()
    return _image_folder(Path(data))


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
        raise LigoError(f"{folder}: image models need a folder with one subfolder of images per class, got a file")
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
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise LigoError(f"{path}: not valid JSON ({e}); restore the file") from None
            m, s = cfg.get("image_mean"), cfg.get("image_std")
            if isinstance(m, list) and isinstance(s, list) and len(m) == len(s) == channels:
                mean, std = m, s
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def _load_images(spec: Spec, source: ImageSource, idx: list[int]) -> torch.Tensor:
    """(B, C, S, S) in [0, 1] for examples ``idx``, resized to the model's image size."""
    size, channels = spec.image_size, spec.num_channels
    if source.images is not None:
        x = source.images[idx][:, None]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if x.shape[-1] != size else x
        return x.expand(-1, channels, -1, -1).contiguous()
    from PIL import Image, UnidentifiedImageError

    out = []
    for i in idx:
        path = source.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float() / 255.0
        except (UnidentifiedImageError, OSError) as e:
            raise LigoError(f"{path}: not a readable image ({type(e).__name__}); remove it from the data folder") \
                from None
        t = t.view(size, size, -1).permute(2, 0, 1)
        if t.shape[0] != channels:
            raise LigoError(f"{path}: the model takes {channels} channels; images must be grey (1) or RGB (3)")
        out.append(t)
    return torch.stack(out)


def _image_batches(spec, source: ImageSource, tokenizer_dir, split, batch_size, seed, repeat) -> Iterator[dict]:
    indices = source.train if split == "train" else source.val
    if not indices:
        raise LigoError(f"{source.name}: no {split} images (every 5th image of each class is held out for "
                        f"validation; add images)")
    mean, std = _normalisation(tokenizer_dir, spec.num_channels)
    g = torch.Generator().manual_seed(seed)
    while True:
        order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()] if split == "train" \
            else list(indices)
        stop = len(order) - len(order) % batch_size if repeat and len(order) >= batch_size else len(order)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            pixels = (_load_images(spec, source, idx) - mean) / std
            yield {"pixel_values": pixels, "labels": torch.tensor([source.labels[i] for i in idx])}
        if not repeat:
            return


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
        raise LigoError(f"{path}: no .txt files found; pass a text file or a folder of .txt files")
    return files


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
            usable = [i for i in range(spec.vocab_size) if i not in reserved]
            if not usable:
                raise LigoError(f"vocabulary of {spec.vocab_size} ids is too small for text")
            self._byte_ids = torch.tensor([usable[b % len(usable)] for b in range(256)])

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
        if cfg.is_file():
            try:
                token = json.loads(cfg.read_text()).get("mask_token")
            except json.JSONDecodeError:
                token = None
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
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


def _text_batches(spec, files: list[Path], tokenizer_dir, split, batch_size, seq_len, seed, repeat) -> Iterator[dict]:
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
    prefix, suffix = torch.tensor(encoder.prefix, dtype=torch.long), torch.tensor(encoder.suffix, dtype=torch.long)
    produced = False

    def make(rows: list[torch.Tensor]) -> dict:
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

    while True:
        order = torch.randperm(len(files), generator=g_order).tolist() if split == "train" \
            else list(range(len(files)))
        pool: list[torch.Tensor] = []
        carry = torch.empty(0, dtype=torch.long)
        for k in order:
            try:
                text = files[k].read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise LigoError(f"{files[k]}: cannot be read ({e.strerror})") from None
            ids = torch.cat([carry, encoder.encode(_split_text(text, split))])
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
            raise LigoError(f"{files[0].parent if len(files) > 1 else files[0]}: too little {split} text for one "
                            f"sequence of {seq_len} tokens; add text or use a shorter --seq-len")
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
