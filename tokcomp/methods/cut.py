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
from dataclasses import dataclass

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
    """One batch's cut after layer K-1: a subclass sets ``kept`` (B, L) from what it observes in layer
    K-1's attention (``observe``) or output (``choose``); this class cuts and restricts later layers.

    A keep share of 1 still chooses, keeps every visual token and cuts nothing away (every position is
    taken, in order), so every layer computes what the stock one does.
    """

    layer: int
    keep: float
    visual: torch.Tensor  # (B, L) bool over the LLM input
    num_layers: int = 0
    kept: torch.Tensor | None = None  # (B, L) the visual tokens that go on
    order: torch.Tensor | None = None  # (B, L') the positions that go on past layer K-1
    real: torch.Tensor | None = None  # (B, L') which of them are tokens (the others: left padding)
    valid: torch.Tensor | None = None  # (B, L) the real (not padding) positions of the prefill
    active_in_prefill: bool = True
    cuts_sequence: bool = True
    seconds: float = 0.0  # the hook's own work (the probe, the cut, the masks)

    @property
    def keeps_everything(self) -> bool:
        return self.keep >= 1

    def budget(self, count: int) -> int:
        """Visual tokens a request with ``count`` of them keeps (at least one)."""
        return max(1, round(self.keep * count)) if count else 0

    def observe(self, query, key, valid, scaling) -> None:
        """Layer K-1's attention inputs (after RoPE); a subclass that ranks by attention sets ``kept``."""

    def choose(self, hidden: torch.Tensor, language_model: nn.Module) -> None:
        """Layer K-1's output (B, L, D); a subclass that ranks by hidden states sets ``kept`` here."""

    def attended_per_sample(self) -> list[float]:
        """Visual keys per layer (mean over layers): all below K, the kept ones from K on."""
        total = self.visual.sum(1).float()
        if self.kept is None or not self.num_layers:
            return total.tolist()
        kept = self.kept.sum(1).float()
        return ((self.layer * total + (self.num_layers - self.layer) * kept) / self.num_layers).tolist()

    def dropped_per_sample(self) -> list[int]:
        """Visual tokens each request sheds from layer K on."""
        if self.kept is None:
            return [0] * self.visual.shape[0]
        return (self.visual.sum(1) - self.kept.sum(1)).tolist()

    # --- prefill ------------------------------------------------------------------------------
    @contextmanager
    def attach(self, language_model: nn.Module) -> Iterator[None]:
        layers = language_model.layers

        def cut(module, args, output):
            return self._cut(output, language_model)

        handles = [layers[self.layer - 1].register_forward_hook(cut)]
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
            if index == self.layer - 1:
                self.valid = valid
                self.observe(query, key, valid, scaling)
            if index < self.layer or self.keeps_everything:
                return mask
            full = causal_mask(self.real) if mask is None else mask.bool()
            eye = torch.eye(full.shape[-1], dtype=torch.bool, device=full.device)
            return (full & self.real[:, None, None, :]) | eye  # a padding row still sees itself (no NaN)
        finally:
            self.seconds += time.perf_counter() - start

    def _cut(self, output, language_model: nn.Module):
        """Layer K-1's output: only the rows that go on."""
        start = time.perf_counter()
        hidden = output[0] if isinstance(output, tuple) else output
        if self.kept is None:
            self.choose(hidden, language_model)
        valid = self.valid.to(hidden.device)
        stays = (valid & ~self.visual.to(valid.device)) | self.kept.to(valid.device)
        self.order, self.real = rows_that_go_on(stays)
        cut = take_positions(hidden, self.order, dim=1)
        self.seconds += time.perf_counter() - start
        return (cut, *output[1:]) if isinstance(output, tuple) else cut

    def _follow(self, module, args, kwargs):
        """A later layer's inputs: the rotary embeddings, position ids and mask of the rows that went on."""
        start = time.perf_counter()
        kwargs = dict(kwargs)
        if (rotary := kwargs.get("position_embeddings")) is not None:
            kwargs["position_embeddings"] = tuple(take_positions(t, self.order, dim=-2) for t in rotary)
        if (positions := kwargs.get("position_ids")) is not None:
            kwargs["position_ids"] = take_positions(positions, self.order, dim=-1)
        if isinstance(mask := kwargs.get("attention_mask"), torch.Tensor):
            kwargs["attention_mask"] = take_mask(mask, self.order)
        self.seconds += time.perf_counter() - start
        return args, kwargs

    # --- decoding -----------------------------------------------------------------------------
    def valid_columns(self, index: int, length: int) -> torch.Tensor | None:
        if index < self.layer or self.real is None:
            return None
        steps = length - self.real.shape[1]
        return torch.cat([self.real, self.real.new_ones(self.real.shape[0], steps)], dim=1)

    def decode(self, module, query, key, value, key_valid, scaling):
        if module.layer_idx < self.layer or self.real is None:
            return key, value, key_valid
        return key, value, self.valid_columns(module.layer_idx, key.shape[-2]).to(key_valid.device)
