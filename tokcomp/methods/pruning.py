"""Pruning methods before the LLM: a scorer base class, random, DivPrune, adaptive multi-image pruning.

Pre-LLM pruners drop visual positions before the language model; the tokens they keep keep their
stock position ids (and image order), so the LLM sees exactly the stock sequence with gaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcomp.errors import TokcompError
from tokcomp.methods import selection as S
from tokcomp.methods.base import Method
from tokcomp.methods.settings import check_ratio, register
from tokcomp.models.visual import UnitTokens, select_positions

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter


@dataclass
class TokenScorer(Method):
    """Keep the ``ratio`` best-scoring positions of every image/video (the kvpress ScorerPress idea).

    A subclass only implements ``score``; this class picks the top positions and keeps them in their
    original order. ``ratio=1`` scores and keeps every position: the plain model, bit for bit.
    """

    name: ClassVar[str] = "scorer"
    ratio: float = 0.25

    def check(self, adapter: VLMAdapter) -> None:
        check_ratio(self.name, self.ratio)

    @property
    def keeps_positions(self) -> bool:
        return True

    def score(self, features: torch.Tensor, text: torch.Tensor, unit: int) -> torch.Tensor:
        """(n,) scores for one unit's positions; higher is kept first."""
        raise NotImplementedError

    def select_request(self, adapter, kinds, tokens, text, record=None):
        out = []
        for index, unit in enumerate(tokens):
            keep = min(unit.num_positions, max(1, round(self.ratio * unit.num_positions)))
            scores = self.score(unit.position_features(), text, index)
            out.append(select_positions(unit, S.top_k_stable(scores, keep).sort().values))
        return out


