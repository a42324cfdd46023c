"""VisionZip (Yang et al., CVPR 2025): dominant tokens by encoder attention, the rest merged into contextual ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.errors import TokcompError
from tokcomp.methods import selection as S
from tokcomp.methods.settings import register
from tokcomp.methods.views import TracedViewSelection


@register
@dataclass
class VisionZip(TracedViewSelection):
    """VisionZip (CVPR 2025): per encoder view, ``dominant`` tokens by attention plus ``contextual`` merged ones.

    From the paper, on every encoder view (image, AnyRes crop, video frame): keep the ``dominant``
    positions whose patches get the most attention at encoder layer ``layer`` (default: the layer the
    VLM reads; CLS attention for CLIP, mean attention received for SigLIP). Of the R left, take
    ``contextual`` centres evenly in raster order (the i-th at floor(i*R/c)); every other one joins the
    centre whose key there (mean over heads) is most cosine-similar; each group becomes one token, the
    mean of its members. Paper defaults for LLaVA-1.5 (576 patches): 54 + 10 (also 108 + 20). Tokens
    keep raster order and stock position ids; a contextual token takes its centre's. Newlines and a
    kept CLS stay; a pooled video position counts with the pooled score and keys of its patches.

    This follows the paper where the published code differs (it counts CLS among the dominant tokens
    and feeds it to the LLM; a contextual token is centre + mean(other members)). Means are taken in
    the LLM's embedding space (the selection sees projected tokens): the code averages encoder features.
    """

    name: ClassVar[str] = "visionzip"
    dominant: int = 54  # kept per view, by encoder attention
    contextual: int = 10  # merged tokens per view

    def check_settings(self) -> None:
        if self.dominant < 0 or self.contextual < 0 or self.dominant + self.contextual < 1:
            raise TokcompError("visionzip: dominant and contextual must be >= 0, and not both 0")

    def view_groups(self, scores: torch.Tensor, keys: torch.Tensor) -> tuple[list[torch.Tensor], None]:
        return self.groups(scores, keys), None

    def groups(self, scores: torch.Tensor, keys: torch.Tensor) -> list[torch.Tensor]:
        """One view's groups (indices into its positions): each dominant one alone, then each contextual
        group with its centre first."""
        top = S.top_k_stable(scores, min(self.dominant, scores.shape[0]))
        rest = torch.ones_like(scores, dtype=torch.bool).index_fill(0, top, False).nonzero().flatten()
        count = min(self.contextual, rest.numel())
        groups = list(top[:, None])
        if count:
            centres = rest[torch.arange(count, device=rest.device) * rest.numel() // count]
            join = S.cosine_matrix(keys[rest], keys[centres]).argmax(dim=1)
            join[torch.isin(rest, centres)] = -1  # a centre heads its own group only
            groups += [torch.cat([centre[None], rest[join == j]]) for j, centre in enumerate(centres)]
        return groups
