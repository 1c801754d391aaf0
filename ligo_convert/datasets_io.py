"""Tables as data: JSON lines, parquet and Hugging Face ``datasets.save_to_disk`` folders, all local files.

A *table* is rows with named columns.  Sources:

- a ``.jsonl`` file (one JSON object per line) or a ``.json`` file (JSON lines, or one JSON array of objects) —
  read with the standard library, no extra package;
- a ``.parquet`` file or a folder of them (read with pyarrow);
- a folder written by ``datasets.save_to_disk``: a ``Dataset`` (``state.json``) or a ``DatasetDict``
  (``dataset_dict.json``; read with the ``datasets`` package, ``load_from_disk``: no network, no remote code).

Splits: a DatasetDict's ``train`` split is train and its ``validation`` (else ``valid``, ``val``, ``dev``, ``test``)
split is val; a folder of parquet or JSON lines files whose names carry a split (``train-00000-of-00002.parquet``,
``validation/part-0.parquet``) splits the same way.  A single table is split by row: **text** rows ``i`` with
``i % 10 == 9`` are held out (of fewer than 10 rows, the last one), each row being one whole document; **image**
rows are held out as in image folders: every 5th row of each class, in row order.

Text models read one string column (``text_column``; default ``text``, else the only string column).  Image models
read an ``image`` column (a datasets ``Image`` feature, encoded bytes, or paths relative to the table's folder) and
a ``label`` column (integer class ids, a ``ClassLabel`` whose names become the classes, or class names).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import LigoError
from .token_cache import CACHE_FOLDER

INSTALL = 'pip install "ligo-convert[datasets]"'
TABLE_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev", "test")
TEXT_ROW_RULE = "table rows: i % 10 == 9 held out (the last of < 10 rows); a named split as is; v1"
_SPLIT_WORD = re.compile(r"(?:^|[-_./])(train|training|validation|valid|val|dev|test|testing)(?=$|[-_./\d])")


def _pyarrow(where=None):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise LigoError(f"{where or 'parquet'}: reading parquet files needs pyarrow: {INSTALL}") from None
    return pyarrow


# --- finding tables -----------------------------------------------------------------------------------------------


def saved_kind(path: Path) -> str | None:
    """``"dataset"`` or ``"datasetdict"`` for a ``datasets.save_to_disk`` folder, else None (cheap: two stats)."""
    if (path / "dataset_dict.json").is_file():
        return "datasetdict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def table_kind(path: Path) -> str | None:
    """``"jsonl"``, ``"parquet"``, ``"dataset"`` (save_to_disk), ``"datasetdict"`` or None (not a table)."""
    if path.is_file():
        return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower())
    if not path.is_dir():
        return None
    saved = saved_kind(path)
    if saved is not None:
        return saved
    files = table_files(path)
    if any(f.suffix == ".parquet" for f in files):
        return "parquet"
    return "jsonl" if files else None


def table_files(folder: Path) -> list[Path]:
    """The parquet files of a folder (else its JSON lines files), sorted, the cache folder left out."""
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in TABLE_FILE_SUFFIXES and p.is_file()
                   and CACHE_FOLDER not in p.relative_to(folder).parts)
    parquet = [p for p in found if p.suffix.lower() == ".parquet"]
    return parquet or found


def _split_of(rel: Path) -> str | None:
    m = _SPLIT_WORD.search(rel.as_posix().lower())
    if m is None:
        return None
    word = m.group(1)
    return "train" if word.startswith("train") else "test" if word.startswith("test") else "val"


def split_files(folder: Path, files: list[Path]) -> dict[str, list[Path]] | None:
    """Train and val files by their names (val: validation-like names, else test), or None when not split."""
    by: dict[str, list[Path]] = {}
    for f in files:
        by.setdefault(_split_of(f.relative_to(folder)) or "", []).append(f)
    if "train" not in by or "" in by or not (by.keys() - {"train"}):
        return None
    return {"train": by["train"], "val": by.get("val") or by.get("test") or []}


# --- one table ------------------------------------------------------------------------------------------------------


class Table:
    """Rows of one split: ``columns`` (name -> kind: string, int, label, image, binary, bool or a type name),
    ``class_names`` of ClassLabel columns, ``len()``, ``values(col)`` (all values, row order) and ``stream(col)``."""

    name: str
    columns: dict[str, str]
    class_names: dict[str, list[str]]

    def __len__(self) -> int:
        raise NotImplementedError

    def stream(self, col: str) -> Iterator[Any]:
        raise NotImplementedError

    def values(self, col: str) -> list:
        return list(self.stream(col))


def _json_kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "int"
    if isinstance(value, dict) and ("path" in value or "bytes" in value):
        return "image"
    return type(value).__name__


class JsonTable(Table):
    """JSON lines files (or JSON arrays of objects), streamed with the standard library."""

    def __init__(self, files: list[Path], name: str):
        self.files, self.name = files, name
        self.class_names, self.columns = {}, {}
        self._rows = None
        for row in self._iter_rows(limit=1000):
            for k, v in row.items():
                if self.columns.get(k) is None:
                    self.columns[k] = _json_kind(v)
        self.columns = {k: v or "null" for k, v in self.columns.items()}

    def _iter_rows(self, limit: int | None = None) -> Iterator[dict]:
        n = 0
        for path in self.files:
            for where, row in _json_rows(path):
                if not isinstance(row, dict):
                    raise LigoError(f"{where}: a row must be a JSON object, not {type(row).__name__}; fix the row")
                yield row
                n += 1
                if limit is not None and n >= limit:
                    return

    def __len__(self) -> int:
        if self._rows is None:
            self._rows = sum(1 for _ in self._iter_rows())
        return self._rows

    def stream(self, col: str) -> Iterator[Any]:
        for row in self._iter_rows():
            yield row.get(col)


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                rows = json.load(f)
                for i, row in enumerate(rows):
                    yield f"{path} (row {i})", row
                return
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{lineno}", json.loads(line)
    except json.JSONDecodeError as e:
        where = f"{path}:{lineno}" if not head.startswith("[") else str(path)
        raise LigoError(f"{where}: not valid JSON ({e.msg}); fix or remove the line") from None
    except UnicodeDecodeError:
        raise LigoError(f"{path}: not UTF-8 text; JSON lines files must be UTF-8") from None
    except OSError as e:
        raise LigoError(f"{path}: cannot be read ({e.strerror})") from None


def _arrow_kind(pa, t, feature: dict | None) -> str:
    kind = (feature or {}).get("_type")
    if kind == "ClassLabel":
        return "label"
    if kind == "Image":
        return "image"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view":
        return "string"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}:
        return "image"
    return str(t)


def _hf_features(schema) -> dict:
    """The datasets features a parquet or arrow file's schema carries (ClassLabel names, Image), if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        return json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}


