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

import time
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
    seconds: float = 0.0  # time spent recomputing the traced attention (the method's own work), all forwards

    def take(self) -> list[TraceView]:
        views, self.views = self.views, []
        return views

    def record(self, attn: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
               projected: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        """Score every view of one forward of the traced layer (``hidden``: the attention's input;
        ``projected``: its query and key projections as the forward computed them, if caught)."""
        start = time.perf_counter()
        heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
        merged = self.merging is not None and self.merging.merged_any
        snapshot = self.merging.current if merged else None
        projected = projected or {}
        with torch.no_grad():
            rows = {}
            for name in ("q", "k"):
                out = projected.get(name)
                if out is None or out.shape[:-1] != hidden.shape[:-1]:
                    out = getattr(attn, f"{name}_proj")(hidden)
                rows[name] = out.view(*hidden.shape[:2], heads, -1).transpose(1, 2)  # (B, heads, n, d)
            for b in range(hidden.shape[0]):  # one view at a time: one (heads, n, n) matrix at most
                q, k = rows["q"][b : b + 1], rows["k"][b : b + 1]
                if self.cls:
                    q = q[:, :, :1]  # only what the CLS query pays is read
                logits = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
                if mask is not None:
                    logits = logits + mask[b : b + 1, :, : q.shape[2]]
                weights = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)[0].float()
                # (n,): what the CLS query pays each token, else what each receives over the real queries
                if self.cls:
                    scores = weights[:, 0].mean(dim=0)
                elif snapshot is None:
                    scores = weights.mean(dim=1).mean(dim=0)
                else:
                    scores = weights[:, snapshot.valid[b]].mean(dim=1).mean(dim=0)
                keys = k[0].float().mean(dim=0) if self.spec.keys else None  # (n, head_dim)
                n = hidden.shape[1]
                tokens = torch.arange(n, device=hidden.device) if snapshot is None else snapshot.source[b]
                patches = tokens[1:] if self.cls else tokens  # the token holding each patch
                self.views.append(TraceView(scores[patches], None if keys is None else keys[patches]))
        self.seconds += time.perf_counter() - start


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

    projected: dict[str, torch.Tensor] = {}  # the layer's own query and key projections, this forward

    def catch(name: str):
        def hook(module, args, output):
            projected[name] = output

        return hook

    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        trace.record(module, hidden, kwargs.get("attention_mask"), dict(projected))
        projected.clear()

    handles = [attn.q_proj.register_forward_hook(catch("q")), attn.k_proj.register_forward_hook(catch("k")),
               attn.register_forward_hook(hook, with_kwargs=True)]  # fmt: skip
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()
