"""Where the shipped configs/, calib/ and checkpoints/ are found (tokcomp.resources); `make wheel-check`
covers an installed wheel end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokcomp import resources
from tokcomp.methods.registry import _load_preset, preset_catalog, stored_calibration
from tokcomp.models.loading import COMMITTED
from tokcomp.results.regress import default_tolerances_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory outside the checkout."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_checkout_finds_the_repository_folders(elsewhere: Path) -> None:
    assert resources.in_checkout()
    assert resources.REPO_ROOT == ROOT
    assert resources.find("configs", "dymu-mid.yaml") == ROOT / "configs" / "dymu-mid.yaml"
    assert stored_calibration("tokcomp-tiny", "mid") == ROOT / "calib" / "tokcomp-tiny" / "mid.yaml"
    assert default_tolerances_path() == ROOT / "configs" / "regress-tolerances.yaml"
    assert resources.checkpoint("tokcomp-tiny") == COMMITTED["tokcomp-tiny"] == ROOT / "checkpoints" / "tokcomp-tiny"
    shipped = {p.stem for p in (ROOT / "configs").glob("*.yaml")} - {"regress-tolerances"}
    assert {p.name for p in preset_catalog()} == shipped


def test_the_working_directory_comes_first_for_configs_and_calib(elsewhere: Path) -> None:
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "dymu-mid.yaml").write_text("# mine\nmethod: tome\nr: 3\n")
    (elsewhere / "configs" / "regress-tolerances.yaml").write_text("default: {}\n")
    (elsewhere / "calib" / "tokcomp-tiny").mkdir(parents=True)
    (elsewhere / "calib" / "tokcomp-tiny" / "mid.yaml").write_text("{}\n")
    assert _load_preset("dymu-mid") == ("tome", {"r": 3})
    assert _load_preset("dymu-low")[0] == "dymu"  # the rest still come from the checkout
    presets = {p.name: p for p in preset_catalog()}
    assert presets["dymu-mid"].path == elsewhere / "configs" / "dymu-mid.yaml"
    assert presets["dymu-low"].path == ROOT / "configs" / "dymu-low.yaml"
    assert stored_calibration("tokcomp-tiny", "mid") == elsewhere / "calib" / "tokcomp-tiny" / "mid.yaml"
    assert default_tolerances_path() == elsewhere / "configs" / "regress-tolerances.yaml"
    # Checkpoints are never taken from the working directory.
    (elsewhere / "checkpoints" / "tokcomp-tiny").mkdir(parents=True)
    assert resources.checkpoint("tokcomp-tiny") == ROOT / "checkpoints" / "tokcomp-tiny"


def test_outside_a_checkout_the_installed_copy_is_used(elsewhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = elsewhere / "site-packages"
    data = site / "tokcomp" / "_data"
    (data / "configs").mkdir(parents=True)
    (data / "configs" / "dymu-mid.yaml").write_text("method: dymu\nbudget: mid\n")
    (data / "checkpoints" / "tokcomp-tiny").mkdir(parents=True)
    monkeypatch.setattr(resources, "REPO_ROOT", site)  # no pyproject.toml there: not a checkout
    monkeypatch.setattr(resources, "DATA_DIR", data)
    assert not resources.in_checkout()
    assert resources.search_paths("configs") == [elsewhere / "configs", data / "configs"]
    assert resources.find("configs", "dymu-mid.yaml") == data / "configs" / "dymu-mid.yaml"
    assert resources.find("calib", "tokcomp-tiny", "mid.yaml") is None
    assert resources.checkpoint("tokcomp-tiny") == data / "checkpoints" / "tokcomp-tiny"
    assert [p.name for p in preset_catalog()] == ["dymu-mid"]
