"""The Qwen3-VL family: Qwen2.5-VL's layout (dynamic-resolution images, 2x2 merger, 3-D M-RoPE) with a
full-attention ViT, 16 px patches, interleaved M-RoPE and DeepStack.

DeepStack: the stock model merges the hidden states of a few intermediate encoder blocks too (one merger
per block) and adds them to the visual positions' hidden states after each of the LLM's first layers.
Each of a unit's LLM tokens carries its DeepStack features (``UnitTokens.deepstack``), so a pre-LLM
selection keeps every kept token's own features (as vLLM's EVS does: they travel as extra channels of the
same embedding row) and a merge averages them like the embeddings.

In-encoder merging (DToMe, ToMe) runs on whole 2x2 merge units as on Qwen2.5-VL
(``tokcomp.models.qwen_merging``), here in every block (no windows) and with each DeepStack tap's output
copied back to the units like the merger's; a merged token's DeepStack features are its units' mean.

Video is not supported yet: the stock processor writes every frame group as its own run between a
timestamp and the vision markers, which tokcomp's one-run-per-unit splice does not take.
"""

from __future__ import annotations

import torch
from PIL import Image

from tokcomp.errors import TokcompError
from tokcomp.models.qwen import Qwen2_5_VLAdapter
from tokcomp.models.visual import identity_tokens, tokens_from_copies

VIDEO_UNSUPPORTED = "video input is not supported on the Qwen3-VL family yet (images are)"


def entry_means(values: torch.Tensor, mapping: torch.Tensor, entries: int) -> torch.Tensor:
    """(levels, entries, H): per unique entry the mean of ``values`` (levels, N, H) over the positions that
    ``mapping`` (N,) sends to it (every position its own entry: ``values`` as they are)."""
    if entries == mapping.numel() and torch.equal(mapping, torch.arange(entries, device=mapping.device)):
        return values
    sums = values.new_zeros(values.shape[0], entries, values.shape[-1]).index_add_(1, mapping, values)
    sizes = torch.bincount(mapping, minlength=entries).clamp_min(1).to(values.dtype)
    return sums / sizes[None, :, None]


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """``Qwen3VLForConditionalGeneration``: a ViT with learned and 2-D rotary positions, a 2x2 merger and
    DeepStack mergers, a Qwen3 LLM with interleaved 3-D M-RoPE."""

    family = "qwen3_vl"

    @property
    def deepstack_levels(self) -> int:
        return len(self.vision_config.deepstack_visual_indexes)

    def prepare_units(self, images: list[Image.Image], video: list[Image.Image] | None) -> list:
        if video:
            raise TokcompError(f"{self.name}: {VIDEO_UNSUPPORTED}")
        return super().prepare_units(images, None)

    def stock_unit_tokens(self, units: list) -> list:
        """Each image's merger outputs with the DeepStack features of every token, as the stock model
        computes them (one tower run over the request's images). Under in-encoder merging a merged token's
        DeepStack features are the mean of its units' (``tokcomp.models.qwen_merging`` copies every tap's
        output back to each unit, as it does the merger's)."""
        if not units:
            return []
        if any(u.kind == "video" for u in units):
            raise TokcompError(f"{self.name}: {VIDEO_UNSUPPORTED}")
        rows = torch.cat([u.views for u in units])
        grids = torch.tensor([u.grid_thw for u in units])
        out = self.model.model.get_image_features(pixel_values=rows, image_grid_thw=grids)
        record = self.merging.last if self.merging is not None else None
        result, first_unit = [], 0
        for i, (unit, features) in enumerate(zip(units, out.pooler_output, strict=True)):
            deepstack = torch.stack([level[i] for level in out.deepstack_features])  # (levels, N, H)
            if record is None:
                tokens = identity_tokens(features, [unit.views.shape[0]] * self.num_layers)
            else:  # ``features`` holds each unit's merged token, copied (one merge segment per image)
                counts = [self.merge_size**2 * c for c in record.layer_counts[i]]
                owner = record.token_of_unit[first_unit : first_unit + features.shape[0]]
                tokens = tokens_from_copies(features, owner, record.tokens, counts, trailing=0)
                first_unit += features.shape[0]
            tokens.deepstack = entry_means(deepstack, tokens.mapping.to(deepstack.device), tokens.kept)
            result.append(self._placed(unit, tokens))
        return result

    def units_from_inputs(self, rows: list[torch.Tensor], inputs: dict) -> list[tuple[list, list]]:
        if inputs.get("pixel_values_videos") is not None or any(bool((r == self.video_token_id).any()) for r in rows):
            raise TokcompError(f"{self.name}: {VIDEO_UNSUPPORTED}")
        return super().units_from_inputs(rows, inputs)
