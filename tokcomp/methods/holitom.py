"""HoliTom (Shao et al., NeurIPS 2025, "HoliTom: Holistic Token Merging for Fast Video Large Language
Models", arXiv 2505.21334): before the LLM, the video is cut into the segments that make the most of
temporal redundancy and each segment's static tokens merge over time and then in space; inside the LLM,
after one layer, the least attended visual tokens merge into their most similar kept ones.

* **Segmentation** (global, by dynamic programming): a position is *static* over frames a..b when every
  adjacent pair of its tokens is more cosine-similar than ``tau``; a segment saves (its static positions)
  x (its length - 1) tokens, and the segmentation into consecutive segments (at most ``max_window``
  frames each) that saves the most wins (ties to the shorter segments).
* **Outside the LLM**: with R tokens saved, every share becomes ``r' = min(ratio * FN / (FN - R), 1)`` so
  that about ``ratio`` of the video's F x N tokens stays. Each static position of a segment becomes its
  mean over the segment's frames; those means cluster by density peaks (DPC-KNN, ``neighbours`` nearest,
  ``round(r' * count)`` centres), every other one joins its nearest centre, and a cluster becomes
  ``beta * centre + (1 - beta) * mean(members)``. Each frame keeps ``ceil(r' * n)`` of its n dynamic
  (not static) tokens, those its encoder attention ranks highest (the mean attention each patch receives
  in the encoder layer the VLM reads, pooled as the stock model pools the features; see
  ``tokcomp.methods.trace``); the rest leave.
* **Inside the LLM** (``inner_merge`` > 0): after layer ``inner_layer - 1`` the ``inner_merge`` share of
  the visual tokens the last token attends to least merges into the kept visual token whose hidden state
  is most cosine-similar, and leaves the sequence (``cut.py``); layers before are untouched.

Kept and merged tokens sit at their head's stock position (a static cluster at its centre in the
segment's first frame), in stock order, as tokcomp's other pre-LLM methods keep them. Where tokcomp
differs from the released code (``cokeshao/HoliTom``, ``holitom/llava_arch.py`` and
``holitom/modeling_qwen2.py``), which otherwise follows the paper:
* a merged token inside the LLM is the plain mean of the kept token and its members; the released code
  averages them in pairs in position order (later members weigh more), ``inner_average="running"``;
* positions are the stock ones, where the released code numbers the shortened sequence 0..L-1 and
  emits each segment's static clusters before its frames' dynamic tokens;
* a segment with static positions keeps at least one cluster; ties in the density score go to the lower
  index (the released code adds random noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from tokcomp.errors import TokcompError
from tokcomp.methods import selection as S
from tokcomp.methods.base import Method
from tokcomp.methods.cut import recorded_cut
from tokcomp.methods.fastv import FastVPruning, check_cut_layer
from tokcomp.methods.fastvid import Groups, density_scores, merged_positions
from tokcomp.methods.settings import check_ratio, register
from tokcomp.methods.trace import TraceSpec
from tokcomp.models.visual import UnitTokens

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter


def adjacent_similarity(frames: torch.Tensor) -> torch.Tensor:
    """(F - 1, N): cosine similarity of each position's token in frame t and in frame t + 1 (frames (F, N, D))."""
    unit = F.normalize(frames.float(), dim=-1)
    return S.round_mantissa((unit[:-1] * unit[1:]).sum(dim=-1))


def static_mask(similarity: torch.Tensor, start: int, end: int, tau: float) -> torch.Tensor:
    """(N,) bool: the positions static over frames ``start``..``end`` (every adjacent pair above ``tau``)."""
    if end <= start:
        return torch.zeros(similarity.shape[-1], dtype=torch.bool)
    return (similarity[start:end] > tau).all(dim=0)


def holitom_segments(similarity: torch.Tensor, count: int, tau: float, max_window: int) -> tuple[list[int], int]:
    """The segment lengths (in frame order) that save the most tokens, and how many they save.

    ``dp[i]``, the most saved over frames 0..i, is frame i on its own after ``dp[i - 1]``, or a segment of
    w frames ending at i after ``dp[i - w]`` (a strict improvement only: ties keep shorter segments)."""
    best = [0] * (count + 1)  # best[i + 1]: the most saved over frames 0..i
    length = [1] * count
    for i in range(count):
        best[i + 1], length[i] = best[i], 1
        run = torch.ones(similarity.shape[-1], dtype=torch.bool)
        for w in range(2, min(i + 1, max_window) + 1):
            run &= similarity[i - w + 1] > tau  # the pair (i - w + 1, i - w + 2) joins the segment
            saved = best[i + 1 - w] + int(run.sum()) * (w - 1)
            if saved > best[i + 1]:
                best[i + 1], length[i] = saved, w
    lengths, i = [], count - 1
    while i >= 0:
        lengths.append(length[i])
        i -= length[i]
    return lengths[::-1], best[count]


