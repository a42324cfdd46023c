"""The shared stage of pre-LLM methods that choose per encoder view from the encoder trace (VisionZip,
PruMerge+): each view's scored positions go to ``view_groups``, newlines and a kept CLS stay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.errors import TokcompError
from tokcomp.methods.base import Method
from tokcomp.methods.trace import TraceSpec
from tokcomp.models.visual import UnitTokens, merge_positions


@dataclass
class TracedViewSelection(Method):
    """Base of a method that reads the attention (and keys) of encoder layer ``layer`` and, per view,
    returns groups of positions to merge (a group of one is kept as it is), optionally weighted."""

    name: ClassVar[str] = "traced-views"
    layer: int | None = None  # traced encoder layer, counted from 1 (None: the one the VLM reads)

    def encoder_trace(self, adapter) -> TraceSpec:
        return TraceSpec(self.layer or adapter.feature_layer, keys=True)

    def check(self, adapter) -> None:
        self.check_settings()
        if not 1 <= self.encoder_trace(adapter).layer <= adapter.num_layers:
            raise TokcompError(f"{self.name}: layer must be between 1 and {adapter.num_layers}")

    def check_settings(self) -> None:
        """The method's own settings (one clear error each)."""

    @property
    def keeps_positions(self) -> bool:
        return True

    def view_groups(
        self, scores: torch.Tensor, keys: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """One view's groups (indices into its positions, the position kept first) and, if the members are
        weighted, one weight tensor per group (None: plain means)."""
        raise NotImplementedError

    def select_request(self, adapter, kinds, tokens: list[UnitTokens], text, record=None):
        out = []
        for unit in tokens:
            if unit.trace is None or unit.trace_keys is None:
                raise TokcompError(f"{self.name}: these tokens carry no encoder trace (attach the method first)")
            scored = torch.isfinite(unit.trace)
            groups = list(torch.nonzero(~scored))  # newlines (and a kept CLS) stay as they are
            weights: list[torch.Tensor] | None = [torch.ones(1) for _ in groups]
            for view in unit.provenance[scored, 0].unique().tolist():
                where = torch.nonzero(scored & (unit.provenance[:, 0] == view)).flatten()
                found, found_weights = self.view_groups(unit.trace[where], unit.trace_keys[where])
                groups += [where[g] for g in found]
                weights = None if weights is None or found_weights is None else weights + found_weights
            out.append(merge_positions(unit, groups, weights))
        return out
