"""What a stock processor gives ``model.generate``: expanded placeholder ids, pixel values, sizes.

LLaVA-1.5 uses transformers' own ``LlavaProcessor``. The stock ``LlavaOnevisionProcessor`` needs a
video processor, which needs torchvision (not installable beside the CPU torch, see the Makefile),
so for OneVision the same outputs are built here the way that processor builds them: the chat
template, each ``<image>`` expanded to the image's token count (AnyRes for a lone image, the base
view plus a newline for each of several), ``<video>`` to frames x pooled tokens + 1, the image
processor's ``pixel_values`` / ``image_sizes``, and ``batch_num_images``. The same holds for
``Qwen2_5_VLProcessor``: placeholders expanded to t*h*w/4 tokens, ``pixel_values`` rows with
``image_grid_thw``, the video's temporal patches with ``video_grid_thw`` and ``second_per_grid_ts``, and
``mm_token_type_ids`` (1 on image tokens, 2 on video tokens); Qwen3-VL the same way, a video's tokens
in one run per frame group after its timestamp (and no ``second_per_grid_ts``).
"""

from __future__ import annotations

import torch
from transformers import LlavaProcessor

from tokcomp.models.visual import VisualUnit


def stock_inputs(adapter, prompts: list[str], images: list[list], videos: list | None = None) -> dict:
    """Left-padded stock inputs for a batch of requests (``images[b]``: request b's images)."""
    tok = adapter.tokenizer
    tok.padding_side = "left"
    videos = videos or [None] * len(prompts)
    if adapter.family == "llava":
        processor = LlavaProcessor(
            image_processor=adapter.image_processor, tokenizer=tok, chat_template=adapter.chat_template(),
            patch_size=adapter.vision_config.patch_size, vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )  # fmt: skip
        texts = [adapter.build_prompt(p, len(ims), False) for p, ims in zip(prompts, images, strict=True)]
        flat = [im for ims in images for im in ims]
        return dict(processor(images=flat or None, text=texts, return_tensors="pt", padding=True))
    if adapter.family in ("qwen2_5_vl", "qwen3_vl"):
        return _qwen_inputs(adapter, prompts, images, videos)
    texts, pixels, sizes, clips = [], [], [], []
    for prompt, ims, video in zip(prompts, images, videos, strict=True):
        text = adapter.build_prompt(prompt, len(ims), video is not None)
        for unit in adapter.prepare_units(list(ims), None):
            text = text.replace("<image>", "\x00" * adapter._image_token_count(unit), 1)
        if video is not None:
            (unit,) = adapter.prepare_units([], list(video))
            pooled = adapter.model.model.get_video_features(unit.views[None]).pooler_output[0].shape[0]
            text = text.replace("<video>", "\x01" * pooled, 1)
            clips.append(unit.views)
        texts.append(text.replace("\x00", "<image>").replace("\x01", "<video>"))
        if ims:
            out = adapter.image_processor(images=[im.convert("RGB") for im in ims], return_tensors="pt")
            pixels.append(out["pixel_values"])
            sizes.append(out["image_sizes"])
    encoded = dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    if pixels:
        most = max(p.shape[1] for p in pixels)
        padded = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
        encoded.update(
            pixel_values=torch.cat(padded), image_sizes=torch.cat(sizes),
            batch_num_images=torch.tensor([len(ims) for ims in images if ims]),
        )  # fmt: skip
    if clips:
        encoded["pixel_values_videos"] = torch.stack(clips)
    return encoded


def _qwen_inputs(adapter, prompts: list[str], images: list[list], videos: list) -> dict:
    tok = adapter.tokenizer
    texts, rows, grids, video_rows, video_grids, seconds = [], [], [], [], [], []
    for prompt, ims, video in zip(prompts, images, videos, strict=True):
        text = adapter.build_prompt(prompt, len(ims), video is not None)
        for unit in adapter.prepare_units(list(ims), list(video) if video is not None else None):
            count = adapter._tokens_of(unit.grid_thw)
            if unit.kind == "image":
                text = text.replace("<image>", "\x00" * count, 1)
                rows.append(unit.views)
                grids.append(unit.grid_thw)
            else:
                runs = adapter.placeholder_runs("video", unit.grid_thw[0])  # Qwen3-VL: a run per frame group
                if runs > 1:
                    text = adapter.video_prompt(text, len(video))
                for _ in range(runs):
                    text = text.replace("<video>", "\x01" * (count // runs), 1)
                video_rows.append(unit.views)
                video_grids.append(unit.grid_thw)
                seconds.append(unit.seconds_per_grid)
        texts.append(text.replace("\x00", "<image>").replace("\x01", "<video>"))
    encoded = dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    ids = encoded["input_ids"]
    encoded["mm_token_type_ids"] = (ids == adapter.image_token_id).int() + 2 * (ids == adapter.video_token_id).int()
    if rows:
        encoded.update(pixel_values=torch.cat(rows), image_grid_thw=torch.tensor(grids))
    if video_rows:
        encoded.update(pixel_values_videos=torch.cat(video_rows), video_grid_thw=torch.tensor(video_grids))
        if adapter.family == "qwen2_5_vl":  # Qwen3-VL writes the times as text instead
            encoded["second_per_grid_ts"] = torch.tensor(seconds)
    return encoded


__all__ = ["VisualUnit", "stock_inputs"]
