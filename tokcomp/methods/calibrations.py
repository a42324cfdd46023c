"""Where a model's stored calibrations are: ``calib/<name>/<budget>.yaml`` (see tokcomp.resources)."""

from __future__ import annotations

from pathlib import Path

from tokcomp import resources


def calibration_name(model: str) -> str:
    """The folder of calib/ that holds a model's stored calibrations: a committed checkpoint by its name
    whether given by name or path, another checkpoint folder by its folder name, a hub id as it is."""
    path = Path(model)
    if not path.exists():
        return model
    from tokcomp.models.loading import COMMITTED

    resolved = path.resolve()
    for name, folder in COMMITTED.items():
        if resolved == folder.resolve():
            return name
    return resolved.name


def stored_calibration(model: str, budget: str) -> Path | None:
    for path in resources.search_paths("calib", calibration_name(model), f"{budget}.yaml"):
        if path.is_file():
            return path
    return None
