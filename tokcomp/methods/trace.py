"""Encoder traces: the attention patch tokens receive at one vision-encoder layer, read from the stock tower.

A method that ranks patches by encoder attention (VisionZip, PruMerge, FasterVLM, ...) declares a
``TraceSpec`` (``Method.encoder_trace``). While the method is attached, a forward hook on that layer's
attention module recomputes the queries and keys from the module's own input with the module's own
projections and takes the softmax the eager attention takes, so the trace is the same whichever
attention implementation the tower runs (sdpa, eager); the layer's output is not touched.

The score of a patch is, averaged over heads:

* with a CLS token (CLIP, LLaVA-1.5): the attention the CLS query pays it;
* without one (SigLIP, LLaVA-OneVision): the mean attention it receives over all (real) queries.

Under in-encoder merging a patch gets the score of the token that holds it at that layer (and that
token's keys); padding of the merged batch is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tokcomp.methods.dtome import MergeState, encoder_layers


@dataclass(frozen=True)
class TraceSpec:
    """What a method reads from the encoder: the attention inside encoder layer ``layer``, counted from 1
    as ``VLMAdapter.feature_layer`` counts (the layer whose output is ``hidden_states[layer]``), and,
    with ``keys``, that layer's keys averaged over heads."""

    layer: int
    keys: bool = False


@dataclass
class TraceView:
    """The trace of one encoder view: per patch (raster order, CLS left out) its score and keys."""

    scores: torch.Tensor  # (P,) float32
    keys: torch.Tensor | None = None  # (P, head_dim) float32


@dataclass
class EncoderTrace:
    """The views traced since the last ``take``, in the order the tower saw them."""

    spec: TraceSpec
    cls: bool
    merging: MergeState | None = None
    views: list[TraceView] = field(default_factory=list)

    def take(self) -> list[TraceView]:
        views, self.views = self.views, []
        return views

    def record(self, attn: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Score every view of one forward of the traced layer (``hidden``: the attention's input)."""
        heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
        merged = self.merging is not None and self.merging.merged_any
        snapshot = self.merging.current if merged else None
        with torch.no_grad():
            for b in range(hidden.shape[0]):  # one view at a time: one (heads, n, n) matrix at most
                x = hidden[b : b + 1]
                q = attn.q_proj(x).view(1, x.shape[1], heads, -1).transpose(1, 2)
                k = attn.k_proj(x).view(1, x.shape[1], heads, -1).transpose(1, 2)
                logits = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
                if mask is not None:
                    logits = logits + mask[b : b + 1]
                weights = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)[0].float()
                valid = snapshot.valid[b] if snapshot is not None else torch.ones_like(weights[0, 0], dtype=torch.bool)
                # (n,): what the CLS query pays each token, else what each receives over the real queries
                scores = weights[:, 0].mean(dim=0) if self.cls else weights[:, valid].mean(dim=1).mean(dim=0)
                keys = k[0].float().mean(dim=0) if self.spec.keys else None  # (n, head_dim)
                tokens = torch.arange(x.shape[1], device=x.device) if snapshot is None else snapshot.source[b]
                patches = tokens[1:] if self.cls else tokens  # the token holding each patch
                self.views.append(TraceView(scores[patches], None if keys is None else keys[patches]))


@contextmanager
def attach_trace(
    vision_model: nn.Module, spec: TraceSpec, *, cls: bool, merging: MergeState | None = None
) -> Iterator[EncoderTrace]:
    """Trace ``spec`` on ``vision_model`` inside the block (``merging``: the merge state attached with it)."""
    layers = encoder_layers(vision_model)
    if not 1 <= spec.layer <= len(layers):
        raise ValueError(f"trace layer {spec.layer} is not in 1..{len(layers)}")
    trace = EncoderTrace(spec, cls, merging)
    attn = layers[spec.layer - 1].self_attn

    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        trace.record(module, hidden, kwargs.get("attention_mask"))

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        yield trace
    finally:
        handle.remove()
