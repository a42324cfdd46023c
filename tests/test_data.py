"""Image sources: folders, files, HF datasets on disk, built-in photographs, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tokcomp.data.images import SKIMAGE_NAMES, open_image_source
from tokcomp.errors import TokcompError


def _write_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((20, 30, 3), i * 20, dtype=np.uint8)).save(folder / f"im{i}.png")


def test_builtin_skimage_has_every_photograph():
    items = open_image_source("builtin:skimage")
    assert len(items) == len(SKIMAGE_NAMES)
    assert all(item.load().mode == "RGB" for item in items[:5])
    assert open_image_source("builtin:skimage/brick")[0].load().size == (512, 512)


def test_folder_is_searched_recursively_and_sorted(tmp_path):
    _write_images(tmp_path / "a", 2)
    _write_images(tmp_path / "b" / "c", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    items = open_image_source(str(tmp_path))
    assert [i.name.rsplit("/", 2)[-2:] for i in items] == [["a", "im0.png"], ["a", "im1.png"], ["c", "im0.png"]]


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((16, 16, 3), v, dtype=np.uint8)) for v in (0, 100, 200)]
    ds = datasets.Dataset.from_dict({"picture": images, "label": [0, 1, 2]}).cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    items = open_image_source(f"hf:{tmp_path / 'ds'}")
    assert len(items) == 3
    assert np.asarray(items[1].load())[0, 0, 0] == 100
    dd = datasets.DatasetDict({"validation": ds})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(open_image_source(f"hf:{tmp_path / 'dd'}:validation:picture")) == 3
    with pytest.raises(TokcompError, match="no split"):
        open_image_source(f"hf:{tmp_path / 'dd'}:test")
    with pytest.raises(TokcompError, match="no column"):
        open_image_source(f"hf:{tmp_path / 'ds'}::caption")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/no/such/folder", "does not exist"),
        ("builtin:skimage/unicorn", "unknown built-in image"),
        ("builtin:imagenet", "unknown built-in source"),
        ("builtin:tasks/zero", "positive number"),
        ("hf:nobody/no-such-dataset-here", "cannot load dataset"),
    ],
)
def test_bad_sources_raise_one_clear_error(spec, message):
    with pytest.raises(TokcompError, match=message):
        open_image_source(spec)


def test_builtin_task_pictures_are_a_stream_of_their_own():
    from tokcomp.data.tasks import make_item

    items = open_image_source("builtin:tasks/8")
    assert len(items) == 8 and len(open_image_source("builtin:tasks")) == 96
    pictures = [item.load() for item in items]
    assert all(p.size == (112, 112) for p in pictures)
    assert np.array_equal(np.asarray(pictures[0]), np.asarray(items[0].load()))  # deterministic
    train = make_item("tc_shapes", "train", 0).images[0]
    assert not np.array_equal(np.asarray(pictures[0]), np.asarray(train))


def test_empty_folder_and_corrupt_image(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokcompError, match="no images"):
        open_image_source(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not really a jpeg")
    items = open_image_source(str(tmp_path / "bad"))
    with pytest.raises(TokcompError, match="cannot read image"):
        items[0].load()
