"""Analytic FLOPs (multiply-add = 2 FLOPs) of the vision encoder and the LLM, from the token counts a
run actually had. Matrix products only: norms, activations and softmax are left out."""

from __future__ import annotations


def vit_layer(tokens_in: int, tokens_out: int, hidden: int, mlp: int) -> float:
    """One ViT layer: Q/K/V/O and attention on the incoming tokens, the MLP on those left after merging."""
    projections = 2 * tokens_in * 4 * hidden * hidden
    attention = 2 * 2 * tokens_in * tokens_in * hidden
    feed_forward = 2 * tokens_out * 2 * hidden * mlp
    return float(projections + attention + feed_forward)


def vision_flops(per_layer: list[int], start: int, hidden: int, mlp: int) -> float:
    """Encoder FLOPs given the tokens after each layer (``start`` before the first)."""
    total, tokens = 0.0, start
    for after in per_layer:
        total += vit_layer(tokens, after, hidden, mlp)
        tokens = after
    return total


def windowed_vit_flops(patches: int, config, layers: int) -> float:
    """Qwen2.5-VL's encoder on ``patches`` patches over ``layers`` blocks: Q/K/V/O and a gated MLP per
    patch, attention over all patches in the full-attention blocks and within a window elsewhere, then
    the 2x2 merger (two matrices on one row per four patches)."""
    hidden, mlp = config.hidden_size, config.intermediate_size
    window = min(patches, (config.window_size // config.patch_size) ** 2)  # patches in one window
    full = set(config.fullatt_block_indexes)
    total = 0.0
    for block in range(layers):
        seen = patches if block in full else window
        total += 2 * patches * 4 * hidden * hidden + 2 * 2 * patches * seen * hidden + 2 * patches * 3 * hidden * mlp
    merged, width = patches // config.spatial_merge_size**2, hidden * config.spatial_merge_size**2
    return float(total + 2 * merged * (width * width + width * config.out_hidden_size))


def llm_layer_prefill(tokens: int, attended: int, config) -> float:
    """One decoder layer's prefill: projections and gated MLP on ``tokens``, causal attention over
    ``attended`` positions (more than ``tokens`` under VTU)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_dim, kv_dim = heads * head_dim, config.num_key_value_heads * head_dim
    projections = 2 * tokens * (hidden * (q_dim + 2 * kv_dim) + q_dim * hidden)
    feed_forward = 2 * tokens * 3 * hidden * config.intermediate_size
    attention = 2 * 2 * attended * attended * q_dim / 2
    return float(projections + feed_forward + attention)


def llm_layer_decode(keys: float, config) -> float:
    """One decoder layer for one new token attending to ``keys`` cached positions."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_dim, kv_dim = heads * head_dim, config.num_key_value_heads * head_dim
    weights = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * config.intermediate_size
    return float(2 * weights + 2 * 2 * keys * q_dim)


def lm_head(hidden: int, vocab: int) -> float:
    return float(2 * hidden * vocab)
