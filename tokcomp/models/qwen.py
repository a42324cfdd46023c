"""The Qwen2.5-VL family: dynamic-resolution images, 2-frame temporal patches, a 2x2 patch merger and
3-D M-RoPE positions.

A unit's views are the processor's flattened patch rows ((N, C*T*p*p), the merger's 2x2 groups next to
each other) with its grid (t, h, w) in patches; its LLM tokens are the merger's outputs, one per 2x2
group, in the stock raster order (frame, row, column). Every stock LLM token has a 3-D position
(``rope``: temporal, height, width, relative to the unit's start) and the unit moves the text position
on by ``span`` (the larger side in merged tokens), exactly as the stock ``get_rope_index`` counts; a
pre-LLM selection keeps each kept token's stock position, as vLLM's EVS does.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from tokcomp.errors import TokcompError
from tokcomp.models.adapters import VLMAdapter
from tokcomp.models.visual import EncodedImage, VisualUnit, identity_tokens, tokens_from_copies

# At most this many pixels per video frame, as the stock Qwen2-VL video processor bounds them (768 merged
# tokens of 28x28 px): a frame gets far fewer tokens than a lone image may.
VIDEO_MAX_PIXELS = 768 * 28 * 28
# Seconds of video per temporal patch when the caller gives no frame rate (the stock processor's
# default: temporal_patch_size / fps with fps 2).
DEFAULT_SECONDS_PER_GRID = 1.0


class Qwen2_5_VLAdapter(VLMAdapter):
    """``Qwen2_5_VLForConditionalGeneration``: a windowed ViT with 2-D RoPE, a 2x2 merger, a Qwen2 LLM
    with 3-D M-RoPE."""

    family = "qwen2_5_vl"
    uses_mrope = True
    merges_in_stock_features = True  # DToMe runs inside get_image_features (tokcomp.models.qwen_merging)
    merge_unit = "2x2 merge units"

    # --- vision encoder geometry -------------------------------------------------------------
    @property
    def vision_model(self) -> nn.Module:
        return self.model.model.visual

    @property
    def num_layers(self) -> int:
        return len(self.vision_model.blocks)

    @property
    def has_cls(self) -> bool:
        return False

    @property
    def feature_layer(self) -> int:
        return self.num_layers

    @property
    def merge_size(self) -> int:
        return int(self.vision_config.spatial_merge_size)

    # Calibration and merge maps read every image at one square size (DyMU calibrates at the encoder's
    # fixed resolution); at their own resolution the thresholds keep about the same share of merge units.
    CALIBRATION_SIDE = 448

    @property
    def image_size(self) -> int:
        """The side (px) of the square calibration view: at most CALIBRATION_SIDE, within the processor's bounds."""
        factor = int(self.vision_config.patch_size) * self.merge_size
        low, high = self._image_pixels()
        side = min(self.CALIBRATION_SIDE, int(high**0.5) // factor * factor)
        return max(side, -(-int(low**0.5) // factor) * factor)

    @property
    def grid(self) -> tuple[int, int]:
        """The calibration view's grid of merge units (the unit DToMe merges on this family)."""
        side = self.image_size // (int(self.vision_config.patch_size) * self.merge_size)
        return side, side

    def attach_merging(self, rule, token_order="spatial"):
        from tokcomp.models.qwen_merging import attach_unit_merging

        return attach_unit_merging(self.vision_model, rule, token_order=token_order)

    def _square(self, image: Image.Image) -> Image.Image:
        side = self.image_size
        return image.convert("RGB").resize((side, side), Image.BICUBIC)

    def encoder_views(self, images: list[Image.Image]) -> torch.Tensor:
        """Every image at the calibration size: (B, rows, C) patch rows, as the processor flattens them."""
        return torch.stack([self._patches(self._square(im))[0] for im in images])

    def view_image(self, image: Image.Image) -> Image.Image:
        return self._square(image)

    @torch.no_grad()
    def encode(self, pixel_values, rule=None, token_order="spatial", project=False) -> list[EncodedImage]:
        """Square calibration views through the tower (merging with ``rule`` or the attached method): per
        image its merged tokens (the merger's outputs), units per token, unit -> token map, units per block."""
        h, w = (g * self.merge_size for g in self.grid)
        grids = torch.tensor([[1, h, w]] * pixel_values.shape[0])
        rows = pixel_values.reshape(-1, pixel_values.shape[-1])
        if rule is not None:
            with self.attach_merging(rule, token_order) as state:
                pooled = self.vision_model(rows, grid_thw=grids).pooler_output
            record = state.last
        else:
            pooled = self.vision_model(rows, grid_thw=grids).pooler_output
            record = self.merging.last if self.merging is not None else None
        units = self.grid[0] * self.grid[1]
        if record is None:
            return [EncodedImage(f, torch.ones(units), torch.arange(units), [units] * self.num_layers)
                    for f in pooled.split(units)]  # fmt: skip
        out, first = [], 0
        for b, kept in enumerate(c[-1] for c in record.layer_counts):
            source = record.token_of_unit[b * units : (b + 1) * units] - first
            out.append(EncodedImage(record.tokens[first : first + kept], record.sizes[first : first + kept],
                                    source, record.layer_counts[b]))  # fmt: skip
            first += kept
        return out

    def inline_tags(self, prompt: str) -> str:
        """``<image>`` / ``<video>`` as the Qwen chat template writes them: the pad token between the
        vision start and end markers."""
        tok = self.tokenizer
        image, video = tok.convert_ids_to_tokens([self.image_token_id, self.video_token_id])
        return prompt.replace("<image>", f"<|vision_start|>{image}<|vision_end|>").replace(
            "<video>", f"<|vision_start|>{video}<|vision_end|>"
        )

    # --- units --------------------------------------------------------------------------------
    def _patches(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        out = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        t, h, w = (int(v) for v in out["image_grid_thw"][0])
        return out["pixel_values"].to(self.dtype), (t, h, w)

    def prepare_units(self, images: list[Image.Image], video: list[Image.Image] | None) -> list:
        units = []
        for image in images:
            rows, grid = self._patches(image)
            units.append(VisualUnit("image", rows, grid_thw=grid))
        if video:
            units.append(self._video_unit(video))
        return units

    def _video_unit(self, frames: list[Image.Image]) -> VisualUnit:
        """Frames paired into temporal patches as the stock video layout has them (an odd last frame
        repeated): each row holds the same patch of two consecutive frames. Every frame is brought to one
        size, from the first frame's, within the image processor's bounds and ``VIDEO_MAX_PIXELS`` (one
        grid per video, as the stock video processor has it)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        width, height = frames[0].size
        factor = int(self.vision_config.patch_size) * self.merge_size
        low, high = self._image_pixels()
        size = tuple(reversed(smart_resize(height, width, factor=factor, min_pixels=low,
                                           max_pixels=min(high, VIDEO_MAX_PIXELS))))  # fmt: skip
        per_frame = [self._patches(f if f.size == size else f.convert("RGB").resize(size, Image.BICUBIC))
                     for f in frames]  # fmt: skip
        _, h, w = per_frame[0][1]
        temporal = int(self.vision_config.temporal_patch_size)
        while len(per_frame) % temporal:
            per_frame.append(per_frame[-1])
        channels, patch = 3, int(self.vision_config.patch_size)
        pieces = []
        for start in range(0, len(per_frame), temporal):
            group = [rows.view(rows.shape[0], channels, temporal, patch, patch)[:, :, 0] for rows, _ in
                     per_frame[start : start + temporal]]  # fmt: skip
            pieces.append(torch.stack(group, dim=2).flatten(1))
        grid = (len(per_frame) // temporal, h, w)
        return VisualUnit("video", torch.cat(pieces), grid_thw=grid, seconds_per_grid=DEFAULT_SECONDS_PER_GRID)

    def _image_pixels(self) -> tuple[int, int]:
        """The image processor's (min, max) pixels."""
        processor = self.image_processor
        size = getattr(processor, "size", None)
        low = getattr(processor, "min_pixels", None) or getattr(size, "shortest_edge", None) or 56 * 56
        high = getattr(processor, "max_pixels", None) or getattr(size, "longest_edge", None) or 28 * 28 * 1280
        return int(low), int(high)

    def _tokens_of(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.merge_size**2

    def stock_unit_tokens(self, units: list) -> list:
        """Each unit's merger outputs as the stock model computes them (one tower run over the request's
        images, one over its video); under in-encoder merging the merged tokens with their map."""
        model = self.model.model
        result: dict[int, object] = {}
        for kind in ("image", "video"):
            mine = [(i, u) for i, u in enumerate(units) if u.kind == kind]
            if not mine:
                continue
            rows = torch.cat([u.views for _, u in mine])
            grids = torch.tensor([u.grid_thw for _, u in mine])
            if kind == "image":
                out = model.get_image_features(pixel_values=rows, image_grid_thw=grids)
            else:
                out = model.get_video_features(pixel_values_videos=rows, video_grid_thw=grids)
            record = self.merging.last if self.merging is not None else None
            segment = unit_start = 0
            for k, ((i, u), f) in enumerate(zip(mine, out.pooler_output, strict=True)):
                frames = u.grid_thw[0] if kind == "video" else 0
                if record is None:
                    counts = [u.views.shape[0]] * self.num_layers
                    tokens = identity_tokens(f, counts, num_frames=frames, views=max(1, frames), trailing=0)
                else:  # merged inside the tower: ``f`` holds each unit's merged token, copied
                    slices = record.layer_counts[segment : segment + u.grid_thw[0]]
                    counts = [self.merge_size**2 * sum(c) for c in zip(*slices, strict=True)]
                    owner = record.token_of_unit[unit_start : unit_start + f.shape[0]]
                    tokens = tokens_from_copies(f, owner, record.tokens, counts, num_frames=frames,
                                                views=max(1, frames), trailing=0)  # fmt: skip
                    segment, unit_start = segment + u.grid_thw[0], unit_start + f.shape[0]
                self._add_encoder_extras(tokens, out, k)
                result[i] = self._placed(u, tokens)
        return [result[i] for i in range(len(units))]

    def _add_encoder_extras(self, tokens, out, index: int) -> None:
        """What else the tower's output gives unit ``index`` of its run (Qwen3-VL: DeepStack features)."""

    def encode_order(self, units: list) -> list[int]:
        return sorted(range(len(units)), key=lambda i: units[i].kind != "image")

    def _placed(self, unit, tokens):
        tokens = super()._placed(unit, tokens)
        tokens.rope, tokens.rope_span = self.unit_rope(unit)
        return tokens

    def unit_rope(self, unit) -> tuple[torch.Tensor, int]:
        """(3, N) stock M-RoPE positions of the unit's LLM tokens relative to its start, and how far the
        text position moves on after it (as the stock ``get_rope_index``)."""
        t, h, w = unit.grid_thw
        m = self.merge_size
        interval = 1.0
        if unit.kind == "video":
            interval = float(self.vision_config.tokens_per_second) * float(unit.seconds_per_grid)
        grid = torch.tensor([t, h, w])
        rope = self.model.model.get_vision_position_ids(0, grid, 1, m, interval)
        return rope, max(h, w) // m

    def provenance(self, unit) -> torch.Tensor:
        """(frame group or 0, merged-token index in raster order) of every LLM token."""
        t, h, w = unit.grid_thw
        per = h * w // self.merge_size**2
        view = torch.arange(t).repeat_interleave(per)
        return torch.stack([view, torch.arange(per).repeat(t)], 1)

    def attach_trace(self, spec):
        """The trace of ``spec`` on the tower (``tokcomp.models.qwen_trace``): per merge unit, the attention
        its patches receive in their segment of the traced block, and their keys."""
        from tokcomp.models.qwen_trace import attach_qwen_trace

        if self.merging is not None:
            raise TokcompError(f"{self.name}: an encoder trace under merging inside the Qwen vision tower is not "
                               "supported")  # fmt: skip
        return attach_qwen_trace(self.vision_model, spec)

    def traced_views(self, unit) -> int:
        """One traced view per image, one per temporal slice of a video (the tower's segments)."""
        return unit.grid_thw[0] if unit.kind == "video" else 1

    def layout(self, unit, values, fill):
        """Traced views (V, P, C) are already merge units in raster order, the unit's own token order."""
        return values.flatten(0, 1)

    def units_from_inputs(self, rows: list[torch.Tensor], inputs: dict) -> list[tuple[list, list]]:
        """Images in order of ``image_grid_thw`` (their rows of ``pixel_values`` in turn), videos in order
        of ``video_grid_thw``; a request takes as many as its image / video tokens need."""
        sources = {
            "image": (inputs.get("pixel_values"), inputs.get("image_grid_thw"), self.image_token_id),
            "video": (inputs.get("pixel_values_videos"), inputs.get("video_grid_thw"), self.video_token_id),
        }
        seconds = inputs.get("second_per_grid_ts")
        cursors = {"image": [0, 0], "video": [0, 0]}  # (unit, patch row)
        out = []
        for ids in rows:
            per_kind = {}
            for kind, (pixels, grids, token) in sources.items():
                need, units = int((ids == token).sum()), []
                while need > 0:
                    unit_index, row = cursors[kind]
                    if pixels is None or grids is None or unit_index >= grids.shape[0]:
                        raise TokcompError(f"the input ids hold more {kind} tokens than the {kind} inputs give")
                    grid = tuple(int(v) for v in grids[unit_index])
                    n_rows = grid[0] * grid[1] * grid[2]
                    # without second_per_grid_ts the stock model counts one second per temporal patch (the default)
                    timed = kind == "video" and seconds is not None
                    extra = {"seconds_per_grid": float(seconds[unit_index])} if timed else {}
                    unit = VisualUnit(kind, pixels[row : row + n_rows].to(self.dtype), grid_thw=grid, **extra)
                    count = self._tokens_of(grid)
                    units.append((unit, count))
                    need -= count
                    cursors[kind] = [unit_index + 1, row + n_rows]
                if need < 0:
                    raise TokcompError(f"a request's {kind} tokens do not match its {kind} grids")
                per_kind[kind] = units
            out.append((per_kind["image"], per_kind["video"]))
        return out
