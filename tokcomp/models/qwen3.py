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

Video: the stock processor writes every frame group (two frames, one temporal patch) as its own run of
tokens after its timestamp (``<0.2 seconds><|vision_start|>...<|vision_end|><1.2 seconds>...``), and the
stock positions place each group as a one-frame image from its run's start. A video is still one unit to
the methods (its frames in order, as on Qwen2.5-VL); the prompt holds one placeholder per frame group
(``video_prompt``) and the splice puts each group's kept tokens in its own run (``placeholder_runs``).
"""

from __future__ import annotations

import torch

from tokcomp.errors import TokcompError
from tokcomp.models.qwen import DEFAULT_SECONDS_PER_GRID, Qwen2_5_VLAdapter


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

    # --- video: one run of tokens per frame group, each after its timestamp ------------------------
    def placeholder_runs(self, kind: str, frames: int) -> int:
        return frames if kind == "video" else 1

    def frame_timestamps(self, num_frames: int, seconds_per_grid: float = DEFAULT_SECONDS_PER_GRID) -> list[float]:
        """Seconds of each frame group, as the stock processor computes them: the mean time of its first and
        last frame (an odd last frame repeated), frames sampled evenly at ``temporal / seconds_per_grid`` fps."""
        temporal = int(self.vision_config.temporal_patch_size)
        indices = list(range(num_frames))
        indices += [indices[-1]] * (-len(indices) % temporal)
        fps = temporal / seconds_per_grid
        return [(indices[i] / fps + indices[i + temporal - 1] / fps) / 2 for i in range(0, len(indices), temporal)]

    def video_prompt(self, prompt: str, num_frames: int) -> str:
        """The video's vision markers written once per frame group after its timestamp, as the stock
        processor writes them (``<0.2 seconds><|vision_start|><|video_pad|><|vision_end|>...``)."""
        video = self.tokenizer.convert_ids_to_tokens(self.video_token_id)
        once = f"<|vision_start|>{video}<|vision_end|>"  # as the chat templates write a video (``inline_tags``)
        if prompt.count(once) != 1:
            raise TokcompError(f"{self.name}: the prompt should hold the video once as {once}")
        runs = "".join(f"<{t:.1f} seconds>{once}" for t in self.frame_timestamps(num_frames))
        return prompt.replace(once, runs)

    def unit_rope(self, unit) -> tuple[torch.Tensor, int]:
        """A video's frame groups each at the positions of a one-frame image from its own run's start (the
        stock ``get_rope_index`` splits the video grid per frame group); images as on Qwen2.5-VL."""
        if unit.kind != "video":
            return super().unit_rope(unit)
        t, h, w = unit.grid_thw
        m = self.merge_size
        one = self.model.model.get_vision_position_ids(0, torch.tensor([1, h, w]), 1, m)
        return one.repeat(1, t), max(h, w) // m

    def _add_encoder_extras(self, tokens, out, index: int) -> None:
        """The unit's DeepStack features per unique token, as the stock model computes them; under
        in-encoder merging a merged token's are the mean of its units' (``tokcomp.models.qwen_merging``
        copies every tap's output back to each unit, as it does the merger's)."""
        deepstack = torch.stack([level[index] for level in out.deepstack_features])  # (levels, N, H)
        tokens.deepstack = entry_means(deepstack, tokens.mapping.to(deepstack.device), tokens.kept)
