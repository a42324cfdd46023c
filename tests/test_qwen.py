"""Qwen2.5-VL: stock generate with a method attached, 3-D M-RoPE positions kept through pruning and
decoding, and the pipeline agreeing with the stock path (tiny-qwen2.5-vl, built from its real layout)."""

from __future__ import annotations

import pytest
import torch
from stock_inputs import stock_inputs

import tokcomp
from tokcomp.errors import TokcompError
from tokcomp.pipeline import Pipeline, Request

GEN = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
PROMPTS = ["what is in the picture ?", "compare them", "what happens in the video ?"]

# Every setting that does nothing, through the method's own code (see the contract matrix).
NEUTRAL = {
    "none": {},
    "random": {"ratio": 1.0},
    "divprune": {"ratio": 1.0},
    "adaptive": {"rho": 1.0},
    "fastv": {"keep": 1.0},
    "dycoke": {"ttm_ratio": 0.0, "dp_ratio": 0.0},
}
# Pre-LLM selections that must keep each kept token's stock 3-D position (vLLM's EVS does the same).
PRUNING = ["random-25", "divprune-25", "adaptive-20", "dycoke-ttm"]


@pytest.fixture(scope="module")
def batch(qwen, photos):
    """One image, two images of other sizes, a 5-frame video (an odd frame repeated into a temporal patch)."""
    small = [p.resize((140, 84)) for p in photos]
    images, videos = [[photos[0]], [small[1], small[2].resize((84, 140))], []], [None, None, small[:5]]
    return images, videos, stock_inputs(qwen, PROMPTS, images, videos)


def _requests(images, videos) -> list[Request]:
    return [Request(p, images=i, video=v) for p, i, v in zip(PROMPTS, images, videos, strict=True)]


def _capture_positions(model):
    """Record the ``position_ids`` each language-model call receives."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_adapter_reads_dynamic_resolution_and_video_patches(qwen, batch):
    images, videos, inputs = batch
    units = Pipeline(qwen).prepare(_requests(images, videos))
    grids = [u.grid_thw for req in units for u in req]
    assert grids[:3] == [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    assert grids[3] == tuple(inputs["video_grid_thw"][0].tolist()) and grids[3][0] == 3  # 5 frames -> 3 patches
    tokens = Pipeline(qwen).tokens_of(units)
    assert [t.original for req in tokens for t in req] == [t * h * w // 4 for t, h, w in grids]
    for req in tokens:
        for t in req:
            assert t.rope.shape == (3, t.original) and t.rope_span > 0


def test_a_video_unit_is_whole_frames_and_ttm_keeps_the_first_frame_whole(qwen, batch):
    """Qwen2.5-VL's video tokens are temporal patches of h*w/4 tokens each, with no token after them
    (LLaVA-OneVision's trailing newline): the frame layout the video methods read must say so."""
    _, videos, _ = batch
    (tokens,) = Pipeline(qwen).tokens_of(Pipeline(qwen).prepare([Request(PROMPTS[2], video=videos[2])]))[0]
    assert tokens.num_frames == 3 and tokens.num_frames * tokens.frame_tokens == tokens.original
    from tokcomp.methods.dycoke import apply_ttm

    kept = apply_ttm(tokens, 0.7).positions
    n = tokens.frame_tokens
    assert torch.equal(kept[:n], torch.arange(n)) and int((kept >= n).sum()) < 2 * n


@pytest.mark.parametrize("name", list(NEUTRAL))
def test_a_neutral_setting_under_stock_generate_is_bit_identical(qwen, batch, name):
    images, videos, inputs = batch
    if name == "dycoke":  # DyCoke takes video only
        inputs = stock_inputs(qwen, PROMPTS[2:], images[2:], videos[2:])
    model = qwen.model
    with torch.no_grad():
        plain = model.generate(**inputs, **GEN)
        method = tokcomp.method(name, **NEUTRAL[name])
        with method(model):
            got = model.generate(**inputs, **GEN)
    assert torch.equal(got.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, plain.logits, strict=True))
    assert all(a.visual_kept == a.visual_full for a in method.accounts)


