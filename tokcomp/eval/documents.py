"""Up-front checks of a task's local documents (``--data-files``), before the model or lmms-eval load them.

A file is read once (only its first rows where the format allows): it must parse, hold at least one
document, have the columns the task reads, and its first documents' pictures must decode. Without this,
lmms-eval fails late, retries five times, and prints a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from tokcomp.errors import TokcompError

SAMPLE_ROWS = 3  # documents whose pictures are decoded
FORMATS = {".parquet": "parquet", ".json": "JSON", ".jsonl": "JSON lines", ".csv": "CSV", ".arrow": "Arrow"}
HOOKS = ("doc_to_visual", "doc_to_text", "doc_to_target")
_TEMPLATE_NAME = re.compile(r"{{\s*([A-Za-z_]\w*)")


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def check_documents(path: Path, config: dict, task: str, columns: tuple = (), hooks: bool = False) -> None:
    """Raise :class:`TokcompError` unless ``path`` holds readable documents for ``task``.

    ``columns``: names each document needs besides those the task's templates name; an entry that is a
    tuple means one of them. ``hooks``: also call the task's ``doc_to_visual`` / ``doc_to_text`` on the
    first documents (for hooks known to be pure, the built-in suites').
    """
    split = config.get("test_split") or "test"
    rows, have, docs = _read(path, split, config)
    if rows == 0:
        raise TokcompError(f"{path} holds no documents (0 rows) for {task}")
    needed: list = [*columns, *sorted(_template_columns(config))]
    missing = [" or ".join(c) if isinstance(c, tuple) else c for c in needed if not _present(c, have)]
    if missing:
        listed = ", ".join(sorted(have)) or "none"
        raise TokcompError(f"{path} lacks column(s) {', '.join(missing)} that {task} reads (it has: {listed})")
    for index in range(len(docs)):
        where = f"{path}, document {index}"
        try:
            doc = docs[index]  # decodes datasets' image features
            _load_pictures(doc)
            if hooks:
                _load_pictures(config["doc_to_visual"](doc))
        except KeyError as exc:
            raise TokcompError(f"{where}: no field {exc}, which {task} reads") from None
        except Exception as exc:  # PIL and datasets raise many types for undecodable data
            what = "not an image PIL can identify" if isinstance(exc, Image.UnidentifiedImageError) else None
            raise TokcompError(f"{where}: cannot decode its picture ({what or _first_line(exc)})") from None
        if hooks:
            try:
                config["doc_to_text"](doc)
            except Exception as exc:  # a field of the wrong type or shape
                raise TokcompError(
                    f"{where}: {task} cannot make its prompt ({type(exc).__name__}: {_first_line(exc)})"
                ) from None


def _present(column, have: set[str]) -> bool:
    return any(c in have for c in column) if isinstance(column, tuple) else column in have


def _template_columns(config: dict) -> set[str]:
    """Fields named in Jinja templates of the task's hooks (``{{question}}``); function hooks name none."""
    names: set[str] = set()
    for hook in HOOKS:
        value = config.get(hook)
        if isinstance(value, str):
            names.update(_TEMPLATE_NAME.findall(value))
    return names


def _load_pictures(value) -> None:
    """Fully decode every PIL image in a document value (lists and dicts searched)."""
    if isinstance(value, Image.Image):
        value.load()
    elif isinstance(value, (list, tuple)):
        for item in value:
            _load_pictures(item)
    elif isinstance(value, dict):
        for item in value.values():
            _load_pictures(item)


def _read(path: Path, split: str, config: dict):
    """(number of documents, column names, the first documents) from a data file or a save_to_disk folder."""
    import pyarrow as pa

    if path.is_dir():
        return _read_saved(path, split)
    kind = FORMATS.get(path.suffix.lower(), path.suffix)
    try:
        if path.stat().st_size == 0:
            raise TokcompError(f"cannot read {path}: the file is empty (0 bytes)")
        if kind == "parquet":
            rows, table = _read_parquet(path)
        elif kind in ("JSON", "JSON lines"):
            rows, table = _read_json(path, (config.get("dataset_kwargs") or {}).get("field"))
        elif kind == "CSV":
            import pandas as pd

            frame = pd.read_csv(path)
            rows, table = len(frame), pa.Table.from_pandas(frame.head(SAMPLE_ROWS), preserve_index=False)
        else:
            table = _read_arrow(path)
            rows, table = table.num_rows, table.slice(0, SAMPLE_ROWS)
        return rows, set(table.column_names), _documents(table)
    except TokcompError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid, JSONDecodeError, pandas' errors
        raise TokcompError(f"cannot read {path} as {kind}: {_first_line(exc)}") from None


def _documents(table):
    """Rows as lmms-eval sees them: with the features datasets recorded in the file decoded (images as PIL)."""
    if b"huggingface" not in (table.schema.metadata or {}):
        return table.to_pylist()
    import datasets  # seconds to import: only for files it wrote

    return datasets.Dataset(table)


def _read_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(path)
    rows = handle.metadata.num_rows
    batches = list(handle.iter_batches(batch_size=SAMPLE_ROWS)) if rows else []
    head = pa.Table.from_batches(batches[:1], schema=handle.schema_arrow)  # keeps datasets' feature metadata
    return rows, head.slice(0, SAMPLE_ROWS)


def _read_json(path: Path, field: str | None):
    """A JSON list of objects (or ``{field: [...]}``), or JSON lines, as datasets' json builder reads them."""
    import pyarrow as pa

    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        data = _json_lines(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if not exc.msg.startswith("Extra data"):  # else: one JSON value per line
                raise
            data = _json_lines(text)
    if isinstance(data, dict):
        data = data.get(field, []) if field else [data]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise TokcompError(f"{path} must hold JSON objects, one per document (a list of them, or one per line)")
    names = list(dict.fromkeys(key for row in data for key in row))
    head = [{name: row.get(name) for name in names} for row in data[:SAMPLE_ROWS]]
    return len(data), pa.Table.from_pylist(head)


def _json_lines(text: str) -> list:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number}: {exc.msg} (column {exc.colno})") from None
    return rows


def _read_arrow(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()  # what datasets writes
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def _read_saved(path: Path, split: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise TokcompError(f"cannot read {path} (a save_to_disk folder): {_first_line(exc)}") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise TokcompError(f"{path} holds one saved Dataset; the task reads split '{split}' of a saved DatasetDict")
    if split not in loaded:
        raise TokcompError(f"{path} has no split '{split}' (has: {', '.join(loaded)})")
    docs = loaded[split]
    return len(docs), set(docs.column_names), docs.select(range(min(len(docs), SAMPLE_ROWS)))
