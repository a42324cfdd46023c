"""Adaptive multi-image pruning, random, DivPrune (and FastV keeping all): budgets, do-nothing exactness, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokcomp.methods import selection as S
from tokcomp.methods.pruning import TokenScorer, adaptive_select
from tokcomp.methods.registry import build_method
from tokcomp.pipeline import Pipeline, Request

PROMPT = "what is in the pictures ?"


def _method(adapter, spec, **sets):
    return build_method(spec, adapter.name, adapter.num_layers, sets={k: str(v) for k, v in sets.items()})


@pytest.mark.parametrize(("spec", "sets"), [("adaptive", {"rho": 1}), ("fastv", {"R": 1}), ("random", {"ratio": 1}),
                                            ("divprune", {"ratio": 1})])  # fmt: skip
def test_keep_everything_is_identical_to_none(adapter, photos, spec, sets):
    request = [Request(PROMPT, photos[:2])]
    plain = Pipeline(adapter)
    expected = plain.generate(request, 4)[0]
    pipe = Pipeline(adapter, _method(adapter, spec, **sets))
    got = pipe.generate(request, 4)[0]
    assert got.token_ids == expected.token_ids
    assert torch.equal(pipe.last_prefill_logits, plain.last_prefill_logits)


@pytest.mark.parametrize("rho", [0.1, 0.2, 0.37])
def test_adaptive_meets_the_global_budget_exactly_with_floors(llava, photos, flat_image, rho):
    method = _method(llava, "adaptive", rho=rho, floor=0.05)
    images = [photos[0], flat_image, photos[5], photos[2]]
    result = Pipeline(llava, method).generate([Request(PROMPT, images)], 2)[0]
    full = result.account.visual_full
    assert result.account.visual_kept == round(rho * full)
    floor = int(np.ceil(0.05 * 196))
    assert all(unit["kept"] >= floor for unit in result.account.per_image)
    plan = result.account.selection["adaptive"]
    assert sum(plan.per_image_budget) + plan.inter_budget == plan.budget


def test_a_flat_image_gets_a_smaller_budget_than_a_textured_one(llava, photos, flat_image):
    method = _method(llava, "adaptive", rho=0.25)
    result = Pipeline(llava, method).generate([Request(PROMPT, [flat_image, photos[5]])], 1)[0]
    flat, gravel = result.account.per_image
    assert flat["kept"] < gravel["kept"]
    plan = result.account.selection["adaptive"]
    assert plan.intra_diversity[0] < plan.intra_diversity[1]


def test_a_repeated_image_gets_far_fewer_tokens(llava_ov, photos):
    method = _method(llava_ov, "adaptive", rho=0.3)
    result = Pipeline(llava_ov, method).generate([Request(PROMPT, [photos[1], photos[1]])], 1)[0]
    first, second = (unit["kept"] for unit in result.account.per_image)
    assert second * 3 <= first


def test_the_prompt_changes_the_pareto_winners_when_alignment_matters():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(60, 16, generator=g), torch.randn(60, 16, generator=g)]
    aligned_a, aligned_b = [3, 17, 41], [8, 29, 55]
    prompt_a = images[1][aligned_a] + 0.01 * torch.randn(3, 16, generator=g)
    prompt_b = images[1][aligned_b] + 0.01 * torch.randn(3, 16, generator=g)
    plan_a = adaptive_select(images, prompt_a, rho=0.4)
    plan_b = adaptive_select(images, prompt_b, rho=0.4)
    assert plan_a.inter_budget > 0 and plan_a.budget == plan_b.budget == 48
    kept_a, kept_b = set(plan_a.kept[1].tolist()), set(plan_b.kept[1].tolist())
    assert kept_a != kept_b
    # each prompt's own tokens win more often under that prompt
    assert len(kept_a & set(aligned_a)) > len(kept_b & set(aligned_a))
    assert len(kept_b & set(aligned_b)) > len(kept_a & set(aligned_b))
    assert plan_a.per_image_budget == plan_b.per_image_budget  # the intra stage ignores the prompt


def test_pareto_fronts_and_crowding():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [0.1, 0.1]])
    assert S.pareto_fronts(points) == [[0, 1, 2], [3], [4]]
    crowd = S.crowding_distance(points[[0, 1, 2]])
    assert torch.isinf(crowd[0]) and torch.isinf(crowd[1]) and torch.isfinite(crowd[2])


def test_split_budget_is_exact_and_respects_floors_and_caps():
    out = S.split_budget(50, [1.0, 0.0, 5.0], floors=[3, 3, 3], caps=[10, 40, 40])
    assert sum(out) == 50 and out[1] == 3 and out[0] <= 10 and all(o >= 3 for o in out)


def test_scorer_base_makes_a_method_in_a_few_lines(llava, photos):
    class Brightest(TokenScorer):
        name = "brightest"

        def score(self, features, text, unit):
            return features.norm(dim=-1)

    result = Pipeline(llava, Brightest(ratio=0.5)).generate([Request(PROMPT, photos[:2])], 1)[0]
    assert [u["kept"] for u in result.account.per_image] == [98, 98]


def test_random_is_seeded_and_divprune_is_diverse(llava, photos):
    request = [Request(PROMPT, photos[:1])]
    a = Pipeline(llava, _method(llava, "random", ratio=0.3, seed=1)).generate(request, 2)[0]
    b = Pipeline(llava, _method(llava, "random", ratio=0.3, seed=1)).generate(request, 2)[0]
    assert a.token_ids == b.token_ids and a.account == b.account
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    x[20:] = x[0] + 1e-3 * torch.randn(20, 8, generator=torch.Generator().manual_seed(1))  # a near-duplicate cluster
    order = S.farthest_point_order(x, 0, 10)
    assert sum(int(i) >= 20 for i in order) <= 1  # greedy max-min avoids the duplicates


def test_pruned_tokens_keep_their_positions(llava, photos):
    seen: list[torch.Tensor] = []
    hook = llava.language_model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        result = Pipeline(llava, _method(llava, "random", ratio=0.25)).generate([Request(PROMPT, photos[:1])], 2)[0]
    finally:
        hook.remove()
    prefill = seen[0][0]
    assert prefill.shape[0] == result.account.prompt_tokens_kept
    assert bool((prefill[1:] > prefill[:-1]).all()) and int(prefill[-1]) == result.account.prompt_tokens_full - 1
    assert int(seen[1]) == result.account.prompt_tokens_full  # decoding continues after the stock length
