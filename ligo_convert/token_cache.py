"""A text corpus tokenised once, kept on disk as a memory-mapped token file, so that large corpora stream.

A cache is two files named by the digest of its *key*:

- ``<digest>.tokens``: every token id of the corpus as little-endian uint32, document after document, then (8-byte
  aligned) the int64 document boundaries (``n_docs + 1`` offsets into the ids) and the int64 document numbers of the
  train split and of the val split.  Document boundaries live here, not in the JSON, so a corpus of millions of rows
  keeps a small JSON.
- ``<digest>.json``: the format version, the key itself, the counts and the BLAKE2b digest of the ``.tokens`` file.

The key covers the format version, the tokenizer (the SHA-256 of its ``tokenizer.json`` or the byte mapping), the
split rule, the source's own settings (a table's text column) and every source file: its path, size, mtime and the
BLAKE2b digest of its contents.  Hashing the contents costs one sequential read of the corpus per run (about 1 s per
GB), far less than tokenising it again; it is what catches a file rewritten with the same size and mtime.

A cache whose JSON is unreadable, whose key differs, or whose ``.tokens`` file has the wrong length or digest is
rebuilt, never trusted.  Both files are written to a temporary name and renamed into place (the JSON last), so a
reader sees a whole cache or none, and two processes building the same cache at once both leave a valid one.

Caches sit beside the data (``<folder>/.ligo-cache/``); where that folder cannot be written (the embedded standard
library, a read-only mount) they go to ``$LIGO_CACHE/tokens``, else ``$XDG_CACHE_HOME/ligo-convert/tokens``, else
``~/.cache/ligo-convert/tokens``.  Nothing is ever evicted: delete the folders to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

FORMAT = 1
CACHE_FOLDER = ".ligo-cache"
_TOKEN_DTYPE = np.dtype("<u4")
_INDEX_DTYPE = np.dtype("<i8")
_CHUNK_CHARS = 8 << 20  # texts handed to the encoder at once while building (bounds the build's memory)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def file_entry(path: Path) -> list:
    """What the key records of one source file: resolved path, size, mtime (ns) and content digest."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, file_digest(path)]


def user_cache_dir() -> Path:
    if os.environ.get("LIGO_CACHE"):
        return Path(os.environ["LIGO_CACHE"]) / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ligo-convert" / "tokens"


def digest_of(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _writable(folder: Path) -> bool:
    """Whether caches can be written to ``folder`` (created if need be).  Asked of access() first (the mode bits),
    then tried (a read-only mount, and root, who passes every access() check)."""
    existing = folder if folder.exists() else folder.parent
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


@dataclass
class TokenCache:
    """A read cache: ``docs(split)[k]`` is document k of ``split`` as a LongTensor."""

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray
    splits: dict[str, np.ndarray]

    def count(self, split: str) -> int:
        return len(self.splits[split])

    def doc(self, split: str, k: int) -> torch.Tensor:
        d = int(self.splits[split][k])
        a, b = int(self.offsets[d]), int(self.offsets[d + 1])
        return torch.from_numpy(self.tokens[a:b].astype(np.int64))


def _layout(n_tokens: int, n_docs: int, n_train: int, n_val: int) -> tuple[int, int]:
    """Byte offset of the index arrays (after the ids, 8-aligned) and the file's total size."""
    start = -(-n_tokens * _TOKEN_DTYPE.itemsize // 8) * 8
    return start, start + (n_docs + 1 + n_train + n_val) * _INDEX_DTYPE.itemsize


def open_cache(folder: Path, key: dict) -> TokenCache | None:
    """The cache for ``key`` in ``folder`` if it is whole and matches; None otherwise (build it)."""
    digest = digest_of(key)
    meta_path, tokens_path = folder / f"{digest}.json", folder / f"{digest}.tokens"
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        n, d, t, v = (int(meta[k]) for k in ("n_tokens", "n_docs", "n_train", "n_val"))
        start, size = _layout(n, d, t, v)
        if tokens_path.stat().st_size != size or file_digest(tokens_path) != meta.get("blake2b"):
            return None
        tokens = np.memmap(tokens_path, dtype=_TOKEN_DTYPE, mode="r", shape=(n,)) if n else np.zeros(0, _TOKEN_DTYPE)
        index = np.fromfile(tokens_path, dtype=_INDEX_DTYPE, offset=start)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    offsets, train, val = index[:d + 1], index[d + 1:d + 1 + t], index[d + 1 + t:]
    if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any() or \
            ((train < 0) | (train >= d)).any() or ((val < 0) | (val >= d)).any():
        return None
    return TokenCache(tokens_path, tokens, offsets, {"train": train, "val": val})


def _chunks(docs: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    chunk, size = [], 0
    for split, text in docs:
        chunk.append((split, text))
        size += len(text)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write(folder: Path, key: dict, docs: Iterable[tuple[str, str]],
           encode_many: Callable[[list[str]], list[np.ndarray]]) -> None:
    """Tokenise ``docs`` ((split, text) pairs in a fixed order) into ``folder``, atomically."""
    digest = digest_of(key)
    offsets, splits, n = [0], {"train": [], "val": []}, 0
    hasher = hashlib.blake2b()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{digest}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in _chunks(docs):
                for (split, _), ids in zip(chunk, encode_many([text for _, text in chunk])):
                    raw = np.ascontiguousarray(ids, dtype=_TOKEN_DTYPE).tobytes()
                    f.write(raw)
                    hasher.update(raw)
                    n += len(ids)
                    splits[split].append(len(offsets) - 1)
                    offsets.append(n)
            start, _ = _layout(n, len(offsets) - 1, len(splits["train"]), len(splits["val"]))
            tail = b"\0" * (start - n * _TOKEN_DTYPE.itemsize) + \
                np.array(offsets + splits["train"] + splits["val"], dtype=_INDEX_DTYPE).tobytes()
            f.write(tail)
            hasher.update(tail)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared data folder's cache from its other users
        os.replace(tmp, folder / f"{digest}.tokens")
        meta = {"format": FORMAT, "key": key, "n_tokens": n, "n_docs": len(offsets) - 1,
                "n_train": len(splits["train"]), "n_val": len(splits["val"]), "blake2b": hasher.hexdigest()}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{digest}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / f"{digest}.json")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_tokens(key: dict, home: Path | None, docs: Callable[[], Iterable[tuple[str, str]]],
                  encode_many: Callable[[list[str]], list[np.ndarray]]) -> TokenCache | None:
    """The token cache for ``key``: read from ``home/.ligo-cache`` or the user cache dir, else built into the first
    of them that can be written.  None when no cache can be written at all (the caller tokenises as it goes)."""
    folders = ([home / CACHE_FOLDER] if home is not None else []) + [user_cache_dir()]
    for folder in folders:
        found = open_cache(folder, key)
        if found is not None:
            return found
    for folder in folders:
        if not _writable(folder):
            continue
        try:
            _write(folder, key, docs(), encode_many)
        except OSError:  # a full disk, a folder that went away: try the next place
            continue
        found = open_cache(folder, key)
        if found is not None:
            return found
    return None
