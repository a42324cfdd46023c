"""Encoder traces of the Qwen2.5-VL (windowed) and Qwen3-VL towers: the recomputed attention is the block's
own, scores are attention received within each segment, and each image's trace is its own."""

from __future__ import annotations

import pytest
import torch

from tokcomp.methods.trace import TraceSpec
from tokcomp.models.qwen_trace import attach_qwen_trace, received_attention, rotated_query_key


def _units(adapter, photos, count):
    return adapter.prepare_units([photos[i].resize((112 + 28 * i, 84 + 28 * i)) for i in range(count)], None)


@pytest.mark.parametrize("family", ["qwen", "qwen3"])
@pytest.mark.parametrize("layer", [1, 2])
def test_recomputed_attention_gives_the_block_output(request, photos, family, layer):
    """Softmax of the recomputed queries and keys, applied to the block's values, reproduces the stock
    attention's output segment by segment (windows in a windowed block): the rotary, the segments and the
    scaling are the block's."""
    adapter = request.getfixturevalue(family)
    tower = adapter.vision_model
    attn = tower.blocks[layer - 1].attn
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"], output=output)

    units = _units(adapter, photos, 2)
    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            tower(torch.cat([u.views for u in units]), grid_thw=torch.tensor([u.grid_thw for u in units]))
    finally:
        handle.remove()
    hidden, bounds = seen["hidden"], seen["cu_seqlens"]
    with torch.no_grad():
        q, k = rotated_query_key(attn, hidden, seen["position_embeddings"])
        v = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1)[:, 2].transpose(0, 1)
        pieces = []
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            probs = (q[:, start:end] @ k[:, start:end].transpose(-1, -2) * attn.scaling).softmax(-1)
            pieces.append((probs @ v[:, start:end]).transpose(0, 1).reshape(end - start, -1))
        out = attn.proj(torch.cat(pieces))
        assert torch.allclose(out, seen["output"], atol=1e-5)
        scores = received_attention(q, k, bounds, attn.scaling)
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        assert scores[start:end].sum().item() == pytest.approx(1.0, abs=1e-5)  # a mean of softmax rows


@pytest.mark.parametrize("family", ["qwen", "qwen3"])
def test_each_image_gets_its_own_trace_in_raster_order_of_its_tokens(request, photos, family):
    """One view per image with one score per LLM token; traced together or alone, an image's trace is the
    same (full-attention segments are per image); in a full-attention block a view's scores sum to a
    quarter (each token the mean of its 2x2 patches)."""
    adapter = request.getfixturevalue(family)
    tower = adapter.vision_model
    full = 2  # a full-attention block of both tiny towers (Qwen2.5-VL: fullatt_block_indexes [1, 3])
    units = _units(adapter, photos, 3)

    def traced(chosen):
        with attach_qwen_trace(tower, TraceSpec(full, keys=True)) as trace, torch.no_grad():
            tower(torch.cat([u.views for u in chosen]), grid_thw=torch.tensor([u.grid_thw for u in chosen]))
            return trace.take()

    together = traced(units)
    assert len(together) == 3
    for unit, view in zip(units, together, strict=True):
        assert view.scores.shape == (adapter._tokens_of(unit.grid_thw),)
        assert view.keys.shape[0] == view.scores.shape[0]
        assert view.scores.sum().item() == pytest.approx(0.25, abs=1e-5)
    for i, unit in enumerate(units):
        (alone,) = traced([unit])
        assert torch.allclose(alone.scores, together[i].scores, atol=1e-6)
        assert torch.allclose(alone.keys, together[i].keys, atol=1e-5)


def test_window_order_is_undone(qwen, photos):
    """In Qwen2.5-VL's window order a unit's rows sit elsewhere; the trace's keys per token are the keys
    of the patches of that token in raster order (recomputed here from the stock raster-order input)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    tower = qwen.vision_model
    (unit,) = qwen.prepare_units([photos[0].resize((168, 112))], None)
    grid = torch.tensor([unit.grid_thw])
    seen = {}
    handle = tower.blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True,
    )
    try:
        with attach_qwen_trace(tower, TraceSpec(1, keys=True)) as trace, torch.no_grad():
            tower(unit.views, grid_thw=grid)
            (view,) = trace.take()
    finally:
        handle.remove()
    window_index, _ = get_vision_window_index(grid, 2, tower.config.window_size, tower.config.patch_size)
    assert not torch.equal(window_index, torch.arange(window_index.numel()))  # the windows do reorder this image
    with torch.no_grad():
        hidden = tower.blocks[0].norm1(seen["hidden"])
        _, k = rotated_query_key(tower.blocks[0].attn, hidden, seen["pe"])
    per_unit = k.float().mean(0).view(-1, 4, k.shape[-1]).mean(1)  # window order
    raster = torch.empty_like(per_unit)
    raster[window_index] = per_unit
    assert torch.allclose(view.keys, raster, atol=1e-5)
