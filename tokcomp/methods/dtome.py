"""Dynamic token merging (DToMe, DyMU §1) and fixed-r ToMe inside a stock HF ViT encoder.

Attaching merging to a ``CLIPVisionModel`` or ``SiglipVisionModel`` swaps, for the duration of a
``with`` block, the ``forward`` of each encoder layer *instance* for one that runs the layer's own stock
submodules (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``) in the stock order, adds the
proportional-attention bias ``log(size)`` to the attention logits, and merges tokens after the
attention residual and before the MLP. The keys used as the similarity metric are read with a
forward hook on ``self_attn.k_proj``. Everything is restored on exit; no modeling file is copied.

While nothing has merged and the batch has no padding the layers run exactly the stock computation
(no bias, no mask), so thresholds of ``+inf`` give bit-identical encoder outputs.
"""

from __future__ import annotations

import time
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tokcomp.methods import merge as M


class MergeRule:
    """Decides, per layer, which of the proposed A->B edges merge."""

    def choose(self, layer: int, edges: M.Edges) -> torch.Tensor | None:
        raise NotImplementedError


@dataclass
class ThresholdRule(MergeRule):
    """DToMe: every edge above the layer's similarity threshold (``+inf`` selects no edge: a layer off)."""

    thresholds: Sequence[float]

    def choose(self, layer: int, edges: M.Edges) -> torch.Tensor | None:
        return M.select_by_threshold(edges, float(self.thresholds[layer]))


@dataclass
class FixedRRule(MergeRule):
    """ToMe: the ``r`` most similar edges of every image in each layer (``r=0`` selects none)."""

    r_per_layer: Sequence[int]

    def choose(self, layer: int, edges: M.Edges) -> torch.Tensor | None:
        return M.select_top_r(edges, max(0, int(self.r_per_layer[layer])))


@dataclass
class BatchTopKRule(MergeRule):
    """Calibration: the top ``batch * r_i`` edges of the whole batch; records the cut per layer."""

    r_per_layer: Sequence[int]
    cuts: dict[int, float] = field(default_factory=dict)

    def choose(self, layer: int, edges: M.Edges) -> torch.Tensor | None:
        r = int(self.r_per_layer[layer])
        if r <= 0:
            return None
        chosen, cut = M.select_top_k_batch(edges, r * edges.scores.shape[0])
        self.cuts[layer] = cut
        return chosen


@dataclass
class LayerSnapshot:
    """Merge bookkeeping of a padded batch after some number of encoder layers."""

    valid: torch.Tensor  # (B, N) bool
    sizes: torch.Tensor  # (B, N) float32, 0 on padding
    source: torch.Tensor  # (B, N0) long: original token -> current token

    def counts(self, protected: int) -> list[int]:
        return [int(c) - protected for c in self.valid.sum(dim=1)]


