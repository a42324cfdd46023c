"""Presets and checkpoints load through the same from_pretrained path."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokcomp.errors import TokcompError
from tokcomp.models.loading import load_vlm
from tokcomp.models.presets import PRESETS, preset_path


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_meets_its_contract(name, llava, llava_ov, qwen, qwen3):
    adapter = {"tiny-llava": llava, "tiny-llava-ov": llava_ov, "tiny-qwen2.5-vl": qwen, "tiny-qwen3-vl": qwen3}[name]
    assert adapter.num_layers >= 4
    if name == "tiny-qwen3-vl":
        assert adapter.family == "qwen3_vl" and adapter.uses_mrope and adapter.deepstack_levels == 2
        assert type(adapter.model).__name__ == "Qwen3VLForConditionalGeneration"
        text = adapter.model.config.text_config
        assert text.rope_parameters["mrope_interleaved"] and sum(text.rope_parameters["mrope_section"]) * 2 == 16
        assert adapter.model.config.vision_config.patch_size == 16
        return
    if name == "tiny-qwen2.5-vl":
        assert adapter.family == "qwen2_5_vl" and adapter.uses_mrope and not adapter.has_cls
        assert type(adapter.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        config = adapter.model.config
        assert config.vision_config.fullatt_block_indexes and config.vision_config.spatial_merge_size == 2
        assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == (
            config.text_config.hidden_size // config.text_config.num_attention_heads
        )
        assert adapter.tokenizer.convert_ids_to_tokens(adapter.tokenizer("<|im_start|>").input_ids) == ["<|im_start|>"]
        return
    assert adapter.num_patches >= 100
    assert adapter.family == ("llava" if name == "tiny-llava" else "llava_onevision")
    if name == "tiny-llava":
        assert adapter.has_cls and adapter.drops_cls and adapter.feature_layer == adapter.num_layers - 1
        assert type(adapter.model).__name__ == "LlavaForConditionalGeneration"
    else:
        assert not adapter.has_cls and adapter.feature_layer == adapter.num_layers
        assert type(adapter.model).__name__ == "LlavaOnevisionForConditionalGeneration"


def test_preset_name_and_checkpoint_path_are_the_same_model(llava):
    by_path = load_vlm(str(preset_path("tiny-llava")))
    assert by_path.vision_weights_hash() == llava.vision_weights_hash()
    for a, b in zip(by_path.model.parameters(), llava.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_presets_are_reproducible_from_their_seed(tmp_path, llava):
    from tokcomp.models.presets import build_preset

    build_preset("tiny-llava", tmp_path / "again")
    rebuilt = load_vlm(str(tmp_path / "again"))
    assert rebuilt.vision_weights_hash() == llava.vision_weights_hash()


def test_saved_model_generates_after_reload(llava):
    prompt = "USER: what is the color ? ASSISTANT:"
    ids = llava.tokenizer(prompt, return_tensors="pt").input_ids
    out = llava.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_unsupported_and_missing_models_are_refused(tmp_path):
    LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    ).save_pretrained(tmp_path / "llama")
    with pytest.raises(TokcompError, match="not supported"):
        load_vlm(str(tmp_path / "llama"))
    with pytest.raises(TokcompError, match="unknown model"):
        load_vlm("no-such-preset")
    with pytest.raises(TokcompError, match="not a model checkpoint"):
        load_vlm(str(tmp_path))
    with pytest.raises(TokcompError, match="cannot load model"):
        load_vlm("nobody/not-in-the-cache")
