"""Budgets, merge schedules, calibration quality and calibration files."""

from __future__ import annotations

import math

import pytest
import yaml

from tokcomp.calibrate import calibrate, merge_schedule, resolve_budget
from tokcomp.config import Calibration
from tokcomp.data.images import open_image_source
from tokcomp.errors import TokcompError


def test_budgets_scale_with_the_encoder():
    assert resolve_budget("low", 576).target_tokens == 89  # DyMU-low on CLIP-L/14-336
    assert resolve_budget("mid", 576).target_tokens == 195
    assert resolve_budget("high", 576).target_tokens == 394
    assert [resolve_budget(b, 196).target_tokens for b in ("low", "mid", "high")] == [30, 66, 134]
    assert resolve_budget("100", 196).target_tokens == 100
    for bad in ("tiny", "0", "500", "-3"):
        with pytest.raises(TokcompError):
            resolve_budget(bad, 196)


@pytest.mark.parametrize(("budget", "dymu_r"), [("low", 21), ("mid", 16), ("high", 8)])
def test_constant_schedule_matches_dymu_on_clip_l(budget, dymu_r):
    """CLIP-L/14-336 read at layer -2: 23 merging layers, 576 patches + CLS."""
    r, kind = merge_schedule(576, resolve_budget(budget, 576).target_tokens, 23, protected=1)
    assert kind == "constant" and len(r) == 23
    assert abs(sum(r) / 23 - dymu_r) <= 1
    assert max(r) - min(r) <= 1


def test_shallow_encoders_fall_back_to_a_geometric_schedule():
    r, kind = merge_schedule(196, 30, 5, protected=1)
    assert kind == "geometric" and 196 - sum(r) == 30
    t = 196
    for ri in r:
        assert ri <= t // 2
        t -= ri
    with pytest.raises(TokcompError, match="at least"):
        merge_schedule(196, 3, 5, protected=1)


@pytest.fixture(scope="module")
def skimage_items():
    return open_image_source("builtin:skimage")


@pytest.fixture(scope="module")
def calibrations(llava, llava_ov, skimage_items):
    out = {}
    for adapter in (llava, llava_ov):
        for budget in ("low", "mid", "high"):
            out[adapter.name, budget] = calibrate(
                adapter,
                skimage_items,
                resolve_budget(budget, adapter.num_patches),
                data_source="builtin:skimage",
                batch_size=8,
            )
    return out


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-llava-ov"])
def test_low_mid_high_are_ordered_and_meet_their_targets(calibrations, model):
    means = []
    for budget in ("low", "mid", "high"):
        calib = calibrations[model, budget]
        assert abs(calib.achieved.mean - calib.target_tokens) <= 0.1 * calib.target_tokens, (budget, calib.achieved)
        assert calib.achieved.min <= calib.achieved.mean <= calib.achieved.max
        assert calib.achieved.std > 0  # dynamic: images get different counts
        means.append(calib.achieved.mean)
    assert means[0] < means[1] < means[2]


def test_layers_after_the_feature_layer_never_merge(calibrations, llava):
    calib = calibrations["tiny-llava", "mid"]
    assert calib.feature_layer == llava.num_layers - 1
    assert math.isinf(calib.thresholds[-1]) and calib.r_per_layer[-1] == 0
    assert all(0 <= t < 1.0 + 1e-6 for t in calib.thresholds[:-1])


def test_calibration_file_round_trip_and_fields(calibrations, tmp_path):
    calib = calibrations["tiny-llava", "low"]
    path = calib.save(tmp_path / "calib.yaml")
    data = yaml.safe_load(path.read_text())
    for key in ("thresholds", "budget", "target_tokens", "achieved", "num_layers", "feature_layer", "num_images"):
        assert key in data
    for key in ("model", "vision_hash", "data", "dtype", "tokcomp_version", "date"):
        assert key in data["provenance"]
    assert set(data["achieved"]) == {"mean", "std", "min", "max"}
    loaded = Calibration.load(path)
    assert loaded.thresholds == calib.thresholds
    assert math.isinf(loaded.thresholds[-1])
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_calibration_is_refused_on_another_encoder(calibrations, llava, llava_ov):
    calib = calibrations["tiny-llava", "low"]
    calib.check_compatible(llava.num_layers, llava.vision_weights_hash(), "float32")
    with pytest.raises(TokcompError, match="other vision weights"):
        calib.check_compatible(llava_ov.num_layers, llava_ov.vision_weights_hash(), "float32")
    with pytest.raises(TokcompError, match="layers"):
        calib.check_compatible(llava.num_layers + 1, llava.vision_weights_hash(), "float32")


def test_bad_calibration_files_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("just text")
    (tmp_path / "b.yaml").write_text("thresholds: [1, 2]\n")
    (tmp_path / "c.yaml").write_text("key: [unclosed\n")
    for name in ("a.yaml", "b.yaml", "c.yaml", "missing.yaml"):
        with pytest.raises(TokcompError):
            Calibration.load(tmp_path / name)


def test_calibration_is_deterministic_for_a_seed(llava, skimage_items):
    budget = resolve_budget("mid", llava.num_patches)
    a = calibrate(llava, skimage_items, budget, data_source="x", batch_size=4, seed=3, num_images=12)
    b = calibrate(llava, skimage_items, budget, data_source="x", batch_size=4, seed=3, num_images=12)
    assert a.thresholds == b.thresholds and a.achieved == b.achieved and a.num_images == 12


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-llava-ov"])
def test_stored_calibrations_fit_the_presets(model, llava, llava_ov):
    """calib/<model>/<budget>.yaml must stay valid for the preset weights (rebuild with `make calibrations`)."""
    from pathlib import Path

    adapter = {"tiny-llava": llava, "tiny-llava-ov": llava_ov}[model]
    root = Path(__file__).resolve().parents[1] / "calib" / model
    means = []
    for budget in ("low", "mid", "high"):
        calib = Calibration.load(root / f"{budget}.yaml")
        calib.check_compatible(adapter.num_layers, adapter.vision_weights_hash(), "float32")
        assert calib.budget == budget and calib.provenance.model == model
        means.append(calib.achieved.mean)
    assert means == sorted(means)