class ArrowTable(Table):
    """A pyarrow table (memory-mapped for save_to_disk folders) or parquet files, read one column at a time."""

    def __init__(self, name: str, files: list[Path] | None = None, table=None, features: dict | None = None):
        pa = _pyarrow(files[0] if files else name)
        self.name, self.files, self.table = name, files, table
        try:
            schema = table.schema if table is not None else pa.parquet.read_schema(files[0])
        except (OSError, pa.ArrowException) as e:
            raise LigoError(f"{files[0]}: not a readable parquet file ({e}); restore or remove it") from None
        features = features if features is not None else _hf_features(schema)
        self.columns = {f.name: _arrow_kind(pa, f.type, features.get(f.name)) for f in schema}
        self.class_names = {k: list(v["names"]) for k, v in features.items()
                            if isinstance(v, dict) and v.get("_type") == "ClassLabel" and "names" in v}

    def __len__(self) -> int:
        if self.table is not None:
            return self.table.num_rows
        return sum(self._parquet(f).metadata.num_rows for f in self.files)

    def _parquet(self, path: Path):
        pa = _pyarrow()
        try:
            return pa.parquet.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise LigoError(f"{path}: not a readable parquet file ({e}); restore or remove it") from None

    def stream(self, col: str) -> Iterator[Any]:
        pa = _pyarrow()
        if self.table is not None:
            for chunk in self.table.column(col).chunks:
                for start in range(0, len(chunk), 4096):
                    yield from chunk.slice(start, 4096).to_pylist()
            return
        for path in self.files:
            try:
                for batch in self._parquet(path).iter_batches(batch_size=4096, columns=[col]):
                    yield from batch.column(0).to_pylist()
            except (OSError, pa.ArrowException) as e:
                raise LigoError(f"{path}: cannot read column {col!r} ({e}); restore or remove the file") from None

    def column(self, col: str):
        """All of one column as one pyarrow array (images stay encoded: compact, and cheap to share)."""
        pa = _pyarrow()
        if self.table is not None:
            return self.table.column(col).combine_chunks()
        parts = []
        for path in self.files:
            try:
                parts.append(self._parquet(path).read(columns=[col]).column(col))
            except (OSError, pa.ArrowException) as e:
                raise LigoError(f"{path}: cannot read column {col!r} ({e}); restore or remove the file") from None
        return pa.chunked_array([c for p in parts for c in p.chunks], type=parts[0].type).combine_chunks()


