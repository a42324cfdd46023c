"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs"): before the LLM, keep per image the subset of visual tokens a
determinantal point process conditioned on the instruction likes best.

The DPP kernel is ``L = diag(q) S diag(q)``: ``S`` the cosine similarity of the image's tokens, ``q``
each token's relevance to the prompt (mean cosine to its text tokens, min-max scaled to [0, 1],
then ``exp(alpha q)`` with ``alpha = theta / (2 (1 - theta))``). The subset is the greedy MAP of
``det(L_S)`` (Chen et al., NeurIPS 2018: one incremental Cholesky row per pick). No attention weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.errors import TokcompError
from tokcomp.methods import selection as S
from tokcomp.methods.pruning import TokenScorer
from tokcomp.methods.settings import register
from tokcomp.models.visual import select_positions


def instruction_relevance(features: torch.Tensor, text: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """(n,) relevance of each visual token to the prompt, min-max scaled to [0, 1] (all 0 without text
    or when every token is as relevant as every other)."""
    if not text.shape[0]:
        return torch.zeros(features.shape[0], dtype=torch.float64)
    relevance = S.cosine_matrix(features.double(), text.double()).mean(dim=1)
    relevance = -relevance if negate else relevance
    low, high = relevance.min(), relevance.max()
    return (relevance - low) / (high - low) if high > low else torch.zeros_like(relevance)


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor, theta: float) -> torch.Tensor:
    """``diag(q) S diag(q)`` with ``q = exp(alpha * relevance)``, ``alpha = theta / (2 (1 - theta))``
    (theta 0: diversity alone; theta 1: the relevance itself as ``q``)."""
    similarity = S.cosine_matrix(features.double(), features.double())
    quality = relevance if theta >= 1 else torch.exp(theta / (2 * (1 - theta)) * relevance)
    return quality[:, None] * similarity * quality[None, :]


def greedy_dpp(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (sorted) of the ``count`` items the greedy MAP inference of a DPP picks from ``kernel``.

    Each step takes the item whose addition multiplies ``det`` most: the largest remaining conditional
    gain ``d_j^2`` (near-ties to the lower index), then updates every gain with one new Cholesky row.
    Once the kernel's rank is used up the gains are ~0 and the order continues among the rest."""
    kernel = kernel.detach()
    n = kernel.shape[0]
    count = min(count, n)
    gains = kernel.diagonal().clone()
    spent = 1e-9 * float(gains.max()) if n else 0.0  # a gain this small: no new direction left
    rows = kernel.new_zeros(count, n)
    free = torch.ones(n, dtype=torch.bool)
    picked = []
    for step in range(count):
        j = int(S.top_k_stable(torch.where(free, gains, -math.inf).float(), 1)[0])
        picked.append(j)
        free[j] = False
        if float(gains[j]) <= spent:  # the kernel's rank is used up: the rest in index order
            continue
        rows[step] = (kernel[j] - rows[:step, j] @ rows[:step]) / math.sqrt(float(gains[j]))
        gains = gains - rows[step] ** 2
        gains = torch.where(gains <= spent, torch.zeros_like(gains), gains)  # rounding noise is no gain
    return torch.tensor(sorted(picked), dtype=torch.long)


@register
@dataclass
class CDPruner(TokenScorer):
    """CDPruner: per image (or video) the ``ratio`` share of visual tokens chosen by a DPP whose kernel
    weighs the tokens' diversity by their relevance to the prompt (``theta``: 0 diversity only)."""

    name: ClassVar[str] = "cdpruner"
    ratio: float = 0.222  # the paper's middle LLaVA-1.5 setting: 128 of 576 tokens
    theta: float = 0.5
    negate_relevance: bool = False  # the released code's sign (see the README)

    def check(self, adapter) -> None:
        super().check(adapter)
        if not 0 <= self.theta <= 1:
            raise TokcompError(f"cdpruner: theta must be in [0, 1], got {self.theta}")

    def select_request(self, adapter, kinds, tokens, text, record=None):
        out, kept = [], []
        for unit in tokens:
            keep = min(unit.num_positions, max(1, round(self.ratio * unit.num_positions)))
            features = unit.position_features()
            relevance = instruction_relevance(features, text, self.negate_relevance)
            chosen = greedy_dpp(conditional_kernel(features, relevance, self.theta), keep)
            out.append(select_positions(unit, chosen))
            kept.append(chosen.tolist())
        if record is not None:
            record[self.name] = kept  # per unit, the positions kept
        return out
