"""Named tiny models built from real `transformers` configs with a fixed seed.

A preset is built once into the local cache (``$TOKCOMP_HOME``, default ``~/.cache/tokcomp``) with
``save_pretrained`` and from then on loaded with ``from_pretrained`` like any other checkpoint, so
the real loading path is the one tests exercise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from tokcomp.errors import TokcompError
from tokcomp.models import builders
from tokcomp.models.tokenizer import build_word_tokenizer, word_vocabulary

# LLaVA-1.5's conversation format, for both tiny families ("USER: <image>\n... ASSISTANT:").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# Bumped when the builders change what a preset's saved files hold beyond its spec (2: Qwen's
# vision_start/vision_end ids from the tokenizer), so that an older cached build is not reused.
BUILD_VERSION = 2


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    spec: dict
    build: Callable[[dict, int], tuple[PreTrainedModel, object]]
    seed: int = 0
    chat_template: str = CHAT_TEMPLATE
    markers: tuple[str, ...] = ()  # the chat template's own special words (kept whole by the tokenizer)

    @property
    def fingerprint(self) -> str:
        payload = json.dumps({"name": self.name, "spec": self.spec, "seed": self.seed, "build": BUILD_VERSION},
                             sort_keys=True)  # fmt: skip
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _build_tiny_llava(spec: dict, vocab_size: int) -> tuple[PreTrainedModel, object]:
    vision = spec["vision"]
    config, processor = builders.llava(
        vision, {"vocab_size": vocab_size, **spec["text"]}, projector_hidden_act="gelu",
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
    )  # fmt: skip
    return LlavaForConditionalGeneration(config), processor


def _build_tiny_llava_ov(spec: dict, vocab_size: int) -> tuple[PreTrainedModel, object]:
    size = spec["vision"]["image_size"]
    pinpoints = [[size * h, size * w] for h, w in spec["grid"]]
    config, processor = builders.onevision(
        spec["vision"], {"vocab_size": vocab_size, **spec["text"]}, pinpoints, vision_aspect_ratio="anyres_max_9"
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def _qwen_builder(make: Callable, model_class: type) -> Callable[[dict, int], tuple[PreTrainedModel, object]]:
    """A Qwen family's preset builder: ``make`` (``builders.qwen2_5_vl`` / ``qwen3_vl``) and the model class."""

    def build(spec: dict, vocab_size: int) -> tuple[PreTrainedModel, object]:
        config, processor = make(dict(spec["vision"]), {"vocab_size": vocab_size, **spec["text"]},
                                 tuple(spec["pixels"]), spec["mrope_section"], tie_word_embeddings=False)  # fmt: skip
        return model_class(config), processor

    return build


_build_tiny_qwen2_5_vl = _qwen_builder(builders.qwen2_5_vl, Qwen2_5_VLForConditionalGeneration)
_build_tiny_qwen3_vl = _qwen_builder(builders.qwen3_vl, Qwen3VLForConditionalGeneration)


# Qwen2.5-VL's conversation format ("<|im_start|>user\n<|vision_start|><image><|vision_end|>...").
QWEN_MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><image><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><video><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-VL-7B's layout, scaled down: its vision tower has a full-attention block after every few
# windowed ones (7B: blocks 7, 15, 23, 31 of 32, windows of 112 px), a 2x2 merger and 2-frame
# temporal patches; its LLM splits the rotary frequencies 16/24/24 among time, height and width (here
# 2/3/3 of a head of 16).
_QWEN_VISION = {
    "depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1, 3],
    "tokens_per_second": 2,
}  # fmt: skip
_QWEN_TEXT = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
}  # fmt: skip

