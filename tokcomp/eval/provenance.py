"""Where a task's documents came from, recorded in results.json so that `regress` pairs like with like."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokcomp.errors import TokcompError


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    try:
        for file in files:
            if file != path:
                digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError as exc:
        raise TokcompError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()[:16]


def _local_path(config: dict) -> Path:
    kwargs = config.get("dataset_kwargs") or {}
    if kwargs.get("load_from_disk"):
        return Path(config["dataset_path"])
    return Path(next(iter(kwargs["data_files"].values())))


def data_source(task: str, config: dict | str, manager, builtin_version: int | None = None) -> dict:
    """The documents of one leaf task: hub dataset and revision, local files and their hash, or a suite.

    ``config`` is what ``simple_evaluate`` gets (a task name or a config dict with local data);
    ``builtin_version`` is the suite generator's version when the files are a built-in suite's own.
    """
    if isinstance(config, str):
        stock = manager._get_config(config)
        kwargs = stock.get("dataset_kwargs") or {}
        return {
            "kind": "hub",
            "dataset": stock.get("dataset_path"),
            "name": stock.get("dataset_name"),
            "revision": kwargs.get("revision"),
            "split": stock.get("test_split"),
        }
    path = _local_path(config)
    source = {"kind": "files", "path": str(path), "sha256": content_hash(path)}
    if builtin_version is not None:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
        source |= {"kind": "builtin", "suite": task, "generator_version": builtin_version, "rows": rows}
    return source


def same_documents(a: dict | None, b: dict | None) -> bool:
    """Whether two recorded sources hold the same documents (a suite: the same generator version and split
    size, so that a Pillow or pyarrow upgrade that re-encodes the same pixels still pairs; local files:
    the same content, wherever they lie; a hub dataset: the same name, subset, split and revision)."""
    if a is None or b is None or a.get("kind") != b.get("kind"):
        return False
    if a["kind"] == "builtin":
        return all(a.get(key) == b.get(key) for key in ("suite", "generator_version", "rows"))
    if a["kind"] == "files":
        return a.get("sha256") == b.get("sha256")
    return all(a.get(key) == b.get(key) for key in ("dataset", "name", "revision", "split"))


def describe(source: dict | None) -> str:
    """One phrase for messages."""
    if source is None:
        return "not recorded"
    if source.get("kind") == "builtin":
        return f"built-in suite {source.get('suite')} v{source.get('generator_version')} ({source.get('rows')} rows)"
    if source.get("kind") == "files":
        return f"{source.get('path')} (sha256 {source.get('sha256')})"
    revision = source.get("revision") or "unpinned revision"
    return f"{source.get('dataset')}:{source.get('name') or ''}:{source.get('split')} @ {revision}"
