"""Where the shipped data lives: method presets (configs/), stored calibrations (calib/), checkpoints/.

In a checkout they are the repository's top-level folders; a wheel carries a copy of them in
``tokcomp/_data/`` (setup.py puts it there at build time). Presets and calibrations are looked up in
the working directory first, so a project's own ``configs/`` and ``calib/`` win over the shipped ones.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # the checkout's root when tokcomp runs from one
DATA_DIR = PACKAGE_DIR / "_data"  # an installed wheel's copy of configs/, calib/, checkpoints/
SHIPPED = ("configs", "calib", "checkpoints")


def in_checkout() -> bool:
    """Whether tokcomp runs from a source checkout (an editable install or the tree itself)."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "configs").is_dir()


def shipped_roots() -> list[Path]:
    """The folders holding the shipped configs/, calib/ and checkpoints/: the checkout's, then the wheel's."""
    roots = [REPO_ROOT] if in_checkout() else []
    return [*roots, DATA_DIR]


def search_paths(*parts: str, cwd: bool = True) -> list[Path]:
    """Candidates for ``parts`` (e.g. ``"configs", "dymu-mid.yaml"``), best first, without repeats.

    The working directory's (unless ``cwd`` is false), then the checkout's, then the installed copy's.
    """
    roots = [Path.cwd()] if cwd else []
    out: list[Path] = []
    for root in [*roots, *shipped_roots()]:
        path = root.joinpath(*parts)
        if path not in out:
            out.append(path)
    return out


def find(*parts: str, cwd: bool = True) -> Path | None:
    """The first existing path of :func:`search_paths`, or None."""
    return next((path for path in search_paths(*parts, cwd=cwd) if path.exists()), None)


def checkpoint(name: str) -> Path:
    """A shipped checkpoint folder (``tokcomp-tiny``); where it should be when it is missing."""
    return find("checkpoints", name, cwd=False) or search_paths("checkpoints", name, cwd=False)[0]
