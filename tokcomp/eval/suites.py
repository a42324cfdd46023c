"""lmms-eval hooks of the built-in suites (tc_shapes, tc_text, tc_multi, tc_motion).

Documents are rows of the eval split files written by ``tokcomp make-tasks``: pictures as PNG bytes.
A video comes back from ``doc_to_visual`` as one list of frames, which the tokcomp model reads as a clip.
"""

from __future__ import annotations

import io

from PIL import Image

from tokcomp.data.tasks import multi_image_prompt, normalize_answer

# Fields the hooks below read: every document has these, and its pictures in one of VISUAL_COLUMNS.
DOC_COLUMNS = ("task", "question", "answer")
VISUAL_COLUMNS = ("images", "video")


def _decode(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def doc_to_visual(doc: dict) -> list:
    """The document's images, or ``[frames]`` for a clip."""
    if doc.get("video"):
        return [[_decode(frame) for frame in doc["video"]]]
    return [_decode(image) for image in doc["images"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question; multi-image questions name each image before showing it (``first <image> ...``)."""
    if doc["task"] == "tc_multi":
        return multi_image_prompt(doc["question"], len(doc["images"]))
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match after normalisation (case, spaces and punctuation ignored)."""
    return {"accuracy": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
