"""FastV that cuts: after layer K-1 the pruned tokens leave the sequence and the cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.errors import TokcompError
from tokcomp.methods.cut import rows_that_go_on, take_mask, take_positions
from tokcomp.methods.registry import build_method
from tokcomp.pipeline import Pipeline, Request

PROMPT = "what is in the pictures ?"


def _fastv(adapter, spec="fastv", **sets):
    return build_method(spec, adapter.name, adapter.num_layers, sets={k: str(v) for k, v in sets.items()})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=4))
def test_the_rows_that_go_on_are_the_kept_ones_in_order_left_padded(rows):
    keep = torch.tensor(rows)
    order, real = rows_that_go_on(keep)
    assert order.shape == real.shape and order.shape[1] == int(keep.sum(1).max())
    for b in range(keep.shape[0]):
        kept = keep[b].nonzero().flatten()
        assert torch.equal(order[b][real[b]], kept)  # every kept position once, in order, at the end
        assert not keep[b][order[b][~real[b]]].any()  # padding comes from positions that are dropped
        assert real[b].sum() == kept.numel() and (real[b].cumsum(0) > 0).sum() == kept.numel()
    everything = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(rows_that_go_on(everything)[0], torch.arange(5).expand(2, 5))


def test_positions_and_masks_are_taken_along_the_sequence():
    order = torch.tensor([[0, 2, 3], [1, 2, 3]])
    rotary = torch.arange(2 * 4 * 3).view(2, 4, 3)  # (B, L, d)
    assert torch.equal(take_positions(rotary, order, dim=-2)[1], rotary[1, [1, 2, 3]])
    mrope = torch.arange(3 * 1 * 4 * 2).view(3, 1, 4, 2)  # (3, B=1 broadcast, L, d)
    taken = take_positions(mrope, order, dim=-2)
    assert taken.shape == (3, 2, 3, 2) and torch.equal(taken[:, 0], mrope[:, 0, [0, 2, 3]])
    ids = torch.arange(8).view(2, 4)
    assert torch.equal(take_positions(ids, order, dim=-1), torch.tensor([[0, 2, 3], [5, 6, 7]]))
    mask = torch.rand(1, 1, 4, 4) > 0.5
    cut = take_mask(mask, order)
    assert cut.shape == (2, 1, 3, 3) and torch.equal(cut[1, 0], mask[0, 0][[1, 2, 3]][:, [1, 2, 3]])


def test_layers_before_k_are_untouched_and_later_ones_run_on_the_kept_tokens(llava, photos):
    outputs: dict[str, list[torch.Tensor]] = {"none": [], "fastv": []}
    request = [Request(PROMPT, photos[:1])]
    pipes = {"none": Pipeline(llava, _fastv(llava, "none")), "fastv": Pipeline(llava, _fastv(llava, K=2, R=0.25))}
    for name, pipe in pipes.items():
        handles = [layer.register_forward_hook(lambda m, a, out, n=name: outputs[n].append(out.detach().clone()))
                   for layer in llava.language_model.layers]  # fmt: skip
        try:
            pipe.generate(request, 1)
        finally:
            for handle in handles:
                handle.remove()
    layers = len(llava.language_model.layers)
    plain, cut = outputs["none"][:layers], outputs["fastv"][:layers]
    for i in range(2):  # the test's hooks run before FastV's: layer K-1's output as it left the layer
        assert torch.equal(plain[i], cut[i])
    (hook,) = pipes["fastv"].last_hooks
    text = plain[0].shape[1] - 196
    assert int(hook.kept.sum()) == 49
    assert [o.shape[1] for o in cut[2:]] == [text + 49] * (layers - 2)


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_the_cut_model_is_the_stock_layers_run_on_the_kept_tokens(adapter, photos, keep):
    """Oracle: the stock decoder layers called by hand, the sequence cut to the text and the kept
    visual tokens (their own positions) before layer K; the last token's logits agree."""
    lm = adapter.language_model
    seen = {}

    def capture(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"])

    pipe = Pipeline(adapter, _fastv(adapter, K=2, R=keep))
    handle = lm.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        pipe.generate([Request(PROMPT, photos[1:2])], 1)
    finally:
        handle.remove()
    (hook,) = pipe.last_hooks
    stays = (~hook.visual[0] | hook.kept[0]).nonzero().flatten()
    hidden, positions = seen["embeds"], seen["positions"]
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i == 2:
                hidden, positions = hidden[:, stays], positions[:, stays]
            length = hidden.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
            hidden = layer(hidden, attention_mask=causal, position_ids=positions,
                           position_embeddings=lm.rotary_emb(hidden, positions))  # fmt: skip
        logits = adapter.lm_head(lm.norm(hidden)[:, -1]).float()
    assert hidden.shape[1] == int((~hook.visual[0]).sum()) + round(keep * int(hook.visual[0].sum()))
    torch.testing.assert_close(pipe.last_prefill_logits, logits, atol=1e-4, rtol=1e-4)


def test_layers_from_k_cache_only_the_tokens_that_went_on(llava, photos):
    pipe = Pipeline(llava, _fastv(llava, K=2, R=0.25))
    result = pipe.generate([Request(PROMPT, photos[:1])], 3)[0]
    config = llava.language_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_column = 2 * config.num_key_value_heads * head_dim * 4  # K and V, float32
    kv = result.account.kv_bytes_per_layer
    assert result.account.llm_drops == ((2, 147),) and result.account.methods["fastv"]["dropped_visual"] == 147
    assert kv[0] == kv[1] and kv[2] == kv[3] and (kv[0] - kv[2]) // per_column == 147
    cache = pipe.last_cache
    assert cache.layers[0].keys.shape[-2] - cache.layers[2].keys.shape[-2] == 147
    # layers 0-1 see 196 visual tokens, layers 2-3 see 49
    assert result.account.decode_visual_attended == pytest.approx((2 * 196 + 2 * 49) / 4)


def test_fastv_with_another_llm_side_method_is_one_clear_error(llava_ov, photos):
    method = _fastv(llava_ov, "fastv+dycoke")
    with pytest.raises(TokcompError, match="cannot be combined"):
        Pipeline(llava_ov, method).generate([Request(PROMPT, video=photos[:4])], 2)

