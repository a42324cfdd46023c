"""The untrained tokcomp-tiny: a stock LlavaOnevisionForConditionalGeneration (SigLIP + Qwen2), seeded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerFast,
)

from tokcomp.data.tasks import IMAGE_SIZE, LABEL_PATCH, vocabulary
from tokcomp.models import builders
from tokcomp.models.presets import CHAT_TEMPLATE
from tokcomp.models.tokenizer import build_word_tokenizer, word_vocabulary

# 112 px, patch 14: 8x8 = 64 patch tokens per image or frame, each patch about one object or one
# letter wide. One AnyRes pinpoint (112x112): a lone image costs its base view plus one crop (and a
# newline per row); video frames are pooled 2x2 to 4x4 = 16 tokens each.
TINY_SPEC: dict = {
    "vision": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": LABEL_PATCH,
    },
    "text": {
        "hidden_size": 160,
        "intermediate_size": 480,
        "num_hidden_layers": 4,
        "num_attention_heads": 5,
        "num_key_value_heads": 5,
        "max_position_embeddings": 2048,
        "rope_theta": 1_000_000.0,  # as Qwen2's: slow rotations leave room to match content far apart
        "tie_word_embeddings": True,
    },
    "pinpoints": [[IMAGE_SIZE, IMAGE_SIZE]],
}
# v2: the same encoder and a wider, deeper LLM (6 layers of 256, 8 heads), about 6 M parameters in all;
# the extra depth and heads leave room to bind each picture to the words naming it and to compare frames.
TINY_V2_SPEC: dict = {
    "vision": dict(TINY_SPEC["vision"]),
    "text": {
        **TINY_SPEC["text"],
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "pinpoints": TINY_SPEC["pinpoints"],
}
# A much smaller model of the same layout, for tests of the training loop.
TEST_SPEC: dict = {
    "vision": {**TINY_SPEC["vision"], "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
    "text": {
        **TINY_SPEC["text"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    },
    "pinpoints": TINY_SPEC["pinpoints"],
}


SPECS: dict[str, dict] = {"v1": TINY_SPEC, "v2": TINY_V2_SPEC, "test": TEST_SPEC}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with the project's base words plus every word the task suites use."""
    return build_word_tokenizer(word_vocabulary(extra=vocabulary()), CHAT_TEMPLATE)


def build_image_processor(spec: dict) -> LlavaOnevisionImageProcessorPil:
    return builders.onevision(spec["vision"], {}, spec["pinpoints"])[1]


def build_model(
    spec: dict, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> LlavaOnevisionForConditionalGeneration:
    """A freshly initialised model with the given sizes and the tokenizer's special token ids."""
    config, _ = builders.onevision(
        spec["vision"], {"vocab_size": len(tokenizer), **spec["text"]}, spec["pinpoints"],
        vision_aspect_ratio="anyres_max_9", image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        tie_word_embeddings=spec["text"].get("tie_word_embeddings", True),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    builders.set_special_tokens(model, tokenizer)
    model.config.tokcomp_preset = "tokcomp-tiny"
    return model


def save_checkpoint(model, tokenizer, image_processor, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out
