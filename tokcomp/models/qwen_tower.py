"""What tokcomp's hooks on a Qwen2.5-VL or Qwen3-VL vision tower share: whether the tower has windows, the
window order of its packed rows, and a block's queries, keys and values as its attention computes them."""

from __future__ import annotations

import torch
from torch import nn


def windowed(tower: nn.Module) -> bool:
    """Whether the tower has windowed blocks (Qwen2.5-VL) or attends to whole segments throughout (Qwen3-VL)."""
    return hasattr(tower, "fullatt_block_indexes")


def window_order(tower: nn.Module, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's window order (window-order merge unit -> raster merge unit) and the cumulative row lengths
    of its windows, from the stock helpers; a tower without windows keeps raster order, one window a segment."""
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_window_index

    if windowed(tower):
        return get_vision_window_index(grid_thw, spatial_merge_size=tower.spatial_merge_size,
                                       window_size=tower.window_size, patch_size=tower.patch_size)  # fmt: skip
    units = int(grid_thw.prod(dim=-1).sum()) // int(tower.spatial_merge_size) ** 2
    return torch.arange(units), get_vision_attention_seqlens(grid_thw, tower.config)[0]


def rotated_qkv(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, heads, head_dim) queries and keys after the 2-D rotary embedding, and values, of a Qwen vision
    attention for packed rows ``hidden`` (S, D), as its forward computes them (``fused``: its ``qkv``
    projection of ``hidden``, if already computed)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    rows = hidden.shape[0]
    fused = fused if fused is not None and fused.shape[0] == rows else attn.qkv(hidden)
    q, k, v = fused.reshape(rows, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q, k, v
