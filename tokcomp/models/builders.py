"""The stock configs and image processors of the families, built in one place.

tokcomp's presets (tiny models from real configs), the real-model shapes (random weights, for bench)
and tokcomp-tiny all make their ``LlavaConfig`` / ``LlavaOnevisionConfig`` / ``Qwen2_5_VLConfig`` /
``Qwen3VLConfig`` and PIL
image processor here, so the families' wiring (feature layer, select strategy, AnyRes pinpoints, M-RoPE
sections, normalisation) is written once.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen3VLConfig,
    SiglipVisionConfig,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]


def llava(vision: dict, text: dict, **config: Any) -> tuple[LlavaConfig, CLIPImageProcessorPil]:
    """LLaVA-1.5: a CLIP tower read at its second-to-last layer without CLS, a Llama LLM."""
    clip = CLIPVisionConfig(**vision)
    full = LlavaConfig(
        vision_config=clip, text_config=LlamaConfig(**text), vision_feature_layer=-2,
        vision_feature_select_strategy="default", **config,
    )  # fmt: skip
    size = clip.image_size
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    return full, processor


def onevision(
    vision: dict, text: dict, pinpoints: list[list[int]], **config: Any
) -> tuple[LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil]:
    """LLaVA-OneVision: a SigLIP tower (no head) read at its last layer, all tokens, a Qwen2 LLM, AnyRes."""
    full = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(vision_use_head=False, **vision), text_config=Qwen2Config(**text),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints, **config,
    )  # fmt: skip
    size = vision["image_size"]
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=pinpoints, image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    )  # fmt: skip
    return full, processor


def _qwen_family(
    config_class: type, vision: dict, text: dict, pixels: tuple[int, int], rope: dict, patch: int, normalise: tuple,
    **config: Any,
) -> tuple[Any, Qwen2VLImageProcessorPil]:
    """The config and PIL image processor both Qwen families build the same way: the merger projecting to the
    LLM's width, ``rope`` as the text rotary parameters, images between ``pixels`` (min, max)."""
    full = config_class(
        vision_config={"out_hidden_size": text["hidden_size"], **vision},
        text_config={"bos_token_id": None, "eos_token_id": None, **text, "rope_parameters": rope}, **config,
    )  # fmt: skip
    low, high = pixels
    mean, std = normalise
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": low, "longest_edge": high}, patch_size=vision.get("patch_size", patch),
        temporal_patch_size=vision.get("temporal_patch_size", 2), merge_size=vision.get("spatial_merge_size", 2),
        image_mean=mean, image_std=std,
    )  # fmt: skip
    return full, processor


def qwen2_5_vl(
    vision: dict, text: dict, pixels: tuple[int, int], mrope_section: list[int], **config: Any
) -> tuple[Qwen2_5_VLConfig, Qwen2VLImageProcessorPil]:
    """Qwen2.5-VL: a windowed ViT with a 2x2 merger into a Qwen2 LLM with 3-D M-RoPE (``mrope_section``
    splits the rotary frequencies among time, height and width); images between ``pixels`` (min, max)."""
    theta = text.pop("rope_theta", 1_000_000.0)
    rope = {"rope_type": "default", "rope_theta": theta, "mrope_section": list(mrope_section)}
    return _qwen_family(Qwen2_5_VLConfig, vision, text, pixels, rope, 14, (CLIP_MEAN, CLIP_STD), **config)


def qwen3_vl(
    vision: dict, text: dict, pixels: tuple[int, int], mrope_section: list[int], **config: Any
) -> tuple[Qwen3VLConfig, Qwen2VLImageProcessorPil]:
    """Qwen3-VL: a ViT with DeepStack mergers (``deepstack_visual_indexes``) into a Qwen3 LLM with
    interleaved 3-D M-RoPE; 16 px patches normalised to [-1, 1]; images between ``pixels`` (min, max)."""
    theta = text.pop("rope_theta", 5_000_000.0)
    rope = {"rope_type": "default", "rope_theta": theta, "mrope_section": list(mrope_section),
            "mrope_interleaved": True}  # fmt: skip
    return _qwen_family(Qwen3VLConfig, vision, text, pixels, rope, 16, (SIGLIP_MEAN, SIGLIP_STD), **config)


def set_special_tokens(model: PreTrainedModel, tokenizer, generation_only: bool = False) -> None:
    """The tokenizer's ``<image>``/``<video>`` ids on the config, and its pad/eos/bos ids where generate
    reads them (``generation_only``: the generation config alone, as the shapes have it)."""
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if hasattr(model.config, "video_token_id"):
        model.config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    for marker in ("vision_start", "vision_end"):  # Qwen's markers (vLLM's EVS reads them from the config)
        word = f"<|{marker}|>"
        if hasattr(model.config, f"{marker}_token_id") and word in tokenizer.get_vocab():
            setattr(model.config, f"{marker}_token_id", tokenizer.convert_tokens_to_ids(word))
    targets = [model.generation_config] if generation_only else [model.config, model.generation_config]
    for cfg in targets:
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        if not generation_only:
            cfg.bos_token_id = tokenizer.bos_token_id
