"""Encoder traces of the Qwen2.5-VL and Qwen3-VL vision towers (what VisionZip and PruMerge+ read).

Both towers pack every image and every temporal slice of a video into one sequence of patch rows and
attend within segments of it (``cu_seqlens``): whole slices in full-attention blocks, windows in
Qwen2.5-VL's windowed ones (whose rows are in window order). A forward hook on the traced block's
attention recomputes its queries and keys from the block's own input with its own fused ``qkv`` and the
stock rotary function, and scores every patch by the mean attention it receives from the queries of its
segment (averaged over heads), as SigLIP towers are scored (``tokcomp.methods.trace``); the block's
output is not touched. When the tower's forward ends, the patches' scores and keys are averaged over each
2x2 merge unit (the merger's LLM token), brought to raster order and split into one ``TraceView`` per
image or temporal slice, so a trace lines up with the LLM tokens ``stock_unit_tokens`` gives.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tokcomp.methods.trace import TraceSpec, TraceView
from tokcomp.models.qwen_tower import rotated_qkv, window_order, windowed

QUERY_CHUNK = 1024  # queries per softmax: bounds the (heads, chunk, segment) matrix of a large image


def rotated_query_key(
    attn: nn.Module, hidden: torch.Tensor, position_embeddings, qkv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, S, head_dim) queries and keys of a Qwen vision attention for packed rows ``hidden`` (S, D),
    after the 2-D rotary embedding, as its forward computes them (``qkv``: its fused projection of
    ``hidden``, if already computed)."""
    q, k, _ = rotated_qkv(attn, hidden, *position_embeddings, qkv)
    return q.transpose(0, 1), k.transpose(0, 1)


def received_attention(q: torch.Tensor, k: torch.Tensor, bounds: torch.Tensor, scaling: float) -> torch.Tensor:
    """(S,) float32: per row, the attention it receives averaged over the queries of its segment and the
    heads; segments are ``bounds`` (cumulative lengths, as ``cu_seqlens``)."""
    out = torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)
    heads = q.shape[0]
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if end <= start:
            continue
        keys = k[:, start:end].float()
        total = torch.zeros(end - start, dtype=torch.float32, device=q.device)
        for first in range(start, end, QUERY_CHUNK):
            logits = q[:, first : min(end, first + QUERY_CHUNK)].float() @ keys.transpose(-1, -2) * scaling
            total += logits.softmax(dim=-1).sum(dim=(0, 1))
        out[start:end] = total / (heads * (end - start))
    return out


@dataclass
class QwenTrace:
    """The views traced since the last ``take`` (one per image or temporal slice, in tower order)."""

    spec: TraceSpec
    tower: nn.Module
    views: list[TraceView] = field(default_factory=list)
    seconds: float = 0.0  # time spent recomputing the traced attention (the method's own work), all forwards
    _grids: torch.Tensor | None = None
    _rows: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def take(self) -> list[TraceView]:
        views, self.views = self.views, []
        return views

    def record(self, attn: nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings,
               qkv: torch.Tensor | None = None) -> None:  # fmt: skip
        start = time.perf_counter()
        with torch.no_grad():
            q, k = rotated_query_key(attn, hidden, position_embeddings, qkv)
            scores = received_attention(q, k, cu_seqlens, attn.scaling)
            keys = k.float().mean(dim=0) if self.spec.keys else None  # (S, head_dim)
        self._rows = (scores, keys)
        self.seconds += time.perf_counter() - start

    def finish(self) -> None:
        """The traced rows of the forward that just ended, as views of merge units in raster order."""
        if self._rows is None or self._grids is None:
            return
        scores, keys = self._rows
        self._rows = None
        unit = int(self.tower.spatial_merge_size) ** 2
        values = torch.cat([scores[:, None], *([keys] if keys is not None else [])], dim=1)
        per_unit = values.view(-1, unit, values.shape[-1]).mean(dim=1)  # tower order
        if windowed(self.tower):
            window_index, _ = window_order(self.tower, self._grids)
            per_unit = per_unit[torch.argsort(window_index.to(per_unit.device))]
        cursor = 0
        for t, h, w in self._grids.tolist():
            per_slice = h * w // unit
            for _ in range(t):
                rows = per_unit[cursor : cursor + per_slice]
                cursor += per_slice
                self.views.append(TraceView(rows[:, 0].clone(), rows[:, 1:].clone() if keys is not None else None))


@contextmanager
def attach_qwen_trace(tower: nn.Module, spec: TraceSpec) -> Iterator[QwenTrace]:
    """Trace ``spec`` (its layer counted from 1) on a Qwen2.5-VL or Qwen3-VL vision tower inside the block."""
    blocks = tower.blocks
    if not 1 <= spec.layer <= len(blocks):
        raise ValueError(f"trace layer {spec.layer} is not in 1..{len(blocks)}")
    trace = QwenTrace(spec, tower)

    def before(module, args, kwargs):
        grids = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        trace._grids = grids.detach().to("cpu", torch.long)

    fused: list[torch.Tensor] = []  # the traced block's own qkv projection, this forward

    def catch(module, args, output):
        fused[:] = [output]

    def traced(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        trace.record(module, hidden, cu, kwargs["position_embeddings"], fused[0] if fused else None)
        fused.clear()

    def after(module, args, kwargs, output):
        trace.finish()

    handles = [
        tower.register_forward_pre_hook(before, with_kwargs=True),
        blocks[spec.layer - 1].attn.qkv.register_forward_hook(catch),
        blocks[spec.layer - 1].attn.register_forward_hook(traced, with_kwargs=True),
        tower.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()
