"""DToMe (and fixed-r ToMe) inside Qwen2.5-VL's windowed vision tower (and Qwen3-VL's), on whole 2x2 merge units.

The tower packs every image (and every temporal slice of a video) into one sequence, in window order,
and its patch merger concatenates each group of four consecutive rows (a 2x2 *merge unit*) into one LLM
token. tokcomp therefore merges whole units: a unit's similarity key is its four patches' keys side by
side (each averaged over heads), a merged unit is the size-weighted mean of its members slot by slot
(top-left with top-left, ...), and it keeps the 2-D rotary positions of the unit it merged into (the
destination, as the B side of bipartite matching). Merges stay within one image or one temporal slice
(the tower's full-attention segments) and may cross windows; a merged unit stays in its destination's
window, so windowed blocks attend within the (now shorter) windows. After the first merge every block
attends with DyMU's proportional bias log(size) per segment, computed from the block's own ``qkv`` and
``proj`` with the stock rotary function; before it the stock block runs untouched, so thresholds of
``+inf`` give the stock tower bit for bit.

The merger's output is copied back to every original unit, so the stock forward's own reordering to
raster order (and everything downstream) sees the stock token count; ``QwenMergeState.last`` says which
merged token each unit is (DyMU's map M) and what the merged tokens are.

Qwen3-VL's tower has no windows (every block attends to whole segments, rows in raster order) and taps
a few intermediate blocks with DeepStack mergers: each tap's output is copied back to every stock unit
the same way, so a merged token's DeepStack features are those of the merged unit at that block.
"""

from __future__ import annotations

import itertools
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokcomp.methods import merge as M
from tokcomp.methods.dtome import MergeRule, detach
from tokcomp.models.qwen_tower import rotated_qkv, window_order, windowed


@dataclass
class UnitMergeRecord:
    """What one tower forward merged: per full-attention segment, in the order the tower packs them."""

    tokens: torch.Tensor  # (T, D) the merger's outputs of the merged units, segment by segment
    token_of_unit: torch.Tensor  # (U,) long: merged token (row of ``tokens``) of every unit, raster order
    sizes: torch.Tensor  # (T,) units per merged token
    layer_counts: list[list[int]]  # per segment, units after each block


