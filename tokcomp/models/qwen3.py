"""The Qwen3-VL family: Qwen2.5-VL's layout (dynamic-resolution images, 2x2 merger, 3-D M-RoPE) with a
full-attention ViT, 16 px patches, interleaved M-RoPE and DeepStack.

DeepStack: the stock model merges the hidden states of a few intermediate encoder blocks too (one merger
per block) and adds them to the visual positions' hidden states after each of the LLM's first layers.
Each of a unit's LLM tokens carries its DeepStack features (``UnitTokens.deepstack``), so a pre-LLM
selection keeps every kept token's own features (as vLLM's EVS does: they travel as extra channels of the
same embedding row) and a merge averages them like the embeddings.

Video is not supported yet: the stock processor writes every frame group as its own run between a
timestamp and the vision markers, which tokcomp's one-run-per-unit splice does not take.
"""

from __future__ import annotations

import torch
from PIL import Image

from tokcomp.errors import TokcompError
from tokcomp.models.qwen import Qwen2_5_VLAdapter
from tokcomp.models.visual import identity_tokens

VIDEO_UNSUPPORTED = "video input is not supported on the Qwen3-VL family yet (images are)"


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """``Qwen3VLForConditionalGeneration``: a ViT with learned and 2-D rotary positions, a 2x2 merger and
    DeepStack mergers, a Qwen3 LLM with interleaved 3-D M-RoPE."""

    family = "qwen3_vl"
    supports_encoder_merging = False  # DToMe inside this tower (with its DeepStack taps): not yet
    merges_in_stock_features = False

    @property
    def deepstack_levels(self) -> int:
        return len(self.vision_config.deepstack_visual_indexes)

    def attach_merging(self, rule, token_order="spatial"):
        raise TokcompError(f"{self.name}: merging inside the Qwen3-VL vision encoder is not supported yet")

    def prepare_units(self, images: list[Image.Image], video: list[Image.Image] | None) -> list:
        if video:
            raise TokcompError(f"{self.name}: {VIDEO_UNSUPPORTED}")
        return super().prepare_units(images, None)

    def stock_unit_tokens(self, units: list) -> list:
        """Each image's merger outputs with the DeepStack features of every token, as the stock model
        computes them (one tower run over the request's images)."""
        if not units:
            return []
        if any(u.kind == "video" for u in units):
            raise TokcompError(f"{self.name}: {VIDEO_UNSUPPORTED}")
        rows = torch.cat([u.views for u in units])
        grids = torch.tensor([u.grid_thw for u in units])
        out = self.model.model.get_image_features(pixel_values=rows, image_grid_thw=grids)
        result = []
        for i, (unit, features) in enumerate(zip(units, out.pooler_output, strict=True)):
            tokens = identity_tokens(features, [unit.views.shape[0]] * self.num_layers)
            tokens.deepstack = torch.stack([level[i] for level in out.deepstack_features])
            result.append(self._placed(unit, tokens))
        return result

    def units_from_inputs(self, rows: list[torch.Tensor], inputs: dict) -> list[tuple[list, list]]:
        if inputs.get("pixel_values_videos") is not None or any(bool((r == self.video_token_id).any()) for r in rows):
            raise TokcompError(f"{self.name}: {VIDEO_UNSUPPORTED}")
        return super().units_from_inputs(rows, inputs)
