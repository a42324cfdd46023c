"""Pure selection math for pre-LLM pruning: greedy diversity, budgets, Pareto fronts.

All functions take token features (n, H) and return indices; nothing here knows about models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b`` (fp32)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Intra-image diversity: mean cosine distance over ordered pairs i != j (TrimTokenator-LC's D_intra)."""
    n = x.shape[0]
    if n < 2:
        return 0.0
    sim = cosine_matrix(x, x)
    return float((1 - sim).sum() - (1 - sim.diagonal()).sum()) / (n * (n - 1))


def nearest_neighbour_distance(x: torch.Tensor) -> float:
    """Mean cosine distance from each token to its nearest other token (0 for fewer than 2 tokens)."""
    if x.shape[0] < 2:
        return 0.0
    sim = cosine_matrix(x, x)
    sim.fill_diagonal_(-2.0)
    return float((1 - sim.max(dim=1).values).mean())


def farthest_point_order(x: torch.Tensor, first: int, count: int | None = None) -> torch.Tensor:
    """Greedy max-min diversity: start at ``first``, then repeatedly add the token whose nearest
    chosen token is farthest (cosine distance). The first ``k`` of the order are the greedy k-subset."""
    n = x.shape[0]
    count = n if count is None else min(count, n)
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    dist = 1 - cosine_matrix(x, x)
    order = [first]
    nearest = dist[first].clone()
    nearest[first] = -1.0
    for _ in range(count - 1):
        pick = int(nearest.argmax())
        order.append(pick)
        nearest = torch.minimum(nearest, dist[pick])
        nearest[order] = -1.0
    return torch.tensor(order, dtype=torch.long)


def most_representative(x: torch.Tensor) -> int:
    """The token closest (cosine) to the mean of the image's tokens."""
    return int(cosine_matrix(x, x.mean(dim=0, keepdim=True))[:, 0].argmax())


def split_budget(total: int, weights: list[float], floors: list[int], caps: list[int]) -> list[int]:
    """Integers summing to ``total`` (if feasible), proportional to ``weights``, within [floor, cap].

    Water-filling: floors first, then the rest proportionally, capping and redistributing;
    largest remainders settle the rounding.
    """
    n = len(weights)
    total = max(min(total, sum(caps)), sum(floors))
    alloc = [float(f) for f in floors]
    free = [i for i in range(n) if caps[i] > floors[i]]
    remaining = total - sum(floors)
    while remaining > 1e-9 and free:
        weight_sum = sum(max(weights[i], 0.0) for i in free)
        share = {i: remaining * (max(weights[i], 0.0) / weight_sum if weight_sum > 0 else 1 / len(free)) for i in free}
        remaining = 0.0
        still = []
        for i in free:
            room = caps[i] - alloc[i]
            if share[i] >= room:
                alloc[i] = caps[i]
                remaining += share[i] - room
            else:
                alloc[i] += share[i]
                still.append(i)
        free = still
    out = [math.floor(a + 1e-9) for a in alloc]
    short = total - sum(out)
    by_remainder = sorted(range(n), key=lambda i: alloc[i] - out[i], reverse=True)
    for i in by_remainder:
        if short <= 0:
            break
        if out[i] < caps[i]:
            out[i] += 1
            short -= 1
    return out


def pareto_fronts(points: torch.Tensor) -> list[list[int]]:
    """Non-dominated sorting of (n, 2) scores, both maximised: front 1 first."""
    n = points.shape[0]
    ge = (points[:, None, :] >= points[None, :, :]).all(-1)
    gt = (points[:, None, :] > points[None, :, :]).any(-1)
    dominates = ge & gt  # [i, j]: i dominates j
    dominated_by = dominates.sum(0).tolist()
    fronts, current = [], [i for i in range(n) if dominated_by[i] == 0]
    while current:
        fronts.append(current)
        following = []
        for i in current:
            for j in torch.nonzero(dominates[i]).flatten().tolist():
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    following.append(j)
        current = sorted(following)
    return fronts


def crowding_distance(points: torch.Tensor) -> torch.Tensor:
    """NSGA-II crowding distance within one front (boundary points are infinite)."""
    n = points.shape[0]
    distance = torch.zeros(n)
    if n <= 2:
        return torch.full((n,), math.inf)
    for objective in range(points.shape[1]):
        values = points[:, objective]
        order = values.argsort()
        span = float(values[order[-1]] - values[order[0]]) or 1.0
        distance[order[0]] = distance[order[-1]] = math.inf
        gaps = (values[order[2:]] - values[order[:-2]]) / span
        distance[order[1:-1]] += gaps
    return distance


TIE_BITS = 16  # scores equal in their first 16 mantissa bits (1.5e-5 relative) are a tie


def round_mantissa(x: torch.Tensor, bits: int = TIE_BITS) -> torch.Tensor:
    """``x`` rounded to ``bits`` bits of mantissa; infinities and NaN stay as they are."""
    mantissa, exponent = torch.frexp(x.float())
    rounded = torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent)
    return torch.where(torch.isfinite(x), rounded, x.float())


def top_k_stable(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` best of 1-D ``scores``, best first, with near-ties going to the lower index.

    Scores that agree to TIE_BITS of mantissa rank as equal, so a last-bit difference between two
    machines' kernels cannot reorder them; ``topk`` would break such ties by whatever the kernel does.
    """
    order = torch.sort(round_mantissa(scores), descending=largest, stable=True).indices
    return order[:k]