@pytest.mark.parametrize("name", PRUNING)
def test_pruned_tokens_keep_their_stock_3d_positions_and_decoding_continues_there(qwen, batch, name):
    images, videos, inputs = batch
    if name == "dycoke-ttm":
        images, videos, inputs = images[2:], videos[2:], stock_inputs(qwen, PROMPTS[2:], images[2:], videos[2:])
    model = qwen.model
    stock_positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    with torch.no_grad():
        seen, handle = _capture_positions(model)
        try:
            model.generate(**inputs, **GEN)
            plain_steps = list(seen[1:])
            seen.clear()
            method = tokcomp.method(name)
            with method(qwen):
                bridge = qwen.bridge
                model.generate(**inputs, **GEN)
                call = bridge.last_call
        finally:
            handle.remove()
    assert any(a.visual_kept < a.visual_full for a in method.accounts)
    prefill = seen[0][1:]  # (3, B, L_kept): the rotary rows (the text row is first)
    stock_features = _stock_visual_features(qwen, inputs)
    for b, spliced in enumerate(call.spliced):
        valid = inputs["attention_mask"][b].bool()
        stock_ids, stock_pos = inputs["input_ids"][b][valid], stock_positions[:, b][:, valid]
        stock_visual = (stock_ids == qwen.image_token_id) | (stock_ids == qwen.video_token_id)
        kept_pos = prefill[:, b, -spliced.embeds.shape[0] :]
        visual = spliced.visual_unique.cpu()
        # text entries: all kept, in order, at their stock positions
        assert torch.equal(kept_pos[:, ~visual], stock_pos[:, ~stock_visual])
        # each kept visual entry is a stock visual token (found by its features) at that token's position
        rows = stock_features[b]
        where = [int((rows == e).all(-1).nonzero()[0]) for e in spliced.embeds[visual]]
        assert len(set(where)) == len(where) < int(stock_visual.sum())
        assert torch.equal(kept_pos[:, visual], stock_pos[:, stock_visual][:, where])
    # decoding goes on at the stock model's own positions (the rotary rows of every decode step)
    assert len(seen) == len(plain_steps) + 1
    for plain_step, step in zip(plain_steps, seen[1:], strict=True):
        assert torch.equal(step[1:], plain_step[1:])


def _stock_visual_features(qwen, inputs) -> list[torch.Tensor]:
    """Per request, the stock visual token features in sequence order."""
    model = qwen.model.model
    with torch.no_grad():
        images = list(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output) \
            if "pixel_values" in inputs else []  # fmt: skip
        videos = list(model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output) \
            if "pixel_values_videos" in inputs else []  # fmt: skip
    out = []
    for ids in inputs["input_ids"]:
        rows = []
        n_image, n_video = int((ids == qwen.image_token_id).sum()), int((ids == qwen.video_token_id).sum())
        while n_image > 0:
            rows.append(images.pop(0))
            n_image -= rows[-1].shape[0]
        while n_video > 0:
            rows.append(videos.pop(0))
            n_video -= rows[-1].shape[0]
        out.append(torch.cat(rows))
    return out


@pytest.mark.parametrize("name", ["none", *PRUNING, "fastv", "dycoke", "visionzip", "prumerge"])
def test_the_pipeline_answers_as_stock_generate_does(qwen, batch, name):
    images, videos, inputs = batch
    if name.startswith("dycoke"):
        images, videos, inputs = images[2:], videos[2:], stock_inputs(qwen, PROMPTS[2:], images[2:], videos[2:])
    prompts = PROMPTS[-len(images) :]
    requests = [Request(p, images=i, video=v) for p, i, v in zip(prompts, images, videos, strict=True)]
    method = tokcomp.method(name)
    answers = Pipeline(qwen, method.resolve(qwen)).generate(requests, max_new_tokens=GEN["max_new_tokens"])
    with torch.no_grad(), method(qwen.model):
        out = qwen.model.generate(**inputs, **GEN)
    start = inputs["input_ids"].shape[1]
    eos = qwen.tokenizer.eos_token_id
    for got, row, account in zip(answers, out.sequences, method.accounts, strict=True):
        stock = row[start:].tolist()
        stock = stock[: stock.index(eos) + 1] if eos in stock else stock
        assert got.token_ids == stock
        assert (got.account.visual_kept, got.account.visual_full) == (account.visual_kept, account.visual_full)


def test_visionzip_under_stock_generate_compresses_every_request(qwen, batch):
    """The encoder trace (tokcomp.models.qwen_trace) drives VisionZip inside stock generate: every image and
    video keeps its dominant and contextual tokens per view, fewer than the stock ones."""
    _, _, inputs = batch
    method = tokcomp.method("visionzip", dominant=6, contextual=2)
    with torch.no_grad(), method(qwen.model):
        qwen.model.generate(**inputs, **GEN)
    for account in method.accounts:
        assert 0 < account.visual_kept < account.visual_full


def test_more_placeholder_tokens_than_grids_is_a_clear_error(qwen, batch):
    _, _, inputs = batch
    """(Stock generate fails first, computing positions; a forward call reaches tokcomp's own check.)"""
    short = {**inputs, "image_grid_thw": inputs["image_grid_thw"][:1]}
    with pytest.raises(TokcompError, match="more image tokens"), tokcomp.method("random-25")(qwen.model):
        qwen.model(**short)


