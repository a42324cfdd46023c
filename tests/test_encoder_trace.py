"""The encoder trace stage: what a method reads from the vision tower's attention, per LLM position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from tokcomp.methods.base import Method
from tokcomp.methods.dtome import FixedRRule, encoder_layers
from tokcomp.methods.trace import TraceSpec
from tokcomp.pipeline import Pipeline, Request


@dataclass
class Traced(Method):
    """Reads a trace and changes nothing; with ``merge`` it runs the merged path (ToMe with r=0)."""

    name: ClassVar[str] = "traced"
    layer: int = 0  # 0: the feature layer
    merge: bool = False

    def encoder_trace(self, adapter):
        return TraceSpec(self.layer or adapter.feature_layer, keys=True)

    def encoder_rule(self, adapter):
        return FixedRRule([0] * adapter.num_layers) if self.merge else None


def eager_trace(adapter, views: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view and patch: the eager attention score (CLS row, or mean received) and the keys, independently."""
    vision = adapter.vision_model
    vision.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = vision(views, output_attentions=True, output_hidden_states=True)
            block = encoder_layers(vision)[layer - 1]
            keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer - 1]))
    finally:
        vision.set_attn_implementation("sdpa")
    weights = out.attentions[layer - 1].float().mean(dim=1)  # (V, N, N), mean over heads
    keys = keys.view(*keys.shape[:2], block.self_attn.num_heads, -1).float().mean(dim=2)
    if adapter.has_cls:
        return weights[:, 0, 1:], keys[:, 1:]
    return weights.mean(dim=1), keys


def traced_units(adapter, request: Request, method: Method):
    with method(adapter):
        return Pipeline(adapter, method).visual_tokens([request])[0]


@pytest.mark.parametrize("layer", [0, 3])
def test_the_trace_is_the_eager_attention_of_that_layer_at_every_position(adapter, photos, layer):
    request = Request("describe it", [photos[1]])  # a lone OneVision image: AnyRes base view and crops
    (unit,) = adapter.prepare_units([photos[1]], None)
    (tokens,) = traced_units(adapter, request, Traced(layer=layer))
    scores, keys = eager_trace(adapter, unit.views, layer or adapter.feature_layer)
    view, patch = tokens.provenance.T
    exact = patch >= 0
    assert tokens.trace.shape == (tokens.num_positions,) and int(exact.sum()) >= adapter.num_patches
    torch.testing.assert_close(tokens.trace[exact], scores[view[exact], patch[exact]], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(tokens.trace_keys[exact], keys[view[exact], patch[exact]], rtol=1e-5, atol=1e-6)
    assert torch.isnan(tokens.trace[view < 0]).all() and not torch.isnan(tokens.trace[view >= 0]).any()  # newlines
    if adapter.family == "llava_onevision":  # the crops are there too, unpadded as the stock model packs them
        assert set(view.tolist()) == set(range(-1, unit.views.shape[0]))


def test_a_pooled_video_position_carries_the_mean_score_of_its_patches(llava_ov, photos):
    frames = photos[:3]
    (unit,) = llava_ov.prepare_units([], frames)
    (tokens,) = traced_units(llava_ov, Request("describe it", video=frames), Traced())
    scores, _ = eager_trace(llava_ov, unit.views, llava_ov.feature_layer)
    h, w = llava_ov.grid
    pooled = torch.nn.functional.avg_pool2d(scores.view(len(frames), 1, h, w), 2).flatten()  # 2x2 means
    torch.testing.assert_close(tokens.trace[:-1], pooled, rtol=1e-5, atol=1e-8)
    assert tokens.provenance[:-1, 1].eq(-1).all() and tokens.provenance[-1].tolist() == [-1, -1]
    assert tokens.provenance[:-1, 0].tolist() == torch.arange(3).repeat_interleave(h * w // 4).tolist()


def test_the_merged_path_traces_the_same(adapter, photos):
    request = Request("describe it", photos[:2])
    stock = traced_units(adapter, request, Traced())
    merged = traced_units(adapter, request, Traced(merge=True))
    for a, b in zip(stock, merged, strict=True):
        assert torch.equal(a.provenance, b.provenance)
        torch.testing.assert_close(a.trace, b.trace, rtol=1e-5, atol=1e-8, equal_nan=True)
        torch.testing.assert_close(a.trace_keys, b.trace_keys, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_detaching_removes_the_trace_and_the_plain_model_is_unchanged(adapter, photos):
    attention = [block.self_attn for block in encoder_layers(adapter.vision_model)]
    before = [dict(a._forward_hooks) for a in attention]
    request = Request("describe it", photos[:2])
    plain = Pipeline(adapter)
    expected = plain.generate([request], 2)[0].token_ids
    method = Traced()
    with method(adapter):
        traced = adapter.feature_layer - 1
        assert adapter.trace is not None and len(attention[traced]._forward_hooks) == len(before[traced]) + 1
        pipe = Pipeline(adapter, method)
        assert pipe.generate([request], 2)[0].token_ids == expected
        logits = pipe.last_prefill_logits
    assert adapter.trace is None and [dict(a._forward_hooks) for a in attention] == before
    plain.generate([request], 2)
    assert torch.equal(logits, plain.last_prefill_logits)
    assert all(u.trace is None for u in plain.visual_tokens([request])[0])  # nobody asked for one
