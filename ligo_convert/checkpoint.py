"""Checkpoint files: finding a source (folder, zoo name, hub id), reading tensors lazily, writing atomically.

Reading opens safetensors (single or sharded) and hands out one tensor at a time; ``.bin`` files are read only with
``torch.load(weights_only=True)``, so no pickled code ever runs.  Writing streams each shard to disk tensor by tensor
inside a temporary folder that is renamed into place at the end: an interrupted run never leaves a half output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import LigoError
from .files import (check_config, check_output, check_safetensors_header, check_shard_index, read_json,
                    readable, remove_leftovers)

# Files carried from a source folder to every output: tokenizers, preprocessors, generation settings.
CARRY_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                  "preprocessor_config.json", "image_processor_config.json", "generation_config.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


# --- finding a source --------------------------------------------------------------------------------------------------


def resolve_source(source: str | os.PathLike) -> Path:
    """A local folder first, then a zoo name, then a Hugging Face hub id (offline: the local HF cache only)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LigoError(f"{path}: expected a checkpoint folder (config.json and *.safetensors), got a file")
        return path
    from .zoo import find_entry  # local import: zoo reads descriptors too

    entry = find_entry(str(source))
    repo_id = entry["hub"] if entry else str(source)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise LigoError(f"{source}: no such folder, zoo name or hub id (see `ligo-convert zoo` for names)")
    return download(repo_id)


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, RepositoryNotFoundError) as e:
        if offline:
            raise LigoError(f"{repo_id}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 keeps downloads "
                            f"off; run `hf download {repo_id}` where there is internet (or unset HF_HUB_OFFLINE), or "
                            f"pass a local folder") from None
        if isinstance(e, LocalEntryNotFoundError):  # online, but the hub could not be reached
            raise LigoError(f"{repo_id}: not in the local Hugging Face cache, and the hub could not be reached; "
                            f"check the connection, run `hf download {repo_id}` where there is internet, or pass a "
                            f"local folder") from None
        raise LigoError(f"{repo_id}: could not be fetched from the Hugging Face hub ({type(e).__name__}); "
                        f"check the id or pass a local folder") from None


# --- reading -----------------------------------------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    path = readable(folder / "config.json", "restore the file")
    if not path.exists():
        return {}
    return check_config(path, read_json(path))