def test_apply_answers_on_a_video_with_dycoke(qwen, photos, tmp_path, capsys):
    from cli_runner import run_tokcomp

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, photo in enumerate(photos[:4]):
        photo.resize((112, 84)).save(frames / f"{i:02d}.png")
    code, out, err = run_tokcomp(["apply", "--model", "tiny-qwen2.5-vl", "--method", "dycoke", "--video", str(frames),
                                  "--prompt", "what happens ?", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    import json

    record = json.loads(out)
    tokens = record["visual_tokens"]
    assert tokens["kept"] < tokens["full"] == 2 * 3 * 4  # 4 frames -> 2 temporal patches of 6x8 patches / 4


@pytest.mark.parametrize("options", [{"num_beams": 2}, {"do_sample": True, "top_k": 5}])
def test_beams_and_sampling_run_compressed_with_one_account_per_request(qwen, batch, options):
    _, _, inputs = batch
    method = tokcomp.method("random-25")
    torch.manual_seed(0)
    with torch.no_grad(), method(qwen.model):
        out = qwen.model.generate(**inputs, max_new_tokens=3, **options)
    assert out.shape[0] == inputs["input_ids"].shape[0]
    assert len(method.accounts) == 3 and all(a.visual_kept < a.visual_full for a in method.accounts)


def test_vtu_attention_with_3d_positions_equals_the_group_mean_of_the_stock_layer(qwen, batch):
    """VTU's exactness on Qwen2.5-VL's language model: one layer on the unique tokens == the stock layer
    on the expanded sequence at the stock 3-D positions, averaged back over each merged group."""
    from tokcomp.methods.attention import attach_vtu
    from tokcomp.methods.vtu import VTUState, group_mean

    _, _, inputs = batch
    ids, types = inputs["input_ids"][:1], inputs["mm_token_type_ids"][:1]
    valid = inputs["attention_mask"][:1].bool()
    ids, types = ids[valid][None], types[valid][None]
    rope, _ = qwen.model.model.get_rope_index(ids, types, image_grid_thw=inputs["image_grid_thw"][:1])
    length = ids.shape[1]
    visual = (ids[0] == qwen.image_token_id).nonzero().flatten()
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, visual.shape[0] // 3, (visual.shape[0],), generator=g)  # merged visual groups
    mapping = torch.empty(length, dtype=torch.long)
    text = torch.ones(length, dtype=torch.bool)
    text[visual] = False
    mapping[text] = torch.arange(int(text.sum()))
    _, dense = torch.unique(groups, return_inverse=True)
    mapping[visual] = int(text.sum()) + dense
    num_unique = int(mapping.max()) + 1
    lm = qwen.language_model
    attn = lm.layers[0].self_attn
    unique = torch.randn(1, num_unique, lm.config.hidden_size, generator=g)
    full = unique[:, mapping]
    with torch.no_grad():
        stock, _ = attn(hidden_states=full, position_embeddings=lm.rotary_emb(full, position_ids=rope),
                        attention_mask=None)  # fmt: skip
        ones = torch.ones(1, length, dtype=torch.bool)
        expected = group_mean(stock.transpose(1, 2)[:, :, :, None], mapping[None], ones, num_unique)[..., 0]
        state = VTUState(mapping[None], ones, torch.arange(length)[None], num_unique, None, lm.rotary_emb,
                         rope_positions=rope)  # fmt: skip
        zeros = torch.zeros(1, num_unique, dtype=torch.long)
        with attach_vtu(lm, state):
            got, _ = attn(hidden_states=unique, position_embeddings=lm.rotary_emb(unique, position_ids=zeros),
                          attention_mask=None)  # fmt: skip
    assert torch.allclose(got, expected.transpose(1, 2), atol=1e-5)
    assert not torch.equal(rope[0], rope[1])  # the positions really are 3-D inside the image


def test_windowed_encoder_flops_count_full_attention_only_in_its_blocks(qwen):
    """Attention costs patches x window in windowed blocks and patches^2 in the full-attention ones."""
    from tokcomp.benchmark.flops import windowed_vit_flops

    config = qwen.vision_config
    window = (config.window_size // config.patch_size) ** 2
    layers = config.depth
    small, large = windowed_vit_flops(window, config, layers), windowed_vit_flops(4 * window, config, layers)
    attention = 2 * 2 * config.hidden_size
    full = len(config.fullatt_block_indexes)
    linear = 16 * (small - attention * window * window * layers) / 4  # everything but attention, 4x the patches
    expected = linear + attention * 4 * window * (full * 4 * window + (layers - full) * window)
    assert large == pytest.approx(expected)
