"""tokcomp's token selection inside vLLM, as a vLLM general plugin (entry point ``vllm.general_plugins``).

vLLM (0.32) sizes a video's placeholder tokens from ``--video-pruning-rate`` q before it has seen the
content (EVS's count: ``max(tokens per frame, int((1 - q) * tokens))``) and then asks
``compute_retention_mask`` which of the video's tokens fill that count. With ``TOKCOMP_VLLM_METHOD`` set in
the server's environment (it reaches the engine core and the workers, where vLLM loads plugins again),
this plugin answers that question with a tokcomp method (``random``, ``divprune``, or ``dycoke``: its TTM)
in Qwen2.5-VL and Qwen3-VL; vLLM's own code still prunes the embeddings, moves the M-RoPE positions and
schedules. Unset (or ``evs``), no selection is patched (on CPU the plugin still fixes vLLM's runner so that
pruning runs at all). The count stays vLLM's, so a method whose count depends on the content (adaptive,
DyMU, DyCoke's own TTM) fills vLLM's count instead of choosing one.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tokcomp.methods import selection as S
from tokcomp.methods.dycoke import ttm_references
from tokcomp.methods.pruning import DivPrune, RandomPruning

METHOD_ENV = "TOKCOMP_VLLM_METHOD"
SEED_ENV = "TOKCOMP_VLLM_SEED"
TRACE_ENV = "TOKCOMP_VLLM_TRACE"  # a file: every selection appends one JSON line (tests, debugging)
METHODS = ("random", "divprune", "dycoke")
PATCHED_MODULES = ("vllm.model_executor.models.qwen2_5_vl", "vllm.model_executor.models.qwen3_vl")


def dycoke_scores(embeddings: torch.Tensor, frames: int, window: int = 4) -> torch.Tensor:
    """DyCoke's TTM as scores: a window's anchor frame first, every other token by how unlike it is to the
    token at its place in the frame TTM compares it with (DyCoke's references, tokcomp's ``ttm_references``)."""
    per_frame = embeddings.shape[0] // frames
    grid = embeddings.float().reshape(frames, per_frame, -1)
    scores = torch.empty(frames, per_frame)
    for frame, reference in enumerate(ttm_references(frames, window)):
        if reference is None:
            scores[frame] = 3.0  # above any 1 - cosine (at most 2)
        else:
            scores[frame] = 1 - F.cosine_similarity(grid[frame], grid[reference], dim=-1)
    return scores.flatten()


def method_scores(method: str, embeddings: torch.Tensor, seed: int = 0, frames: int = 1) -> torch.Tensor:
    """(n,) scores of one video's tokens by the tokcomp method (higher is kept first); ``frames``: the
    video's temporal grid (its tokens are frame after frame, each frame in raster order)."""
    if method == "random":
        return RandomPruning(seed=seed).score(embeddings, None, 0)
    if method == "divprune":
        return DivPrune().score(embeddings, None, 0)
    if method == "dycoke":
        return dycoke_scores(embeddings, frames)
    raise unknown_method(method)


def unknown_method(method: str) -> ValueError:
    return ValueError(f"{METHOD_ENV}={method!r}: the plugin applies one of {', '.join(METHODS)} (or evs: vLLM's own)")


def keep_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` best-scoring positions (near-ties to the lower index)."""
    mask = torch.zeros(scores.shape[0], dtype=torch.bool)
    mask[S.top_k_stable(scores, min(count, scores.shape[0]))] = True
    return mask


def retention_mask(method: str, embeddings: torch.Tensor, count: int, seed: int = 0, frames: int = 1) -> torch.Tensor:
    """Which of a video's (n, H) merged tokens fill vLLM's ``count`` placeholders (on their device)."""
    scores = method_scores(method, embeddings.detach().float().cpu(), seed, frames)
    return keep_mask(scores, count).to(embeddings.device)


def _trace(record: dict) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with Path(path).open("a") as out:
            out.write(json.dumps(record) + "\n")


def make_mask_function(method: str, seed: int = 0):
    """A drop-in for vLLM's ``compute_retention_mask(embeds, size_thw, spatial_merge_size, q)``."""
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    def compute_retention_mask(video_embeds, video_size_thw, spatial_merge_size: int, q: float) -> torch.Tensor:
        frames, height, width = map(int, video_size_thw)
        per_frame = (height // spatial_merge_size) * (width // spatial_merge_size)
        count = compute_retained_tokens_count(per_frame, frames, q)
        mask = retention_mask(method, video_embeds, count, seed, frames)
        _trace({"method": method, "thw": [frames, height, width], "tokens": int(mask.numel()), "count": count,
                "kept": mask.nonzero().flatten().tolist()})  # fmt: skip
        return mask

    return compute_retention_mask


def install_mask_function(function) -> None:
    """Make ``function`` the ``compute_retention_mask`` the Qwen VL modules call (they look it up per call)."""
    for name in PATCHED_MODULES:
        importlib.import_module(name).compute_retention_mask = function


def enable_pruning_on_cpu() -> None:
    """vLLM 0.32's CPU model runner replaces ``load_model`` without the line that turns on pruning support.

    Without it any ``video_pruning_rate`` (vLLM's own EVS included) fails on CPU merging the pruned
    embeddings, which still carry their 4 position channels; this sets the flag as the GPU runner does.
    """
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    load_model = CPUModelRunner.load_model
    if getattr(load_model, "tokcomp_pruning_flag", False):
        return

    def load_model_with_pruning_flag(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        config = self.model_config.multimodal_config
        enabled = config is not None and config.is_multimodal_pruning_enabled()
        self.is_multimodal_pruning_enabled = bool(supports_multimodal_pruning(self.get_model()) and enabled)
        self.requires_sequential_video_encoding = hasattr(self.get_model(), "requires_sequential_video_encoding")

    load_model_with_pruning_flag.tokcomp_pruning_flag = True
    CPUModelRunner.load_model = load_model_with_pruning_flag


def register() -> None:
    """vLLM calls this in every process: patch the Qwen VL modules' mask function when a method is set."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        enable_pruning_on_cpu()
    method = os.environ.get(METHOD_ENV, "").strip().lower()
    if method in ("", "evs"):
        return
    if method not in METHODS:
        raise unknown_method(method)  # at start-up, before any request
    install_mask_function(make_mask_function(method, int(os.environ.get(SEED_ENV, "0"))))
