"""Build step: a wheel carries the repository's configs/, calib/ and checkpoints/ as tokcomp/_data/.

Everything else about the package is in pyproject.toml. An editable install reads the checkout's
folders instead (see tokcomp/resources.py), so nothing is copied for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Top-level folder -> globs (inside it) of the files a wheel carries; MANIFEST.in puts them in the sdist.
SHIPPED = {"configs": ["*.yaml"], "calib": ["*/*.yaml"], "checkpoints": ["tokcomp-tiny/*"]}


class BuildPyWithData(build_py):
    """``build_py`` that also copies the shipped folders into ``tokcomp/_data/`` of the build tree."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_shipped(Path(self.build_lib) / "tokcomp" / "_data")

    def copy_shipped(self, target: Path) -> None:
        """Replace ``target`` with a fresh copy of the shipped files (no stale ones from an older build)."""
        shutil.rmtree(target, ignore_errors=True)
        for folder, patterns in SHIPPED.items():
            files = [p for pattern in patterns for p in sorted((ROOT / folder).glob(pattern)) if p.is_file()]
            if not files:
                raise SystemExit(f"setup.py: no files match {patterns} in {ROOT / folder}; the wheel would lack them")
            for src in files:
                dest = target / folder / src.relative_to(ROOT / folder)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)


setup(cmdclass={"build_py": BuildPyWithData})
