"""Threshold calibration for DToMe (DyMU §2): per-layer similarity thresholds for a token budget.

For each batch of ``B`` images, every merging layer ``i`` merges the ``B * r_i`` most similar edges of
the whole batch (so simple images give more edges than busy ones) and records the similarity of the
first edge it did not take. A layer's threshold is the mean of those cuts over all batches. Merging
really happens while calibrating, so deeper layers see merged inputs. Similarities are fp32.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from tokcomp import __version__
from tokcomp.config import Achieved, Calibration, Provenance
from tokcomp.data.images import ImageItem
from tokcomp.distributed import World, current_world, gather_dicts
from tokcomp.errors import TokcompError
from tokcomp.methods.dtome import BatchTopKRule, ThresholdRule
from tokcomp.models.adapters import VLMAdapter

# Mean tokens per image DyMU reports for LLaVA-1.5-7B (CLIP-L/14-336, 576 patches; paper's main
# table: 89, 195, 394), as fractions of the patch tokens. They come from r = 21, 16, 8 per layer.
BUDGET_FRACTIONS = {"low": 89 / 576, "mid": 195 / 576, "high": 394 / 576}


@dataclass(frozen=True)
class Budget:
    name: str
    target_tokens: int


def resolve_budget(spec: str, num_patches: int) -> Budget:
    """``low``/``mid``/``high`` scale with the encoder's patch count; an integer is a mean token count."""
    spec = str(spec).strip().lower()
    if spec in BUDGET_FRACTIONS:
        return Budget(spec, max(1, round(BUDGET_FRACTIONS[spec] * num_patches)))
    try:
        tokens = int(spec)
    except ValueError:
        raise TokcompError(f"unknown budget '{spec}': use low, mid, high or a token count") from None
    if not 1 <= tokens <= num_patches:
        raise TokcompError(f"budget {tokens} tokens is outside 1..{num_patches} (patch tokens per image)")
    return Budget(str(tokens), tokens)


def _caps_hold(r: Sequence[int], num_tokens: int, protected: int) -> bool:
    t = num_tokens + protected
    for ri in r:
        if ri > (t - protected) // 2:
            return False
        t -= ri
    return True


def merge_schedule(num_patches: int, target: int, merging_layers: int, protected: int) -> tuple[list[int], str]:
    """Merges per layer for the layers whose output reaches the VLM, and the schedule's name.

    ``constant`` (DyMU's default): the same r in every layer, remainder to the first layers; it
    reproduces DyMU's r = 21/16/8 for CLIP-L/14-336 read at layer -2. Shallow encoders can't remove
    that many tokens evenly (a layer merges at most half its tokens); there ``geometric`` removes
    the same fraction in every layer instead.
    """
    if merging_layers <= 0:
        raise TokcompError("the encoder has no layer before the feature layer to merge in")
    total = max(0, num_patches - target)
    base, extra = divmod(total, merging_layers)
    constant = [base + (1 if i < extra else 0) for i in range(merging_layers)]
    if _caps_hold(constant, num_patches, protected):
        return constant, "constant"
    ratio = (target / num_patches) ** (1 / merging_layers)
    if ratio < 0.5:
        minimum = math.ceil(num_patches * 0.5**merging_layers)
        raise TokcompError(
            f"budget of {target} tokens is below what {merging_layers} merging layers can reach "
            f"(each merges at most half its tokens): ask for at least {minimum}"
        )
    schedule, t = [], num_patches
    for i in range(merging_layers):
        goal = round(num_patches * ratio ** (i + 1)) if i < merging_layers - 1 else target
        schedule.append(max(0, t - goal))
        t = goal
    return schedule, "geometric"


