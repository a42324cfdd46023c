"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models
via Pyramid Visual Redundancy Reduction"): the LLM runs in stages; at the end of each stage only the
``keep`` share (lambda) of the visual tokens still in the sequence goes on, those the last instruction
token attends to most, so the visual part shrinks geometrically with depth (FastV's ranking and cut at
several layers, ``cut.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tokcomp.errors import TokcompError
from tokcomp.methods.base import Method
from tokcomp.methods.cut import recorded_cut
from tokcomp.methods.fastv import FastVPruning
from tokcomp.methods.settings import check_ratio, register

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter


def stage_layers(text: str | None, num_layers: int) -> tuple[int, ...]:
    """The cut layers: ``a,b,c`` as given, or (None) the ends of four equal stages (8, 16, 24 of 32)."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return tuple(sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3)} - {num_layers}))
    try:
        layers = tuple(int(part) for part in str(text).replace(" ", "").split(","))
    except ValueError:
        raise TokcompError(f"pyramiddrop: layers must be comma-separated layer numbers, got '{text}'") from None
    if list(layers) != sorted(set(layers)) or not all(1 <= c < num_layers for c in layers):
        raise TokcompError(f"pyramiddrop: layers must increase, each between 1 and {num_layers - 1}, got '{text}'")
    return layers


@register
@dataclass
class PyramidDrop(Method):
    """PyramidDrop: at the end of each stage (``layers``, default the quarters of the LLM's depth) the
    ``keep`` share (lambda) of the visual tokens still in the sequence goes on, ranked by the attention
    of the last instruction token in that stage's last layer; positions are kept."""

    name: ClassVar[str] = "pyramiddrop"
    aliases: ClassVar[dict[str, str]] = {"lambda": "keep"}
    keep: float = 0.5
    layers: str | None = None  # e.g. "8,16,24" (the paper's LLaVA-1.5 stages); None: quarters of the depth

    @property
    def cuts_scale_with_depth(self) -> bool:
        return self.layers is None

    def check(self, adapter: VLMAdapter) -> None:
        check_ratio("pyramiddrop", self.keep)
        stage_layers(self.layers, adapter.language_model.config.num_hidden_layers)

    def attention_hooks(self, visual, cache):
        first, *later = stage_layers(self.layers, len(cache.layers))
        return [FastVPruning(layer=first, later=tuple(later), keep=self.keep, visual=visual,
                             num_layers=len(cache.layers))]  # fmt: skip

    def report(self, hooks, sample: int, account) -> dict:
        hook = recorded_cut(hooks, FastVPruning, sample, account)
        return {"pyramiddrop": {"layers": list(hook.cut_layers), "visual_per_stage": hook.visual_per_stage(sample)}}