@dataclass
class QwenMergeState:
    """Per-forward state of the patched tower (``last``: the record of the latest forward).

    The packed sequence is viewed as a padded batch of its segments: ``flat[s, j]`` is the current unit
    (in sequence order) in slot ``j`` of segment ``s``.
    """

    rule: MergeRule
    tower: nn.Module
    token_order: M.TokenOrder = "spatial"
    seconds: float = 0.0  # time spent matching and merging (the method's own work), all forwards
    last: UnitMergeRecord | None = None
    # the forward in progress
    grid_thw: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    merged_any: bool = False
    flat: torch.Tensor | None = None  # (S, Umax) long
    valid: torch.Tensor | None = None  # (S, Umax) bool
    sizes: torch.Tensor | None = None  # (S, Umax) float32: stock units per slot
    source: torch.Tensor | None = None  # (S, U0max) long: stock slot -> current slot
    window: torch.Tensor | None = None  # (S, Umax) long: window of every slot
    cos: torch.Tensor | None = None  # current rotary tables, one row per patch row
    sin: torch.Tensor | None = None
    window_index: torch.Tensor | None = None  # the tower's: window-order unit -> raster unit
    stock_units: list[int] = field(default_factory=list)
    counts: list[list[int]] = field(default_factory=list)

    @property
    def unit(self) -> int:
        return int(self.tower.spatial_merge_size) ** 2

    @property
    def heads(self) -> int:
        return int(self.tower.blocks[0].attn.num_heads)

    def start(self, rows: int, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Segments (full attention) and windows of the stock packing, from the tower's own helpers."""
        from transformers.vision_utils import get_vision_attention_seqlens

        cu_full, _ = get_vision_attention_seqlens(self.grid_thw, self.tower.config)
        self.window_index, cu_window = window_order(self.tower, self.grid_thw)
        edges_full = torch.unique_consecutive(torch.as_tensor(cu_full).long().cpu() // self.unit)
        edges_window = torch.unique_consecutive(torch.as_tensor(cu_window).long().cpu() // self.unit)
        window = torch.bucketize(torch.arange(rows // self.unit), edges_window[1:], right=True)
        lengths = torch.diff(edges_full).tolist()
        width = max(lengths)
        self.flat = torch.zeros(len(lengths), width, dtype=torch.long)
        self.valid = torch.zeros(len(lengths), width, dtype=torch.bool)
        self.window = torch.zeros(len(lengths), width, dtype=torch.long)
        for s, (lo, n) in enumerate(zip(edges_full[:-1].tolist(), lengths, strict=True)):
            self.flat[s, :n] = torch.arange(lo, lo + n)
            self.valid[s, :n] = True
            self.window[s, :n] = window[lo : lo + n]
        self.sizes = self.valid.float()
        # a shorter segment's padding columns point at its first unit (never read back, always a live slot)
        self.source = torch.arange(width).expand(len(lengths), width).masked_fill(~self.valid, 0)
        self.stock_units = [int(n) for n in lengths]
        self.counts = [[] for _ in lengths]
        self.cos, self.sin = position_embeddings
        self.merged_any = False
        self.keys = None

    def cu_seqlens(self, full: bool, device: torch.device) -> torch.Tensor:
        """Cumulative patch-row lengths of the current segments (``full``) or of their windows."""
        if full:
            lengths = self.valid.sum(dim=1)
        else:
            keyed = self.window.masked_fill(~self.valid, -1)
            lengths = torch.cat([torch.unique_consecutive(row[row >= 0], return_counts=True)[1] for row in keyed])
        lengths = lengths * self.unit
        return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device=device, dtype=torch.int32)

    # --- one block's merge --------------------------------------------------------------------
    def merge(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Merge units after the block's attention residual; the hidden states of the survivors."""
        started = time.perf_counter()
        try:
            return self._merge(layer, hidden)
        finally:
            self.seconds += time.perf_counter() - started

    def _merge(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        keys, self.keys = self.keys, None
        if keys is None:
            raise RuntimeError("DToMe did not capture the attention keys of this block")
        u, device = self.unit, hidden.device
        slots = self.flat.to(device)
        valid = self.valid.to(device)
        metric = keys.reshape(-1, u * keys.shape[-1])[slots]  # a unit's four patch keys side by side
        edges = M.best_edges(metric, valid, 0)
        chosen = self.rule.choose(layer, edges)
        if chosen is not None and bool(chosen.any()):
            plan = M.plan_merge(edges, chosen, valid, 0, self.token_order)
            rows = hidden.reshape(-1, u * hidden.shape[-1])[slots]  # (S, Umax, 4 * C): a unit's rows side by side
            merged, sizes = M.merge_weighted(rows, self.sizes.to(device), plan)
            keep = plan.new_valid
            self.window = self.window.to(device).gather(1, plan.order).masked_fill(~keep, 0)
            self.source = M.remap_source(self.source.to(device), plan)
            self.cos, self.sin = (self._survivors(t, slots, plan) for t in (self.cos, self.sin))
            counts = keep.sum(dim=1)
            starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
            self.flat = (starts[:, None] + torch.arange(keep.shape[1], device=device)).masked_fill(~keep, 0)
            self.valid, self.sizes = keep, sizes
            hidden = merged[keep].reshape(-1, hidden.shape[-1])
            self.merged_any = True
        for s, n in enumerate(self.valid.sum(dim=1).tolist()):
            self.counts[s].append(int(n))
        return hidden

    def _survivors(self, table: torch.Tensor, slots: torch.Tensor, plan: M.MergePlan) -> torch.Tensor:
        """A per-row table (rotary cos or sin) of the surviving units: each keeps its own rows."""
        u = self.unit
        per_slot = table.reshape(-1, u, table.shape[-1])[slots]
        index = plan.order[..., None, None].expand(-1, -1, u, table.shape[-1])
        return per_slot.gather(1, index)[plan.new_valid].reshape(-1, table.shape[-1])

    def log_sizes(self, device: torch.device) -> torch.Tensor:
        """log(size) of every current patch row, in sequence order."""
        return self.sizes[self.valid].clamp_min(1).log().repeat_interleave(self.unit).to(device)

    # --- the merger's output back to every stock unit ------------------------------------------
    def expand(self, merged: torch.Tensor, record: bool = True) -> torch.Tensor:
        """(T, D) merged tokens -> (U0, D), one row per stock unit in window order; records ``last`` (not for
        a DeepStack tap, whose merger reads an intermediate block)."""
        device = merged.device
        counts = self.valid.sum(dim=1).to(device)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        stock = torch.tensor(self.stock_units, device=device)
        stock_valid = torch.arange(self.source.shape[1], device=device)[None, :] < stock[:, None]
        token = (starts[:, None] + self.source.to(device))[stock_valid]  # (U0,) stock window order
        if not record:
            return merged[token]
        raster = torch.empty_like(token)
        raster[self.window_index.to(device)] = token
        self.last = UnitMergeRecord(
            tokens=merged, token_of_unit=raster, sizes=self.sizes[self.valid].to(device),
            layer_counts=[list(c) for c in self.counts],
        )  # fmt: skip
        return merged[token]


def _sized_attention(attn: nn.Module, hidden: torch.Tensor, cu: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, log_sizes: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The block's attention over packed segments with the proportional bias log(size) on the keys."""
    n = hidden.shape[0]
    q, k, v = rotated_qkv(attn, hidden, cos, sin)
    outs = []
    bounds = cu.tolist()
    for lo, hi in itertools.pairwise(bounds):
        if hi == lo:
            continue
        bias = log_sizes[lo:hi].to(q.dtype)[None, None, None, :]
        chunk = [t[lo:hi].transpose(0, 1)[None] for t in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*chunk, attn_mask=bias, scale=attn.scaling)[0].transpose(0, 1))
    return attn.proj(torch.cat(outs).reshape(n, -1))


def _merging_block_forward(block: nn.Module, index: int, full: bool, state: QwenMergeState):
    """A replacement ``forward`` for one vision block instance: the stock block until something merged."""

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings=None, **kwargs):
        if index == 0:
            state.start(hidden_states.shape[0], position_embeddings)
        if not state.merged_any:
            attended = self.attn(self.norm1(hidden_states), cu_seqlens=cu_seqlens,
                                 position_embeddings=position_embeddings, **kwargs)  # fmt: skip
        else:
            device = hidden_states.device
            attended = _sized_attention(self.attn, self.norm1(hidden_states), state.cu_seqlens(full, device),
                                        state.cos, state.sin, state.log_sizes(device))  # fmt: skip
        hidden_states = state.merge(index, hidden_states + attended)
        return hidden_states + self.mlp(self.norm2(hidden_states))

    return types.MethodType(forward, block)


@contextmanager
def attach_unit_merging(tower: nn.Module, rule: MergeRule, *, token_order: M.TokenOrder = "spatial"
                        ) -> Iterator[QwenMergeState]:  # fmt: skip
    """Run a Qwen2.5-VL or Qwen3-VL vision tower with DToMe on merge units; yields the state (``last`` per
    forward). On Qwen3-VL every block attends to whole segments and each DeepStack merger's output is
    copied back to every stock unit too, like the final merger's."""
    state = QwenMergeState(rule=rule, tower=tower, token_order=token_order)
    fullatt = set(tower.fullatt_block_indexes) if windowed(tower) else set(range(len(tower.blocks)))
    handles, patched = [], []

    def grid_hook(_module, args, kwargs):
        state.grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

    def keys_hook(_module, _inputs, output):
        n = output.shape[0]
        state.keys = output.reshape(n, 3, state.heads, -1)[:, 1].mean(dim=1)

    try:
        handles.append(tower.register_forward_pre_hook(grid_hook, with_kwargs=True))
        for i, block in enumerate(tower.blocks):
            handles.append(block.attn.qkv.register_forward_hook(keys_hook))
            block.forward = _merging_block_forward(block, i, i in fullatt, state)
            patched.append(block)
        handles.append(tower.merger.register_forward_hook(lambda _m, _i, output: state.expand(output)))
        for tap in getattr(tower, "deepstack_merger_list", []):
            handles.append(tap.register_forward_hook(lambda _m, _i, output: state.expand(output, record=False)))
        yield state
    finally:
        detach(handles, patched)
