"""Pure merge math for bipartite token merging (ToMe / DToMe), batched with variable lengths.

Every function here is stateless. A layer's merge is described by a :class:`MergePlan`: for each
token of the current (padded) sequence, the index of the token it is summed into (itself when it
survives) and whether it disappears. The same plan is then applied to features, sizes and the
patch-to-token source map, so they can never disagree.

Tokens are split by parity of their current index: A = even, B = odd. Each A token proposes one edge
to its most similar B token (cosine similarity of the metric, computed in fp32). Which edges merge is
decided by a rule: a similarity threshold (DToMe), the top ``r`` per image (ToMe), or the top ``k``
over the whole batch (threshold calibration). An image never merges more than
``(valid - protected) // 2`` tokens in one layer, and protected leading tokens (CLS) never merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TokenOrder = Literal["spatial", "reference"]


@dataclass(frozen=True)
class Edges:
    """Best A->B edge of every A token: scores (B, Na) in fp32 (-inf where not mergeable), dest (B, Na)."""

    scores: torch.Tensor
    dest_b: torch.Tensor
    cap: torch.Tensor  # (B,) most merges allowed per image in this layer


@dataclass(frozen=True)
class MergePlan:
    """What one layer's merge does to a padded batch of ``N`` tokens."""

    dest: torch.Tensor  # (B, N) long: token each token is summed into (itself if it survives)
    merged: torch.Tensor  # (B, N) bool: token disappears into another one
    order: torch.Tensor  # (B, N') long: surviving tokens, in output order, padded with 0
    new_valid: torch.Tensor  # (B, N') bool
    num_merged: torch.Tensor  # (B,) long

    @property
    def new_length(self) -> int:
        return self.order.shape[1]


