"""The compressed generation pipeline: exactness vs the stock model, VTU, batching, positions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from stock_inputs import stock_inputs

from tokcomp.errors import TokcompError
from tokcomp.methods.attention import attach_vtu
from tokcomp.methods.base import Method
from tokcomp.methods.registry import build_method
from tokcomp.methods.vtu import VTUState, group_mean
from tokcomp.pipeline import Pipeline, Request

PROMPT = "what is the color of the object ?"


def _stock_generate(adapter, image, prompt, max_new_tokens):
    """The plain HF model, fed what its own processor gives (tests/stock_inputs.py)."""
    inputs = stock_inputs(adapter, [prompt], [[image]])
    with torch.no_grad():
        out = adapter.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), out.scores[0]


def _method(adapter, name, **sets):
    return build_method(name, adapter.name, adapter.num_layers, sets={k: str(v) for k, v in sets.items()})


@pytest.mark.parametrize("method", [("none", {}), ("dymu", {"threshold": "inf"}), ("dtome", {"threshold": "inf"})])
def test_doing_nothing_is_bit_identical_to_the_stock_model(adapter, photos, method):
    tokens, logits = _stock_generate(adapter, photos[1], PROMPT, 6)
    pipe = Pipeline(adapter, _method(adapter, method[0], **method[1]))
    result = pipe.generate([Request(PROMPT, [photos[1]])], max_new_tokens=6)[0]
    assert torch.equal(pipe.last_prefill_logits, logits.float())
    assert result.token_ids == [t for t in tokens if t != adapter.tokenizer.eos_token_id][: len(result.token_ids)]
    assert len(result.token_ids) == 6 or tokens[len(result.token_ids)] == adapter.tokenizer.eos_token_id
    assert result.account.visual_kept == result.account.visual_full


def test_vtu_on_an_identity_map_reproduces_the_plain_model(adapter, photos):
    """The VTU path itself (expand, RoPE at true positions, full-length cache) with nothing merged."""
    plain = Pipeline(adapter, Method())
    expected = plain.generate([Request(PROMPT, [photos[0]])], max_new_tokens=5)[0]
    vtu = Pipeline(adapter, _method(adapter, "dymu", threshold="inf"), vtu_on_identity=True)
    got = vtu.generate([Request(PROMPT, [photos[0]])], max_new_tokens=5)[0]
    assert torch.allclose(vtu.last_prefill_logits, plain.last_prefill_logits, atol=1e-4)
    assert got.token_ids == expected.token_ids


def _unique_stream(adapter, seed=0, n_unique=12, n_text=5):
    g = torch.Generator().manual_seed(seed)
    hidden = adapter.language_model.config.hidden_size
    unique = torch.randn(1, n_text + n_unique, hidden, generator=g)
    groups = torch.randint(0, n_unique, (30,), generator=g)
    groups[:n_unique] = torch.arange(n_unique)  # every unique token is used
    mapping = torch.cat([torch.arange(n_text), n_text + groups[torch.randperm(30, generator=g)]])
    return unique, mapping[None]


def test_vtu_attention_equals_group_mean_of_the_stock_attention(adapter):
    """Single layer: VTU on unique tokens == stock attention on M·e, averaged back per group."""
    lm = adapter.language_model
    attn = lm.layers[0].self_attn
    unique, mapping = _unique_stream(adapter)
    full = unique[:, mapping[0]]
    positions = torch.arange(full.shape[1])[None]
    with torch.no_grad():
        cos_sin = lm.rotary_emb(full, position_ids=positions)
        stock, _ = attn(hidden_states=full, position_embeddings=cos_sin, attention_mask=None)
        expected = group_mean(stock.transpose(1, 2)[:, :, :, None], mapping, torch.ones_like(mapping, dtype=torch.bool),
                              unique.shape[1])[..., 0].transpose(1, 2)  # fmt: skip
        state = VTUState(mapping, torch.ones_like(mapping, dtype=torch.bool), positions, unique.shape[1], None,
                         lm.rotary_emb)  # fmt: skip
        zeros = torch.zeros(1, unique.shape[1], dtype=torch.long)
        with attach_vtu(lm, state):
            got, _ = attn(hidden_states=unique, position_embeddings=lm.rotary_emb(unique, position_ids=zeros),
                          attention_mask=None)  # fmt: skip
    assert torch.allclose(got, expected, atol=1e-5)
    assert lm.config._attn_implementation == "sdpa"  # restored on exit


def _kl(p_logits, q_logits):
    return F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True, reduction="sum")


def test_vtu_is_closer_to_the_full_model_than_the_dtome_ablation(adapter, photos):
    plain, vtu, ablation = (
        Pipeline(adapter, _method(adapter, name, **sets))
        for name, sets in (("none", {}), ("dymu", {"budget": "mid"}), ("dtome", {"budget": "mid"}))
    )
    kl_vtu, kl_dtome = [], []
    for photo in photos:
        request = [Request(PROMPT, [photo])]
        plain.generate(request, 1)
        vtu_result = vtu.generate(request, 1)[0]
        ablation.generate(request, 1)
        assert vtu_result.account.visual_kept < vtu_result.account.visual_full  # real merging
        kl_vtu.append(float(_kl(plain.last_prefill_logits, vtu.last_prefill_logits)))
        kl_dtome.append(float(_kl(plain.last_prefill_logits, ablation.last_prefill_logits)))
    assert sum(kl_vtu) / len(kl_vtu) < sum(kl_dtome) / len(kl_dtome)


@pytest.mark.parametrize("name", ["none", "dymu", "dtome", "tome"])
def test_a_batch_gives_the_same_answers_as_one_at_a_time(adapter, photos, name):
    sets = {"budget": "mid"} if name != "none" else {}
    pipe = Pipeline(adapter, _method(adapter, name, **sets))
    requests = [
        Request(PROMPT, [photos[0]]),
        Request("describe it", [photos[4]]),
        Request("how many objects are there in this picture ?", [photos[2]]),
    ]
    batch = pipe.generate(requests, max_new_tokens=4)
    lengths = {r.account.prompt_tokens_kept for r in batch}
    assert len(lengths) == 3  # different token counts in one batch
    for request, together in zip(requests, batch, strict=True):
        alone = pipe.generate([request], max_new_tokens=4)[0]
        assert alone.token_ids == together.token_ids
        assert alone.account == together.account


def test_decoding_after_a_vtu_prefill_uses_full_length_positions(llava, photos):
    lm = llava.language_model
    seen: list[torch.Tensor] = []
    hook = lm.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    pipe = Pipeline(llava, _method(llava, "dymu", budget="low"))
    try:
        result = pipe.generate([Request(PROMPT, [photos[1]])], max_new_tokens=4)[0]
    finally:
        hook.remove()
    full = result.account.prompt_tokens_full
    assert result.account.prompt_tokens_kept < full
    assert (seen[0] == 0).all()  # prefill: identity RoPE, true positions applied inside VTU
    assert [int(p) for p in seen[1:]] == list(range(full, full + len(seen) - 1))
    assert pipe.last_cache.get_seq_length() == full + len(seen) - 1  # the cache is full length


def test_dtome_ablation_uses_contiguous_positions(llava, photos):
    seen: list[torch.Tensor] = []
    hook = llava.language_model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        result = Pipeline(llava, _method(llava, "dtome", budget="low")).generate([Request(PROMPT, [photos[1]])], 3)[0]
    finally:
        hook.remove()
    kept = result.account.prompt_tokens_kept
    assert seen[0][0].tolist() == list(range(kept))
    assert int(seen[1]) == kept


def test_multi_image_and_video_requests(llava_ov, photos):
    frames = [photos[i % 4] for i in range(6)]
    pipe = Pipeline(llava_ov, _method(llava_ov, "dymu", budget="mid"))
    multi, video = pipe.generate(
        [Request("which image shows a cat ?", [photos[0], photos[2]]), Request("what happens ?", video=frames)], 3
    )
    assert [u["kind"] for u in multi.account.per_image] == ["image", "image"]
    assert all(u["full"] == 197 for u in multi.account.per_image)  # base view + newline each
    assert video.account.per_image[0]["full"] == 6 * 49 + 1  # pooled 7x7 per frame + newline
    plain = Pipeline(llava_ov).generate([Request("what happens ?", video=frames)], 3)[0]
    assert plain.account.visual_full == video.account.visual_full


def test_method_errors_are_clear(llava, llava_ov, photos):
    with pytest.raises(TokcompError, match="other vision weights"):
        build_method("dymu", "tiny-llava", 6, calib="calib/tiny-llava-ov/mid.yaml").check(llava)
    with pytest.raises(TokcompError, match="unknown method"):
        build_method("fastest", "tiny-llava", 6)
    with pytest.raises(TokcompError, match="no setting"):
        build_method("tome", "tiny-llava", 6, sets={"k": "3"})
    with pytest.raises(TokcompError, match="needs thresholds"):
        build_method("dymu", "tiny-llava", 6)
    with pytest.raises(TokcompError, match="make one with: tokcomp calibrate"):
        build_method("dymu", "tiny-llava", 6, sets={"budget": "123"})
    with pytest.raises(TokcompError, match="video"):
        Pipeline(llava).generate([Request("x", video=photos[:2])], 2)
    assert math.isinf(build_method("dymu-low", "tiny-llava", 6).thresholds[-1])


def test_method_context_manager_attaches_and_detaches(llava, photos):
    method = _method(llava, "dymu", budget="mid")
    with method(llava):
        assert llava.active_method is method and llava.merging is not None
        inside = Pipeline(llava).generate([Request(PROMPT, [photos[1]])], 2)[0]
    assert llava.active_method is None and llava.merging is None
    assert inside.account.visual_kept < inside.account.visual_full
    after = Pipeline(llava).generate([Request(PROMPT, [photos[1]])], 2)[0]
    assert after.account.visual_kept == after.account.visual_full
