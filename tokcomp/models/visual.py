"""Visual units (an image or a video of one request) and how their tokens reach the LLM.

For the plain model, a unit's LLM tokens come from the stock feature functions. For a merging
method, tokcomp rebuilds the *same layout* the stock model would produce (AnyRes crops unpadded with
row newlines, pooled video frames, ...) from the merged tokens copied back to their patches, and
records which layout positions are exact copies of one merged token. Those positions share one
*unique* token; anything mixed (a newline, a pooled position straddling two groups) is a singleton.
``mapping[p]`` gives the unique token of layout position ``p``: this is DyMU's ``M``.

Every position also records where it comes from (``provenance``: encoder view and patch), and, while a
method that reads an encoder trace is attached, the traced attention score of its patch (``trace``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncodedImage:
    """One encoder view after (optional) merging, at the layer the VLM reads."""

    features: torch.Tensor  # (n, D) vision hidden states (or projected), CLS dropped where the VLM drops it
    sizes: torch.Tensor  # (n,) patches per token
    source: torch.Tensor  # (P,) long: patch position (raster order) -> token index
    layer_counts: list[int]  # patch tokens after each encoder layer

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


@dataclass
class VisualUnit:
    """One image or one video of a request, preprocessed into encoder views."""

    kind: str  # "image" | "video"
    views: torch.Tensor  # (V, 3, S, S)
    image_size: tuple[int, int] | None = None  # original (H, W), for AnyRes unpadding
    anyres: bool = False  # OneVision single image: base view + crops
    grid_thw: tuple[int, int, int] | None = None  # Qwen2.5-VL: (temporal, height, width) in patches
    seconds_per_grid: float = 1.0  # Qwen2.5-VL video: seconds per temporal patch (its M-RoPE time step)


@dataclass
class UnitTokens:
    """A unit's tokens as the LLM receives them: unique embeddings and the full-length map.

    ``mapping`` is the sequence the LLM's positions count (one entry per position); a pre-LLM
    selection (TTM, pruning) shortens it. ``original`` is the stock model's token count, for
    accounting. Video units also record their frame layout (``frame_tokens`` per frame, then one
    trailing newline).

    ``provenance[p]`` is (view, patch) of position ``p``: the encoder view (AnyRes base view 0 then its
    crops, or the video frame) and the patch (raster order) whose place it takes in the stock layout;
    patch -1 where the position mixes patches (a pooled video position, an interpolated AnyRes one) and
    view -1 too where it is no patch at all (a newline, a kept CLS). Under in-encoder merging a position
    still takes its patch's place; its embedding is the merged token's.

    ``trace``/``trace_keys`` (set by the pipeline when the method declares ``encoder_trace``) are each
    position's score and keys from ``tokcomp.methods.trace``, laid out by the stock layout itself: a
    patch's own values, for a mixed position the stock pooling/interpolation of them (for LLaVA-OneVision's
    2x2 video pooling the mean over the patches it pools), NaN for a newline or CLS.
    """

    unique: torch.Tensor  # (N_un, H)
    mapping: torch.Tensor  # (N_full,) long into ``unique``
    layer_counts: list[int]  # visual tokens after each encoder layer, summed over views
    original: int = -1
    num_frames: int = 0
    frame_tokens: int = 0
    positions: torch.Tensor | None = None  # (N_full,) index of each kept position in the stock layout
    views: int = 1  # encoder views (AnyRes crops, frames) the unit took
    provenance: torch.Tensor | None = None  # (N_full, 2) long: (view, patch) of each position, -1 where none
    trace: torch.Tensor | None = None  # (N_full,) float32: the encoder-trace score of each position (NaN: none)
    trace_keys: torch.Tensor | None = None  # (N_full, d) float32: its traced keys, if the trace has keys
    # M-RoPE families: (3, original) stock positions of the stock layout relative to the unit's start, and
    # how far the text position moves on after the unit
    rope: torch.Tensor | None = None
    rope_span: int = 0
    # DeepStack families (Qwen3-VL): (levels, N_un, H) the encoder's intermediate features of each unique
    # token, which the stock LLM adds to that token's hidden state after its first ``levels`` layers
    deepstack: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.original < 0:
            self.original = int(self.mapping.shape[0])
        if self.positions is None:
            self.positions = torch.arange(self.mapping.shape[0], device=self.mapping.device)

    @property
    def num_positions(self) -> int:
        """Positions the LLM sees for this unit (after any pre-LLM selection; ``original``: the stock count)."""
        return int(self.mapping.shape[0])

    @property
    def kept(self) -> int:
        """Distinct embeddings the LLM computes on for this unit."""
        return int(self.unique.shape[0])

    def position_features(self) -> torch.Tensor:
        """(N_positions, H): every position's embedding (merged tokens copied to all their positions)."""
        return self.unique[self.mapping]


def identity_tokens(
    features: torch.Tensor, layer_counts: list[int], num_frames: int = 0, views: int = 1, trailing: int = 1
) -> UnitTokens:
    """A unit's stock tokens, each its own position; a video's ``num_frames`` frames are followed by
    ``trailing`` tokens that belong to no frame (LLaVA-OneVision's newline; Qwen2.5-VL has none)."""
    frame_tokens = (features.shape[0] - trailing) // num_frames if num_frames else 0
    mapping = torch.arange(features.shape[0], device=features.device)
    return UnitTokens(features, mapping, layer_counts, num_frames=num_frames, frame_tokens=frame_tokens, views=views)


