"""VidCom2 (Liu et al., EMNLP 2025, "Video Compression Commander: Plug-and-Play Inference Acceleration
for Video Large Language Models"): before the LLM, frames that stand out from the video get a larger
share of the token budget, and inside each frame the tokens most unlike both the whole video and their
own frame are kept.

Uniqueness is measured on the tokens' normalised features over the half of the channels that vary
least across the video (as the released code does): a multi-scale Gaussian similarity to the video's
mean token and to the frame's. A frame's budget is ``ratio * (1 + p - mean(p))`` of its tokens, ``p``
the softmax (temperature 0.01) of how unlike the video mean its tokens are; the budgets add up to
``ratio`` of the video (before the cap at a whole frame and rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from tokcomp.errors import TokcompError
from tokcomp.methods import selection as S
from tokcomp.methods.base import Method
from tokcomp.methods.settings import check_ratio, register
from tokcomp.models.visual import UnitTokens, select_positions

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter

SCALES = (0.125, 0.25, 0.5, 1.0, 2.0)  # bandwidths of the multi-scale Gaussian similarity


def steady_channels(x: torch.Tensor, share: float) -> torch.Tensor:
    """``x`` (N, D) restricted to the ``share`` of its channels with the least variance over the N tokens."""
    count = max(1, int(x.shape[-1] * share))
    variance = x.float().var(dim=0, unbiased=False)
    return x[:, S.top_k_stable(variance, count, largest=False).sort().values]


def gaussian_similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Sum over ``SCALES`` of ``exp(-|x - centre|^2 / (2 a))``, per row of ``x``."""
    distance = ((x - centre) ** 2).sum(dim=-1)
    return sum(torch.exp(-distance / (2 * a)) for a in SCALES)


def frame_budgets(uniqueness: torch.Tensor, ratio: float, tokens_per_frame: int, temperature: float) -> list[int]:
    """Tokens each frame keeps: ``ratio (1 + p - mean p)`` of its tokens, at most all, at least one;
    ``p`` the softmax of the frames' uniqueness at ``temperature`` (infinite: every frame ``ratio``)."""
    if math.isinf(temperature):
        probs = torch.full_like(uniqueness, 1 / uniqueness.numel())
    else:
        probs = torch.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    shares = (ratio * (1 + probs - probs.mean())).clamp(max=1.0)
    return [max(1, min(tokens_per_frame, round(float(s) * tokens_per_frame))) for s in shares]


def vidcom2_select(frames: torch.Tensor, ratio: float, channels: float = 0.5, temperature: float = 0.01
                   ) -> list[torch.Tensor]:  # fmt: skip
    """Per frame of ``frames`` (F, n, D), the indices (sorted) of the tokens VidCom2 keeps."""
    count, n, _ = frames.shape
    x = F.normalize(steady_channels(frames.reshape(count * n, -1).float(), channels), dim=-1).view(count, n, -1)
    to_video = gaussian_similarity(x, x.mean(dim=(0, 1), keepdim=True))  # (F, n)
    to_frame = gaussian_similarity(x, x.mean(dim=1, keepdim=True))
    budgets = frame_budgets(-to_video.mean(dim=1), ratio, n, temperature)
    return [S.top_k_stable(to_video[f] + to_frame[f], k, largest=False).sort().values for f, k in enumerate(budgets)]


@register
@dataclass
class VidCom2(Method):
    """VidCom2 on video: per-frame budgets from how unlike the video each frame is, then per frame the
    tokens most unlike the video and the frame (``ratio`` of the video overall; images pass untouched)."""

    name: ClassVar[str] = "vidcom2"
    inputs: ClassVar[frozenset[str]] = frozenset({"video"})
    ratio: float = 0.25  # the paper's main setting: 25 % of the video's tokens
    temperature: float = 0.01
    channels: float = 0.5  # share of the least-varying channels the similarities use

    @property
    def keeps_positions(self) -> bool:
        return True

    def check(self, adapter: VLMAdapter) -> None:
        check_ratio("vidcom2", self.ratio)
        if not 0 < self.channels <= 1 or not self.temperature > 0:
            raise TokcompError("vidcom2: channels must be in (0, 1] and temperature above 0")

    def select(self, adapter: VLMAdapter, kind: str, tokens: UnitTokens) -> UnitTokens:
        if kind != "video" or tokens.num_frames == 0:
            return tokens
        n, count = tokens.frame_tokens, tokens.num_frames
        full = tokens.position_features()
        kept = vidcom2_select(full[: count * n].reshape(count, n, -1), self.ratio, self.channels, self.temperature)
        positions = [idx.to(full.device) + f * n for f, idx in enumerate(kept)]
        positions.append(torch.arange(count * n, full.shape[0], device=full.device))  # the trailing newline
        return select_positions(tokens, torch.cat(positions))
