"""The vLLM plugin's selection (tokcomp/serving/vllm_plugin.py) without vLLM: counts, do-nothing, oracles.

`make test-vllm` runs it inside vLLM; these are the pure parts, in tokcomp's own environment."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokcomp.methods import selection as S
from tokcomp.methods.pruning import DivPrune
from tokcomp.serving import vllm_plugin as plugin


def video_tokens(frames: int, per_frame: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(frames * per_frame, 16, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(frames=st.integers(1, 6), per_frame=st.integers(1, 12), share=st.floats(0.0, 1.0),
       method=st.sampled_from(plugin.METHODS), seed=st.integers(0, 5))  # fmt: skip
def test_every_method_fills_exactly_the_count_it_is_given(frames, per_frame, share, method, seed):
    embeddings = video_tokens(frames, per_frame, seed)
    count = round(share * embeddings.shape[0])
    mask = plugin.retention_mask(method, embeddings, count, seed=seed, frames=frames)
    assert mask.dtype == torch.bool and mask.shape == (embeddings.shape[0],)
    assert int(mask.sum()) == count


@pytest.mark.parametrize("method", plugin.METHODS)
def test_asked_to_keep_every_token_each_method_keeps_every_token(method):
    embeddings = video_tokens(4, 9)
    scores = plugin.method_scores(method, embeddings, frames=4)  # the method's own scoring runs
    assert scores.shape == (36,) and torch.isfinite(scores).all()
    assert plugin.retention_mask(method, embeddings, 36, frames=4).all()


def test_divprune_keeps_what_tokcomps_divprune_keeps():
    embeddings = video_tokens(4, 16)
    kept = plugin.retention_mask("divprune", embeddings, 20).nonzero().flatten()
    assert kept.tolist() == S.top_k_stable(DivPrune().score(embeddings, None, 0), 20).sort().values.tolist()


def test_dycoke_keeps_the_anchor_frame_then_the_tokens_unlike_their_reference():
    """Frames 1-3 repeat frame 0. Changing two tokens of frame 1 (compared with frame 0) adds just those two;
    changing one of frame 2 adds it and its place in frame 3 (which DyCoke's window compares with frame 2)."""
    still = video_tokens(1, 9).repeat(4, 1).reshape(4, 9, -1)
    changed = still.clone()
    changed[1, 3] = -changed[1, 3]
    changed[1, 7] = torch.randn(16, generator=torch.Generator().manual_seed(1))
    kept = plugin.retention_mask("dycoke", changed.reshape(36, -1), 11, frames=4).nonzero().flatten().tolist()
    assert kept == [*range(9), 9 + 3, 9 + 7]
    changed = still.clone()
    changed[2, 4] = -changed[2, 4]
    kept = plugin.retention_mask("dycoke", changed.reshape(36, -1), 11, frames=4).nonzero().flatten().tolist()
    assert kept == [*range(9), 18 + 4, 27 + 4]


def test_random_depends_on_the_seed_and_only_on_it():
    embeddings = video_tokens(2, 8)
    first = plugin.retention_mask("random", embeddings, 5, seed=0)
    assert torch.equal(first, plugin.retention_mask("random", embeddings, 5, seed=0))
    assert not all(torch.equal(first, plugin.retention_mask("random", embeddings, 5, seed=s)) for s in range(1, 4))


def test_an_unknown_method_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"TOKCOMP_VLLM_METHOD='fastv'.*random, divprune, dycoke"):
        plugin.method_scores("fastv", torch.zeros(1, 1))