@register
@dataclass
class RandomPruning(TokenScorer):
    """Uniformly random positions (seeded): the control UniPruneBench finds surprisingly strong."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(self, features, text, unit):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + unit)
        return torch.rand(features.shape[0], generator=generator)


@register
@dataclass
class DivPrune(TokenScorer):
    """DivPrune (CVPR 2025): the max-min diverse subset of the visual embeddings, greedily.

    The greedy order starts at the token with the largest total cosine distance to the others.
    """

    name: ClassVar[str] = "divprune"

    def score(self, features, text, unit):
        distance = 1 - S.cosine_matrix(features, features)
        order = S.farthest_point_order(features, int(distance.sum(dim=1).argmax()))
        scores = torch.empty(features.shape[0])
        scores[order] = -torch.arange(order.shape[0], dtype=torch.float32)
        return scores


# --- adaptive multi-image pruning (TrimTokenator-LC) ----------------------------------------
@dataclass
class AdaptivePlan:
    """What adaptive pruning decided for one request (for the account and for tests)."""

    budget: int
    intra_budget: int
    inter_budget: int
    per_image_budget: list[int]
    intra_diversity: list[float]
    novelty: list[float]
    kept: list[torch.Tensor]


def adaptive_select(
    images: list[torch.Tensor],
    text: torch.Tensor,
    rho: float,
    floor: float = 0.05,
    tau: float = 0.9,
    pool: float = 2.0,
) -> AdaptivePlan:
    """Adaptive multi-image pruning over one request; returns kept indices per image.

    Sourced (TrimTokenator-LC abstract and D_intra formula): intra-image diversity (mean pairwise
    cosine distance) and inter-image variation set the budget split between an intra stage (greedy
    representative selection per image) and an inter stage (global diversity filtering into a
    candidate pool, then Pareto selection of diversity vs. text alignment). Chosen here where the
    paper is not public: inter-image variation of an image is the mean over its tokens of the cosine
    distance to the nearest token of any *earlier* image, relative to the distance between its own
    neighbouring tokens (capped at 1: a repeat is worth nothing, a new image everything); the intra share
    of the budget is D_intra / (D_intra + D_inter); per-image budgets are proportional to
    size x diversity x relative novelty, with a floor of ``floor`` x size; the intra stage is
    farthest-point sampling seeded at the token nearest the image mean; the filter drops tokens whose
    similarity to an already kept token exceeds ``tau`` and keeps the ``pool`` x inter-budget most
    novel as candidates; alignment is the best cosine similarity to a prompt token embedding;
    Pareto fronts are taken in order, the last one cut by crowding distance, and diversity is
    recomputed after each front.
    """
    sizes = [int(x.shape[0]) for x in images]
    total = sum(sizes)
    budget = max(len(images), min(total, round(rho * total)))
    diversity = [S.mean_pairwise_distance(x) for x in images]
    novelty = [math.nan] + [
        float((1 - S.cosine_matrix(x, torch.cat(images[:k])).max(dim=1).values).mean())
        for k, x in enumerate(images)
        if k > 0
    ]
    d_intra = sum(diversity) / len(diversity)
    d_inter = sum(novelty[1:]) / (len(images) - 1) if len(images) > 1 else 0.0
    relative = [1.0]  # the first image is new by definition
    for k in range(1, len(images)):
        own = S.nearest_neighbour_distance(images[k])  # how far its tokens are from each other
        relative.append(1.0 if novelty[k] >= own else novelty[k] / max(own, 1e-8))

    floors = [min(s, max(1, math.ceil(floor * s))) for s in sizes]
    intra_budget = round(budget * d_intra / (d_intra + d_inter)) if d_intra + d_inter > 0 else budget
    intra_budget = max(sum(floors), min(budget, intra_budget))
    weights = [s * max(d, 1e-6) * r for s, d, r in zip(sizes, diversity, relative, strict=True)]
    per_image = S.split_budget(intra_budget, weights, floors, sizes)

    kept = []
    for x, b in zip(images, per_image, strict=True):
        kept.append(S.farthest_point_order(x, S.most_representative(x), b))
    inter_budget = budget - sum(per_image)
    if inter_budget > 0:
        kept = _inter_stage(images, kept, text, inter_budget, tau, pool)
    return AdaptivePlan(
        budget=budget,
        intra_budget=sum(per_image),
        inter_budget=inter_budget,
        per_image_budget=per_image,
        intra_diversity=diversity,
        novelty=novelty,
        kept=[k.sort().values for k in kept],
    )


def _inter_stage(images, kept, text, count, tau, pool) -> list[torch.Tensor]:
    """Global diversity filtering into a candidate pool, then Pareto selection (diversity, alignment)."""
    owner, index = [], []
    chosen_mask = [torch.zeros(x.shape[0], dtype=torch.bool) for x in images]
    for k, picks in enumerate(kept):
        chosen_mask[k][picks] = True
    for k, mask in enumerate(chosen_mask):
        rest = torch.nonzero(~mask).flatten()
        owner += [k] * rest.numel()
        index += rest.tolist()
    if not index:
        return kept
    owner_t, index_t = torch.tensor(owner), torch.tensor(index)
    rest_feats = torch.stack([images[k][i] for k, i in zip(owner, index, strict=True)])
    selected = torch.cat([images[k][p] for k, p in enumerate(kept)])

    def novelty_of(feats: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return 1 - S.cosine_matrix(feats, chosen).max(dim=1).values

    novel = novelty_of(rest_feats, selected)
    survivors = torch.nonzero(novel >= 1 - tau).flatten()
    ranked = survivors[novel[survivors].argsort(descending=True)]
    candidates = ranked[: max(count, math.ceil(pool * count))].tolist()
    if len(candidates) < count:  # the filter removed too much: fill up with the most novel of the rest
        extra = [i for i in novel.argsort(descending=True).tolist() if i not in set(candidates)]
        candidates += extra[: count - len(candidates)]
    alignment = S.cosine_matrix(rest_feats, text).max(dim=1).values if text.numel() else torch.zeros(len(index))

    picked: list[int] = []
    pool_left = list(candidates)
    while len(picked) < count and pool_left:
        feats = rest_feats[pool_left]
        chosen = torch.cat([selected, rest_feats[picked]]) if picked else selected
        scores = torch.stack([novelty_of(feats, chosen), alignment[pool_left]], dim=1)
        front = S.pareto_fronts(scores)[0]
        need = count - len(picked)
        if len(front) > need:
            crowd = S.crowding_distance(scores[front])
            order = sorted(range(len(front)), key=lambda j: (-float(crowd[j]), front[j]))
            front = [front[j] for j in order[:need]]
        picked += [pool_left[j] for j in front]
        pool_left = [c for j, c in enumerate(pool_left) if j not in set(front)]
    out = list(kept)
    for k in range(len(images)):
        mine = [int(index_t[c]) for c in picked if int(owner_t[c]) == k]
        if mine:
            out[k] = torch.cat([out[k], torch.tensor(mine, dtype=torch.long)])
    return out


@register
@dataclass
class Adaptive(Method):
    """Adaptive multi-image pruning (TrimTokenator-LC), keeping ``rho`` of a request's visual tokens.

    Works over all images of a request, and over the frames of a video (each frame an image; the
    video's newline is always kept). See ``adaptive_select`` for the algorithm and its sources.
    """

    name: ClassVar[str] = "adaptive"
    rho: float = 0.25
    floor: float = 0.05
    tau: float = 0.9
    pool: float = 2.0

    def check(self, adapter: VLMAdapter) -> None:
        check_ratio("adaptive", self.rho)
        if not 0 <= self.floor <= 1 or not 0 < self.tau <= 1 or self.pool < 1:
            raise TokcompError("adaptive: floor in [0, 1], tau in (0, 1], pool >= 1")

    @property
    def keeps_positions(self) -> bool:
        return True

    def select_request(self, adapter, kinds, tokens: list[UnitTokens], text, record=None):
        """Prunes one request; its plan goes into ``record`` (that request's, for this call only)."""
        if not tokens:
            return tokens
        groups: list[tuple[int, torch.Tensor]] = []  # (unit, positions in the unit) per image/frame
        for u, unit in enumerate(tokens):
            if unit.num_frames:
                n = unit.frame_tokens
                groups += [(u, torch.arange(f * n, (f + 1) * n)) for f in range(unit.num_frames)]
            else:
                groups.append((u, torch.arange(unit.num_positions)))
        feats = [tokens[u].position_features()[pos].float().cpu() for u, pos in groups]
        plan = adaptive_select(feats, text.float().cpu(), self.rho, self.floor, self.tau, self.pool)
        if record is not None and self.rho < 1:  # rho=1 keeps everything and reports nothing, as the plain model
            record[self.name] = plan
        chosen: list[list[torch.Tensor]] = [[] for _ in tokens]
        for (u, pos), keep in zip(groups, plan.kept, strict=True):
            chosen[u].append(pos[keep])
        out = []
        for u, unit in enumerate(tokens):
            if unit.num_frames:  # the video's trailing newline stays
                chosen[u].append(torch.arange(unit.num_frames * unit.frame_tokens, unit.num_positions))
            out.append(select_positions(unit, torch.cat(chosen[u]).sort().values))
        return out

    def report(self, hooks, sample: int, account) -> dict:
        plan = account.selection.get(self.name)
        if plan is None:
            return {}
        return {
            "adaptive": {
                "budget": plan.budget,
                "intra_budget": plan.intra_budget,
                "inter_budget": plan.inter_budget,
                "per_image_budget": plan.per_image_budget,
            }
        }
