"""Real model shapes with random weights, for benchmarks: the layer sizes of released VLMs.

Weights are random (seeded) and the vocabulary is tokcomp's small word list (the LM head's cost for
one token is negligible; the FLOP counts include the real vocabulary analytically). ``llm_layers``
(default 2) keeps only the first N decoder layers so a CPU can hold and run them; results per layer are exact,
whole-model numbers are extrapolated and labelled so. ``vision_layers`` (default: all) does the same for the
vision encoder, for methods that act after it (a 32-frame video through all SigLIP layers takes minutes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from tokcomp.models import builders
from tokcomp.models.presets import CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE, QWEN_MARKERS
from tokcomp.models.tokenizer import build_word_tokenizer, word_vocabulary

CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14}  # fmt: skip
# SigLIP-so400m/14-384 as LLaVA-OneVision uses it: the last of its 27 layers is removed.
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16,
                 "image_size": 384, "patch_size": 14}  # fmt: skip
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32064}  # fmt: skip
QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936}  # fmt: skip
QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064}  # fmt: skip
# Qwen2.5-VL-7B's vision tower (its released config): 32 blocks, full attention in 7, 15, 23, 31, windows
# of 112 px, a 2x2 merger, 2-frame temporal patches; its LLM is Qwen2-7B's with M-RoPE sections 16/24/24,
# and its processor takes 56x56 to 12845056 pixels.
QWEN25_VL_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}  # fmt: skip
QWEN25_VL_PIXELS = (56 * 56, 12845056)
QWEN25_VL_MROPE = [16, 24, 24]


@dataclass(frozen=True)
class Shape:
    name: str
    family: str
    vision: dict
    text: dict
    description: str

    @property
    def real_llm_layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def real_vision_layers(self) -> int:
        return int(self.vision.get("num_hidden_layers", self.vision.get("depth", 0)))

    @property
    def real_vocab(self) -> int:
        return int(self.text["vocab_size"])


SHAPES = {
    "llava-1.5-7b-shape": Shape("llava-1.5-7b-shape", "llava", CLIP_L_336, LLAMA_7B,
                                "LLaVA-1.5-7B: CLIP ViT-L/14-336 (577 tokens, features of layer -2), Llama-7B"),
    "llava-ov-0.5b-shape": Shape("llava-ov-0.5b-shape", "llava_onevision", SIGLIP_SO400M, QWEN2_05B,
                                 "LLaVA-OneVision-0.5B: SigLIP-so400m/14-384 (729 tokens, 26 layers), Qwen2-0.5B"),
    "llava-ov-7b-shape": Shape("llava-ov-7b-shape", "llava_onevision", SIGLIP_SO400M, QWEN2_7B,
                               "LLaVA-OneVision-7B: SigLIP-so400m/14-384, Qwen2-7B"),
    "qwen2.5-vl-7b-shape": Shape("qwen2.5-vl-7b-shape", "qwen2_5_vl", QWEN25_VL_VISION, QWEN2_7B,
                                 "Qwen2.5-VL-7B: windowed ViT 32 blocks (full attention in 4), 2x2 merger, "
                                 "images at their own resolution, Qwen2-7B with M-RoPE"),
}  # fmt: skip


DEFAULT_LLM_LAYERS = 2  # a whole 7B decoder does not fit a 24 GB CPU machine in fp32


def build_shape(name: str, llm_layers: int | None = None, seed: int = 0, vision_layers: int | None = None):
    """(model, tokenizer, image_processor) with the real layer sizes and random weights.

    ``llm_layers`` / ``vision_layers`` keep only the first N decoder / encoder layers (clamped to 1..real)."""
    shape = SHAPES[name]
    tokenizer = build_word_tokenizer(word_vocabulary(), CHAT_TEMPLATE)
    text = {**shape.text, "vocab_size": len(tokenizer), "max_position_embeddings": 32768}
    layers = DEFAULT_LLM_LAYERS if llm_layers is None else llm_layers
    text["num_hidden_layers"] = max(1, min(layers, shape.real_llm_layers))
    vision = dict(shape.vision)
    if vision_layers is not None:
        kept = max(1, min(vision_layers, shape.real_vision_layers))
        if shape.family == "qwen2_5_vl":  # the full-attention blocks among those kept
            vision.update(depth=kept, fullatt_block_indexes=[i for i in vision["fullatt_block_indexes"] if i < kept])
        else:
            vision["num_hidden_layers"] = kept
    torch.manual_seed(seed)
    if shape.family == "qwen2_5_vl":
        tokenizer = build_word_tokenizer(word_vocabulary(extra=QWEN_MARKERS), QWEN_CHAT_TEMPLATE, QWEN_MARKERS)
        text["vocab_size"] = len(tokenizer)
        config, processor = builders.qwen2_5_vl(vision, text, QWEN25_VL_PIXELS, QWEN25_VL_MROPE)
        model = Qwen2_5_VLForConditionalGeneration(config)
    elif shape.family == "llava":
        config, processor = builders.llava(vision, text)
        model = LlavaForConditionalGeneration(config)
    else:
        size = vision["image_size"]
        pinpoints = [[size * h, size * w] for h, w in ((1, 1), (1, 2), (2, 1), (2, 2))]
        config, processor = builders.onevision(vision, text, pinpoints)
        model = LlavaOnevisionForConditionalGeneration(config)
    builders.set_special_tokens(model, tokenizer, generation_only=True)
    return model.eval(), tokenizer, processor