# --- sources: the tables of each split ----------------------------------------------------------------------------


@dataclass
class TableSet:
    """A table source: the train table, the val table (None: held-out rows of train), the files it was read from
    (for cache keys), the folder beside which caches go, and a kind for reports."""

    path: Path
    kind: str
    train: Table | None
    val: Table | None
    files: list[Path] = field(default_factory=list)
    home: Path | None = None


def _load_datasets(path: Path):
    try:
        import datasets
    except ImportError:
        raise LigoError(f"{path}: a datasets.save_to_disk folder needs the datasets package: {INSTALL}") from None
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a damaged folder
        raise LigoError(f"{path}: cannot be read by datasets.load_from_disk ({type(e).__name__}: {e}); restore the "
                        f"folder") from None


def _dataset_table(ds, name: str) -> ArrowTable:
    return ArrowTable(name, table=ds.with_format("arrow")[:], features=ds.features.to_dict())


def open_tables(path: Path) -> TableSet:
    """The tables of ``path`` (see the module docstring); LigoError if it is not a table source."""
    kind = table_kind(path)
    folder = path if path.is_dir() else path.parent
    if kind in ("dataset", "datasetdict"):
        files = sorted(p for p in path.rglob("*") if p.is_file() and CACHE_FOLDER not in p.relative_to(path).parts)
        loaded = _load_datasets(path)
        if kind == "dataset":
            return TableSet(path, "datasets folder", _dataset_table(loaded, str(path)), None, files, folder)
        splits = list(loaded.keys())
        val = next((s for s in VAL_SPLIT_NAMES if s in loaded), None)
        train = _dataset_table(loaded["train"], f"{path} (split train)") if "train" in loaded else None
        if train is None and val is None:
            raise LigoError(f"{path}: the DatasetDict has no 'train' or validation split (it has {', '.join(splits)});"
                            f" save one named 'train'")
        return TableSet(path, f"datasets folder (splits {', '.join(splits)})", train,
                        _dataset_table(loaded[val], f"{path} (split {val})") if val else None, files, folder)
    if kind is None:
        raise LigoError(f"{path}: not a table (expected .jsonl, .json, .parquet or a datasets.save_to_disk folder)")
    files = table_files(path) if path.is_dir() else [path]
    make = (lambda fs, n: ArrowTable(n, files=fs)) if kind == "parquet" else (lambda fs, n: JsonTable(fs, n))
    label = "parquet" if kind == "parquet" else "JSON lines"
    by_split = split_files(path, files) if path.is_dir() else None
    if by_split is not None:
        val = make(by_split["val"], f"{path} (val files)") if by_split["val"] else None
        return TableSet(path, f"{label} files (train/val by name)", make(by_split["train"], f"{path} (train files)"),
                        val, files, folder)
    return TableSet(path, f"{label} file" if path.is_file() else f"{label} files", make(files, str(path)), None,
                    files, folder)


# --- text -----------------------------------------------------------------------------------------------------------


def text_column_of(tables: TableSet, text_column: str | None) -> str:
    """The column text is read from: ``text_column``, else ``text``, else the only string column."""
    table = tables.train or tables.val
    cols = table.columns
    listing = ", ".join(f"{k} ({v})" for k, v in cols.items()) or "none"
    if text_column is not None and text_column not in cols:
        raise LigoError(f"{table.name}: no column {text_column!r} (columns: {listing}); pass --text-column with one "
                        f"of them")
    col = text_column or ("text" if "text" in cols else None)
    if col is None:
        strings = [k for k, v in cols.items() if v == "string"]
        if len(strings) != 1:
            why = "no string column" if not strings else "several string columns"
            raise LigoError(f"{table.name}: {why} to read text from (columns: {listing}); pass --text-column NAME")
        col = strings[0]
    if cols[col] not in ("string", "null"):
        raise LigoError(f"{table.name}: column {col!r} holds {cols[col]}, not text; pass --text-column with a string "
                        f"column (columns: {listing})")
    for other in (tables.train, tables.val):
        if other is not None and col not in other.columns:
            raise LigoError(f"{other.name}: no column {col!r}; every split needs the text column")
    return col


def held_out_rows(rows: Iterator[Any]) -> Iterator[tuple[str, int, Any]]:
    """(split, row number, value) of a single table's text rows: rows ``i % 10 == 9`` are val, and of a table of
    fewer than 10 rows (at least 2) the last one; streamed, holding at most 10 rows."""
    head = []
    for i, value in enumerate(rows):
        if i < 10:
            head.append(value)
            if i < 9:
                continue
            for j, v in enumerate(head):
                yield ("val" if j == 9 else "train"), j, v
            continue
        yield ("val" if i % 10 == 9 else "train"), i, value
    if len(head) < 10:
        for j, v in enumerate(head):
            yield ("val" if j == len(head) - 1 and len(head) >= 2 else "train"), j, v