def cluster_groups(tokens: torch.Tensor, centres: int, neighbours: int) -> list[tuple[int, torch.Tensor]]:
    """DPC-KNN on ``tokens`` (m, D): the ``centres`` highest density-peak scores (index order) and, for each,
    the indices (not the centre) that join it, each token its nearest centre."""
    order = S.top_k_stable(density_scores(tokens, neighbours), centres).sort().values
    owner = torch.cdist(tokens.float(), tokens[order].float()).argmin(dim=1)
    owner[order] = torch.arange(order.numel())
    groups = []
    for k, centre in enumerate(order.tolist()):
        joined = (owner == k).nonzero().flatten()
        groups.append((centre, joined[joined != centre]))
    return groups


def holitom_groups(
    frames: torch.Tensor,
    scores: torch.Tensor,
    ratio: float,
    tau: float = 0.8,
    beta: float = 0.6,
    neighbours: int = 7,
    max_window: int = 1024,
) -> Groups:
    """HoliTom outside the LLM on ``frames`` (F, N, D) with encoder attention ``scores`` (F, N): groups of
    frame-major indices (f * N + i, the head first) and their weights."""
    count, n, _ = frames.shape
    similarity = adjacent_similarity(frames) if count > 1 else frames.new_zeros(0, n)
    lengths, saved = holitom_segments(similarity, count, tau, max_window)
    share = min(ratio * count * n / (count * n - saved), 1.0)
    out = Groups([], [], lengths)
    start = 0
    for length in lengths:
        static = static_mask(similarity, start, start + length - 1, tau) if length > 1 else torch.zeros(n, dtype=bool)
        where = static.nonzero().flatten()
        if where.numel():
            means = frames[start : start + length, where].float().mean(dim=0)
            k = min(where.numel(), max(1, round(share * where.numel())))
            over_time = torch.arange(length) * n + start * n
            for centre, members in cluster_groups(means, k, min(neighbours, k)):
                head = over_time + int(where[centre])
                joined = (over_time[None, :] + where[members][:, None]).flatten()
                out.members.append(torch.cat([head, joined]))
                centre_share = beta if members.numel() else 1.0
                weights = [torch.full((length,), centre_share / length)]
                if members.numel():
                    weights.append(torch.full((joined.numel(),), (1 - beta) / joined.numel()))
                out.weights.append(torch.cat(weights))
        dynamic = (~static).nonzero().flatten()
        keep = min(dynamic.numel(), math.ceil(share * dynamic.numel() - 1e-9))
        for f in range(start, start + length):
            chosen = dynamic[S.top_k_stable(scores[f, dynamic], keep)] if keep else dynamic[:0]
            for i in chosen.sort().values.tolist():
                out.members.append(torch.tensor([f * n + i]))
                out.weights.append(torch.ones(1))
        start += length
    return out


def running_average_weights(count: int) -> torch.Tensor:
    """(count + 1,) weights of a kept token and its ``count`` members (in order) averaged pairwise in turn,
    ``h <- (h + member) / 2``, as the released code merges inside the LLM."""
    return torch.tensor([0.5**count] + [0.5 ** (count - j) for j in range(count)])


def merge_into_kept(hidden: torch.Tensor, kept: torch.Tensor, merged: torch.Tensor, running: bool) -> torch.Tensor:
    """``hidden`` (B, L, D) with every ``merged`` position's state averaged into the ``kept`` position whose
    state is most cosine-similar (plain mean, or the released code's pairwise ``running`` average)."""
    out = hidden.clone()
    for b in range(hidden.shape[0]):
        sources, targets = merged[b].nonzero().flatten(), kept[b].nonzero().flatten()
        if sources.numel() == 0 or targets.numel() == 0:
            continue
        unit = F.normalize(hidden[b].float(), dim=-1)
        owner = S.round_mantissa(unit[sources] @ unit[targets].T).argmax(dim=1)
        for k in owner.unique().tolist():
            members = sources[owner == k]  # in position order
            rows = torch.cat([targets[k : k + 1], members])
            if running:
                weights = running_average_weights(members.numel())
            else:
                weights = torch.full((rows.numel(),), 1.0 / rows.numel())
            state = (hidden[b, rows].float() * weights[:, None].to(hidden.device)).sum(dim=0)
            out[b, targets[k]] = state.to(hidden.dtype)
    return out


