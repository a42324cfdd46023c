"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"): after LLM layer K-1, keep the visual tokens that duplicate a few pivot
tokens least, and cut the rest out of the sequence (``cut.py``, as FastV does).

Pivots are the visual tokens whose keys in layer K-1 have the largest L1 norm, plus the text tokens
after the pictures with the largest key norm; each pivot in turn claims an equal share of the budget:
the visual tokens left whose hidden states (after the model's final norm) are least cosine-similar to
it. No attention weights are needed, so it runs beside FlashAttention and SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from tokcomp.errors import TokcompError
from tokcomp.methods import selection as S
from tokcomp.methods.base import Method
from tokcomp.methods.cut import LayerCut, recorded_cut
from tokcomp.methods.fastv import check_cut_layer
from tokcomp.methods.settings import check_ratio, register

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter


def least_duplicated(
    visual: torch.Tensor,
    visual_norms: torch.Tensor,
    text: torch.Tensor,
    text_norms: torch.Tensor,
    budget: int,
    image_pivots: int,
    text_pivots: int,
) -> torch.Tensor:
    """Indices (sorted) of the ``budget`` visual tokens DART keeps.

    ``visual`` (N, D) and ``text`` (T, D) are hidden states, ``*_norms`` their keys' L1 norms. The
    ``image_pivots`` visual tokens of largest norm are kept; they and the ``text_pivots`` text tokens
    of largest norm are the pivots, and each in turn takes its share of the rest of the budget (the
    first ``rest % pivots`` one more): the tokens still unclaimed that are least similar to it."""
    count = visual.shape[0]
    budget = min(budget, count)
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long)
    chosen = S.top_k_stable(visual_norms.float(), min(image_pivots, budget))
    text_chosen = S.top_k_stable(text_norms.float(), min(text_pivots, text.shape[0])) if text.shape[0] else chosen[:0]
    pivots = torch.cat([visual[chosen], text[text_chosen]]).float()
    rest = budget - chosen.numel()
    free = torch.ones(count, dtype=torch.bool)
    free[chosen] = False
    picked = [chosen]
    unit = nn.functional.normalize(visual.float(), dim=-1)
    for i, pivot in enumerate(nn.functional.normalize(pivots, dim=-1)):
        share = rest // len(pivots) + (1 if i < rest % len(pivots) else 0)
        if not share:
            continue
        duplication = (unit @ pivot).masked_fill(~free, float("inf"))
        take = S.top_k_stable(-duplication, share)
        free[take] = False
        picked.append(take)
    return torch.cat(picked).sort().values


@dataclass
class DARTPruning(LayerCut):
    """One batch's DART: key norms from layer K-1's attention, duplication from its output."""

    image_pivots: int = 4
    text_pivots: int = 4
    key_norms: torch.Tensor | None = None  # (B, L) L1 norm of each position's keys in layer K-1

    def observe(self, query, key, valid, scaling) -> None:
        self.key_norms = key.float().abs().sum(dim=(1, 3))  # over heads and head dimensions

    def choose(self, hidden: torch.Tensor, language_model: nn.Module) -> None:
        states = language_model.norm(hidden).float()
        visual = self.visual.to(hidden.device)
        valid = self.valid.to(hidden.device)
        self.kept = torch.zeros_like(self.visual)
        for b in range(visual.shape[0]):
            positions = visual[b].nonzero().flatten()
            if not positions.numel():
                continue
            after = torch.arange(visual.shape[1], device=hidden.device) > positions[-1]
            text = (valid[b] & ~visual[b] & after).nonzero().flatten()  # the prompt after the pictures
            keep = least_duplicated(
                states[b, positions].cpu(), self.key_norms[b, positions].cpu(), states[b, text].cpu(),
                self.key_norms[b, text].cpu(), self.budget(positions.numel()), self.image_pivots, self.text_pivots,
            )  # fmt: skip
            self.kept[b, positions[keep.to(positions.device)].to(self.kept.device)] = True


@register
@dataclass
class DART(Method):
    """DART: from LLM layer ``layer`` (K) on, only the ``keep`` share (R) of visual tokens goes on, those
    that duplicate ``image_pivots`` + ``text_pivots`` pivot tokens least; no attention weights needed."""

    name: ClassVar[str] = "dart"
    aliases: ClassVar[dict[str, str]] = {"K": "layer", "R": "keep"}
    layer: int = 2
    keep: float = 0.222  # the paper's headline setting: 128 of LLaVA-1.5's 576 tokens
    image_pivots: int = 4
    text_pivots: int = 4

    def check(self, adapter: VLMAdapter) -> None:
        check_ratio("dart", self.keep)
        check_cut_layer("dart", self.layer, adapter)
        if self.image_pivots < 1 or self.text_pivots < 0:
            raise TokcompError("dart: image_pivots must be at least 1 and text_pivots at least 0")

    def attention_hooks(self, visual, cache):
        hook = DARTPruning(layer=self.layer, keep=self.keep, visual=visual, num_layers=len(cache.layers),
                           image_pivots=self.image_pivots, text_pivots=self.text_pivots)  # fmt: skip
        return [hook]

    def report(self, hooks, sample: int, account) -> dict:
        hook = recorded_cut(hooks, DARTPruning, sample, account)
        return {"dart": {"layer": self.layer, "dropped_visual": int(hook.dropped_per_sample()[sample])}}
