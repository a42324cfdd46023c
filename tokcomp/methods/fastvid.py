"""FastVID (Shen et al., 2025, "FastVID: Dynamic Density Pruning for Fast Video Large Language Models",
arXiv 2503.11187): before the LLM, the video is cut into segments of alike frames, and each frame keeps
its most salient tokens plus, on a few anchor frames per segment, density-peak tokens into which the
segment's other tokens merge.

* **DySeg** (dynamic temporal segmentation): the cosine similarity of consecutive frames' global
  features; a cut after every transition below ``tau`` and after the ``segments - 1`` least similar ones
  (so there are at least ``segments`` segments when the video has the frames).
* **STPrune**: each frame's budget is ``ratio`` of its tokens; ``1 - density_share`` of it goes to the
  tokens with the most attention (ATS), the rest to density merging (DTM).
* **DTM**: in a segment of L frames the anchors are its last frame and every ``anchor_every``-th before
  it; the segment's context budget is spread over them. On an anchor, the tokens with the highest
  density-peak score (local density from the 4 nearest neighbours times the distance to the nearest
  denser token) become centres, every other token of the segment (not salient) joins its most similar
  centre, and a centre becomes ``w * centre + (1 - w) * mean(members)``, ``w = max(beta, 1 / (n + 1))``.
  A segment of one frame merges within that frame.

Kept and merged tokens sit at their own (the centre's) stock position. Where tokcomp differs from the
paper (the released code follows it there too, save the first point):
* the attention of ATS is the frame's mean token attending to its tokens (softmax of the scaled dot
  product in LLM space) and DySeg's global feature is the frame's mean token, because the stock
  LLaVA-OneVision and Qwen2.5-VL towers have no [CLS] or pooling head whose attention the paper reads;
* ties in the density score go to the lower index (the released code adds random noise).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from tokcomp.errors import TokcompError
from tokcomp.methods import selection as S
from tokcomp.methods.base import Method
from tokcomp.methods.settings import check_ratio, register
from tokcomp.models.visual import UnitTokens, merge_positions, select_positions

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter

DENSITY_NEIGHBOURS = 4  # the released code's k for the local density (the token itself included)


def segment_lengths(global_features: torch.Tensor, segments: int, tau: float) -> list[int]:
    """DySeg: lengths of the consecutive segments of frames (F, D) cut at low adjacent similarity."""
    count = global_features.shape[0]
    if count <= 1:
        return [count]
    unit = F.normalize(global_features.float(), dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(dim=-1)  # (F - 1,): frame t against t + 1
    lowest = S.top_k_stable(similarity, min(max(0, segments - 1), similarity.numel()), largest=False)
    cuts = sorted(set(lowest.tolist()) | set((similarity < tau).nonzero().flatten().tolist()))
    bounds = [-1, *cuts, count - 1]
    return [b - a for a, b in itertools.pairwise(bounds) if b > a]


def mean_token_attention(frame: torch.Tensor) -> torch.Tensor:
    """(n,) the attention a frame's mean token pays each of its tokens (n, D): ATS's saliency."""
    x = frame.float()
    return torch.softmax(x @ x.mean(dim=0) / x.shape[-1] ** 0.5, dim=0)


def density_scores(tokens: torch.Tensor, neighbours: int = DENSITY_NEIGHBOURS) -> torch.Tensor:
    """(m,) density-peak scores of tokens (m, D): local density exp(-mean squared distance to the
    nearest ``neighbours`` (the token itself included)) times the distance to the nearest denser token
    (for the densest, the largest distance)."""
    x = tokens.float()
    distance = torch.cdist(x, x) / x.shape[-1] ** 0.5
    nearest = distance.topk(max(1, min(neighbours, x.shape[0])), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    denser = S.round_mantissa(density)[None, :] > S.round_mantissa(density)[:, None]  # [i, j]: j denser than i
    to_denser = distance.masked_fill(~denser, float("inf")).min(dim=-1).values
    to_denser = torch.where(torch.isinf(to_denser), distance.max(), to_denser)
    return to_denser * density


@dataclass
class Groups:
    """What FastVID keeps of a video: groups of frame-major token indices (the head first) and weights."""

    members: list[torch.Tensor]
    weights: list[torch.Tensor]
    segments: list[int]


def _absorb(centres: torch.Tensor, pool: torch.Tensor, unit: torch.Tensor, beta: float, out: Groups) -> None:
    """Each token of ``pool`` (indices into the normalised tokens ``unit``) joins its most similar centre;
    one group per centre."""
    owner = (unit[pool] @ unit[centres].T).argmax(dim=1)
    for c, centre in enumerate(centres.tolist()):
        joined = pool[owner == c]
        n = joined.numel()
        w = max(beta, 1.0 / (n + 1))
        members = torch.cat([torch.tensor([centre]), joined[joined != centre]])
        weights = torch.full((members.numel(),), (1 - w) / max(n, 1))
        weights[0] = w + ((1 - w) / n if bool((joined == centre).any()) else 0.0)
        out.members.append(members)
        out.weights.append(weights)


def fastvid_groups(
    frames: torch.Tensor,
    ratio: float,
    segments: int = 8,
    tau: float = 0.9,
    density_share: float = 0.4,
    anchor_every: int = 4,
    beta: float = 0.6,
) -> Groups:
    """FastVID on ``frames`` (F, n, D): the groups of frame-major indices (f * n + i) it keeps."""
    count, n, _ = frames.shape
    x = frames.reshape(count * n, -1)
    unit = F.normalize(x.float(), dim=-1)
    lengths = segment_lengths(frames.float().mean(dim=1), segments, tau)
    budget = max(1, min(n, int(n * ratio)))
    salient_count = budget - int(budget * density_share)
    context = budget - salient_count
    out = Groups([], [], lengths)
    rest: list[torch.Tensor] = []  # per frame, its tokens that are not salient (frame-major indices)
    for f in range(count):
        order = S.top_k_stable(mean_token_attention(frames[f]), n)
        for i in order[:salient_count].sort().values.tolist():
            out.members.append(torch.tensor([f * n + i]))
            out.weights.append(torch.ones(1))
        rest.append(order[salient_count:].sort().values + f * n)
    if context == 0 or salient_count == n:
        return out
    start = 0
    for length in lengths:
        frames_here = range(start, start + length)
        anchors = [f for f in frames_here if (start + length - 1 - f) % anchor_every == 0]
        per_anchor = context * length // len(anchors)
        pool = torch.cat([rest[f] for f in frames_here])
        for f in anchors:
            own = rest[f]
            k = min(per_anchor, own.numel())
            if k == 0:
                continue
            centres = own[S.top_k_stable(density_scores(x[own]), k).sort().values]
            local = length == 1 or len(anchors) == length  # every frame an anchor: it merges its own tokens
            _absorb(centres, own if local else pool, unit, beta, out)
        start += length
    return out


@register
@dataclass
class FastVID(Method):
    """FastVID on video: dynamic segments of alike frames, then per frame its most salient tokens and,
    on each segment's anchor frames, density-peak centres that the segment's other tokens merge into
    (``ratio`` of every frame's tokens; images pass untouched)."""

    name: ClassVar[str] = "fastvid"
    inputs: ClassVar[frozenset[str]] = frozenset({"video"})
    aliases: ClassVar[dict[str, str]] = {"c": "segments", "d": "density_share", "p": "anchor_every"}
    ratio: float = 0.25  # share of each frame's tokens kept (the paper's 25 % setting)
    segments: int = 8  # DySeg's c: at least this many segments
    tau: float = 0.9  # DySeg's threshold on adjacent frames' cosine similarity
    density_share: float = 0.4  # STPrune's d: share of the budget for DTM's density centres
    anchor_every: int = 4  # DTM's p: anchor frames per segment, counted from its last frame
    beta: float = 0.6  # DTM's lowest weight of a centre in its merge

    @property
    def keeps_positions(self) -> bool:
        return True

    def check(self, adapter: VLMAdapter) -> None:
        check_ratio("fastvid", self.ratio)
        if self.segments < 1 or self.anchor_every < 1:
            raise TokcompError("fastvid: segments (c) and anchor_every (p) must be at least 1")
        if not 0 <= self.density_share <= 1 or not 0 <= self.beta <= 1:
            raise TokcompError("fastvid: density_share (d) and beta must be in [0, 1]")

    def select(self, adapter: VLMAdapter, kind: str, tokens: UnitTokens) -> UnitTokens:
        if kind != "video" or tokens.num_frames == 0:
            return tokens
        n, count = tokens.frame_tokens, tokens.num_frames
        full = tokens.position_features()
        groups = fastvid_groups(full[: count * n].reshape(count, n, -1), self.ratio, self.segments, self.tau,
                                self.density_share, self.anchor_every, self.beta)  # fmt: skip
        trailing = [torch.tensor([p]) for p in range(count * n, full.shape[0])]  # a trailing newline stays
        weights = [*groups.weights, *(torch.ones(1) for _ in trailing)]
        return merged_positions(tokens, [*groups.members, *trailing], weights)


def merged_positions(unit: UnitTokens, members: list[torch.Tensor], weights: list[torch.Tensor]) -> UnitTokens:
    """``merge_positions`` for a unit whose positions are each their own token (the stock layout), in one
    pass: the kept heads selected, then every merged group's weighted mean written at its head. Hundreds
    of groups per video make ``merge_positions``' per-group loop the slow part; the result is the same
    (each group's weighted mean at its head's stock position; a group of one as it is)."""
    device = unit.mapping.device
    if unit.trace is not None or unit.deepstack is not None or not torch.equal(
        unit.mapping, torch.arange(unit.num_positions, device=device)
    ):
        return merge_positions(unit, members, weights)
    heads = torch.tensor([int(m[0]) for m in members], dtype=torch.long, device=device)
    order = torch.sort(unit.positions[heads], stable=True).indices
    kept = select_positions(unit, heads[order])
    sizes = torch.tensor([len(members[int(i)]) for i in order])
    merged = (sizes > 1).nonzero().flatten()
    if merged.numel() == 0:
        return kept
    feats = unit.position_features()
    cols = torch.cat([members[int(order[g])] for g in merged.tolist()]).to(device)
    shares = torch.cat([weights[int(order[g])].float() / weights[int(order[g])].float().sum()
                        for g in merged.tolist()]).to(device)  # fmt: skip
    rows = torch.repeat_interleave(torch.arange(merged.numel()), sizes[merged]).to(device)
    means = torch.zeros(merged.numel(), feats.shape[-1], device=device).index_add_(0, rows, feats[cols].float()
                                                                                     * shares[:, None])  # fmt: skip
    kept.unique = kept.unique.clone()
    kept.unique[merged.to(device)] = means.to(kept.unique.dtype)
    if kept.provenance is not None:
        kept.provenance = kept.provenance.clone()
        kept.provenance[merged.to(kept.provenance.device), 1] = -1
    return kept