def select_positions(unit: UnitTokens, keep: torch.Tensor) -> UnitTokens:
    """Keep only the positions ``keep`` (in the given order); unique tokens nobody uses are dropped."""
    keep = keep.to(unit.mapping.device)
    kept_map = unit.mapping[keep]
    used, inverse = torch.unique(kept_map, return_inverse=True)
    steps = torch.arange(kept_map.shape[0], device=kept_map.device)
    first = torch.full_like(used, kept_map.shape[0]).scatter_reduce(0, inverse, steps, "amin")
    order = first.argsort()  # unique tokens in order of first appearance among the kept positions
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    return UnitTokens(
        unique=unit.unique[used[order]],
        mapping=rank[inverse],
        layer_counts=unit.layer_counts,
        original=unit.original,
        num_frames=unit.num_frames,
        frame_tokens=unit.frame_tokens,
        positions=unit.positions[keep],
        views=unit.views,
        rope=unit.rope,
        rope_span=unit.rope_span,
        deepstack=None if unit.deepstack is None else unit.deepstack[:, used[order].to(unit.deepstack.device)],
        **_per_position(unit, keep),
    )


def _per_position(unit: UnitTokens, keep: torch.Tensor) -> dict[str, torch.Tensor | None]:
    names = ("provenance", "trace", "trace_keys")
    return {n: None if getattr(unit, n) is None else getattr(unit, n)[keep.to(getattr(unit, n).device)] for n in names}


def merge_positions(
    unit: UnitTokens, groups: list[torch.Tensor], weights: list[torch.Tensor] | None = None
) -> UnitTokens:
    """Positions of ``unit`` merged in groups: each group (indices into the unit's positions) becomes one
    position at the stock position of its *first* index, carrying the mean of the group's embeddings
    (and traces), or with ``weights`` (one per member) their weighted mean; positions in no group are
    dropped and positions keep their order. Groups may share members.

    A group of one is that position as it is, so with groups of one only this is ``select_positions``
    (bit for bit). A merged position is its own unique token and has provenance (view of the first, -1).
    """
    heads = torch.tensor([int(g[0]) for g in groups], dtype=torch.long, device=unit.positions.device)
    order = torch.sort(unit.positions[heads], stable=True).indices
    if all(len(g) == 1 for g in groups):
        return select_positions(unit, heads[order])
    groups = [groups[int(i)].to(unit.mapping.device) for i in order]
    shares = None if weights is None else [weights[int(i)].float() for i in order]
    feats = unit.position_features()

    def mean(values: torch.Tensor) -> torch.Tensor:
        def one(j: int, g: torch.Tensor) -> torch.Tensor:
            if len(g) == 1:
                return values[g[0]].float()
            w = None if shares is None else shares[j].to(values.device)
            if w is None or not float(w.sum()) > 0:
                return values[g].float().mean(dim=0)
            w = w.view(-1, *[1] * (values.dim() - 1))  # over the members, whatever a member's shape
            return (w * values[g].float()).sum(dim=0) / w.sum()

        return torch.stack([one(j, g) for j, g in enumerate(groups)]).to(values.dtype)

    extra = _per_position(unit, heads[order])
    if extra["provenance"] is not None:
        merged = torch.tensor([len(g) > 1 for g in groups], device=extra["provenance"].device)
        extra["provenance"][merged, 1] = -1
    for name in ("trace", "trace_keys"):
        if extra[name] is not None:
            extra[name] = mean(getattr(unit, name))
    deepstack = None  # per level, the members' mean, as for the embeddings
    if unit.deepstack is not None:
        deepstack = torch.stack([mean(level[unit.mapping.to(level.device)]) for level in unit.deepstack])
    return UnitTokens(
        unique=mean(feats),
        mapping=torch.arange(len(groups), device=unit.mapping.device),
        layer_counts=unit.layer_counts,
        original=unit.original,
        num_frames=unit.num_frames,
        frame_tokens=unit.frame_tokens,
        positions=unit.positions[heads[order]],
        views=unit.views,
        rope=unit.rope,
        rope_span=unit.rope_span,
        deepstack=deepstack,
        **extra,
    )


def tokens_from_copies(
    full: torch.Tensor,
    owner: torch.Tensor,
    token_feats: torch.Tensor,
    counts: list[int],
    num_frames: int = 0,
    views: int = 1,
    trailing: int = 1,
) -> UnitTokens:
    """Unique tokens from a layout: ``owner[p]`` is the merged token copied at ``p``, or -1 if mixed
    (``trailing``: a video's tokens after its frames, as in ``identity_tokens``).

    Merged tokens keep the order of their first appearance; mixed positions become singletons
    carrying the layout's own feature.
    """
    mapping = torch.empty(full.shape[0], dtype=torch.long, device=full.device)
    rows: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    for p, t in enumerate(owner.tolist()):
        if t >= 0:
            if t not in seen:
                seen[t] = len(rows)
                rows.append(token_feats[t])
            mapping[p] = seen[t]
        else:
            mapping[p] = len(rows)
            rows.append(full[p])
    frame_tokens = (full.shape[0] - trailing) // num_frames if num_frames else 0
    unique = torch.stack(rows) if rows else full[:0]
    return UnitTokens(unique, mapping, counts, num_frames=num_frames, frame_tokens=frame_tokens, views=views)


def summed_counts(views: list[EncodedImage]) -> list[int]:
    return [sum(c) for c in zip(*(v.layer_counts for v in views), strict=True)]
