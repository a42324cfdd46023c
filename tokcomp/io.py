"""Atomic file output: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from tokcomp.errors import TokcompError


def ensure_writable(path: str | Path) -> Path:
    """Create the parent folder if needed and check that a file can be written there, before any work."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise TokcompError(f"output path {path} is a directory, expected a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TokcompError(f"cannot create folder {path.parent}: {exc.strerror or exc}") from exc
    if not os.access(path.parent, os.W_OK):
        raise TokcompError(f"cannot write to {path.parent}: permission denied")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``; nothing is left behind on failure."""
    path = ensure_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
