"""Qwen3-VL: DeepStack features carried with every kept token, 3-D positions kept through pruning (images
and video, a run per frame group), stock generate and the pipeline agreeing, and what the family does not
take yet refused in one line (tiny-qwen3-vl, built from its real layout)."""

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


def _plain_then_compressed(qwen3, inputs, method):
    """Stock generate, then with ``method``: the position ids of the plain run's decode steps, those of
    every LLM call of the compressed run, and the bridge's record of that run."""
    model = qwen3.model
    positions = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: positions.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.generate(**inputs, **GEN)
        plain_steps, positions[:] = positions[1:], []
        with torch.no_grad(), method(qwen3):
            bridge = qwen3.bridge
            model.generate(**inputs, **GEN)
            return plain_steps, positions, bridge.last_call
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["random-25", "divprune-25", "adaptive-20"])
def test_pruned_tokens_keep_their_positions_and_their_own_deepstack_features(qwen3, batch, name, monkeypatch):
    _, inputs = batch
    model = qwen3.model
    stock_positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    added = []
    original = tokcomp.stock.add_deepstack

    def spy(language_model, visual, features, cut=None):
        added.append(features.clone())
        return original(language_model, visual, features, cut)

    monkeypatch.setattr(tokcomp.stock, "add_deepstack", spy)
    method = tokcomp.method(name)
    plain_steps, positions, call = _plain_then_compressed(qwen3, inputs, method)
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


@pytest.fixture(scope="module")
def video_batch(qwen3, photos):
    """A 5-frame video (three frame groups, the last frame repeated) with an image, and a 3-frame video."""
    images, videos = [[photos[3]], []], [photos[:5], photos[2:5]]
    return images, videos, stock_inputs(qwen3, ["what happens ?", "and here ?"], images, videos)


def test_a_video_is_one_run_per_frame_group_after_its_timestamp(qwen3, video_batch):
    """The prompt writes each frame group after its time as the stock processor does (frames at 2 fps:
    groups at 0.25, 1.25, 2.0 s), and the pipeline answers as stock generate does."""
    images, videos, inputs = video_batch
    assert qwen3.frame_timestamps(5) == [0.25, 1.25, 2.0]
    request = Request("what happens ?", images=images[0], video=videos[0])
    ids = Pipeline(qwen3).prompt_ids(request)
    assert int((ids == qwen3.video_token_id).sum()) == 3  # one placeholder per frame group
    text = qwen3.video_prompt(qwen3.build_prompt("what happens ?", 1, True), 5)
    video = qwen3.tokenizer.convert_ids_to_tokens(qwen3.video_token_id)
    runs = "".join(f"<{t} seconds><|vision_start|>{video}<|vision_end|>" for t in ("0.2", "1.2", "2.0"))
    assert runs in text and text.count(video) == 3
    plain = _plain(qwen3.model, inputs)
    got = Pipeline(qwen3).generate([Request(p, images=i, video=v) for p, i, v in
                                    zip(["what happens ?", "and here ?"], images, videos, strict=True)], 4)  # fmt: skip
    eos = qwen3.tokenizer.eos_token_id
    for answer, row in zip(got, plain.sequences[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
        assert answer.token_ids == (row[: row.index(eos)] if eos in row else row)


VIDEO_NEUTRAL = [("none", {}), ("random", {"ratio": 1.0}), ("dycoke", {"K": 0.0, "P": 0.0}),
                 ("holitom", {"ratio": 1.0, "tau": 2.0, "inner_merge": 0.0})]  # fmt: skip


@pytest.mark.parametrize(("name", "settings"), VIDEO_NEUTRAL)
def test_a_neutral_setting_on_video_is_bit_identical(qwen3, video_batch, name, settings):
    _, _, inputs = video_batch
    plain = _plain(qwen3.model, inputs)
    method = tokcomp.method(name, **settings)
    with torch.no_grad(), method(qwen3.model):
        got = qwen3.model.generate(**inputs, **GEN)
    assert torch.equal(got.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, plain.logits, strict=True))


@pytest.mark.parametrize("name", ["random-25", "fastvid"])
def test_pruned_video_tokens_keep_their_stock_positions_and_decoding_continues_at_the_stock_ones(
    qwen3, video_batch, name
):
    _, _, inputs = video_batch
    model = qwen3.model
    stock_positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    method = tokcomp.method(name)
    plain_steps, positions, call = _plain_then_compressed(qwen3, inputs, method)
    with torch.no_grad():
        stock_video = torch.cat(model.model.get_video_features(inputs["pixel_values_videos"],
                                                               inputs["video_grid_thw"]).pooler_output)  # fmt: skip
    assert all(a.visual_kept < a.visual_full for a in method.accounts)
    video_rows = stock_video.split([int((ids == qwen3.video_token_id).sum()) for ids in inputs["input_ids"]])
    for b, spliced in enumerate(call.spliced):
        valid = inputs["attention_mask"][b].bool()
        stock_ids, stock_pos = inputs["input_ids"][b][valid], stock_positions[:, b][:, valid]
        kept = positions[0][1:, b, -spliced.embeds.shape[0] :]
        visual = spliced.visual_unique.cpu()
        is_video = torch.tensor([bool((video_rows[b] == e).all(-1).any()) for e in spliced.embeds[visual]])
        where = [int((video_rows[b] == e).all(-1).nonzero()[0]) for e in spliced.embeds[visual][is_video]]
        assert len(where) == len(set(where)) < video_rows[b].shape[0]
        assert torch.equal(kept[:, visual.nonzero().flatten()[is_video]],
                           stock_pos[:, stock_ids == qwen3.video_token_id][:, where])  # fmt: skip
    steps = min(len(plain_steps), len(positions) - 1)  # either run may stop at its EOS first
    assert steps >= 1
    for plain_step, step in zip(plain_steps[:steps], positions[1 : steps + 1], strict=True):
        assert torch.equal(step[1:], plain_step[1:])


def test_vtu_refuses_in_one_line_and_in_encoder_methods_run(qwen3, photos, tmp_path, capsys):
    from cli_runner import run_tokcomp

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