class TensorReader:
    """All tensors of a checkpoint folder, read one at a time.  ``keys()``, ``shape(key)``, ``dtype(key)``,
    ``get(key)``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._file_of: dict[str, Path] = {}
        self._header: dict[str, dict] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        self._index: tuple[Path, dict[str, str]] | None = None
        files = self._weight_files(folder)
        for path in files:
            if path.suffix == ".safetensors":
                for key, info in _read_header(path).items():
                    self._claim(key, path)
                    self._header[key] = info
            else:
                self._load_bin(path)
        if self._index is not None:  # each tensor where the index says it is
            index, weight_map = self._index
            for key, name in weight_map.items():
                if key in self._file_of and self._file_of[key].name != name:
                    raise LigoError(f"{index} puts tensor {key} in {name}, but it is in {self._file_of[key].name}; "
                                    f"restore the index or delete it")

    def _claim(self, key: str, path: Path) -> None:
        """Record that ``key`` is in ``path``; the same name in two files is refused (which copy is meant?)."""
        if key in self._file_of:
            raise LigoError(f"{path}: tensor {key} is also in {self._file_of[key]}; remove one copy (or the extra "
                            f"shard) so each tensor is stored once")
        self._file_of[key] = path

    def _weight_files(self, folder: Path) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = readable(folder / index_name, "restore it or delete it")
            if index.exists():
                weight_map = check_shard_index(index, read_json(index, "restore it or delete it"), folder)
                self._index = (index, weight_map)
                return [folder / f for f in dict.fromkeys(weight_map.values())]
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            files = sorted(folder.glob("*.bin"))
        if not files:
            raise LigoError(f"{folder}: no *.safetensors (or *.bin) weights found")
        return [readable(f) for f in files]

    def _load_bin(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure here means the file cannot be trusted
            raise LigoError(f"{path}: cannot be read safely as plain tensors ({type(e).__name__}); convert it to "
                            f"safetensors with its own library first") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LigoError(f"{path}: does not hold a flat dict of tensors")
        self._bin = self._bin or {}
        for key, tensor in state.items():
            self._claim(key, path)
            self._bin[key] = tensor

    def keys(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._header:
            return tuple(self._header[key]["shape"])
        return tuple(self._bin[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        if key in self._header:
            return _DTYPES[self._header[key]["dtype"]]
        return self._bin[key].dtype

    def nbytes(self, key: str) -> int:
        if key in self._header:
            start, end = self._header[key]["data_offsets"]
            return end - start
        t = self._bin[key]
        return t.numel() * t.element_size()

    def get(self, key: str) -> torch.Tensor:
        if key not in self._header:
            return self._bin[key]
        path = self._file_of[key]
        info = self._header[key]
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        offset, size = info["_base"] + start, end - start
        storage = None
        if size and offset % dtype.itemsize == 0:
            # Map the bytes instead of copying them, as safetensors does (benchmarks/convert_io.py): a private
            # mapping, so the file never changes; torch keeps no file descriptor open, and the mapping goes with the
            # tensor, so only the tensors in use stay resident.
            with contextlib.suppress(RuntimeError):  # a file system that cannot map, or a file that shrank: copy
                storage = torch.UntypedStorage.from_file(str(path), False, offset + size)
        if storage is not None:
            data = torch.empty(0, dtype=torch.uint8).set_(storage)[offset:offset + size]
        else:  # empty, not aligned for its dtype (files not written by safetensors can be), or not mappable: copy
            data = torch.empty(size, dtype=torch.uint8)
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.readinto(memoryview(data.numpy())) if size else 0
            if got != size:
                raise LigoError(f"{path}: tensor {key} is cut short (file truncated); download the file again")
        return data.view(dtype).reshape(info["shape"])


def _read_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors header without reading the data; check it against the file size."""
    try:
        size = readable(path).stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LigoError(f"{path}: not a safetensors file (too short); download it again")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8 or length > 100_000_000:
                raise LigoError(f"{path}: not a safetensors file (bad header length); download it again")
            header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LigoError(f"{path}: not a safetensors file (unreadable header); download it again") from None
    except OSError as e:  # a folder, a file without read permission...
        raise LigoError(f"{path}: cannot be read ({e.strerror or type(e).__name__}); download it again") from None
    base = 8 + length
    header = check_safetensors_header(path, header, size - base)
    for info in header.values():
        info["_base"] = base
    return header


# --- writing -----------------------------------------------------------------------------------------------------------


class PlannedTensor:
    """A tensor to write: its key, shape and dtype known up front, its data made only when written: whole by
    ``make()``, or by ``pieces()`` as consecutive blocks of its rows (dim 0), so that a stacked tensor (a per-layer
    operator's matrices) is never formed."""

    def __init__(self, key: str, shape: tuple, dtype: torch.dtype, make: Callable[[], torch.Tensor] | None = None,
                 pieces: Callable[[], Iterable[torch.Tensor]] | None = None):
        if (make is None) == (pieces is None):
            raise ValueError("a PlannedTensor takes make or pieces, one of them")
        self.key, self.shape, self.dtype, self.make, self.pieces = key, tuple(shape), dtype, make, pieces

    def blocks(self) -> Iterator[torch.Tensor]:
        """The data in writing order, checked against the plan: the whole tensor, or its row blocks."""
        if self.make is not None:
            data = self.make()
            if tuple(data.shape) != self.shape or data.dtype != self.dtype:
                raise AssertionError(f"{self.key}: planned {self.shape} {self.dtype}, made {tuple(data.shape)} "
                                     f"{data.dtype}")
            yield data
            return
        rows = 0
        for block in self.pieces():
            if tuple(block.shape[1:]) != self.shape[1:] or block.dtype != self.dtype:
                raise AssertionError(f"{self.key}: planned rows of {self.shape[1:]} {self.dtype}, made "
                                     f"{tuple(block.shape)} {block.dtype}")
            rows += block.shape[0]
            yield block
        if rows != self.shape[0]:
            raise AssertionError(f"{self.key}: planned {self.shape[0]} rows, made {rows}")

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.tensor([], dtype=self.dtype).element_size()


# Tensors are written in pieces of this size: on Linux one write() of several MB from process memory cost up to
# ten times the kernel time of the same bytes in 1 MB writes (benchmarks/convert_io.py).
_WRITE_CHUNK = 1 << 20


