"""DToMe inside the stock CLIP and SigLIP encoders of the two tiny presets."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from tokcomp.methods import merge as M
from tokcomp.methods.dtome import FixedRRule, ThresholdRule, attach_merging, encoder_layers

INF = math.inf


def test_infinite_thresholds_are_bit_identical_to_the_stock_encoder(adapter, photos):
    pixels = adapter.encoder_views(photos[:3])
    with torch.no_grad():
        stock = adapter.vision_model(pixels, output_hidden_states=True)
        with attach_merging(
            adapter.vision_model, ThresholdRule([INF] * adapter.num_layers), protected=adapter.protected
        ):
            hooked = adapter.vision_model(pixels, output_hidden_states=True)
    assert torch.equal(stock.last_hidden_state, hooked.last_hidden_state)
    for a, b in zip(stock.hidden_states, hooked.hidden_states, strict=True):
        assert torch.equal(a, b)
    encoded = adapter.encode(pixels, ThresholdRule([INF] * adapter.num_layers))
    stock_features = stock.hidden_states[adapter.model.config.vision_feature_layer]
    if adapter.drops_cls:
        stock_features = stock_features[:, 1:]
    for b, enc in enumerate(encoded):
        assert torch.equal(enc.features, stock_features[b])
        assert enc.num_tokens == adapter.num_patches
        assert enc.layer_counts == [adapter.num_patches] * adapter.num_layers
    if adapter.family == "llava":  # and through the stock get_image_features + projector
        with torch.no_grad():
            projected = adapter.model.model.get_image_features(pixel_values=pixels).pooler_output
            for enc, feat in zip(encoded, projected, strict=True):
                assert torch.equal(adapter.model.model.multi_modal_projector(enc.features), feat)


def test_pooling_head_with_sizes_equals_the_stock_head_on_duplicated_tokens():
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8
    )
    model = SiglipVisionModel(config).eval()
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        stock = model(pixels).pooler_output
        with attach_merging(model, ThresholdRule([INF] * 4), protected=0):
            same = model(pixels).pooler_output
        assert torch.equal(stock, same)
        with attach_merging(model, FixedRRule([8, 8, 8, 0]), protected=0) as state:
            merged = model(pixels)
        snap = state.current
        for b in range(2):
            valid = snap.valid[b]
            tokens = merged.last_hidden_state[b][valid]
            expanded = tokens[snap.source[b]]  # each merged token repeated once per original patch
            reference = model.head(expanded[None])
            assert torch.allclose(merged.pooler_output[b], reference[0], atol=1e-5)


def test_source_maps_partition_patches_and_counts_match(adapter, photos):
    pixels = adapter.encoder_views(photos)
    rule = ThresholdRule([0.9] * adapter.num_layers)
    with torch.no_grad(), attach_merging(adapter.vision_model, rule, protected=adapter.protected) as state:
        adapter.vision_model(pixels)
    for k, snap in enumerate(state.snapshots):
        counts = snap.valid.sum(dim=1)
        for b in range(len(photos)):
            n = int(counts[b])
            src = snap.source[b]
            assert src.min() == 0 and src.max() == n - 1
            assert torch.equal(torch.bincount(src, minlength=n).float(), snap.sizes[b, :n])
            assert snap.sizes[b].sum() == src.numel()
            assert (snap.sizes[b, n:] == 0).all()
            if k and adapter.protected:
                assert src[0] == 0  # CLS never merges
    encoded = adapter.encode(pixels, rule)
    for enc in encoded:
        assert enc.source.shape == (adapter.num_patches,)
        assert torch.equal(torch.unique(enc.source), torch.arange(enc.num_tokens))
        assert int(enc.sizes.sum()) == adapter.num_patches
        assert torch.equal(torch.bincount(enc.source, minlength=enc.num_tokens).float(), enc.sizes)
        assert enc.layer_counts[adapter.feature_layer - 1] == enc.num_tokens
        assert all(a >= b for a, b in zip(enc.layer_counts, enc.layer_counts[1:], strict=False))
    assert len({e.num_tokens for e in encoded}) > 1  # dynamic: images differ


def test_batch_and_one_at_a_time_agree(adapter, photos):
    rule = ThresholdRule([0.93] * adapter.num_layers)
    batch = adapter.encode(adapter.encoder_views(photos), rule)
    assert len({e.num_tokens for e in batch}) > 1  # the batch really holds different lengths
    for photo, together in zip(photos, batch, strict=True):
        alone = adapter.encode(adapter.encoder_views([photo]), rule)[0]
        assert alone.layer_counts == together.layer_counts
        assert torch.equal(alone.source, together.source)
        assert torch.equal(alone.sizes, together.sizes)
        assert torch.allclose(alone.features, together.features, atol=1e-5, rtol=1e-4)


def test_uniform_image_merges_far_more_than_texture(adapter, flat_image, photos):
    gravel, brick = photos[5], photos[4]
    rule = ThresholdRule([0.97] * adapter.num_layers)
    flat, grav, brk = adapter.encode(adapter.encoder_views([flat_image, gravel, brick]), rule)
    assert flat.num_tokens * 3 <= grav.num_tokens
    assert flat.num_tokens <= brk.num_tokens


def test_merged_tokens_are_size_weighted_means_in_the_first_merging_layer(adapter, photos):
    """One merging layer: merged hidden state = size-weighted mean of the stock layer's residual stream."""
    pixels = adapter.encoder_views(photos[:2])
    rule = ThresholdRule([0.9] + [INF] * (adapter.num_layers - 1))
    layer0 = encoder_layers(adapter.vision_model)[0]
    captured = {}
    handle = layer0.layer_norm2.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            stock_embeds = adapter.vision_model(pixels, output_hidden_states=True).hidden_states[0]
            layer_in = stock_embeds
            residual = layer_in + layer0.self_attn(layer0.layer_norm1(layer_in))[0]
            captured.clear()
            with attach_merging(adapter.vision_model, rule, protected=adapter.protected) as state:
                adapter.vision_model(pixels)
    finally:
        handle.remove()
    snap = state.snapshots[1]
    merged_stream = captured["x"]
    for b in range(2):
        n = int(snap.valid[b].sum())
        for j in range(n):
            members = snap.source[b] == j
            assert torch.allclose(merged_stream[b, j], residual[b, members].mean(0), atol=1e-5)


