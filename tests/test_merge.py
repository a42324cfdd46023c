"""Properties of the pure merge math (hypothesis): partitions, sizes, caps, order, batching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.methods import merge as M


def _batch(lengths: list[int], dim: int, seed: int, duplicates: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    metric = torch.randn(len(lengths), n, dim, generator=g)
    if duplicates:  # many near-identical tokens, so thresholds near 1 still merge
        metric = metric.round()
    valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return metric, valid


def _apply(metric, valid, chosen, edges, protected, order="spatial"):
    plan = M.plan_merge(edges, chosen, valid, protected, order)
    bsz, n = valid.shape
    sizes = valid.float()
    source = torch.arange(n).expand(bsz, n).clone()
    return plan, M.merge_sum(sizes, plan).masked_fill(~plan.new_valid, 0), M.remap_source(source, plan)


lengths_strategy = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, seed=st.integers(0, 10_000), tau=st.floats(-1.0, 1.0), protected=st.integers(0, 1))
def test_threshold_merge_partitions_the_tokens(lengths, seed, tau, protected):
    metric, valid = _batch(lengths, 8, seed, duplicates=seed % 2 == 0)
    edges = M.best_edges(metric, valid, protected)
    chosen = M.select_by_threshold(edges, tau)
    plan, sizes, source = _apply(metric, valid, chosen, edges, protected)
    for b, t in enumerate(lengths):
        count = int(plan.new_valid[b].sum())
        merged = int(plan.num_merged[b])
        assert count == t - merged
        assert merged <= max(t - protected, 0) // 2
        src = source[b, :t]
        assert src.min() >= 0 and src.max() < count  # every original token lands on a real token
        covered = torch.bincount(src, minlength=count)
        assert (covered >= 1).all()  # every token covers at least one original position
        assert torch.equal(covered.float(), sizes[b, :count])  # sizes = patches per token
        assert sizes[b].sum() == t
        if protected and t > 0:
            assert src[0] == 0 and sizes[b, 0] == 1  # CLS is never merged and stays first
        # every chosen edge was strictly above the threshold
        assert bool((edges.scores[b][chosen[b]] > tau).all())


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_strategy, seed=st.integers(0, 10_000), tau=st.floats(-1.0, 1.0))
def test_spatial_order_keeps_survivors_in_index_order(lengths, seed, tau):
    metric, valid = _batch(lengths, 8, seed)
    edges = M.best_edges(metric, valid, 0)
    plan = M.plan_merge(edges, M.select_by_threshold(edges, tau), valid, 0, "spatial")
    for b in range(len(lengths)):
        kept = plan.order[b][plan.new_valid[b]]
        assert bool((kept[1:] > kept[:-1]).all())
        assert not bool(plan.merged[b][kept].any())


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_strategy, seed=st.integers(0, 10_000), tau=st.floats(-0.5, 0.9))
def test_batch_plan_equals_one_image_at_a_time(lengths, seed, tau):
    metric, valid = _batch(lengths, 8, seed)
    edges = M.best_edges(metric, valid, 1)
    plan, sizes, source = _apply(metric, valid, M.select_by_threshold(edges, tau), edges, 1)
    for b, t in enumerate(lengths):
        m1, v1 = metric[b : b + 1, :t], valid[b : b + 1, :t]
        e1 = M.best_edges(m1, v1, 1)
        p1, s1, src1 = _apply(m1, v1, M.select_by_threshold(e1, tau), e1, 1)
        c = int(p1.new_valid.sum())
        assert c == int(plan.new_valid[b].sum())
        assert torch.equal(src1[0], source[b, :t])
        assert torch.equal(s1[0, :c], sizes[b, :c])


def test_infinite_threshold_merges_nothing():
    metric, valid = _batch([10, 7], 4, 0, duplicates=True)
    edges = M.best_edges(metric, valid, 0)
    assert not M.select_by_threshold(edges, math.inf).any()


def test_weighted_merge_is_the_size_weighted_mean_of_each_group():
    metric, valid = _batch([12], 4, 3, duplicates=True)
    x = torch.randn(1, 12, 5)
    sizes = torch.tensor([[1.0, 2, 3, 1, 1, 4, 1, 2, 1, 1, 5, 1]])
    edges = M.best_edges(metric, valid, 0)
    plan = M.plan_merge(edges, M.select_by_threshold(edges, -1.0), valid, 0)
    merged, new_sizes = M.merge_weighted(x, sizes, plan)
    group = M.remap_source(torch.arange(12)[None], plan)[0]
    for j in range(plan.new_length):
        members = group == j
        expected = (x[0, members] * sizes[0, members, None]).sum(0) / sizes[0, members].sum()
        assert torch.allclose(merged[0, j], expected, atol=1e-6)
        assert new_sizes[0, j] == sizes[0, members].sum()


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_strategy, seed=st.integers(0, 10_000), k=st.integers(0, 60))
def test_batch_top_k_takes_exactly_k_edges_and_cuts_at_the_next_one(lengths, seed, k):
    metric, valid = _batch(lengths, 8, seed)
    edges = M.best_edges(metric, valid, 1)
    chosen, cut = M.select_top_k_batch(edges, k)
    eligible = int(sum(min(c, int(torch.isfinite(s).sum())) for c, s in zip(edges.cap, edges.scores, strict=True)))
    assert int(chosen.sum()) == min(k, eligible)
    assert (chosen.sum(dim=1) <= edges.cap).all()
    if 0 < int(chosen.sum()) < eligible:
        assert float(edges.scores[chosen].min()) >= cut or cut == 0.0
    assert cut >= 0.0


def test_top_r_merges_r_per_image():
    metric, valid = _batch([30, 30, 11], 8, 5)
    edges = M.best_edges(metric, valid, 0)
    chosen = M.select_top_r(edges, 4)
    assert chosen.sum(dim=1).tolist() == [4, 4, 4]
    assert M.select_top_r(edges, 100).sum(dim=1).tolist() == [15, 15, 5]


def test_reference_order_is_cls_then_unmerged_a_then_b():
    metric, valid = _batch([9], 4, 0, duplicates=True)
    edges = M.best_edges(metric, valid, 1)
    chosen = torch.zeros_like(edges.scores, dtype=torch.bool)
    chosen[0, 2] = True  # token 4 merges away
    plan = M.plan_merge(edges, chosen, valid, 1, "reference")
    assert plan.order[0].tolist() == [0, 2, 6, 8, 1, 3, 5, 7]
    no_cls = M.plan_merge(M.best_edges(metric, valid, 0), chosen, valid, 0, "reference")
    a_kept = no_cls.order[0][:4].tolist()
    scores = M.best_edges(metric, valid, 0).scores[0]
    assert sorted(a_kept) == [0, 2, 6, 8]
    assert [float(scores[i // 2]) for i in a_kept] == sorted((float(scores[i // 2]) for i in a_kept), reverse=True)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_proportional_bias_equals_attending_to_duplicates(dtype):
    """softmax with +log(size) over merged keys == softmax over the keys repeated size times."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g)
    k = torch.randn(1, 2, 4, 8, generator=g)
    v = torch.randn(1, 2, 4, 8, generator=g)
    sizes = torch.tensor([[1.0, 3.0, 2.0, 1.0]])
    bias = M.proportional_bias(sizes, torch.ones(1, 4, dtype=torch.bool), dtype)
    merged = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    rep = torch.repeat_interleave(torch.arange(4), sizes[0].long())
    dup = F.scaled_dot_product_attention(q, k[:, :, rep], v[:, :, rep])
    assert torch.allclose(merged, dup, atol=1e-6)