@dataclass
class MergeState:
    """Per-forward state shared by the patched layers; ``snapshots[k]`` is the state after ``k`` layers."""

    rule: MergeRule
    protected: int
    token_order: M.TokenOrder = "spatial"
    snapshots: list[LayerSnapshot] = field(default_factory=list)
    keys: torch.Tensor | None = None
    merged_any: bool = False
    seconds: float = 0.0  # time spent matching and merging (the method's own work), all forwards

    def start(self, hidden_states: torch.Tensor) -> None:
        bsz, n, _ = hidden_states.shape
        device = hidden_states.device
        valid = torch.ones(bsz, n, dtype=torch.bool, device=device)
        sizes = torch.ones(bsz, n, dtype=torch.float32, device=device)
        source = torch.arange(n, device=device).expand(bsz, n).clone()
        self.snapshots = [LayerSnapshot(valid, sizes, source)]
        self.merged_any = False
        self.keys = None

    @property
    def current(self) -> LayerSnapshot:
        return self.snapshots[-1]

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if not self.merged_any:
            return None
        cur = self.current
        return M.proportional_bias(cur.sizes, cur.valid, dtype)

    def merge(self, layer: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, LayerSnapshot]:
        """Merge after the attention residual; returns the new hidden states and bookkeeping."""
        start = time.perf_counter()
        try:
            return self._merge(layer, hidden_states)
        finally:
            self.seconds += time.perf_counter() - start

    def _merge(self, layer: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, LayerSnapshot]:
        cur = self.current
        keys, self.keys = self.keys, None
        if keys is None:
            raise RuntimeError("DToMe did not capture the attention keys of this layer")
        edges = M.best_edges(keys, cur.valid, self.protected)
        chosen = self.rule.choose(layer, edges)
        if chosen is None or not bool(chosen.any()):
            return hidden_states, cur
        plan = M.plan_merge(edges, chosen, cur.valid, self.protected, self.token_order)
        merged, sizes = M.merge_weighted(hidden_states, cur.sizes, plan)
        self.merged_any = True
        return merged, LayerSnapshot(plan.new_valid, sizes, M.remap_source(cur.source, plan))


def _merging_layer_forward(layer: nn.Module, index: int, state: MergeState):
    """A replacement ``forward`` for one CLIP/SigLIP encoder layer instance (same submodules, same order)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        if index == 0:
            state.start(hidden_states)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        bias = state.attention_bias(hidden_states.dtype)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=bias, **kwargs)
        hidden_states = residual + hidden_states
        hidden_states, snapshot = state.merge(index, hidden_states)
        state.snapshots.append(snapshot)
        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states

    return types.MethodType(forward, layer)


def _pooling_head_forward(head: nn.Module, state: MergeState):
    """SigLIP's attention-pooling head with the size bias on its keys (padding masked)."""

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        batch_size = hidden_state.shape[0]
        probe = self.probe.repeat(batch_size, 1, 1)
        mask = None
        if state.merged_any:
            cur = state.current
            bias = M.proportional_bias(cur.sizes, cur.valid, hidden_state.dtype)[:, 0]  # (B, 1, N)
            mask = bias.repeat_interleave(self.attention.num_heads, dim=0)
        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=mask)[0]
        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]

    return types.MethodType(forward, head)


def detach(handles: list, patched: list[nn.Module]) -> None:
    """Remove the hooks and the per-instance ``forward`` replacements a merging attachment made."""
    for handle in handles:
        handle.remove()
    for module in patched:
        module.__dict__.pop("forward", None)


def encoder_layers(vision_model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP or SigLIP vision model (or of its ``vision_model`` wrapper)."""
    inner = getattr(vision_model, "vision_model", vision_model)
    return inner.encoder.layers


@contextmanager
def attach_merging(
    vision_model: nn.Module,
    rule: MergeRule,
    *,
    protected: int,
    token_order: M.TokenOrder = "spatial",
) -> Iterator[MergeState]:
    """Run ``vision_model`` with token merging inside the block; yields the state of the last forward."""
    state = MergeState(rule=rule, protected=protected, token_order=token_order)
    layers = encoder_layers(vision_model)
    handles = []
    patched: list[nn.Module] = []
    try:
        for i, layer in enumerate(layers):

            def capture(_module, _inputs, output, _attn=layer.self_attn):
                heads = getattr(_attn, "num_heads", None) or _attn.config.num_attention_heads
                b, n, _ = output.shape
                state.keys = output.view(b, n, heads, -1).mean(dim=2)

            handles.append(layer.self_attn.k_proj.register_forward_hook(capture))
            layer.forward = _merging_layer_forward(layer, i, state)
            patched.append(layer)
        head = getattr(getattr(vision_model, "vision_model", vision_model), "head", None)
        if head is not None and hasattr(head, "probe"):
            head.forward = _pooling_head_forward(head, state)
            patched.append(head)
        yield state
    finally:
        detach(handles, patched)
