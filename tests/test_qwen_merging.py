"""DToMe on Qwen2.5-VL's windowed vision tower, on whole 2x2 merge units (tokcomp.models.qwen_merging)."""

from __future__ import annotations

import torch

import tokcomp
from tokcomp.calibrate import calibrate, measure_tokens, resolve_budget
from tokcomp.config import Calibration
from tokcomp.data.images import open_image_source
from tokcomp.methods.dtome import FixedRRule, ThresholdRule
from tokcomp.models.qwen_merging import _sized_attention
from tokcomp.resources import find


def test_merge_maps_partition_the_units_and_sizes_add_up(qwen, photos):
    views = qwen.encoder_views(photos[:3])
    units = qwen.num_patches
    for encoded in qwen.encode(views, FixedRRule([5] * qwen.num_layers)):
        assert sorted(set(encoded.source.tolist())) == list(range(encoded.num_tokens))
        assert float(encoded.sizes.sum()) == units
        assert encoded.layer_counts == [units - 5 * (i + 1) for i in range(qwen.num_layers)]
        assert encoded.num_tokens == units - 5 * qwen.num_layers


def test_no_merge_is_the_stock_tower_bit_for_bit(qwen, photos):
    views = qwen.encoder_views(photos[:2])
    plain = qwen.encode(views)
    off = qwen.encode(views, ThresholdRule([float("inf")] * qwen.num_layers))
    for a, b in zip(plain, off, strict=True):
        assert torch.equal(a.features, b.features[b.source])


def test_sized_attention_is_the_stock_attention_and_a_size_counts_as_copies(qwen):
    """With every size 1 it is the stock block attention; a key of size 2 weighs as two equal keys."""
    torch.manual_seed(0)
    attn = qwen.vision_model.blocks[0].attn
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


def test_stock_generate_with_dymu_merges_and_the_pipeline_agrees(qwen, photos):
    from stock_inputs import stock_inputs

    from tokcomp.pipeline import Pipeline, Request

    images = [[photos[0]], [photos[1].resize((140, 84))]]
    prompts = ["what is in the picture ?", "and here ?"]
    inputs = stock_inputs(qwen, prompts, images, [None, None])
    gen = {"max_new_tokens": 3, "do_sample": False}
    for name in ("dymu", "dtome"):
        method = tokcomp.method(name, budget="mid")
        with torch.no_grad(), method(qwen.model):
            out = qwen.model.generate(**inputs, **gen)
        accounts = method.accounts
        assert all(a.visual_kept < a.visual_full for a in accounts)
        positions = [a.visual_positions for a in accounts]
        assert positions == ([a.visual_full for a in accounts] if name == "dymu" else [a.visual_kept for a in accounts])
        requests = [Request(p, images=i) for p, i in zip(prompts, images, strict=True)]
        answers = Pipeline(qwen, method.resolve(qwen)).generate(requests, max_new_tokens=3)
        start = inputs["input_ids"].shape[1]
        for got, row in zip(answers, out, strict=True):
            assert got.token_ids == row[start:].tolist()[: len(got.token_ids)]


def test_images_of_different_sizes_merge_in_one_tower_call_as_they_do_alone(qwen, photos):
    """Segments of different lengths in one packed call (padding in the merge state): each image keeps
    the tokens it keeps alone, and its map covers exactly its own units."""
    from tokcomp.pipeline import Pipeline, Request

    images = [photos[0], photos[1].resize((140, 84)), photos[2].resize((84, 140)), photos[3]]
    method = tokcomp.method("tome", r=3).resolve(qwen)
    together = Pipeline(qwen, method).generate([Request("compare them", images=images)], 2)[0].account.per_image
    alone = [Pipeline(qwen, method).generate([Request("what is it", images=[im])], 2)[0].account.per_image[0]
             for im in images]  # fmt: skip
    assert [p["kept"] for p in together] == [p["kept"] for p in alone]
    assert [p["full"] for p in together] == [p["full"] for p in alone]
    assert all(p["kept"] < p["full"] for p in together)


def test_a_calibration_holds_its_budget_on_images_it_did_not_see(qwen):
    """Calibrated on every other scikit-image photograph, measured on the rest (about 23 of 22 tokens)."""
    items = open_image_source("builtin:skimage")
    seen, unseen = items[::2], items[1::2]
    calibration = calibrate(qwen, seen, resolve_budget("mid", qwen.num_patches), data_source="test", batch_size=8)
    tokens = measure_tokens(qwen, unseen, calibration.thresholds, batch_size=8)
    mean = sum(tokens) / len(tokens)
    assert abs(mean - calibration.target_tokens) <= 0.25 * calibration.target_tokens, (mean, tokens)
    assert len(set(tokens)) > 3  # dynamic: busy photographs keep more tokens than plain ones


def test_the_stored_calibrations_are_ordered_and_made_for_these_weights(qwen):
    means = []
    for budget in ("low", "mid", "high"):
        calibration = Calibration.load(find("calib", "tiny-qwen2.5-vl", f"{budget}.yaml"))
        assert calibration.provenance.vision_hash == qwen.vision_weights_hash()
        means.append(calibration.achieved.mean)
    assert means == sorted(means)
