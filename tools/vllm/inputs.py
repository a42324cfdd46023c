"""Inputs for the vLLM scripts (test_plugin.py, bench.py): random videos with the metadata vLLM asks for."""

from __future__ import annotations


def video(seed: int, frames: int, size: int) -> tuple:
    """A random (frames, size, size, 3) uint8 video at 2 fps, with its metadata."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
    return pixels, {"total_num_frames": frames, "fps": 2.0, "frames_indices": list(range(frames)),
                    "duration": frames / 2.0}  # fmt: skip
