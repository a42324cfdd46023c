"""Visual units (an image or a video of one request) and how their tokens reach the LLM.

For the plain model, a unit's LLM tokens come from the stock feature functions. For a merging
method, tokcomp rebuilds the *same layout* the stock model would produce (AnyRes crops unpadded with
row newlines, pooled video frames, ...) from the merged tokens copied back to their patches, and
records which layout positions are exact copies of one merged token. Those positions share one
*unique* token; anything mixed (a newline, a pooled position straddling two groups) is a singleton.
``mapping[p]`` gives the unique token of layout position ``p``: this is DyMU's ``M``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokcomp.models.adapters import EncodedImage


@dataclass
class VisualUnit:
    """One image or one video of a request, preprocessed into encoder views."""

    kind: str  # "image" | "video"
    views: torch.Tensor  # (V, 3, S, S)
    image_size: tuple[int, int] | None = None  # original (H, W), for AnyRes unpadding
    anyres: bool = False  # OneVision single image: base view + crops


@dataclass
class UnitTokens:
    """A unit's tokens as the LLM receives them: unique embeddings and the full-length map."""

    unique: torch.Tensor  # (N_un, H)
    mapping: torch.Tensor  # (N_full,) long into ``unique``
    layer_counts: list[int]  # visual tokens after each encoder layer, summed over views

    @property
    def full(self) -> int:
        return int(self.mapping.shape[0])

    @property
    def kept(self) -> int:
        return int(self.unique.shape[0])


def identity_tokens(features: torch.Tensor, layer_counts: list[int]) -> UnitTokens:
    return UnitTokens(features, torch.arange(features.shape[0], device=features.device), layer_counts)


def tokens_from_copies(
    full: torch.Tensor, owner: torch.Tensor, token_feats: torch.Tensor, counts: list[int]
) -> UnitTokens:
    """Unique tokens from a layout: ``owner[p]`` is the merged token copied at ``p``, or -1 if mixed.

    Merged tokens keep the order of their first appearance; mixed positions become singletons
    carrying the layout's own feature.
    """
    mapping = torch.empty(full.shape[0], dtype=torch.long, device=full.device)
    rows: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    for p, t in enumerate(owner.tolist()):
        if t >= 0:
            if t not in seen:
                seen[t] = len(rows)
                rows.append(token_feats[t])
            mapping[p] = seen[t]
        else:
            mapping[p] = len(rows)
            rows.append(full[p])
    return UnitTokens(torch.stack(rows) if rows else full[:0], mapping, counts)


def summed_counts(views: list[EncodedImage]) -> list[int]:
    return [sum(c) for c in zip(*(v.layer_counts for v in views), strict=True)]