def best_edges(metric: torch.Tensor, valid: torch.Tensor, protected: int) -> Edges:
    """Cosine similarity of each A (even) token to its best B (odd) token, within each image."""
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]
    if b.shape[1] == 0:
        empty = torch.full(a.shape[:2], float("-inf"), device=m.device)
        return Edges(scores=empty, dest_b=torch.zeros_like(empty, dtype=torch.long), cap=valid.sum(1) * 0)
    scores = a @ b.transpose(-1, -2)
    valid_a, valid_b = valid[:, ::2], valid[:, 1::2]
    scores = scores.masked_fill(~valid_b[:, None, :], float("-inf"))
    best, dest_b = scores.max(dim=-1)
    best = best.masked_fill(~valid_a, float("-inf"))
    if protected:
        best[:, : (protected + 1) // 2] = float("-inf")
    counts = valid.sum(dim=1)
    cap = ((counts - protected).clamp_min(0)) // 2
    return Edges(scores=best, dest_b=dest_b, cap=cap)


def _rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry of each row when sorted descending (stable, ties keep index order)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank


def select_by_threshold(edges: Edges, threshold: float) -> torch.Tensor:
    """DToMe rule: every edge with similarity strictly above ``threshold``, capped per image."""
    above = edges.scores > threshold
    rank = _rank_desc(edges.scores)
    return above & (rank < edges.cap[:, None])


def select_top_r(edges: Edges, r: int) -> torch.Tensor:
    """ToMe rule: the ``r`` most similar edges of each image (fewer if the image is too short)."""
    finite = torch.isfinite(edges.scores)
    rank = _rank_desc(edges.scores)
    limit = edges.cap.clamp(max=r)
    return finite & (rank < limit[:, None])


def select_top_k_batch(edges: Edges, k: int) -> tuple[torch.Tensor, float]:
    """Calibration rule: the ``k`` most similar edges of the whole batch, each image within its cap.

    Returns the chosen edges and the threshold at the cut: the score of the best edge that was
    *not* chosen, clamped to >= 0 (``+inf``-free; 0 when every eligible edge was chosen).
    """
    rank = _rank_desc(edges.scores)
    eligible = torch.isfinite(edges.scores) & (rank < edges.cap[:, None])
    flat = edges.scores.masked_fill(~eligible, float("-inf")).flatten()
    n_eligible = int(eligible.sum())
    k = max(0, min(k, n_eligible))
    order = torch.sort(flat, descending=True, stable=True).indices
    chosen_flat = torch.zeros_like(flat, dtype=torch.bool)
    chosen_flat[order[:k]] = True
    cut = float(flat[order[k]]) if k < n_eligible else 0.0
    return chosen_flat.view_as(edges.scores), max(cut, 0.0)


def plan_merge(
    edges: Edges,
    chosen: torch.Tensor,
    valid: torch.Tensor,
    protected: int,
    order: TokenOrder = "spatial",
) -> MergePlan:
    """Turn the chosen A->B edges into a :class:`MergePlan`.

    ``spatial`` keeps survivors in their current relative order (so a sequence that starts in raster
    order stays in raster order of each group's destination). ``reference`` reproduces the published
    DyMU/ToMe layout: protected tokens, then unmerged A tokens (by index when there is a protected CLS,
    otherwise by descending edge score), then all B tokens.
    """
    bsz, n = valid.shape
    device = valid.device
    idx = torch.arange(n, device=device).expand(bsz, n)
    a_pos = idx[:, ::2]
    dest = idx.clone()
    dest[:, ::2] = torch.where(chosen, 2 * edges.dest_b + 1, a_pos)
    merged = torch.zeros(bsz, n, dtype=torch.bool, device=device)
    merged[:, ::2] = chosen
    survives = valid & ~merged

    big = 4 * n + 1
    if order == "spatial":
        key = idx.clone()
    else:
        key = torch.empty(bsz, n, dtype=torch.long, device=device)
        key[:, 1::2] = 2 * n + idx[:, 1::2]
        if protected:
            key[:, ::2] = a_pos
        else:
            key[:, ::2] = _rank_desc(edges.scores)
        key[:, :protected] = -1 - (protected - idx[:, :protected])
    key = key.masked_fill(~survives, big)
    sorted_order = torch.sort(key, dim=1, stable=True).indices
    counts = survives.sum(dim=1)
    new_len = int(counts.max()) if bsz else 0
    out_order = sorted_order[:, :new_len]
    new_valid = torch.arange(new_len, device=device)[None, :] < counts[:, None]
    out_order = out_order.masked_fill(~new_valid, 0)
    return MergePlan(dest=dest, merged=merged, order=out_order, new_valid=new_valid, num_merged=chosen.sum(dim=1))


def merge_sum(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Sum every token into its destination, then keep the survivors in output order: (B, N', ...)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    summed = torch.zeros_like(flat).scatter_add_(1, plan.dest[..., None].expand_as(flat), flat)
    out = summed.gather(1, plan.order[..., None].expand(-1, -1, flat.shape[-1]))
    return out.reshape(x.shape[0], plan.new_length, *x.shape[2:])


def merge_weighted(x: torch.Tensor, sizes: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of features (B, N, C) and summed sizes (B, N); padding gets size 0."""
    new_sizes = merge_sum(sizes, plan).masked_fill(~plan.new_valid, 0)
    weighted = merge_sum(x * sizes[..., None].to(x.dtype), plan)
    denom = new_sizes.clamp_min(1).to(x.dtype)[..., None]
    return weighted / denom, new_sizes


def remap_source(source: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Update a source map (B, P): original position -> current token index, through one merge."""
    bsz, n = plan.dest.shape
    new_index = torch.full((bsz, n + 1), -1, dtype=torch.long, device=source.device)
    positions = torch.arange(plan.new_length, device=source.device).expand(bsz, -1)
    slots = plan.order.masked_fill(~plan.new_valid, n)  # padding writes into a spare column
    new_index.scatter_(1, slots, positions)
    return new_index[:, :n].gather(1, plan.dest.gather(1, source))


def proportional_bias(sizes: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, 1, N): log(size) for real tokens, the dtype's minimum for padding."""
    bias = sizes.clamp_min(1).to(torch.float32).log()
    bias = bias.masked_fill(~valid, torch.finfo(torch.float32).min)
    return bias.to(dtype)[:, None, None, :]


def source_matrix(source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """0/1 matrix (num_tokens, P) of one image's source map: row j marks the patches token j covers."""
    out = torch.zeros(num_tokens, source.shape[0], dtype=torch.int32)
    out[source, torch.arange(source.shape[0])] = 1
    return out
