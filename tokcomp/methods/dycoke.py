"""DyCoke (Tao et al., CVPR 2025): temporal token merging (TTM) and dynamic KV-cache pruning (DP).

**TTM** runs before the LLM on a video's projected, pooled per-frame tokens. Frames form windows of
``window`` (4); the first frame of a window is the anchor and stays whole. Frame 1 and frame 2 of a
window are compared with the anchor, frame 3 with frame 2, always position by position (cosine
similarity of the same spatial token), and each non-anchor frame keeps its ``int((1-K)·n)``
most-changed tokens. Nothing is averaged: the redundant tokens are dropped.

**DP** acts while decoding. At every step the attention of the current token at layer ``L-1`` over
the visual tokens (computed explicitly for that one query, so any attention kernel works) is
compared with the previous step's; on the first step, or when their cosine similarity falls below
``drift``, the top ``(1-P)`` visual tokens are re-selected. Layers ``>= L`` attend only to the
selected visual tokens (plus all text and generated tokens). ``gather`` keeps the full cache, so a
token dropped at one step can return later (saves compute); ``evict`` removes tokens that stayed
unselected for ``evict_after`` consecutive steps from the cache of layers ``>= L`` (saves memory).
``K=0`` runs TTM keeping every token and ``P=0`` runs DP's probe keeping every visual token with the
stock attention, so ``K=0, P=0`` is the plain model, bit for bit.

``reference: true`` reproduces the published code instead of the paper: the last window's third
frame is never pruned, an odd last frame is dropped, kept tokens are in similarity order rather
than raster order, steps whose attention did not drift attend to the full cache, and the previous
attention vector carries over from one request to the next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from tokcomp.errors import TokcompError
from tokcomp.methods.attention import AttentionHook
from tokcomp.methods.base import Method
from tokcomp.methods.selection import top_k_stable
from tokcomp.methods.settings import register
from tokcomp.models.visual import UnitTokens, select_positions

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter


# --- TTM: pure functions ---------------------------------------------------------------------
def ttm_references(num_frames: int, window: int = 4, reference: bool = False) -> list[int | None]:
    """For every frame, the frame it is compared with (None: kept whole; -1: dropped).

    Default (the paper): anchors at 0, w, 2w, ...; in a window, frames 1 and 2 look at the anchor,
    frame 3 at frame 2. ``reference`` follows the published loops (pairs ``range(0, T-1, 2)``,
    windows ``range(0, T-4, 4)``), which leave the last window's frame 2 whole and drop an odd last
    frame.
    """
    if not reference:
        refs: list[int | None] = []
        for f in range(num_frames):
            offset = f % window
            anchor = f - offset
            refs.append(None if offset == 0 else anchor + 2 if offset == 3 else anchor)
        return refs
    refs = [-1] * num_frames
    for i in range(0, num_frames - 1, 2):
        refs[i], refs[i + 1] = None, i
    for i in range(0, num_frames - 4, 4):
        refs[i + 2] = i
    return refs


def ttm_keep_counts(num_frames: int, tokens_per_frame: int, k: float, window: int = 4, reference: bool = False) -> int:
    """How many visual tokens TTM keeps (the newline not included)."""
    keep = int((1 - k) * tokens_per_frame)
    refs = ttm_references(num_frames, window, reference)
    return sum(tokens_per_frame if r is None else 0 if r == -1 else keep for r in refs)


def ttm_select(frames: torch.Tensor, k: float, window: int = 4, reference: bool = False) -> list[torch.Tensor]:
    """Per frame, the kept token indices; ``frames`` is (T, n, H) of projected, pooled tokens."""
    num_frames, n, _ = frames.shape
    keep = int((1 - k) * n)
    out = []
    for f, ref in enumerate(ttm_references(num_frames, window, reference)):
        if ref is None:
            out.append(torch.arange(n, device=frames.device))
        elif ref == -1:
            out.append(torch.empty(0, dtype=torch.long, device=frames.device))
        else:
            similarity = F.cosine_similarity(frames[f].float(), frames[ref].float(), dim=-1)
            if reference:  # the official code's order: whatever topk returns
                out.append(similarity.topk(keep, largest=False).indices)
            else:
                out.append(top_k_stable(similarity, keep, largest=False).sort().values)
    return out


def apply_ttm(unit: UnitTokens, k: float, window: int = 4, reference: bool = False) -> UnitTokens:
    """TTM on a video unit's layout positions (frames of ``frame_tokens``, then the newline)."""
    if unit.num_frames == 0:
        return unit
    n, num_frames = unit.frame_tokens, unit.num_frames
    full = unit.position_features()
    frames = full[: num_frames * n].reshape(num_frames, n, -1)
    kept = ttm_select(frames, k, window, reference)
    positions = [idx + f * n for f, idx in enumerate(kept)]
    positions.append(torch.arange(num_frames * n, full.shape[0], device=full.device))  # the newline
    return select_positions(unit, torch.cat(positions))


