"""Atomic file output: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from tokcomp.distributed import current_world
from tokcomp.errors import TokcompError


def _probe_folder(folder: Path, target: Path, keep_folders: bool = False) -> None:
    """Create ``folder`` if needed and create and delete a temporary file in it; then remove the folders it
    made unless ``keep_folders``.

    ``os.access`` is not enough: it says yes to root, and under /proc or /sys. In a multi-process run
    only rank 0 writes, so only rank 0 probes (two processes probing one new folder race: one removes
    the folder the other is about to write in).
    """
    if not current_world().is_main:
        return
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise TokcompError(f"cannot write {target}: {candidate} is a file, not a folder")
            break
        missing.append(candidate)
    created: list[Path] = []
    try:
        for candidate in reversed(missing):
            try:
                candidate.mkdir()
            except FileExistsError:  # made meanwhile by someone else: theirs to keep
                continue
            except OSError as exc:
                raise TokcompError(f"cannot create folder {candidate}: {exc.strerror or exc}") from None
            created.append(candidate)
        try:
            fd, probe = tempfile.mkstemp(prefix=".tokcomp-probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise TokcompError(f"cannot write {target}: {folder} takes no new files ({exc.strerror or exc})") from None
    except BaseException:
        keep_folders = False
        raise
    finally:
        for candidate in [] if keep_folders else reversed(created):
            with contextlib.suppress(OSError):
                candidate.rmdir()


def ensure_writable(path: str | Path, keep_folders: bool = True) -> Path:
    """Check, before any work, that a file can be written at ``path`` (by writing a temporary file there).

    The parent folders it had to create stay, for a writer to use, unless ``keep_folders`` is false (a
    check up front: then nothing is left behind).
    """
    path = Path(path)
    if path.is_dir():
        raise TokcompError(f"output path {path} is a directory, expected a file")
    _probe_folder(path.parent, path, keep_folders)
    return path


def ensure_writable_dir(path: str | Path) -> Path:
    """Check, before any work, that the output folder ``path`` can be created or written; leaves nothing behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TokcompError(f"output folder {path} is a file, expected a folder")
    _probe_folder(path, path)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``; nothing is left behind on failure."""
    path = Path(path)
    if path.is_dir():
        raise TokcompError(f"output path {path} is a directory, expected a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as exc:
        raise TokcompError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, a folder gone: the machine's trouble, not a bug
            raise TokcompError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_all(outputs: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write several files as a unit: each ``write(tmp)`` beside its target first, then all renamed.

    A failure in any writer leaves none of the targets changed and no temporary file behind.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in outputs:
            path = ensure_writable(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
            os.close(fd)
            staged.append((Path(tmp), path))
            write(Path(tmp))
        for tmp, path in staged:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
