"""DART and CDPruner selections: exact budgets, pivots kept, the cut shared with FastV."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.methods.dart import least_duplicated
from tokcomp.methods.registry import build_method
from tokcomp.pipeline import Pipeline, Request


@settings(max_examples=80, deadline=None)
@given(
    count=st.integers(1, 30), texts=st.integers(0, 6), budget=st.integers(1, 40), image_pivots=st.integers(1, 6),
    text_pivots=st.integers(0, 6), seed=st.integers(0, 10_000),
)  # fmt: skip
def test_the_budget_is_met_exactly_with_the_image_pivots_in_it(count, texts, budget, image_pivots, text_pivots, seed):
    generator = torch.Generator().manual_seed(seed)
    visual, text = torch.randn(count, 5, generator=generator), torch.randn(texts, 5, generator=generator)
    norms = torch.rand(count, generator=generator)
    kept = least_duplicated(visual, norms, text, torch.rand(texts, generator=generator), budget, image_pivots,
                            text_pivots)  # fmt: skip
    assert kept.tolist() == sorted(set(kept.tolist()))  # sorted, each token once
    assert kept.numel() == min(budget, count) and (kept.numel() == 0 or 0 <= kept.min() <= kept.max() < count)
    pivots = torch.argsort(norms, descending=True, stable=True)[: min(image_pivots, budget, count)]
    assert set(pivots.tolist()) <= set(kept.tolist())


def test_dart_layers_before_k_are_untouched_and_later_ones_are_shorter(llava, photos):
    outputs: dict[str, list[torch.Tensor]] = {"none": [], "dart": []}
    request = [Request("what is in the pictures ?", photos[:1])]
    for name in outputs:
        sets = {"K": "2", "R": "0.25"} if name == "dart" else {}
        method = build_method(name, llava.name, llava.num_layers, sets=sets)
        handles = [layer.register_forward_hook(lambda m, a, out, n=name: outputs[n].append(out.detach().clone()))
                   for layer in llava.language_model.layers]  # fmt: skip
        try:
            Pipeline(llava, method).generate(request, 1)
        finally:
            for handle in handles:
                handle.remove()
    plain, dart = outputs["none"], outputs["dart"]
    assert torch.equal(plain[0], dart[0])  # layer 0 runs the stock layer on the same input
    kept = round(0.25 * 196)
    assert dart[2].shape[1] == plain[2].shape[1] - (196 - kept)  # from layer K=2 on: the kept tokens only


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 24), dim=st.integers(1, 8), keep=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_cdpruner_keeps_exactly_its_budget_even_past_the_kernel_rank(count, dim, keep, seed):
    from tokcomp.methods.cdpruner import conditional_kernel, greedy_dpp, instruction_relevance

    generator = torch.Generator().manual_seed(seed)
    features, text = torch.randn(count, dim, generator=generator), torch.randn(2, dim, generator=generator)
    kernel = conditional_kernel(features, instruction_relevance(features, text), 0.5)
    chosen = greedy_dpp(kernel, keep).tolist()
    assert chosen == sorted(set(chosen)) and len(chosen) == min(keep, count)  # dim < count: rank runs out
    assert all(0 <= i < count for i in chosen)


def test_pyramiddrop_stages_default_to_the_quarters_of_the_depth():
    from tokcomp.errors import TokcompError
    from tokcomp.methods.pyramiddrop import stage_layers

    assert stage_layers(None, 32) == (8, 16, 24)  # the paper's LLaVA-1.5 stages
    assert stage_layers(None, 4) == (1, 2, 3) and stage_layers(None, 2) == (1,)
    assert stage_layers("2,5", 8) == (2, 5)
    for bad in ("3,2", "0,2", "8", "a"):
        with pytest.raises(TokcompError, match="pyramiddrop: layers"):
            stage_layers(bad, 8)


def test_pyramiddrop_is_the_stock_layers_run_stage_by_stage(adapter, photos):
    """Oracle: the stock decoder layers called by hand, the sequence cut again before every stage to
    the text and that stage's visual tokens (their own positions); the last token's logits agree."""
    lm = adapter.language_model
    seen = {}

    def capture(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"])

    pipe = Pipeline(adapter, build_method("pyramiddrop", adapter.name, adapter.num_layers, sets={"keep": "0.5"}))
    handle = lm.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        pipe.generate([Request("what is in the picture ?", photos[1:2])], 1)
    finally:
        handle.remove()
    (hook,) = pipe.last_hooks
    hidden, positions = seen["embeds"], seen["positions"]
    current = torch.arange(hidden.shape[1])
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i in hook.cut_layers:
                stage = hook.cut_layers.index(i)
                goes_on = hook.orders[stage][0][hook.reals[stage][0]]
                rows = torch.tensor([current.tolist().index(int(p)) for p in goes_on])
                hidden, positions, current = hidden[:, rows], positions[:, rows], goes_on
            length = hidden.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
            hidden = layer(hidden, attention_mask=causal, position_ids=positions,
                           position_embeddings=lm.rotary_emb(hidden, positions))  # fmt: skip
        logits = adapter.lm_head(lm.norm(hidden)[:, -1]).float()
    counts = [len(o[0][r[0]]) for o, r in zip(hook.orders, hook.reals, strict=True)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]  # shorter every stage
    torch.testing.assert_close(pipe.last_prefill_logits, logits, atol=1e-4, rtol=1e-4)