def _batches(items: Sequence[ImageItem], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def calibrate(
    adapter: VLMAdapter,
    items: Sequence[ImageItem],
    budget: Budget,
    *,
    data_source: str,
    batch_size: int = 16,
    seed: int = 0,
    num_images: int | None = None,
    token_order: str = "spatial",
    on_step: Callable[[str, int, int], None] | None = None,
) -> Calibration:
    """Calibrate thresholds on ``items``; ``on_step(phase, done, total)`` reports progress."""
    if not adapter.supports_encoder_merging:
        raise TokcompError(f"{adapter.name}: merging inside the vision encoder (what a calibration is for) is not "
                           f"supported on the {adapter.family} family yet")  # fmt: skip
    if batch_size < 1:
        raise TokcompError("batch size must be at least 1")
    chosen = list(items)
    random.Random(seed).shuffle(chosen)
    if num_images is not None:
        if num_images < 1:
            raise TokcompError("--num-images must be at least 1")
        chosen = chosen[:num_images]
    if not chosen:
        raise TokcompError("no images to calibrate on")

    merging = adapter.feature_layer
    r_merging, schedule = merge_schedule(adapter.num_patches, budget.target_tokens, merging, adapter.protected)
    r_all = r_merging + [0] * (adapter.num_layers - merging)

    world = current_world()
    batches = list(_batches(chosen, batch_size))
    mine = range(world.rank, len(batches), world.size)  # a process's share of the batches, round robin
    cuts: dict[int, list[float]] = {}
    for done, index in enumerate(mine, start=1):
        pixels = adapter.encoder_views([item.load() for item in batches[index]])
        rule = BatchTopKRule(r_all)
        adapter.encode(pixels, rule, token_order=token_order)
        cuts[index] = [rule.cuts.get(layer, 0.0) for layer in range(adapter.num_layers)]
        if on_step:
            on_step("calibrating", done, len(mine))
    cuts = gather_dicts(cuts, world)  # every process's cuts, averaged in batch order as one process would
    sums = [sum(cuts[index][layer] for index in range(len(batches))) for layer in range(adapter.num_layers)]
    thresholds = [sums[i] / len(batches) if r_all[i] > 0 else math.inf for i in range(adapter.num_layers)]

    tokens = measure_tokens(adapter, chosen, thresholds, batch_size, token_order, on_step, world)
    achieved = Achieved(
        mean=round(statistics.fmean(tokens), 3),
        std=round(statistics.pstdev(tokens), 3),
        min=min(tokens),
        max=max(tokens),
    )
    return Calibration(
        thresholds=[round(t, 6) if math.isfinite(t) else t for t in thresholds],
        budget=budget.name,
        target_tokens=budget.target_tokens,
        achieved=achieved,
        num_layers=adapter.num_layers,
        feature_layer=adapter.feature_layer,
        num_patches=adapter.num_patches,
        num_images=len(chosen),
        r_per_layer=r_all,
        schedule=schedule,
        token_order=token_order,
        provenance=Provenance(
            model=adapter.name,
            vision_hash=adapter.vision_weights_hash(),
            encoder=adapter.encoder_class,
            data=data_source,
            dtype=adapter.dtype_name,
            tokcomp_version=__version__,
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            seed=seed,
            batch_size=batch_size,
        ),
    )


@torch.no_grad()
def measure_tokens(
    adapter: VLMAdapter,
    items: Sequence[ImageItem],
    thresholds: Sequence[float],
    batch_size: int = 16,
    token_order: str = "spatial",
    on_step: Callable[[str, int, int], None] | None = None,
    world: World | None = None,
) -> list[int]:
    """Tokens per image that reach the VLM with the given thresholds (over ``world``'s processes)."""
    world = world or World()
    batches = list(_batches(list(items), batch_size))
    mine = range(world.rank, len(batches), world.size)
    counts: dict[int, list[int]] = {}
    for done, index in enumerate(mine, start=1):
        pixels = adapter.encoder_views([item.load() for item in batches[index]])
        encoded = adapter.encode(pixels, ThresholdRule(list(thresholds)), token_order=token_order)
        counts[index] = [e.num_tokens for e in encoded]
        if on_step:
            on_step("measuring", done, len(mine))
    counts = gather_dicts(counts, world)
    return [count for index in range(len(batches)) for count in counts[index]]
