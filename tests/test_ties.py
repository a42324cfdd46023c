"""Deterministic top-k: near-ties go to the lower index, so last-bit differences cannot reorder a choice."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.methods.selection import TIE_BITS, round_mantissa, top_k_stable
from tokcomp.pipeline import nudge_one_ulp

scores_lists = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64)


@given(scores_lists, st.data())
@settings(max_examples=200, deadline=None)
def test_top_k_stable_picks_k_of_the_best_without_repeats(values, data):
    scores = torch.tensor(values)
    k = data.draw(st.integers(0, len(values)))
    chosen = top_k_stable(scores, k)
    assert chosen.numel() == k and len(set(chosen.tolist())) == k
    rounded = round_mantissa(scores)
    if 0 < k < len(values):  # nothing left out ranks above anything chosen
        left_out = torch.ones(len(values), dtype=torch.bool)
        left_out[chosen] = False
        assert rounded[chosen].min() >= rounded[left_out].max()


@given(scores_lists)
@settings(max_examples=200, deadline=None)
def test_one_ulp_noise_does_not_reorder_away_from_a_bucket_edge(values):
    scores = torch.tensor(values)
    nudged = nudge_one_ulp(scores)
    same_bucket = round_mantissa(scores) == round_mantissa(nudged)
    if bool(same_bucket.all()):  # the usual case: a last-bit change leaves every rounded score as it was
        k = max(1, len(values) // 2)
        assert torch.equal(top_k_stable(scores, k), top_k_stable(nudged, k))


def test_exact_and_near_ties_go_to_the_lower_index():
    near = 1.0 + 2.0 ** -(TIE_BITS + 4)  # equal to 1.0 at TIE_BITS of mantissa
    scores = torch.tensor([0.5, near, 1.0, 1.0, 2.0])
    assert top_k_stable(scores, 3).tolist() == [4, 1, 2]
    assert top_k_stable(scores, 2, largest=False).tolist() == [0, 1]
    assert top_k_stable(torch.tensor([3.0, float("-inf"), 3.0]), 2).tolist() == [0, 2]


def test_clearly_different_scores_rank_as_topk_does():
    scores = torch.tensor([0.1, 0.9, 0.4, 0.7, 0.3])
    assert set(top_k_stable(scores, 3).tolist()) == set(scores.topk(3).indices.tolist())
