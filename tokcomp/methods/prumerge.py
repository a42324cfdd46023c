"""PruMerge+ (Shang et al., 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models"): per encoder view, keep the patches whose encoder attention is an outlier (above
Q3 + 1.5 IQR, so the count adapts to the image), add patches sampled evenly over the grid (the "+"),
and let each kept token absorb its nearest neighbours by key similarity, weighted by their attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.errors import TokcompError
from tokcomp.methods import selection as S
from tokcomp.methods.settings import register
from tokcomp.methods.views import TracedViewSelection


def attention_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Indices (sorted) of the scores above ``Q3 + 1.5 IQR`` (linear-interpolated quartiles)."""
    q1, q3 = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return torch.nonzero(scores.double() > q3 + 1.5 * (q3 - q1)).flatten()


def spread_samples(count: int, chosen: torch.Tensor, spread: float) -> torch.Tensor:
    """Positions every ``stride`` in raster order that ``chosen`` lacks, ``stride = (count / len(chosen)) /
    spread`` (at least 1): about ``spread`` samples per outlier, evenly over the view."""
    stride = max(1, int(count / max(1, chosen.numel()) / spread))
    grid = torch.arange(0, count, stride)
    return grid[~torch.isin(grid, chosen)]


def absorbing_groups(keys: torch.Tensor, kept: torch.Tensor, neighbours: int) -> list[torch.Tensor]:
    """For each kept index, itself and its ``neighbours`` most key-similar other positions (any of the
    view's, kept or not), most similar first; near-ties to the lower index."""
    similarity = S.cosine_matrix(keys[kept].float(), keys.float())
    groups = []
    for row, own in zip(similarity, kept.tolist(), strict=True):
        row = row.clone()
        row[own] = float("-inf")
        take = S.top_k_stable(row, min(neighbours, keys.shape[0] - 1)) if neighbours else kept[:0]
        groups.append(torch.cat([torch.tensor([own]), take]))
    return groups


@register
@dataclass
class PruMergePlus(TracedViewSelection):
    """PruMerge+: per view the attention outliers plus even samples (``spread`` per outlier), each kept
    token the attention-weighted mean of itself and its ``neighbours`` nearest by key."""

    name: ClassVar[str] = "prumerge"
    spread: float = 3.0  # even samples per outlier (the "+"; 0: PruMerge, outliers only)
    neighbours: int = 32  # tokens each kept one absorbs (0: none)

    def check_settings(self) -> None:
        if self.spread < 0 or self.neighbours < 0:
            raise TokcompError("prumerge: spread and neighbours must be >= 0")

    def view_groups(self, scores: torch.Tensor, keys: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        kept = attention_outliers(scores)
        if not kept.numel():  # attention with no outlier: its peak stands for them
            kept = S.top_k_stable(scores, 1)
        if self.spread:
            kept = torch.cat([kept, spread_samples(scores.shape[0], kept, self.spread)]).sort().values
        groups = absorbing_groups(keys, kept, self.neighbours)
        return groups, [scores[g].float() for g in groups]
