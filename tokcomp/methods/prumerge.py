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
from tokcomp.methods.base import Method
from tokcomp.methods.settings import register
from tokcomp.methods.trace import TraceSpec
from tokcomp.models.visual import UnitTokens, merge_positions


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
class PruMergePlus(Method):
    """PruMerge+: per view the attention outliers plus even samples (``spread`` per outlier), each kept
    token the attention-weighted mean of itself and its ``neighbours`` nearest by key."""

    name: ClassVar[str] = "prumerge"
    spread: float = 3.0  # even samples per outlier (the "+"; 0: PruMerge, outliers only)
    neighbours: int = 32  # tokens each kept one absorbs (0: none)
    layer: int | None = None  # traced encoder layer, counted from 1 (None: the one the VLM reads)

    def encoder_trace(self, adapter) -> TraceSpec:
        return TraceSpec(self.layer or adapter.feature_layer, keys=True)

    def check(self, adapter) -> None:
        if self.spread < 0 or self.neighbours < 0:
            raise TokcompError("prumerge: spread and neighbours must be >= 0")
        if not 1 <= self.encoder_trace(adapter).layer <= adapter.num_layers:
            raise TokcompError(f"prumerge: layer must be between 1 and {adapter.num_layers}")

    @property
    def keeps_positions(self) -> bool:
        return True

    def select_request(self, adapter, kinds, tokens: list[UnitTokens], text, record=None):
        out = []
        for unit in tokens:
            if unit.trace is None or unit.trace_keys is None:
                raise TokcompError("prumerge: these tokens carry no encoder trace (attach the method first)")
            scored = torch.isfinite(unit.trace)
            groups = list(torch.nonzero(~scored))  # newlines (and a kept CLS) stay as they are
            weights = [torch.ones(1) for _ in groups]
            for view in unit.provenance[scored, 0].unique().tolist():
                where = torch.nonzero(scored & (unit.provenance[:, 0] == view)).flatten()
                scores, keys = unit.trace[where], unit.trace_keys[where]
                kept = attention_outliers(scores)
                if not kept.numel():  # attention with no outlier: its peak stands for them
                    kept = S.top_k_stable(scores, 1)
                if self.spread:
                    kept = torch.cat([kept, spread_samples(where.numel(), kept, self.spread)]).sort().values
                for group in absorbing_groups(keys, kept, self.neighbours):
                    groups.append(where[group])
                    weights.append(scores[group].float())
            out.append(merge_positions(unit, groups, weights))
        return out
