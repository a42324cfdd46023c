"""DToMe on Qwen2.5-VL's windowed vision tower and Qwen3-VL's DeepStack tower, on whole 2x2 merge units
(tokcomp.models.qwen_merging)."""

from __future__ import annotations

import pytest
import torch

import tokcomp
from tokcomp.calibrate import calibrate, measure_tokens, resolve_budget
from tokcomp.config import Calibration
from tokcomp.data.images import open_image_source
from tokcomp.methods.dtome import FixedRRule, ThresholdRule
from tokcomp.models.qwen_merging import _sized_attention
from tokcomp.resources import find


@pytest.fixture(params=["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def family(request):
    """Each Qwen family's tiny preset (the session fixtures ``qwen`` and ``qwen3``)."""
    return request.getfixturevalue("qwen3" if request.param == "tiny-qwen3-vl" else "qwen")


def test_merge_maps_partition_the_units_and_sizes_add_up(family, photos):
    views = family.encoder_views(photos[:3])
    units = family.num_patches
    for encoded in family.encode(views, FixedRRule([5] * family.num_layers)):
        assert sorted(set(encoded.source.tolist())) == list(range(encoded.num_tokens))
        assert float(encoded.sizes.sum()) == units
        assert encoded.layer_counts == [units - 5 * (i + 1) for i in range(family.num_layers)]
        assert encoded.num_tokens == units - 5 * family.num_layers


def test_no_merge_is_the_stock_tower_bit_for_bit(family, photos):
    views = family.encoder_views(photos[:2])
    plain = family.encode(views)
    off = family.encode(views, ThresholdRule([float("inf")] * family.num_layers))
    for a, b in zip(plain, off, strict=True):
        assert torch.equal(a.features, b.features[b.source])


def test_sized_attention_is_the_stock_attention_and_a_size_counts_as_copies(family):
    """With every size 1 it is the stock block attention; a key of size 2 weighs as two equal keys."""
    torch.manual_seed(0)
    attn = family.vision_model.blocks[0].attn
    dim, rows = attn.qkv.in_features, 8
    x = torch.randn(rows, dim)
    cos, sin = torch.randn(rows, attn.head_dim).cos(), torch.randn(rows, attn.head_dim).sin()
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with torch.no_grad():
        stock = attn(x, cu_seqlens=cu, position_embeddings=(cos, sin))
        ours = _sized_attention(attn, x, cu, cos, sin, torch.zeros(rows))
        assert torch.allclose(ours, stock, atol=1e-5)
        # the size bias: one segment whose row 0 has size 2 equals that row present twice
        doubled = torch.cat([x[:1], x[:4]])
        dcos, dsin = torch.cat([cos[:1], cos[:4]]), torch.cat([sin[:1], sin[:4]])
        twice = _sized_attention(attn, doubled, torch.tensor([0, 5], dtype=torch.int32), dcos, dsin, torch.zeros(5))
        sized = _sized_attention(attn, x[:4], torch.tensor([0, 4], dtype=torch.int32), cos[:4], sin[:4],
                                 torch.tensor([2.0, 1, 1, 1]).log())  # fmt: skip
        assert torch.allclose(sized, twice[1:], atol=1e-5)
        assert not torch.allclose(sized, ours[:4], atol=1e-3)


def test_stock_generate_with_dymu_merges_and_the_pipeline_agrees(family, photos):
    from stock_inputs import stock_inputs

    from tokcomp.pipeline import Pipeline, Request

    images = [[photos[0]], [photos[1].resize((140, 84))]]
    prompts = ["what is in the picture ?", "and here ?"]
    inputs = stock_inputs(family, prompts, images, [None, None])
    gen = {"max_new_tokens": 3, "do_sample": False}
    for name in ("dymu", "dtome") if not family.deepstack_levels else ("dtome",):  # VTU: not on DeepStack models
        method = tokcomp.method(name, budget="mid")
        with torch.no_grad(), method(family.model):
            out = family.model.generate(**inputs, **gen)
        accounts = method.accounts
        assert all(a.visual_kept < a.visual_full for a in accounts)
        positions = [a.visual_positions for a in accounts]
        assert positions == ([a.visual_full for a in accounts] if name == "dymu" else [a.visual_kept for a in accounts])
        requests = [Request(p, images=i) for p, i in zip(prompts, images, strict=True)]
        answers = Pipeline(family, method.resolve(family)).generate(requests, max_new_tokens=3)
        start = inputs["input_ids"].shape[1]
        for got, row in zip(answers, out, strict=True):
            assert got.token_ids == row[start:].tolist()[: len(got.token_ids)]


def test_images_of_different_sizes_merge_in_one_tower_call_as_they_do_alone(family, photos):
    """Segments of different lengths in one packed call (padding in the merge state): each image keeps
    the tokens it keeps alone, and its map covers exactly its own units."""
    from tokcomp.pipeline import Pipeline, Request

    images = [photos[0], photos[1].resize((140, 84)), photos[2].resize((84, 140)), photos[3]]
    method = tokcomp.method("tome", r=3).resolve(family)
    together = Pipeline(family, method).generate([Request("compare them", images=images)], 2)[0].account.per_image
    alone = [Pipeline(family, method).generate([Request("what is it", images=[im])], 2)[0].account.per_image[0]
             for im in images]  # fmt: skip
    assert [p["kept"] for p in together] == [p["kept"] for p in alone]
    assert [p["full"] for p in together] == [p["full"] for p in alone]
    assert all(p["kept"] < p["full"] for p in together)


def test_a_calibration_holds_its_budget_on_images_it_did_not_see(family):
    """Calibrated on every other scikit-image photograph, measured on the rest (about 23 of 22 tokens)."""
    items = open_image_source("builtin:skimage")
    seen, unseen = items[::2], items[1::2]
    calibration = calibrate(family, seen, resolve_budget("mid", family.num_patches), data_source="test", batch_size=8)
    tokens = measure_tokens(family, unseen, calibration.thresholds, batch_size=8)
    mean = sum(tokens) / len(tokens)
    assert abs(mean - calibration.target_tokens) <= 0.25 * calibration.target_tokens, (mean, tokens)
    assert len(set(tokens)) > 3  # dynamic: busy photographs keep more tokens than plain ones


def test_the_stored_calibrations_are_ordered_and_made_for_these_weights(family):
    means = []
    for budget in ("low", "mid", "high"):
        calibration = Calibration.load(find("calib", family.name, f"{budget}.yaml"))
        assert calibration.provenance.vision_hash == family.vision_weights_hash()
        means.append(calibration.achieved.mean)
    assert means == sorted(means)


def test_a_merged_token_carries_the_mean_deepstack_features_of_its_units(qwen3, photos):
    """Merging only in the last block (after both DeepStack taps, blocks 1 and 2 of 4), each merged token's
    DeepStack features are the mean of its units' stock ones, and its units' tap outputs are copied back."""
    from tokcomp.pipeline import Pipeline, Request

    assert list(qwen3.vision_config.deepstack_visual_indexes) == [1, 2]
    request = Request("what is it ?", images=[photos[0]])
    (stock,) = Pipeline(qwen3).visual_tokens([request])[0]
    with qwen3.attach_merging(FixedRRule([0, 0, 0, 6])) as state:
        qwen3.merging = state
        try:
            (merged,) = Pipeline(qwen3).visual_tokens([request])[0]
        finally:
            qwen3.merging = None
    assert merged.kept == stock.kept - 6 and merged.deepstack.shape[1] == merged.kept
    for entry in range(merged.kept):
        units = (merged.mapping == entry).nonzero().flatten()
        assert torch.allclose(merged.deepstack[:, entry], stock.deepstack[:, units].mean(dim=1), atol=1e-5)