def test_detaches_cleanly(adapter, photos):
    pixels = adapter.encoder_views(photos[:1])
    with torch.no_grad():
        before = adapter.vision_model(pixels).last_hidden_state
        with attach_merging(
            adapter.vision_model, ThresholdRule([0.5] * adapter.num_layers), protected=adapter.protected
        ):
            shortened = adapter.vision_model(pixels).last_hidden_state
        after = adapter.vision_model(pixels).last_hidden_state
    assert shortened.shape[1] < before.shape[1]
    assert torch.equal(before, after)
    for layer in encoder_layers(adapter.vision_model):
        assert "forward" not in layer.__dict__
        assert not layer.self_attn.k_proj._forward_hooks


def test_reference_order_changes_layout_not_bookkeeping(llava, photos):
    pixels = llava.encoder_views(photos[:2])
    rule = ThresholdRule([0.9] * llava.num_layers)
    for enc in llava.encode(pixels, rule, token_order="reference"):
        assert int(enc.sizes.sum()) == llava.num_patches
        assert torch.equal(torch.bincount(enc.source, minlength=enc.num_tokens).float(), enc.sizes)


def test_proportional_attention_is_used_after_a_merge(llava, photos):
    """Dropping the size bias changes the encoder output once tokens have merged."""
    pixels = llava.encoder_views(photos[:1])
    rule = ThresholdRule([0.9] * llava.num_layers)
    with torch.no_grad(), attach_merging(llava.vision_model, rule, protected=1) as state:
        with_bias = llava.vision_model(pixels).last_hidden_state
        state.attention_bias = lambda dtype: None  # type: ignore[method-assign]
        without = llava.vision_model(pixels).last_hidden_state
    assert with_bias.shape == without.shape
    assert not torch.allclose(with_bias, without)
    bias = M.proportional_bias(torch.tensor([[2.0]]), torch.tensor([[True]]), torch.float32)
    assert bias.item() == pytest.approx(math.log(2))