def write_safetensors(path: Path, tensors: list[PlannedTensor], metadata: dict | None = None,
                      progress: Callable[[int], None] | None = None) -> None:
    """Stream tensors into one safetensors file, holding only one tensor (or one block of a tensor's rows) in memory
    at a time; ``progress(1)`` after each tensor."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    ordered = sorted(tensors, key=lambda t: t.key)
    for t in ordered:
        header[t.key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset,
                                                                                              offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in ordered:
            for data in t.blocks():
                data = data.detach().cpu().contiguous()
                raw = memoryview(data.reshape(-1).view(torch.uint8).numpy())
                for start in range(0, len(raw), _WRITE_CHUNK):
                    f.write(raw[start:start + _WRITE_CHUNK])
            if progress:
                progress(1)


def write_sharded(folder: Path, tensors: list[PlannedTensor], max_shard_size: int | str = "5GB",
                  progress: Callable[[int], None] | None = None) -> list[str]:
    """Write ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards plus their index, with
    huggingface_hub's sharding rule.  ``progress(n)`` is called as tensors are written.  Returns the file names
    written."""
    from huggingface_hub import split_state_dict_into_shards_factory

    by_key = {t.key: t for t in tensors}
    split = split_state_dict_into_shards_factory(
        by_key, get_storage_size=lambda t: t.nbytes, filename_pattern="model{suffix}.safetensors",
        max_shard_size=parse_size(max_shard_size))
    written = []
    for filename, keys in split.filename_to_tensors.items():
        write_safetensors(folder / filename, [by_key[k] for k in keys], progress=progress)
        written.append(filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append("model.safetensors.index.json")
    return written


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False, protect: Iterable[Path] = ()):
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it vanishes."""
    out = check_output(out, overwrite=overwrite, sources=protect)
    created = [d for d in [out.parent, *out.parent.parents] if not d.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out, log=lambda line: print(line, file=sys.stderr))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should have the usual folder mode
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # the folders made for the output: a failed run leaves none behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def carry_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer/preprocessor files from a source folder.  Returns the names copied."""
    copied = []
    for name in CARRY_PATTERNS:
        path = source / name
        if path.is_file():
            shutil.copy2(path, dest / name)
            copied.append(name)
    return copied


# sentence-transformers: the module list and its configs, beside the transformer's own files
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# module types that only pool or normalise the token vectors: they follow any width
ST_WIDTH_FREE = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                 "sentence_transformers.models.Normalize")


def sentence_transformer_modules(folder: Path) -> list[dict]:
    """The modules a sentence-transformers folder lists in modules.json (empty when it is no such folder)."""
    path = folder / "modules.json"
    if not path.is_file():
        return []
    try:
        modules = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LigoError(f"{path}: not valid JSON ({e}); restore the file") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("path", ""), str)
                                                  for m in modules):
        raise LigoError(f"{path}: expected a list of modules with a path each; restore the file")
    return modules


def check_sentence_transformer_width(folder: Path, width: int, new_width: int) -> None:
    """Refuse a width change a sentence-transformers module after the pooling cannot follow (a Dense layer reads
    the old width)."""
    if new_width == width:
        return
    for module in sentence_transformer_modules(folder):
        if module.get("type") not in ST_WIDTH_FREE:
            raise LigoError(f"{folder / 'modules.json'}: module {module.get('path') or module.get('name')!r} "
                            f"({module.get('type')}) reads the width {width}, which growth changes to {new_width}; "
                            f"remove it from modules.json or keep the width")


def carry_sentence_transformers(source: Path, dest: Path, width: int) -> list[str]:
    """Copy a sentence-transformers folder's own files and module folders, the pooling set to ``width``, so the
    result still loads in ``SentenceTransformer``.  Returns the names copied."""
    modules = sentence_transformer_modules(source)
    if not modules:
        return []
    copied = [name for name in ST_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, dest / name)
    for module in modules:
        sub = module.get("path", "")
        if not sub or not (source / sub).is_dir() or Path(sub).is_absolute() or ".." in Path(sub).parts:
            continue
        shutil.copytree(source / sub, dest / sub)
        config = dest / sub / "config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LigoError(f"{source / sub / 'config.json'}: not valid JSON ({e}); restore the file") from None
            if isinstance(data, dict) and data.get("word_embedding_dimension", width) != width:
                data["word_embedding_dimension"] = width
                config.write_text(json.dumps(data, indent=2) + "\n")
        copied.append(sub + "/")
    return copied


def parse_size(size: str | int) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        n = size if isinstance(size, int) else parse_size_to_int(size)
    except ValueError:
        n = 0
    if n <= 0:
        raise LigoError(f"shard size {size!r} is not a size like 500MB or 5GB")
    return n