# Qwen3-VL-2B's layout, scaled down (its released config: ViT 24 blocks of 1024 with 16 px patches, DeepStack
# taps after blocks 5, 11 and 17, a 48x48 learned position grid; a Qwen3 LLM with head_dim 128 and
# interleaved M-RoPE sections 24/20/20, here 2/3/3 of a head of 16).
_QWEN3_VISION = {
    "depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 256,
    "deepstack_visual_indexes": [1, 2],
}  # fmt: skip
_QWEN3_TEXT = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_theta": 5_000_000.0,
}  # fmt: skip

_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 16,
}
_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}

PRESETS: dict[str, Preset] = {
    "tiny-llava": Preset(
        name="tiny-llava",
        description="LLaVA-1.5 layout: CLIP ViT 6 layers (CLS, 14x14=196 patches at 224 px), "
        "features from layer -2, Llama 4 layers; random weights",
        spec={"vision": _VISION, "text": _TEXT},
        build=_build_tiny_llava,
    ),
    "tiny-llava-ov": Preset(
        name="tiny-llava-ov",
        description="LLaVA-OneVision layout: SigLIP 6 layers (no CLS, 196 patches at 224 px), "
        "Qwen2 4 layers, AnyRes grid up to 2x2; random weights",
        spec={"vision": _VISION, "text": _TEXT, "grid": [[1, 1], [1, 2], [2, 1], [2, 2]]},
        build=_build_tiny_llava_ov,
    ),
    "tiny-qwen2.5-vl": Preset(
        name="tiny-qwen2.5-vl",
        description="Qwen2.5-VL layout: windowed ViT 4 blocks (full attention in 2 and 4), 2x2 merger, images "
        "at their own resolution (56-224 px a side: 4-64 tokens), 2-frame video patches, Qwen2 4 layers "
        "with 3-D M-RoPE; random weights",
        spec={"vision": _QWEN_VISION, "text": _QWEN_TEXT, "pixels": [56 * 56, 224 * 224], "mrope_section": [2, 3, 3]},
        build=_build_tiny_qwen2_5_vl,
        chat_template=QWEN_CHAT_TEMPLATE,
        markers=QWEN_MARKERS,
    ),
    "tiny-qwen3-vl": Preset(
        name="tiny-qwen3-vl",
        description="Qwen3-VL layout: ViT 4 blocks with 16 px patches and DeepStack taps after blocks 2 and 3, "
        "2x2 merger, images at their own resolution (64-256 px a side: 4-64 tokens), Qwen3 4 layers with "
        "interleaved 3-D M-RoPE; images only; random weights",
        spec={"vision": _QWEN3_VISION, "text": _QWEN3_TEXT, "pixels": [64 * 64, 256 * 256], "mrope_section": [2, 3, 3]},
        build=_build_tiny_qwen3_vl,
        chat_template=QWEN_CHAT_TEMPLATE,
        markers=QWEN_MARKERS,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("TOKCOMP_HOME", Path.home() / ".cache" / "tokcomp"))


def preset_path(name: str) -> Path:
    preset = PRESETS[name]
    return cache_root() / "models" / f"{name}-{preset.fingerprint}"


def build_preset(name: str, out_dir: Path) -> None:
    """Build a preset with its seed and save model, tokenizer and image processor to ``out_dir``."""
    preset = PRESETS[name]
    tokenizer = build_word_tokenizer(word_vocabulary(extra=preset.markers), preset.chat_template, preset.markers)
    torch.manual_seed(preset.seed)
    model, image_processor = preset.build(preset.spec, len(tokenizer))
    builders.set_special_tokens(model, tokenizer)
    model.config.tokcomp_preset = name
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)


def ensure_preset(name: str) -> Path:
    """Path of a built preset, building it on first use (atomically, safe under concurrent callers)."""
    path = preset_path(name)
    if (path / "config.json").exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise TokcompError(
            f"cannot build preset {name} in TOKCOMP_HOME={cache_root()} ({path.parent}: {exc.strerror or exc}); "
            "point TOKCOMP_HOME at a writable folder"
        ) from None
    try:
        build_preset(name, tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
