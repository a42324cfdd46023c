"""Virtual Token Unmerging (VTU, DyMU §3) through a registered attention function.

The language model runs on the *unique* sequence: text tokens plus one embedding per merged visual
token. Norms, MLPs and the Q/K/V/O projections are token-wise, so they commute with the map ``M``
that copies each unique token to the full-length positions it stands for. Only attention needs the
full sequence. During a VTU prefill the model is called with every position id set to 0, which makes
the stock rotary embedding an exact identity (cos = 1, sin = 0); the registered attention function
then

1. expands Q, K and V to full length with the map,
2. applies RoPE at the true full-length positions (the model's own rotary module and function; for
   an M-RoPE model the stock 3-D positions, while the causal mask follows the sequence order),
3. attends with a causal mask over the full sequence (plus padding, plus a sliding window if any),
4. stores the full-length RoPE'd K/V in the cache, so decoding continues as if nothing was merged,
5. averages the output back over each group ((MᵀM)⁻¹Mᵀ, before ``o_proj``, which is linear).

Decoding steps use the true positions and the stock attention over the cached keys. The KV cache is
therefore full length: VTU saves prefill compute in the linear layers, not decode memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache


@dataclass
class VTUState:
    """What the attention function needs for one batch: maps, positions, padding, the cache."""

    mapping: torch.Tensor  # (B, L_full) long: full position -> index in the unique (LLM input) axis
    full_valid: torch.Tensor  # (B, L_full) bool: False on left padding
    positions: torch.Tensor  # (B, L_full) long: true positions (the causal order)
    num_unique: int
    cache: Cache | None
    rotary: nn.Module
    # M-RoPE models: (3, B, L_full) the stock 3-D positions RoPE is applied at (else ``positions``)
    rope_positions: torch.Tensor | None = None
    _rope: dict = field(default_factory=dict)

    def rope(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._rope:
            at = self.positions if self.rope_positions is None else self.rope_positions
            self._rope[key] = self.rotary(like, position_ids=at)
        return self._rope[key]


def _expand(x: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """(B, H, L_un, D) -> (B, H, L_full, D) by copying unique tokens to their positions."""
    index = mapping[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return x.gather(2, index)


def group_mean(x: torch.Tensor, mapping: torch.Tensor, valid: torch.Tensor, num_unique: int) -> torch.Tensor:
    """(B, H, L_full, D) -> (B, H, L_un, D): mean over the full positions of each unique token."""
    b, h, _, d = x.shape
    index = mapping[:, None, :, None].expand(-1, h, -1, d)
    weights = valid[:, None, :, None].to(x.dtype)
    summed = torch.zeros(b, h, num_unique, d, dtype=x.dtype, device=x.device).scatter_add_(2, index, x * weights)
    counts = torch.zeros(b, num_unique, dtype=x.dtype, device=x.device).scatter_add_(1, mapping, valid.to(x.dtype))
    return summed / counts.clamp_min(1)[:, None, :, None]


def _full_mask(state: VTUState, window: int | None) -> torch.Tensor:
    """Boolean (B, 1, L, L): causal over true positions, keys on padding hidden, diagonal always on."""
    pos = state.positions
    causal = pos[:, None, :] <= pos[:, :, None]
    if window:
        causal &= pos[:, :, None] - pos[:, None, :] < window
    allowed = causal & state.full_valid[:, None, :]
    eye = torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device)[None]
    return (allowed | eye)[:, None]


def attend(query, key, value, mask, scaling):
    """SDPA with a boolean mask; grouped K/V heads are repeated to the query heads."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def vtu_prefill(module: nn.Module, query, key, value, scaling, state: VTUState) -> torch.Tensor:
    """VTU attention for one layer's prefill; returns (B, L_un, H, D) like an attention function."""
    rotary_apply = sys.modules[type(module).__module__].apply_rotary_pos_emb
    q_full = _expand(query, state.mapping)
    k_full = _expand(key, state.mapping)
    v_full = _expand(value, state.mapping)
    cos, sin = state.rope(q_full)
    q_full, k_full = rotary_apply(q_full, k_full, cos, sin)
    if state.cache is not None:
        layer = state.cache.layers[module.layer_idx]
        layer.keys, layer.values = k_full, v_full
    out = attend(q_full, k_full, v_full, _full_mask(state, getattr(module, "sliding_window", None)), scaling)
    out = group_mean(out, state.mapping, state.full_valid, state.num_unique)
    return out.transpose(1, 2).contiguous()
