"""Cutting visual tokens out of the LLM's sequence between two decoder layers (FastV, DART).

The cut happens with hooks on the stock layers (no copy of any modeling file): layer K-1's output
keeps only the rows that go on (each request left-padded to the longest), and every later layer gets
the matching rows of the rotary embeddings, position ids and mask. Kept tokens keep their positions;
decoding continues at the stock positions; layers 0 to K-1 keep the full cache and compute exactly
what the plain model computes. A subclass only chooses which visual tokens go on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tokcomp.methods.attention import AttentionHook, causal_mask


def rows_that_go_on(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, L) bool of the positions that stay, the (B, L') positions to take for each request
    and which of them are real (L' is the most any request keeps; a shorter request is left-padded
    with positions it drops, in order, marked not real). With nothing dropped: every position, as is."""
    counts = keep.sum(dim=1)
    width = int(counts.max()) if keep.numel() else 0
    order = torch.empty(keep.shape[0], width, dtype=torch.long, device=keep.device)
    real = torch.zeros(keep.shape[0], width, dtype=torch.bool, device=keep.device)
    for b in range(keep.shape[0]):
        kept = keep[b].nonzero().flatten()
        filler = (~keep[b]).nonzero().flatten()[: width - kept.numel()]
        order[b] = torch.cat([filler, kept])
        real[b, width - kept.numel() :] = True
    return order, real


def take_positions(tensor: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor``'s entries at ``order`` (B, L') along its sequence dimension ``dim``; the batch
    dimension is the one just before it (broadcast if it is 1), dimensions before that (M-RoPE's
    three position rows) and after it are carried along."""
    dim = dim % tensor.ndim
    batch = dim - 1
    shape = list(tensor.shape)
    shape[batch] = order.shape[0]
    tensor = tensor.expand(shape)
    index_shape = [1] * tensor.ndim
    index_shape[batch], index_shape[dim] = order.shape
    index = order.to(tensor.device).view(index_shape)
    target = list(tensor.shape)
    target[dim] = order.shape[1]
    return tensor.gather(dim, index.expand(target))


def take_mask(mask: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A (B or 1, heads, L, L) attention mask restricted to the rows and columns at ``order`` (B, L')."""
    index = order.to(mask.device)
    batch, width = index.shape
    mask = mask.expand(batch, *mask.shape[1:])
    rows = mask.gather(2, index[:, None, :, None].expand(batch, mask.shape[1], width, mask.shape[3]))
    return rows.gather(3, index[:, None, None, :].expand(batch, mask.shape[1], width, width))