def checked_text(table: Table, col: str, i: int, value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LigoError(f"{table.name}: row {i} of column {col!r} holds {type(value).__name__}, not text; fix the row "
                        f"or pass --text-column with a string column")
    return value


# --- images ---------------------------------------------------------------------------------------------------------


@dataclass
class ImageColumn:
    """The ``image`` values of one or more tables (encoded bytes, paths or datasets' {bytes, path} structs), opened
    one row at a time — also in DataLoader worker processes, so it holds only picklable things."""

    parts: list  # (table name, values: a pyarrow array or a list, folder that relative paths start from)
    starts: list[int]

    def locate(self, i: int) -> tuple[str, Any, Path, int]:
        k = max(j for j, s in enumerate(self.starts) if s <= i)
        name, values, base = self.parts[k]
        local = i - self.starts[k]
        value = values[local]
        return name, (value.as_py() if hasattr(value, "as_py") else value), base, local

    def open(self, i: int):
        """(a PIL image, where it came from) for row ``i``; LigoError names the table and row."""
        from PIL import Image, UnidentifiedImageError

        name, value, base, row = self.locate(i)
        where = f"{name} (row {row})"
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        try:
            if isinstance(value, (bytes, bytearray)):
                return Image.open(io.BytesIO(value)), where
            if isinstance(value, str) and value:
                path = Path(value) if Path(value).is_absolute() else base / value
                return Image.open(path), f"{path} ({where})"
        except (UnidentifiedImageError, OSError) as e:
            raise LigoError(f"{where}: not a readable image ({type(e).__name__}); fix or remove the row") from None
        raise LigoError(f"{where}: column 'image' holds {type(value).__name__}, not an image (encoded bytes or a "
                        f"path); fix or remove the row")


def _check_image_columns(table: Table) -> None:
    for col, kinds in (("image", ("image", "binary", "string", "null")), ("label", ("int", "label", "string"))):
        if col not in table.columns:
            raise LigoError(f"{table.name}: no {col!r} column (columns: {', '.join(table.columns) or 'none'}); image "
                            f"models need an 'image' column (images, bytes or paths) and an integer 'label' column")
        if table.columns[col] not in kinds:
            raise LigoError(f"{table.name}: column {col!r} holds {table.columns[col]}, not "
                            f"{'images' if col == 'image' else 'integer class ids'}; fix the column")


def _classes(tables: TableSet, labels: list) -> tuple[list[int], list[str]]:
    """Class ids and class names: a ClassLabel's names, class names numbered in sorted order, or ids 0..max."""
    table = tables.train or tables.val
    if labels and all(isinstance(v, str) for v in labels):
        classes = sorted(set(labels))
        number = {c: i for i, c in enumerate(classes)}
        return [number[v] for v in labels], classes
    bad = next((v for v in labels if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
    if bad is not None:
        raise LigoError(f"{table.name}: column 'label' holds {bad!r}, not a class id (an integer >= 0); fix the rows")
    names = table.class_names.get("label")
    if names and labels and max(labels) >= len(names):
        raise LigoError(f"{table.name}: label {max(labels)} is beyond the {len(names)} class names; fix the rows")
    return labels, list(names) if names else [str(i) for i in range(max(labels, default=-1) + 1)]


def image_rows(tables: TableSet) -> tuple[ImageColumn, list[int], list[str], list[int], list[int]]:
    """(images, labels, classes, train rows, val rows) of an image table source."""
    parts, starts, labels, sizes = [], [], [], []
    base = tables.path if tables.path.is_dir() else tables.path.parent
    for table in (tables.train, tables.val):
        if table is None:
            sizes.append(0)
            continue
        _check_image_columns(table)
        values = table.column("image") if isinstance(table, ArrowTable) else table.values("image")
        starts.append(len(labels))
        parts.append((table.name, values, base))
        got = table.values("label")
        labels += got
        sizes.append(len(got))
    labels, classes = _classes(tables, labels)
    if tables.val is not None:
        return ImageColumn(parts, starts), labels, classes, list(range(sizes[0])), \
            list(range(sizes[0], sizes[0] + sizes[1]))
    train, val, seen = [], [], {}
    for i, label in enumerate(labels):  # every 5th row of each class is held out, as in image folders
        seen[label] = seen.get(label, 0) + 1
        (val if seen[label] % 5 == 0 else train).append(i)
    return ImageColumn(parts, starts), labels, classes, train, val
