"""Small local documents in the real schemas of lmms-eval's TextVQA, MVBench and VideoMME tasks.

The stock task definitions read them through ``tokcomp eval --data-files``; videos go where those
tasks look for them, under ``$HF_HOME``. Pictures come from scikit-image, clips from the tc_motion
generator, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from skimage import data as skdata

from tokcomp.data.tasks import make_item, write_mp4

PHOTOS = ("astronaut", "coffee", "chelsea")


def write_textvqa(path: Path) -> Path:
    """``textvqa_val`` documents: image, question, ten answers, question_id, ocr_tokens, ..."""
    from PIL import Image

    rows = {
        "image_id": [], "question_id": [], "question": [], "question_tokens": [], "image": [], "image_width": [],
        "image_height": [], "flickr_original_url": [], "flickr_300k_url": [], "answers": [], "image_classes": [],
        "set_name": [], "ocr_tokens": [],
    }  # fmt: skip
    for i, name in enumerate(PHOTOS):
        image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        question = "what is in the picture?"
        for key, value in {
            "image_id": f"sk{i}", "question_id": i, "question": question, "question_tokens": question.split(),
            "image": image, "image_width": image.width, "image_height": image.height, "flickr_original_url": "",
            "flickr_300k_url": "", "answers": [name] * 10, "image_classes": [name], "set_name": "val", "ocr_tokens": [],
        }.items():  # fmt: skip
            rows[key].append(value)
    features = datasets.Features(
        {
            **{k: datasets.Value("string") for k in ("image_id", "question", "flickr_original_url", "flickr_300k_url")},
            "question_id": datasets.Value("int64"),
            "question_tokens": datasets.Sequence(datasets.Value("string")),
            "image": datasets.Image(),
            "image_width": datasets.Value("int64"),
            "image_height": datasets.Value("int64"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "image_classes": datasets.Sequence(datasets.Value("string")),
            "set_name": datasets.Value("string"),
            "ocr_tokens": datasets.Sequence(datasets.Value("string")),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def _clips(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"clip{i}.mp4"
        write_mp4(make_item("tc_motion", "eval", i).video, folder / name)
        names.append(name)
    return names


def write_mvbench(folder: Path, hf_home: Path, count: int = 2) -> Path:
    """``mvbench_action_sequence`` documents (video, question, candidates, answer) and their clips."""
    import json

    clips = _clips(hf_home / "mvbench_video" / "star" / "Charades_segment", count)
    docs = [
        {"video": clip, "question": "What happened?", "candidates": ["a circle moved", "nothing"],
         "answer": "a circle moved", "accurate_start": 0.0, "accurate_end": 1.0}
        for clip in clips
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mvbench_action_sequence.json").write_text(json.dumps(docs))
    return folder


def write_videomme(path: Path, hf_home: Path, count: int = 2) -> Path:
    """``videomme`` documents (videoID, question, options, answer, ...) and their clips."""
    clips = _clips(hf_home / "videomme" / "data", count)
    rows = [
        {"video_id": f"{i:03d}", "duration": "short", "domain": "Knowledge",
         "sub_category": "Humanity & History", "url": "", "videoID": clip.removesuffix(".mp4"),
         "question_id": f"{i:03d}-1", "task_type": "Spatial Perception",
         "question": "How many objects move?", "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."],
         "answer": "A"}
        for i, clip in enumerate(clips)
    ]  # fmt: skip
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path