@dataclass
class HoliTomInnerMerge(FastVPruning):
    """FastV's ranking and cut at one layer, with the visual tokens that leave merged first into their most
    similar kept visual token."""

    running: bool = False

    def _cut(self, output, language_model):
        hidden = output[0] if isinstance(output, tuple) else output
        if self.kept is not None and self.order is None:  # the first (only) cut, in LLM-input coordinates
            valid = self.valid.to(hidden.device)
            kept = self.kept.to(hidden.device)
            hidden = merge_into_kept(hidden, kept, valid & self.visual.to(hidden.device) & ~kept, self.running)
            output = (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return super()._cut(output, language_model)


INNER_AVERAGES = ("mean", "running")


@register
@dataclass
class HoliTom(Method):
    """HoliTom on video: segments chosen globally for temporal redundancy, static tokens merged over time
    and clustered, ``ceil(r' n)`` dynamic tokens per frame kept by encoder attention (about ``ratio`` of
    the video overall); inside the LLM, after layer ``inner_layer`` - 1 the ``inner_merge`` share of the
    visual tokens merges into the most similar kept ones (0: off). Images pass untouched."""

    name: ClassVar[str] = "holitom"
    inputs: ClassVar[frozenset[str]] = frozenset({"video"})
    aliases: ClassVar[dict[str, str]] = {"r": "ratio", "T": "tau", "K": "inner_layer"}
    ratio: float = 0.25  # share of the video's tokens kept before the LLM (the paper's 25 % setting)
    tau: float = 0.8  # cosine similarity above which a position is static between adjacent frames
    beta: float = 0.6  # a static cluster's centre weight
    neighbours: int = 7  # DPC-KNN's k
    max_window: int = 1024  # longest segment, in frames
    inner_merge: float = 0.5  # share of the visual tokens merged away inside the LLM (0: off)
    inner_layer: int | None = None  # the LLM layer from which they are gone (None: 18/28 of the depth, as released)
    inner_average: str = "mean"  # "running": the released code's pairwise average in position order

    @property
    def keeps_positions(self) -> bool:
        return True

    @property
    def cuts_scale_with_depth(self) -> bool:
        return self.inner_layer is None

    def cut_layer(self, num_layers: int) -> int:
        """The inner merge's layer K: as given, or the released 18 of 28 layers scaled to this depth."""
        if self.inner_layer is not None:
            return self.inner_layer
        return max(1, min(num_layers - 1, round(num_layers * 18 / 28)))

    def encoder_trace(self, adapter: VLMAdapter) -> TraceSpec:
        return TraceSpec(adapter.feature_layer)

    def check(self, adapter: VLMAdapter) -> None:
        check_ratio("holitom", self.ratio)
        if not 0 <= self.inner_merge < 1:
            raise TokcompError("holitom: inner_merge must be in [0, 1)")
        if not 0 <= self.beta <= 1 or self.neighbours < 1 or self.max_window < 1:
            raise TokcompError("holitom: beta must be in [0, 1], neighbours and max_window at least 1")
        if self.inner_average not in INNER_AVERAGES:
            raise TokcompError(f"holitom: inner_average must be one of {', '.join(INNER_AVERAGES)}")
        check_cut_layer("holitom", self.cut_layer(adapter.language_model.config.num_hidden_layers), adapter)

    def select(self, adapter: VLMAdapter, kind: str, tokens: UnitTokens) -> UnitTokens:
        if kind != "video" or tokens.num_frames == 0:
            return tokens
        if tokens.trace is None:
            raise TokcompError("holitom: these tokens carry no encoder trace (attach the method first)")
        n, count = tokens.frame_tokens, tokens.num_frames
        full = tokens.position_features()
        scores = tokens.trace[: count * n].reshape(count, n).nan_to_num(float("-inf"))
        groups = holitom_groups(full[: count * n].reshape(count, n, -1), scores, self.ratio, self.tau, self.beta,
                                self.neighbours, self.max_window)  # fmt: skip
        trailing = [torch.tensor([p]) for p in range(count * n, full.shape[0])]  # a trailing newline stays
        weights = [*groups.weights, *(torch.ones(1) for _ in trailing)]
        return merged_positions(tokens, [*groups.members, *trailing], weights)

    def attention_hooks(self, visual, cache):
        if self.inner_merge == 0:
            return []
        layers = len(cache.layers)
        return [HoliTomInnerMerge(layer=self.cut_layer(layers), keep=1 - self.inner_merge, visual=visual,
                                  num_layers=layers, running=self.inner_average == "running")]  # fmt: skip

    def report(self, hooks, sample: int, account) -> dict:
        if not any(isinstance(h, HoliTomInnerMerge) for h in hooks):
            return {}
        hook = recorded_cut(hooks, HoliTomInnerMerge, sample, account)
        return {"holitom": {"layer": hook.layer, "merged_visual": int(hook.dropped_per_sample()[sample])}}