# --- DP: an attention hook -------------------------------------------------------------------
@dataclass
class DynamicPruning(AttentionHook):
    """DyCoke's decode-time KV pruning for one batch (see the module docstring)."""

    layer: int
    prune: float
    visual: torch.Tensor  # (B, L0) bool: visual columns of the prefill sequence
    cache: object
    drift: float = 0.9
    mode: str = "gather"
    evict_after: int = 1
    reference: bool = False
    previous: torch.Tensor | None = None  # attention over the visual columns at the last step
    keep: torch.Tensor | None = None  # (B, L0) bool: selected visual columns
    stable: torch.Tensor | None = None  # (B,) bool: this step re-used the selection
    slots: torch.Tensor | None = None  # evict mode: original column of each cache slot in layers >= L (-1 pad)
    unselected_for: torch.Tensor | None = None  # (B, L0) consecutive steps a visual column was not selected
    active: torch.Tensor | None = None  # (B,) bool: requests still generating at this step (None: all)
    steps: torch.Tensor | None = None  # (B,) long: decoding steps each request observed
    reselections: torch.Tensor | None = None  # (B,) long: steps at which each request re-selected
    cache_length: int = 0
    seconds: float = 0.0  # the hook's own work (probes, selection, gathers)
    # (B,) visual keys seen, per layer per step; NaN for a request that had already finished
    attended: list[torch.Tensor] = field(default_factory=list)
    deep: list[torch.Tensor] = field(default_factory=list)  # (B,) the same, layers >= L only

    def __post_init__(self) -> None:
        zeros = torch.zeros(self.visual.shape[0], dtype=torch.long, device=self.visual.device)
        self.steps = zeros.clone() if self.steps is None else self.steps
        self.reselections = zeros.clone() if self.reselections is None else self.reselections

    @property
    def prefill_length(self) -> int:
        return int(self.visual.shape[1])

    @property
    def keeps_everything(self) -> bool:
        return self.prune == 0

    def start_step(self, active: torch.Tensor) -> None:
        self.active = active

    def _live(self) -> torch.Tensor:
        """(B,) bool: the requests this step belongs to."""
        if self.active is None:
            return torch.ones(self.visual.shape[0], dtype=torch.bool, device=self.visual.device)
        return self.active.to(self.visual.device)

    def _record(self, seen: torch.Tensor, deep: bool) -> None:
        seen = seen.float().masked_fill(~self._live(), float("nan"))
        self.attended.append(seen)
        if deep:
            self.deep.append(seen)

    def decode(self, module, query, key, value, key_valid, scaling):
        start = time.perf_counter()
        try:
            return self._decode(module, query, key, value, key_valid, scaling)
        finally:
            self.seconds += time.perf_counter() - start

    def _decode(self, module, query, key, value, key_valid, scaling):
        index = module.layer_idx
        if index == self.layer - 1:
            self._observe(query, key, key_valid, scaling)
        if index >= self.layer and not self.keeps_everything:
            key, value, key_valid = self._restrict(index, key, value, key_valid)
        else:
            self._record(self.visual.sum(1), deep=False)
        return key, value, key_valid

    def attended_per_sample(self) -> list[float]:
        """Mean visual keys attended per layer and decode step, per request, over that request's own steps
        (all of them before any step)."""
        everything = self.visual.sum(1).float()
        if not self.attended:
            return everything.tolist()
        mean = torch.stack(self.attended).nanmean(dim=0)
        return torch.where(torch.isnan(mean), everything, mean).tolist()

    def deep_attended(self, sample: int, default: float) -> float:
        """Mean visual keys the layers >= L attended per decode step for one request (its own steps)."""
        seen = torch.stack(self.deep)[:, sample] if self.deep else torch.empty(0)
        seen = seen[~torch.isnan(seen)]
        return float(seen.mean()) if seen.numel() else float(default)

    def valid_columns(self, index: int, length: int) -> torch.Tensor | None:
        """Occupied cache slots of layer ``index`` when eviction changed it, else None."""
        if self.mode != "evict" or index < self.layer or self.slots is None:
            return None
        slots = self.slots[:, :length]
        return slots >= 0

    def _observe(self, query, key, key_valid, scaling) -> None:
        """Attention of the current token at layer L-1 over the visual columns; re-select if it drifted."""
        groups = query.shape[1] // key.shape[1]
        keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        logits = (query.float() @ keys.float().transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        weights = logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, L_cache)
        current = weights[:, : self.prefill_length] * self.visual
        if self.previous is None or self.previous.shape != current.shape:
            drifted = torch.ones(current.shape[0], dtype=torch.bool, device=current.device)
        else:
            similarity = F.cosine_similarity(current, self.previous, dim=-1)
            drifted = similarity < self.drift
        self.previous = current
        if self.keep is None:
            self.keep = torch.zeros_like(self.visual)
        for b in torch.nonzero(drifted).flatten().tolist():
            count = int(self.visual[b].sum())
            k = int(count * (1 - self.prune))
            scores = current[b].masked_fill(~self.visual[b], float("-inf"))
            selected = torch.zeros_like(self.visual[b])
            if k > 0:
                selected[top_k_stable(scores, k)] = True
            self.keep[b] = selected
        live = self._live()
        self.reselections += (drifted & live).long()
        self.stable = ~drifted
        self.steps += live.long()
        if self.mode == "evict" and not self.keeps_everything:
            self._evict(key.shape[-2], key_valid)

    def _allowed(self, columns: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Which of these original columns layers >= L may read at this step."""
        inside = (columns >= 0) & (columns < self.prefill_length)
        safe = columns.clamp(0, self.prefill_length - 1)
        visual = self.visual.gather(1, safe) & inside
        kept = self.keep.gather(1, safe) & inside
        if self.reference:  # the published code: steps without drift attend to the full cache
            kept = kept | self.stable[:, None]
        return valid & (~visual | kept)

    def _restrict(self, index: int, key, value, key_valid):
        if self.mode == "evict":
            columns = self.slots
            valid = columns >= 0
            extra = key.shape[-2] - columns.shape[1]
            if extra:  # the current token, appended by the layer's cache update
                new = torch.arange(self.cache_length - extra, self.cache_length, device=columns.device)
                columns = torch.cat([columns, new.expand(columns.shape[0], -1)], dim=1)
                valid = torch.cat([valid, torch.ones_like(valid[:, :extra])], dim=1)
        else:
            columns = torch.arange(key.shape[-2], device=key.device).expand(key.shape[0], -1)
            valid = key_valid
        allowed = self._allowed(columns, valid)
        self._record((allowed & self._is_visual(columns)).sum(1), deep=True)
        return _gather_columns(key, value, allowed)

    def _is_visual(self, columns: torch.Tensor) -> torch.Tensor:
        inside = (columns >= 0) & (columns < self.prefill_length)
        return self.visual.gather(1, columns.clamp(0, self.prefill_length - 1)) & inside

    def _evict(self, cache_length: int, key_valid: torch.Tensor) -> None:
        """Remove visual tokens unselected for ``evict_after`` steps from the caches of layers >= L."""
        self.cache_length = cache_length
        bsz = self.visual.shape[0]
        device = self.visual.device
        if self.slots is None:  # a batch's left padding is no slot of its request
            columns = torch.arange(cache_length - 1, device=device).expand(bsz, -1)
            self.slots = columns.masked_fill(~key_valid[:, : cache_length - 1].to(device), -1)
            self.unselected_for = torch.zeros(self.visual.shape, dtype=torch.long, device=device)
        self.unselected_for = torch.where(self.visual & ~self.keep, self.unselected_for + 1, 0)
        gone = self.unselected_for >= self.evict_after  # (B, L0)
        slot_ok = self.slots >= 0
        safe = self.slots.clamp(0, self.prefill_length - 1)
        inside = slot_ok & (self.slots < self.prefill_length)
        drop = inside & gone.gather(1, safe)
        survive = slot_ok & ~drop
        if bool(drop.any()):
            order, new_valid = _compact_order(survive)
            for layer in self.cache.layers[self.layer :]:
                if layer.keys is None or layer.keys.numel() == 0:
                    continue
                idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
                layer.keys = layer.keys.gather(2, idx)
                layer.values = layer.values.gather(2, idx)
            self.slots = self.slots.gather(1, order).masked_fill(~new_valid, -1)
        # the current token's column, appended to layers >= L when they update their caches
        self.slots = torch.cat([self.slots, torch.full((bsz, 1), cache_length - 1, device=device)], dim=1)


def _compact_order(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order putting kept slots first, cut to the longest row; and which slots are real."""
    counts = keep.sum(dim=1)
    length = int(counts.max()) if keep.numel() else 0
    key = (~keep).long() * keep.shape[1] + torch.arange(keep.shape[1], device=keep.device)
    order = key.argsort(dim=1)[:, :length]
    valid = torch.arange(length, device=keep.device)[None, :] < counts[:, None]
    return order, valid


def _gather_columns(key, value, allowed):
    """Gather the allowed key/value columns per sample, padded to the longest row."""
    order, valid = _compact_order(allowed)
    idx = order[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
    return key.gather(2, idx), value.gather(2, idx), valid


# --- the method ------------------------------------------------------------------------------
@register
@dataclass
class DyCoke(Method):
    """TTM on video tokens before the LLM, DP while decoding (LLaVA-OneVision video)."""

    name: ClassVar[str] = "dycoke"
    inputs: ClassVar[frozenset[str]] = frozenset({"video"})
    aliases: ClassVar[dict[str, str]] = {"K": "ttm_ratio", "L": "dp_layer", "P": "dp_ratio"}
    ttm_ratio: float = 0.7  # K: the share of each non-anchor frame's tokens TTM merges away
    dp_layer: int = 3  # L: the first LLM layer whose visual keys DP prunes while decoding
    dp_ratio: float = 0.7  # P: the share of visual keys DP prunes there
    window: int = 4
    drift: float = 0.9
    mode: str = "gather"
    evict_after: int = 1
    reference: bool = False
    _carry: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def supports_beam_search(self) -> bool:
        return self.dp_ratio == 0  # DP re-chooses each sequence's cached keys at every step

    def check(self, adapter: VLMAdapter) -> None:
        if not 0 <= self.ttm_ratio < 1 or not 0 <= self.dp_ratio < 1:
            raise TokcompError("dycoke: ttm_ratio (K) and dp_ratio (P) must be in [0, 1)")
        if self.mode not in ("gather", "evict"):
            raise TokcompError(f"dycoke: mode must be gather or evict, not '{self.mode}'")
        layers = adapter.language_model.config.num_hidden_layers
        if self.dp_ratio > 0 and not 1 <= self.dp_layer < layers:
            raise TokcompError(f"dycoke: dp_layer (L) must be between 1 and {layers - 1} for this {layers}-layer LLM")
        if self.window < 2 or self.evict_after < 1:
            raise TokcompError("dycoke: window must be >= 2 and evict_after >= 1")

    def select(self, adapter: VLMAdapter, kind: str, tokens: UnitTokens) -> UnitTokens:
        # K=0 runs TTM keeping every token; the published loops would still drop an odd last frame
        if kind != "video" or (self.ttm_ratio == 0 and self.reference):
            return tokens
        return apply_ttm(tokens, self.ttm_ratio, self.window, self.reference)

    def attention_hooks(self, visual: torch.Tensor, cache) -> list[AttentionHook]:
        """One DP hook for the batch; it holds every per-request number of this call (rows of ``visual``)."""
        hook = DynamicPruning(
            layer=self.dp_layer, prune=self.dp_ratio, visual=visual, cache=cache, drift=self.drift, mode=self.mode,
            evict_after=self.evict_after, reference=self.reference,
        )  # fmt: skip
        if self.reference and self._carry is not None:
            hook.previous = self._carry  # the published code never resets between requests
        return [hook]

    def finish(self, hooks: list[AttentionHook]) -> None:
        for hook in hooks:
            if isinstance(hook, DynamicPruning) and self.reference:
                self._carry = hook.previous

    def report(self, hooks: list[AttentionHook], sample: int, account) -> dict:
        pruning = [h for h in hooks if isinstance(h, DynamicPruning)]
        out = {"retained_ratio_paper": round(self.retained_ratio(), 4)}
        if pruning and self.dp_ratio > 0:  # request ``sample``'s own steps and re-selections
            out["dp_steps"] = int(pruning[0].steps[sample])
            out["dp_reselections"] = int(pruning[0].reselections[sample])
        if account.visual_full:
            # visual keys the pruned layers read per decode step, over the stock visual tokens
            deep = pruning[0].deep_attended(sample, account.visual_positions) if pruning else account.visual_positions
            out["retained_ratio_measured"] = round(deep / account.visual_full, 4)
        return {"dycoke": out}

    def retained_ratio(self) -> float:
        """The paper's retained ratio: (1 + 3(1-K))/4 · (1-P), for windows of 4."""
        return (1 + (self.window - 1) * (1 - self.ttm_ratio)) / self.window * (1 - self.dp_ratio)

    def settings(self) -> dict:
        data = super().settings()
        data.pop("_carry", None)
        return data
