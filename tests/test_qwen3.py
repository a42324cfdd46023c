"""Qwen3-VL: DeepStack features carried with every kept token, 3-D positions kept through pruning, stock
generate and the pipeline agreeing, and what the family does not take yet refused in one line
(tiny-qwen3-vl, built from its real layout)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from stock_inputs import stock_inputs

import tokcomp
import tokcomp.stock
from tokcomp.errors import TokcompError
from tokcomp.pipeline import Pipeline, Request

GEN = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
PROMPTS = ["what is in the picture ?", "compare them"]


@pytest.fixture(scope="module")
def batch(qwen3, photos):
    """One image at its own size, and two small images of other shapes."""
    images = [[photos[0]], [photos[1].resize((140, 84)), photos[2].resize((84, 140))]]
    return images, stock_inputs(qwen3, PROMPTS, images)


def _plain(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, **GEN)


def test_the_preset_is_the_stock_model_with_deepstack(qwen3, batch):
    assert type(qwen3.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert qwen3.family == "qwen3_vl" and qwen3.uses_mrope and qwen3.deepstack_levels == 2
    images, inputs = batch
    tokens = Pipeline(qwen3).tokens_of(Pipeline(qwen3).prepare([Request(p, images=i) for p, i in
                                                                zip(PROMPTS, images, strict=True)]))  # fmt: skip
    grids = inputs["image_grid_thw"].tolist()
    flat = [t for req in tokens for t in req]
    assert [t.original for t in flat] == [t * h * w // 4 for t, h, w in grids]
    for t in flat:
        assert t.deepstack.shape == (2, t.kept, t.unique.shape[-1]) and t.rope.shape == (3, t.original)


@pytest.mark.parametrize(("name", "settings"), [("none", {}), ("random", {"ratio": 1.0}), ("adaptive", {"rho": 1.0}),
                                                ("fastv", {"layer": 1, "keep": 1.0})])  # fmt: skip
def test_a_neutral_setting_is_bit_identical_and_needs_the_deepstack_features(qwen3, batch, name, settings, monkeypatch):
    """FastV cut after layer 0 keeping everything: the DeepStack addition of layer 1 runs on the cut rows."""
    _, inputs = batch
    model = qwen3.model
    plain = _plain(model, inputs)
    method = tokcomp.method(name, **settings)
    with torch.no_grad(), method(model):
        got = model.generate(**inputs, **GEN)
    assert torch.equal(got.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, plain.logits, strict=True))
    # the same prefill without DeepStack is another model: the check above could fail
    monkeypatch.setattr(tokcomp.stock, "add_deepstack", lambda *args: contextlib.nullcontext())
    with torch.no_grad(), method(model):
        without = model.generate(**inputs, **GEN)
    assert not torch.equal(without.logits[0], plain.logits[0])


def _stock_visual_rows(qwen3, inputs):
    """Per request, the stock merger outputs and DeepStack features of its image tokens, in order."""
    with torch.no_grad():
        out = qwen3.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    counts = [int((ids == qwen3.image_token_id).sum()) for ids in inputs["input_ids"]]
    features = torch.cat(out.pooler_output).split(counts)
    deep = torch.stack([torch.cat(level) for level in out.deepstack_features]).split(counts, dim=1)
    return features, deep


@pytest.mark.parametrize("name", ["random-25", "divprune-25", "adaptive-20"])
def test_pruned_tokens_keep_their_positions_and_their_own_deepstack_features(qwen3, batch, name, monkeypatch):
    _, inputs = batch
    model = qwen3.model
    stock_positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    added, positions = [], []
    original = tokcomp.stock.add_deepstack

    def spy(language_model, visual, features, cut=None):
        added.append(features.clone())
        return original(language_model, visual, features, cut)

    def capture(module, args, kwargs):
        positions.append(kwargs["position_ids"].clone())

    monkeypatch.setattr(tokcomp.stock, "add_deepstack", spy)
    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    method = tokcomp.method(name)
    try:
        with torch.no_grad():
            model.generate(**inputs, **GEN)
        plain_steps = positions[1:]
        positions.clear()
        with torch.no_grad(), method(qwen3):
            bridge = qwen3.bridge
            model.generate(**inputs, **GEN)
            call = bridge.last_call
    finally:
        handle.remove()
    assert len(added) == 1 and any(a.visual_kept < a.visual_full for a in method.accounts)
    features, deep = _stock_visual_rows(qwen3, inputs)
    entry = 0
    for b, spliced in enumerate(call.spliced):
        visual = spliced.visual_unique.cpu()
        kept = spliced.embeds[visual]
        where = [int((features[b] == e).all(-1).nonzero()[0]) for e in kept]
        assert len(set(where)) == len(where) < features[b].shape[0]
        # each kept token's DeepStack features are its own stock ones
        assert torch.equal(added[0][:, entry : entry + len(where)], deep[b][:, where])
        entry += len(where)
        # and it sits at its stock 3-D position
        valid = inputs["attention_mask"][b].bool()
        stock_ids, stock_pos = inputs["input_ids"][b][valid], stock_positions[:, b][:, valid]
        kept_pos = positions[0][1:, b, -spliced.embeds.shape[0] :]
        assert torch.equal(kept_pos[:, visual], stock_pos[:, stock_ids == qwen3.image_token_id][:, where])
    assert entry == added[0].shape[1]
    # decoding goes on at the stock model's own positions (the rotary rows of every decode step)
    assert len(positions) == len(plain_steps) + 1
    for plain_step, step in zip(plain_steps, positions[1:], strict=True):
        assert torch.equal(step[1:], plain_step[1:])


def test_the_pipeline_answers_as_stock_generate_does(qwen3, batch):
    images, inputs = batch
    plain = _plain(qwen3.model, inputs)
    got = Pipeline(qwen3).generate([Request(p, images=i) for p, i in zip(PROMPTS, images, strict=True)], 4)
    assert [r.token_ids for r in got] == plain.sequences[:, -4:].tolist()


def test_video_and_vtu_refuse_in_one_line_and_in_encoder_methods_run(qwen3, photos, tmp_path, capsys):
    from cli_runner import run_tokcomp

    with pytest.raises(TokcompError, match="video input is not supported on the Qwen3-VL family"):
        Pipeline(qwen3).generate([Request("what happens ?", video=photos[:4])], 2)
    with pytest.raises(TokcompError, match="VTU"), tokcomp.method("dymu-mid")(qwen3):
        pass
    image = tmp_path / "a.png"
    photos[0].save(image)
    for name in ("visionzip", "random-25", "dtome-mid", "tome-mid"):  # DToMe / ToMe: tokcomp.models.qwen_merging
        code, _, err = run_tokcomp(["apply", "--model", "tiny-qwen3-vl", "--method", name, "--image", str(image),
                                    "--prompt", "what is it ?"], capsys)  # fmt: skip
        assert code == 0, (name, err)
    code, _, err = run_tokcomp(["apply", "--model", "tiny-qwen3-vl", "--method", "dymu-mid", "--image", str(image),
                                "--prompt", "what is it ?"], capsys)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and "VTU" in err