@dataclass
class LayerCut(AttentionHook):
    """One batch's cuts: after layer ``layer - 1`` (and after ``later`` ones - 1, PyramidDrop's stages)
    a subclass sets ``kept`` (B, L), the visual tokens that go on, from what it observes in that
    layer's attention (``observe``) or output (``choose``); this class cuts and restricts later layers.

    Everything is kept in the coordinates of the LLM input (B, L): stage ``s`` (after ``s`` cuts) runs on
    the rows ``orders[s - 1]`` of it, ``reals[s - 1]`` telling which are tokens. A keep share of 1 still
    chooses, keeps every visual token and cuts nothing away (every position is taken, in order), so
    every layer computes what the stock one does.
    """

    layer: int
    keep: float
    visual: torch.Tensor  # (B, L) bool over the LLM input
    num_layers: int = 0
    later: tuple[int, ...] = ()  # further cut layers, increasing
    kept: torch.Tensor | None = None  # (B, L) the visual tokens that go on past the latest cut
    valid: torch.Tensor | None = None  # (B, L) the real (not padding) positions of the prefill
    orders: list[torch.Tensor] = field(default_factory=list)  # per cut: (B, L_s) positions that go on
    reals: list[torch.Tensor] = field(default_factory=list)  # per cut: (B, L_s) which of them are tokens
    counts: list[torch.Tensor] = field(default_factory=list)  # per cut: (B,) visual tokens that go on
    active_in_prefill: bool = True
    cuts_sequence: bool = True
    seconds: float = 0.0  # the hook's own work (the probe, the cut, the masks)

    @property
    def cut_layers(self) -> tuple[int, ...]:
        return (self.layer, *self.later)

    @property
    def keeps_everything(self) -> bool:
        return self.keep >= 1

    @property
    def order(self) -> torch.Tensor | None:
        """The rows the last stage runs on (None before the first cut)."""
        return self.orders[-1] if self.orders else None

    @property
    def real(self) -> torch.Tensor | None:
        return self.reals[-1] if self.reals else None

    def stage_of(self, index: int) -> int:
        """How many cuts come before decoder layer ``index``."""
        return sum(1 for cut in self.cut_layers if cut <= index)

    def budget(self, count: int) -> int:
        """Visual tokens a request with ``count`` of them (at this cut) keeps (at least one)."""
        return max(1, round(self.keep * count)) if count else 0

    def current_visual(self) -> torch.Tensor:
        """(B, L) the visual tokens still in the sequence (all of them before the first cut)."""
        return self.visual if self.kept is None else self.kept

    def to_input(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """Per-row values (B, L_s) of the current stage, placed at their LLM-input positions (B, L);
        ``fill`` where a position is not in the stage (or is its padding)."""
        if self.order is None:
            return values
        real = self.real.to(values.device)
        placed = torch.where(real, values, torch.full_like(values, fill))
        return values.new_full(self.visual.shape, fill).scatter(1, self.order.to(values.device), placed)

    def observe(self, query, key, valid, scaling) -> None:
        """A cut layer's attention inputs (after RoPE; ``valid`` the stage's real rows); a subclass
        that ranks by attention sets ``kept`` here."""

    def choose(self, hidden: torch.Tensor, language_model: nn.Module) -> None:
        """A cut layer's output (B, L, D), before the first cut; a subclass that ranks by hidden states
        sets ``kept`` here."""

    def attended_per_sample(self) -> list[float]:
        """Visual keys per layer (mean over layers): every one before the first cut, then each stage's."""
        total = self.visual.sum(1).float()
        if not self.counts or not self.num_layers:
            return total.tolist()
        bounds = [*self.cut_layers[: len(self.counts)], self.num_layers]
        keys = self.layer * total
        for count, start, end in zip(self.counts, bounds, bounds[1:], strict=False):
            keys = keys + (end - start) * count.float()
        return (keys / self.num_layers).tolist()

    def dropped_per_sample(self) -> list[int]:
        """Visual tokens each request sheds by the last cut."""
        if self.kept is None:
            return [0] * self.visual.shape[0]
        return (self.visual.sum(1) - self.kept.sum(1)).tolist()

    def visual_per_stage(self, sample: int) -> list[int]:
        """Visual tokens of request ``sample`` in each stage: before the first cut, then after each."""
        return [int(self.visual[sample].sum()), *(int(c[sample]) for c in self.counts)]

    def drops(self, sample: int) -> tuple[tuple[int, int], ...]:
        """(layer, visual tokens fewer from that layer on) for each cut of request ``sample``."""
        total = int(self.visual[sample].sum())
        return tuple((layer, total - int(c[sample])) for layer, c in zip(self.cut_layers, self.counts, strict=False))

    # --- prefill ------------------------------------------------------------------------------
    @contextmanager
    def attach(self, language_model: nn.Module) -> Iterator[None]:
        layers = language_model.layers

        def cut(module, args, output):
            return self._cut(output, language_model)

        handles = [layers[c - 1].register_forward_hook(cut) for c in self.cut_layers]
        handles += [layer.register_forward_pre_hook(self._follow, with_kwargs=True) for layer in layers[self.layer :]]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def prefill(self, module, query, key, value, mask, scaling, valid):
        start = time.perf_counter()
        try:
            index = module.layer_idx
            if index + 1 in self.cut_layers:
                if self.valid is None:
                    self.valid = valid
                self.observe(query, key, valid if self.real is None else self.real.to(valid.device), scaling)
            if self.stage_of(index) == 0 or self.keeps_everything:
                return mask
            full = causal_mask(self.real) if mask is None else mask.bool()
            eye = torch.eye(full.shape[-1], dtype=torch.bool, device=full.device)
            return (full & self.real[:, None, None, :]) | eye  # a padding row still sees itself (no NaN)
        finally:
            self.seconds += time.perf_counter() - start

    def _cut(self, output, language_model: nn.Module):
        """A cut layer's output: only the rows that go on."""
        start = time.perf_counter()
        hidden = output[0] if isinstance(output, tuple) else output
        if self.kept is None:  # nothing observed in the attention: the subclass chooses from the output
            self.choose(hidden, language_model)
        valid = self.valid.to(hidden.device)
        stays = (valid & ~self.visual.to(valid.device)) | self.kept.to(valid.device)
        order, real = rows_that_go_on(stays)
        rows = order if self.order is None else self._rows_of(order)
        self.orders.append(order)
        self.reals.append(real)
        self.counts.append(self.kept.sum(1))
        cut = take_positions(hidden, rows, dim=1)
        self.seconds += time.perf_counter() - start
        return (cut, *output[1:]) if isinstance(output, tuple) else cut

    def _rows_of(self, order: torch.Tensor) -> torch.Tensor:
        """The rows of the current stage holding the LLM-input positions ``order`` (B, L'); a position
        not in the stage (padding filler of the new one) maps to row 0."""
        where = torch.zeros(self.visual.shape, dtype=torch.long, device=order.device)
        rows = torch.arange(self.order.shape[1], device=order.device).expand_as(self.order)
        where = where.scatter(1, self.order.to(order.device), torch.where(self.real.to(order.device), rows, 0))
        return where.gather(1, order)

    def _follow(self, module, args, kwargs):
        """A later layer's inputs: the rotary embeddings, position ids and mask of its stage's rows."""
        start = time.perf_counter()
        order = self.orders[self.stage_of(module.self_attn.layer_idx) - 1]
        kwargs = dict(kwargs)
        if (rotary := kwargs.get("position_embeddings")) is not None:
            kwargs["position_embeddings"] = tuple(take_positions(t, order, dim=-2) for t in rotary)
        if (positions := kwargs.get("position_ids")) is not None:
            kwargs["position_ids"] = take_positions(positions, order, dim=-1)
        if isinstance(mask := kwargs.get("attention_mask"), torch.Tensor):
            kwargs["attention_mask"] = take_mask(mask, order)
        self.seconds += time.perf_counter() - start
        return args, kwargs

    # --- decoding -----------------------------------------------------------------------------
    def valid_columns(self, index: int, length: int) -> torch.Tensor | None:
        stage = self.stage_of(index)
        if stage == 0 or len(self.reals) < stage:
            return None
        real = self.reals[stage - 1]
        steps = length - real.shape[1]
        return torch.cat([real, real.new_ones(real.shape[0], steps)], dim=1)

    def decode(self, module, query, key, value, key_valid, scaling):
        columns = self.valid_columns(module.layer_idx, key.shape[-2])
        if columns is None:
            return key, value, key_valid
        return key, value, columns.to(key_valid.device)


def recorded_cut(hooks: list, kind: type[LayerCut], sample: int, account) -> LayerCut:
    """The batch's one cut of class ``kind``, after writing request ``sample``'s drops on its account
    (what every cutting method's report starts with)."""
    (hook,) = [h for h in hooks if isinstance(h, kind)]
    account.llm_drops = hook.drops(sample)
    return hook
