"""FastV (Chen et al., ECCV 2024): after LLM layer K-1, only the visual tokens the last token attends
to most go on; the others leave the sequence (``cut.py``), so layers K and later compute on fewer
tokens and cache fewer keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tokcomp.errors import TokcompError
from tokcomp.methods import selection as S
from tokcomp.methods.base import Method
from tokcomp.methods.cut import LayerCut, recorded_cut
from tokcomp.methods.settings import check_ratio, register

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter


def last_token_attention(query, key, valid, scaling) -> torch.Tensor:
    """(B, L) the attention the last query pays every key (softmax over the valid ones, mean over heads)."""
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    logits = (query[:, :, -1:].float() @ keys.float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


@dataclass
class FastVPruning(LayerCut):
    """One batch's FastV: at each cut, the ``keep`` share of the visual tokens still in the sequence
    that the last token attends to most in the layer before goes on (one cut for FastV, several for
    PyramidDrop)."""

    def observe(self, query, key, valid, scaling) -> None:
        self._rank(query, key, valid, scaling)

    def _rank(self, query, key, valid, scaling) -> None:
        received = self.to_input(last_token_attention(query, key, valid, scaling), float("-inf"))
        current = self.current_visual().to(received.device)
        kept = torch.zeros_like(self.visual)
        for b in range(self.visual.shape[0]):
            k = self.budget(int(current[b].sum()))
            if k:
                kept[b, S.top_k_stable(received[b].masked_fill(~current[b], float("-inf")), k).to(kept.device)] = True
        self.kept = kept


def check_cut_layer(name: str, layer: int, adapter: VLMAdapter) -> None:
    """The cut layer K must leave at least one layer before and one after it."""
    layers = adapter.language_model.config.num_hidden_layers
    if not 1 <= layer < layers:
        raise TokcompError(f"{name}: layer (K) must be between 1 and {layers - 1} for this {layers}-layer LLM")


@register
@dataclass
class FastV(Method):
    """FastV (ECCV 2024): from LLM layer ``layer`` (the paper's K) on, only the ``keep`` share (R) of
    visual tokens goes on, ranked by the attention the last token pays them in layer K-1; the others
    leave the sequence and the cache. Layers below are untouched; positions are kept."""

    name: ClassVar[str] = "fastv"
    aliases: ClassVar[dict[str, str]] = {"K": "layer", "R": "keep"}
    layer: int = 2
    keep: float = 0.5

    def check(self, adapter: VLMAdapter) -> None:
        check_ratio("fastv", self.keep)
        check_cut_layer("fastv", self.layer, adapter)

    def attention_hooks(self, visual, cache):
        return [FastVPruning(layer=self.layer, keep=self.keep, visual=visual, num_layers=len(cache.layers))]

    def report(self, hooks, sample: int, account) -> dict:
        hook = recorded_cut(hooks, FastVPruning, sample, account)
        return {"fastv": {"layer": self.layer, "dropped_visual": int(hook.dropped_per_sample()[sample])}}
