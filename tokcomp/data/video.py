"""Video frames from a file (decoded with PyAV) or a folder of frames, sampled uniformly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tokcomp.data.images import IMAGE_SUFFIXES, _open_file, _to_rgb
from tokcomp.defaults import DEFAULT_FRAMES
from tokcomp.errors import TokcompError


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames (all of them if fewer)."""
    if total <= 0:
        return []
    if count >= total:
        return list(range(total))
    return np.linspace(0, total - 1, count).round().astype(int).tolist()


def load_video(path: str | Path, num_frames: int = DEFAULT_FRAMES) -> list[Image.Image]:
    """Uniformly sampled RGB frames of a video file or of a folder of frame images."""
    if num_frames < 1:
        raise TokcompError("--frames must be at least 1")
    path = Path(path).expanduser()
    if not path.exists():
        raise TokcompError(f"video {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise TokcompError(f"frame folder {path} contains no images")
        frames = []
        for i in uniform_indices(len(files), num_frames):
            try:
                frames.append(_to_rgb(_open_file(files[i])))
            except OSError as exc:
                raise TokcompError(f"cannot read frame {files[i]}: {exc}") from exc
        return frames
    return _decode_file(path, num_frames)


def _decode_file(path: Path, num_frames: int) -> list[Image.Image]:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a declared dependency of the video extra
        raise TokcompError("reading video files needs PyAV: pip install av") from exc
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise TokcompError(f"{path} has no video stream")
            total = container.streams.video[0].frames
            if total > 0:  # the container knows its length: convert only the sampled frames
                wanted = set(uniform_indices(total, num_frames))
                frames = [f.to_image() for i, f in enumerate(container.decode(video=0)) if i in wanted]
            else:
                decoded = list(container.decode(video=0))
                frames = [decoded[i].to_image() for i in uniform_indices(len(decoded), num_frames)]
    except TokcompError:
        raise
    except Exception as exc:  # PyAV raises its own error hierarchy for unreadable files
        raise TokcompError(f"cannot decode video {path}: {str(exc).splitlines()[0]}") from exc
    if not frames:
        raise TokcompError(f"video {path} has no frames")
    return [f.convert("RGB") for f in frames]
