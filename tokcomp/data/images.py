"""Image sources for calibration and inspection: folders, files, HF datasets, built-in photographs.

Source strings:
  ``builtin:skimage``           the photographs shipped inside scikit-image's wheel
  ``builtin:skimage/NAME``      one of them (``brick``, ``astronaut``, ...)
  ``builtin:tasks[/N]``         N pictures (default 96) from tokcomp-tiny's task generators, calibration stream
  ``hf:NAME[:SPLIT[:COLUMN]]``  a Hugging Face dataset from a local folder or the warm cache
  ``PATH``                      an image file, or a folder searched recursively for images
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tokcomp.errors import TokcompError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
# Photographs and textures that ship inside scikit-image (no download needed).
SKIMAGE_NAMES = [
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
]


@dataclass(frozen=True)
class ImageItem:
    """A named image that is decoded only when ``load`` is called."""

    name: str
    loader: Callable[[], Image.Image]

    def load(self) -> Image.Image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = self.loader()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise TokcompError(f"image {self.name} is too large to decode safely: {_one_line(exc)}") from None
        except UnidentifiedImageError:
            raise TokcompError(f"cannot read image {self.name}: not an image file PIL can identify") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise TokcompError(f"cannot read image {self.name}: {_one_line(exc)}") from exc
        return _to_rgb(image)


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            array = (255 * (array.astype(np.float64) / max(float(array.max()), 1e-9))).astype(np.uint8)
        image = Image.fromarray(array)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def _skimage_item(name: str) -> ImageItem:
    import skimage.data

    if name not in SKIMAGE_NAMES:
        raise TokcompError(f"unknown built-in image '{name}' (choose from {', '.join(SKIMAGE_NAMES)})")
    return ImageItem(f"skimage/{name}", lambda: _to_rgb(getattr(skimage.data, name)()))


def _open_file(path: Path) -> Image.Image:
    """Decode an image file; one past PIL's decompression-bomb limit is refused, not decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                image.load()
                return image.copy()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise TokcompError(f"image {path} is too large to decode safely: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _folder_items(folder: Path) -> list[ImageItem]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [ImageItem(str(p), lambda p=p: _open_file(p)) for p in files]


def _hf_items(spec: str) -> list[ImageItem]:
    parts = spec.split(":")
    name = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else None
    column = parts[2] if len(parts) > 2 and parts[2] else None
    if os.environ.get("TOKCOMP_ALLOW_DOWNLOAD") != "1":
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by `datasets` when first imported
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(name)
    saved_to_disk = folder.is_dir() and any((folder / f).exists() for f in ("state.json", "dataset_dict.json"))
    try:
        import datasets

        loaded = datasets.load_from_disk(name) if saved_to_disk else datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for a missing or unreadable dataset
        raise TokcompError(f"cannot load dataset '{name}': {str(exc).splitlines()[0]}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in loaded else next(iter(loaded))
        if split not in loaded:
            raise TokcompError(f"dataset '{name}' has no split '{split}' (has: {', '.join(loaded)})")
        loaded = loaded[split]
    if column is None:
        image_columns = [k for k, f in loaded.features.items() if isinstance(f, datasets.Image)]
        column = image_columns[0] if image_columns else "image"
    if column not in loaded.column_names:
        raise TokcompError(f"dataset '{name}' has no column '{column}' (has: {', '.join(loaded.column_names)})")
    column_data = loaded[column]

    def item(i: int) -> ImageItem:
        def load() -> Image.Image:
            value = column_data[i]
            if isinstance(value, str):
                return _open_file(Path(value))
            if isinstance(value, dict) and value.get("bytes") is not None:
                import io

                return Image.open(io.BytesIO(value["bytes"]))
            return value

        return ImageItem(f"{name}[{i}]", load)

    return [item(i) for i in range(len(loaded))]


TASK_PICTURES = 96


def _task_items(count: int) -> list[ImageItem]:
    """Pictures drawn like the tc_* suites' (scenes, text, single objects, video frames), from a stream of
    their own: neither the training nor the eval items."""
    from tokcomp.data.tasks import TASKS, make_item

    def load(task: str, index: int) -> Image.Image:
        item = make_item(task, "calib", index)
        return item.video[len(item.video) // 2] if item.video else item.images[0]

    return [
        ImageItem(f"{TASKS[i % len(TASKS)]}-{i}", lambda t=TASKS[i % len(TASKS)], k=i: load(t, k)) for i in range(count)
    ]


def open_image_source(spec: str) -> list[ImageItem]:
    """List the images of a source string; raises :class:`TokcompError` when there are none."""
    if spec == "builtin:skimage":
        items = [_skimage_item(n) for n in SKIMAGE_NAMES]
    elif spec.startswith("builtin:skimage/"):
        items = [_skimage_item(spec.split("/", 1)[1])]
    elif spec == "builtin:tasks" or spec.startswith("builtin:tasks/"):
        count = spec.partition("/")[2] or str(TASK_PICTURES)
        if not count.isdigit() or int(count) < 1:
            raise TokcompError(f"builtin:tasks/N takes a positive number of pictures, not '{count}'")
        items = _task_items(int(count))
    elif spec.startswith("builtin:"):
        raise TokcompError(
            f"unknown built-in source '{spec}' (use builtin:skimage, builtin:skimage/NAME or builtin:tasks[/N])"
        )
    elif spec.startswith("hf:"):
        items = _hf_items(spec[3:])
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise TokcompError(f"image source {spec} does not exist")
        items = _folder_items(path) if path.is_dir() else [ImageItem(str(path), lambda: _open_file(path))]
    if not items:
        raise TokcompError(f"image source {spec} contains no images")
    return items
